"""What the CLI writes: one JSON line per frame (`JsonlWriter`, the statuses and event lines) and heat-map overlays.

Each JSON line is written and flushed on its own, so a results file can be followed while it grows (`tail -f`)
and a crash loses at most the line being written. (The file is appended to line by line rather than written
atomically as a whole: a multi-hour run must be readable while it runs.) An existing results file is never
replaced unless asked (`overwrite=True`, the CLI's --overwrite).
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from mrkd.core.wire import STATUS_INVALID_SCORE, STATUS_OK

__all__ = ["STATUS_OK", "STATUS_INVALID_SCORE", "STATUS_DROPPED", "STATUS_ERROR", "STATUS_LATE", "STATUS_SPOOLED",
           "EVENT_GAP", "EVENT_GAVE_UP", "OutputInUse", "lock_exclusively", "JsonlWriter", "read_jsonl",
           "earlier_heatmaps", "save_heatmap_overlay"]

STATUS_DROPPED = "dropped"
STATUS_ERROR = "error"
STATUS_LATE = "late"  # answered from the spool once a server was back (capture_time and inspected_time)
STATUS_SPOOLED = "spooled"  # the run ended with the frame in the spool: the next run with that spool inspects it
# Lines that are not frames: a source's gap (it was lost and came back) and a camera that gave up.
EVENT_GAP = "gap"
EVENT_GAVE_UP = "gave_up"


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null (the status says why); numpy scalars become Python."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class OutputInUse(FileExistsError):
    """Another client (another process) is writing the same results file or spool."""


def lock_exclusively(fd: int, path: Path, what: str) -> None:
    """A non-blocking exclusive flock on `fd`, held until it is closed; OutputInUse when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputInUse(f"{path} is in use by another client ({what}); give each client its own") from None


class JsonlWriter:
    """Thread-safe JSON-lines writer; every line is flushed when written. Refuses an existing, non-empty file
    unless `overwrite` (a rerun must not wipe the results of the previous run), and a file that another client is
    writing (an exclusive lock is held while it is open: two clients never interleave lines in one file)."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"--out {self.path} is a folder; give a file name such as results.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating, locked, and only then checked and emptied: a second client started on the
        # same file finds it locked and leaves it alone.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        lock_exclusively(fd, self.path, "its --out")
        if not overwrite and os.fstat(fd).st_size > 0:
            os.close(fd)
            raise FileExistsError(
                f"{self.path} already exists; pass --overwrite to replace it, or choose another --out")
        os.ftruncate(fd, 0)
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8")
        self._lock = threading.Lock()
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_json_safe(record), separators=(",", ":"), allow_nan=False, default=str)
        with self._lock:
            if self._file is None:
                raise ValueError(f"{self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (a last, partly written line is reported, not skipped)."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc
    return records


def earlier_heatmaps(folder: str | Path, cameras: Sequence[str]) -> list[Path]:
    """Heat maps an earlier run left in `folder` for these cameras (what save_heatmap_overlay would replace)."""
    return sorted(p for camera in cameras for p in (Path(folder) / camera).glob(f"{camera}_*.png"))


def save_heatmap_overlay(folder: str | Path, camera: str, index: int, image: np.ndarray,
                         anomaly_map: np.ndarray) -> Path:
    """Writes <folder>/<camera>/<camera>_<index:06d>.png (atomic) and returns its path."""
    from mrkd.runtime.visualize import overlay, save_png

    path = Path(folder) / camera / f"{camera}_{index:06d}.png"
    return save_png(path, overlay(image, anomaly_map))
