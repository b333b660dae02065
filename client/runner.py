"""Runs several cameras against an InspectionClient and records every frame read: a result, a drop or an error.

Per camera, a reader thread reads frames into a bounded FrameQueue and a dispatcher thread sends them, holding at
most `max_in_flight` requests in flight: it takes a request slot first and only then the queued frame, so a live
camera's queue keeps the freshest frames (policy `oldest`). Answers arrive on gRPC threads and are recorded there.

Stopping (Ctrl-C, `duration`, `max_frames`): the readers stop reading, frames still queued are recorded as
dropped ("stopped"), requests in flight are waited for up to `shutdown_timeout` seconds, and any still unanswered
then are recorded as errors. So the output always holds exactly one line per frame read.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .events import CAMERA_RUNNING, CAMERA_STOPPED, RunObserver
from .frame_queue import FrameQueue, QueueClosed
from .inspection import InspectionClient, InspectionError, InspectionResult
from .report import STATUS_DROPPED, STATUS_ERROR, STATUS_OK, CameraStats, JsonlWriter, save_heatmap_overlay
from .sources import Frame, FrameSource

_POLL_S = 0.1  # how often blocked threads look at the stop flag


@dataclass
class RunOptions:
    max_in_flight: int = 4
    queue_size: int | None = None  # None: the same as max_in_flight
    drop_policy: str = "oldest"
    heatmap_dir: Path | None = None
    shutdown_timeout: float = 10.0
    max_frames: int | None = None  # per camera
    duration: float | None = None  # seconds, then stop as on Ctrl-C

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if self.queue_size is not None and self.queue_size < 1:
            raise ValueError(f"--queue-size must be at least 1, got {self.queue_size}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"--duration must be positive, got {self.duration}")


class _Camera:
    def __init__(self, name: str, source: FrameSource, options: RunOptions):
        self.name = name
        self.source = source
        self.queue: FrameQueue[Frame] = FrameQueue(options.queue_size or options.max_in_flight, options.drop_policy)
        self.slots = threading.Semaphore(options.max_in_flight)
        self.stats = CameraStats(name)
        self.pending: dict[int, Frame] = {}  # frames sent and not yet recorded, by index
        self.pending_lock = threading.Condition()
        self.failure = ""  # why the source stopped early, if it did
        self.threads: list[threading.Thread] = []


class MultiCameraRunner:
    def __init__(
        self,
        cameras: Sequence[tuple[str, FrameSource]],
        client: InspectionClient,
        writer: JsonlWriter,
        options: RunOptions | None = None,
        observer: RunObserver | None = None,
    ):
        names = [name for name, _ in cameras]
        if not cameras:
            raise ValueError("at least one --camera is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {', '.join(names)}")
        self.options = options or RunOptions()
        self.client = client
        self.writer = writer
        self.cameras = [_Camera(name, source, self.options) for name, source in cameras]
        self.stop_event = threading.Event()
        self.abort_event = threading.Event()  # stop waiting for answers in flight (a second Ctrl-C)
        self.observer = observer or RunObserver()
        self._observer_failed = False

    @property
    def stats(self) -> list[CameraStats]:
        return [c.stats for c in self.cameras]

    def stop(self) -> None:
        """Asks every camera to stop reading; run() then records what is left and returns."""
        self.stop_event.set()

    def abort(self) -> None:
        """Like stop(), and requests still in flight are recorded as errors without waiting for them."""
        self.stop_event.set()
        self.abort_event.set()

    def run(self) -> list[dict[str, Any]]:
        """Blocks until every source ended (or stop()); returns the per-camera summaries."""
        deadline = time.monotonic() + self.options.duration if self.options.duration else None
        for camera in self.cameras:
            camera.stats.started = time.monotonic()
            self._notify("camera_state", camera.name, CAMERA_RUNNING)
            for target, role in ((self._read, "reader"), (self._dispatch_until_done, "dispatcher")):
                thread = threading.Thread(target=target, args=(camera,), name=f"{camera.name}-{role}", daemon=True)
                camera.threads.append(thread)
                thread.start()
        # The main thread only waits, in short steps, so that Ctrl-C reaches the signal handler at once.
        for camera in self.cameras:
            for thread in camera.threads:
                while thread.is_alive():
                    thread.join(_POLL_S)
                    if deadline is not None and time.monotonic() >= deadline:
                        self.stop()
        for camera in self.cameras:
            self._finish(camera)
        for camera in self.cameras:
            self._wait_in_flight(camera, time.monotonic() + self.options.shutdown_timeout)
            camera.stats.finished = time.monotonic()
            camera.source.close()
        return [c.stats.summary() for c in self.cameras]

    # -- threads -------------------------------------------------------------------------------------------------
    def _read(self, camera: _Camera) -> None:
        try:
            for frame in camera.source.read(camera.name, self.stop_event):
                camera.stats.frame_read()
                self._enqueue(camera, frame)
                if self.options.max_frames is not None and frame.index + 1 >= self.options.max_frames:
                    break
        except Exception as exc:  # the source broke (stream lost, codec error): this camera ends, others go on
            camera.failure = f"{type(exc).__name__}: {exc}"
            print(f"camera {camera.name}: source stopped: {camera.failure}", file=sys.stderr, flush=True)
        finally:
            camera.queue.close()

    def _enqueue(self, camera: _Camera, frame: Frame) -> None:
        if camera.source.live:
            dropped = camera.queue.put(frame)
            if dropped is not None:
                self._record_drop(camera, dropped, f"queue full (drop policy: {camera.queue.drop_policy})")
            return
        while True:  # not live: wait for room, nothing is dropped
            try:
                if camera.queue.put(frame, block=True, timeout=_POLL_S) is None:
                    return
            except QueueClosed:
                pass
            if self.stop_event.is_set():
                self._record_drop(camera, frame, "stopped before it was sent")
                return

    def _dispatch_until_done(self, camera: _Camera) -> None:
        try:
            self._dispatch(camera)
        finally:
            self._notify("camera_state", camera.name, CAMERA_STOPPED)

    def _dispatch(self, camera: _Camera) -> None:
        while not self.stop_event.is_set():
            if not camera.slots.acquire(timeout=_POLL_S):
                continue
            frame = None
            while frame is None and not self.stop_event.is_set():
                frame = camera.queue.get(timeout=_POLL_S)
                if frame is None and camera.queue.closed and len(camera.queue) == 0:
                    camera.slots.release()
                    return
            if frame is None:
                camera.slots.release()
                return
            self._send(camera, frame)

    def _send(self, camera: _Camera, frame: Frame) -> None:
        if frame.image is None:
            self._record(camera, frame, STATUS_ERROR, error=f"unreadable frame: {frame.read_error}")
            camera.slots.release()
            return
        with camera.pending_lock:
            camera.pending[frame.index] = frame

        def done(result: InspectionResult | None, error: InspectionError | None) -> None:
            try:
                if result is not None:
                    self._record_result(camera, frame, result)
                else:
                    assert error is not None
                    self._record(
                        camera, frame, STATUS_ERROR, sent=True, server=error.server or None, attempts=error.attempts,
                        latency_ms=round(error.latency_ms, 3), error=str(error),
                    )
            finally:
                camera.slots.release()

        self._notify("frame_sent", camera.name, frame)
        try:
            self.client.submit(frame.image, done)
        except Exception as exc:  # the frame could not be encoded: nothing was sent
            self._record(camera, frame, STATUS_ERROR, sent=True, error=f"{type(exc).__name__}: {exc}")
            camera.slots.release()

    # -- shutdown ------------------------------------------------------------------------------------------------
    def _finish(self, camera: _Camera) -> None:
        for frame in camera.queue.drain():
            self._record_drop(camera, frame, "stopped before it was sent")

    def _wait_in_flight(self, camera: _Camera, deadline: float) -> None:
        with camera.pending_lock:
            while camera.pending and not self.abort_event.is_set() and time.monotonic() < deadline:
                camera.pending_lock.wait(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            left = sorted(camera.pending)
        for index in left:
            with camera.pending_lock:
                frame = camera.pending.get(index)
            if frame is not None:
                self._record(camera, frame, STATUS_ERROR, sent=True, error="no answer before shutdown")

    # -- recording -----------------------------------------------------------------------------------------------
    def _record_result(self, camera: _Camera, frame: Frame, result: InspectionResult) -> None:
        heatmap = None
        if result.is_anomalous and self.options.heatmap_dir is not None and result.anomaly_map is not None:
            try:
                assert frame.image is not None
                heatmap = str(save_heatmap_overlay(
                    self.options.heatmap_dir, camera.name, frame.index, frame.image, result.anomaly_map
                ))
            except OSError as exc:
                print(f"camera {camera.name}: cannot write heat map: {exc}", file=sys.stderr, flush=True)
        self._record(
            camera, frame, STATUS_OK, sent=True,
            server=result.server, latency_ms=round(result.latency_ms, 3), score=result.score,
            raw_score=result.raw_score, verdict=result.verdict, attempts=result.attempts, heatmap=heatmap,
            answer=result,
        )

    def _record_drop(self, camera: _Camera, frame: Frame, reason: str) -> None:
        self._record(camera, frame, STATUS_DROPPED, drop_reason=reason)

    def _record(self, camera: _Camera, frame: Frame, status: str, sent: bool = False,
                answer: InspectionResult | None = None, **fields: Any) -> None:
        """Writes the frame's line. A sent frame is recorded by whoever takes it out of `pending` first (its
        answer, or the shutdown's 'no answer'), so a late answer cannot give a frame a second line."""
        if sent:
            with camera.pending_lock:
                if camera.pending.pop(frame.index, None) is None:
                    return
                camera.pending_lock.notify_all()
        record: dict[str, Any] = {
            "camera": camera.name,
            "frame": frame.index,
            "source": frame.source_name,
            "capture_time": frame.capture_time_iso,
            "status": status,
        }
        record.update({k: v for k, v in fields.items() if v is not None})
        self.writer.write(record)
        camera.stats.add(status, fields.get("latency_ms"), fields.get("verdict") == "anomalous")
        self._notify("frame_recorded", camera.name, frame, record, answer)

    def _notify(self, event: str, *args: Any) -> None:
        """Tells the observer (see client/events.py); an observer that raises is reported once, never fatal."""
        try:
            getattr(self.observer, event)(*args)
        except Exception as exc:
            if not self._observer_failed:
                self._observer_failed = True
                print(f"observer {type(self.observer).__name__}.{event} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
