"""The observer hook of MultiCameraRunner: what a run reports while it goes (the live dashboard is one observer).

The runner calls these methods from its own threads (camera readers, dispatchers and gRPC callbacks), so an
observer keeps every call short, never blocks and never raises; the runner reports an observer's exception once
and goes on (a broken observer never costs a frame its JSONL line).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inspection import InspectionResult
    from .sources import Frame

from .stats import CameraState

CAMERA_STATES = tuple(state.value for state in CameraState)  # a camera's live state, as camera_state() gets it


class RunObserver:
    """No-op base: override what you need."""

    def camera_state(self, camera: str, state: str) -> None:
        """The camera's live state changed (one of CAMERA_STATES)."""

    def frame_sent(self, camera: str, frame: "Frame") -> None:
        """The frame went to a server (its answer or error follows as frame_recorded)."""

    def frame_recorded(self, camera: str, frame: "Frame", record: dict[str, Any],
                       result: "InspectionResult | None") -> None:
        """Called once per JSONL line, right after it was written: `record` is that line, `result` the server's
        answer for status "ok" or "late" (with the frame's anomaly map when the client asked for maps). Dispatches to
        frame_answered, frame_dropped and frame_failed."""
        status = record.get("status")
        if status in ("ok", "late"):
            self.frame_answered(camera, frame, record, result)
        elif status == "dropped":
            self.frame_dropped(camera, frame, record)
        elif status == "spooled":
            self.frame_spooled(camera, frame, record)
        else:
            self.frame_failed(camera, frame, record)

    def frame_answered(self, camera: str, frame: "Frame", record: dict[str, Any],
                       result: "InspectionResult | None") -> None:
        """A verdict came back (record["verdict"], record["score"])."""

    def frame_dropped(self, camera: str, frame: "Frame", record: dict[str, Any]) -> None:
        """The frame was dropped (record["drop_reason"])."""

    def frame_spooled(self, camera: str, frame: "Frame", record: dict[str, Any]) -> None:
        """The run ended with the frame still in the spool: the next run with that spool inspects it."""

    def frame_failed(self, camera: str, frame: "Frame", record: dict[str, Any]) -> None:
        """The frame got no answer (record["error"])."""

    def server_state(self, url: str, up: bool, detail: str = "", product: str = "") -> None:
        """A server became ready (up) or stopped being ready, for `product`'s model."""


class Observers(RunObserver):
    """Several observers as one (the dashboard and the MQTT publisher): each gets every call, in order; one that
    raises does not keep the others from theirs (the first exception is raised after all were called)."""

    def __init__(self, observers: list[RunObserver]):
        self.observers = observers

    def _each(self, method: str, *args: Any) -> None:
        failure: Exception | None = None
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def camera_state(self, camera: str, state: str) -> None:
        self._each("camera_state", camera, state)

    def frame_sent(self, camera: str, frame: "Frame") -> None:
        self._each("frame_sent", camera, frame)

    def frame_recorded(self, camera: str, frame: "Frame", record: dict[str, Any],
                       result: "InspectionResult | None") -> None:
        self._each("frame_recorded", camera, frame, record, result)

    def server_state(self, url: str, up: bool, detail: str = "", product: str = "") -> None:
        self._each("server_state", url, up, detail, product)
