"""What a run of MultiCameraRunner (runner.py) is given besides its cameras' sources: the run's options, and per
camera its product's client and its own request limits (`CameraPlan`; a plant file sets these per camera)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .inspection import DEFAULT_RETRY_TIMEOUT
from .spool import Spool

if TYPE_CHECKING:
    from .inspection import InspectionClient

DEFAULT_SPOOL_WAIT = 600.0  # seconds the end of a run waits for a server to inspect what is in the spool


@dataclass
class RunOptions:
    max_in_flight: int = 4
    queue_size: int | None = None  # None: the same as max_in_flight
    drop_policy: str = "oldest"
    heatmap_dir: Path | None = None
    shutdown_timeout: float = 10.0
    max_frames: int | None = None  # per camera
    duration: float | None = None  # seconds, then stop as on Ctrl-C
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT  # seconds a frame may wait for a ready server
    spool: Spool | None = None  # frames that waited longer go there instead of becoming errors
    spool_wait: float = DEFAULT_SPOOL_WAIT  # at the end: seconds without a ready server before the spool is left

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if self.queue_size is not None and self.queue_size < 1:
            raise ValueError(f"--queue-size must be at least 1, got {self.queue_size}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"--duration must be positive, got {self.duration}")
        if self.retry_timeout < 0:
            raise ValueError(f"--retry-timeout must not be negative, got {self.retry_timeout}")
        if self.spool_wait < 0:
            raise ValueError(f"--spool-wait must not be negative, got {self.spool_wait}")


@dataclass(frozen=True)
class CameraPlan:
    """One camera's own settings in a run; None: the runner's client, or the RunOptions' value."""

    client: "InspectionClient | None" = None  # its product's client (client.model is the product)
    max_in_flight: int | None = None
    queue_size: int | None = None
    drop_policy: str | None = None

    def options(self, run: RunOptions) -> RunOptions:
        """The run's options with this camera's limits (checked as the run's are)."""
        from dataclasses import replace

        limits = {"max_in_flight": self.max_in_flight, "queue_size": self.queue_size, "drop_policy": self.drop_policy}
        return replace(run, **{k: v for k, v in limits.items() if v is not None})
