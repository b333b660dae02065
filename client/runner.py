"""Runs several cameras against an InspectionClient and records every frame read: a result, a drop or an error.

Per camera, a reader thread reads frames into a bounded FrameQueue and a dispatcher thread sends them, holding at
most `max_in_flight` requests in flight: it takes a request slot first and only then the queued frame, so a live
camera's queue keeps the freshest frames (policy `oldest`). Answers arrive on gRPC threads and are recorded there.

No server ready: frames are not sent to be burned as errors. The dispatcher waits; the frames stay in the queue (a
live camera drops by its policy when the queue is full, other sources pause reading) and frames already sent wait
in the client to be resent (see inspection.py). Each frame waits at most `retry_timeout` seconds for a ready server
(counted from when it was read, or from when the servers went away if that was later; for a sent frame, from its
failure); a frame that waited longer is recorded as an error.

A camera's live state (`CameraStats.state`, a `stats.CameraState`): running, waiting_for_server, reconnecting (its
stream was lost, see sources.py), stopped. Source events are lines of their own: a "gap" line when a lost stream
came back, a "gave_up" line (with the reason) when a camera's source failed for good.

With a spool (`RunOptions.spool`, client/spool.py), such a frame is not an error: it goes to the spool (as does a
sent frame that no server could answer), and a spool thread inspects spooled frames, oldest first, whenever a
server is ready, each recorded with status "late" (its capture time and its inspection time). When the sources end
the run waits for the spool to empty (up to `spool_wait` seconds without a ready server); frames of this run
still in the spool then (or when stopped) get a "spooled" line: the next run given the same spool inspects them.
A frame evicted from a full spool is recorded as dropped.

Stopping (Ctrl-C, `duration`, `max_frames`): the readers stop reading, frames still queued are recorded as
dropped ("stopped"), requests in flight are waited for up to `shutdown_timeout` seconds, and any still unanswered
then are recorded as errors. So the output always holds exactly one line per frame read, whatever the servers
answered (a score that is not a number gets status "invalid_score", verdict "anomalous").
"""
from __future__ import annotations

import math
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Sequence

from .events import RunObserver
from .frame_queue import FrameQueue, QueueClosed
from .inspection import InspectionClient, InspectionError, InspectionResult
from .redact import redact
from .results import (
    EVENT_GAP,
    EVENT_GAVE_UP,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_LATE,
    STATUS_SPOOLED,
    JsonlWriter,
    save_heatmap_overlay,
)
from .run_options import DEFAULT_SPOOL_WAIT, CameraPlan, RunOptions
from .sources import Frame, FrameSource, SourceError, SourceEvent
from .spool import SpooledFrame
from .stats import CameraState, CameraStats

_POLL_S = 0.1  # how often blocked threads look at the stop flag
SPOOL_IN_FLIGHT = 2  # spooled frames sent at a time (the live cameras keep the rest of the servers' capacity)
SPOOL_MAX_TRIES = 5  # a spooled frame that failed on the servers this often is recorded as an error


__all__ = ["DEFAULT_SPOOL_WAIT", "CameraPlan", "MultiCameraRunner", "RunOptions"]


class _Camera:
    def __init__(self, name: str, source: FrameSource, options: RunOptions, client: InspectionClient):
        self.name = name
        self.source = source
        self.client = client  # its product's (client.model is the product)
        self.product = client.model
        self.queue: FrameQueue[Frame] = FrameQueue(options.queue_size or options.max_in_flight, options.drop_policy)
        self.slots = threading.Semaphore(options.max_in_flight)
        self.stats = CameraStats(name, self.product)
        self.pending: dict[int, Frame] = {}  # frames sent and not yet recorded, by index
        self.recording = 0  # frames taken out of `pending` whose line and counts are being written
        self.pending_lock = threading.Condition()
        self.failure = ""  # why the source stopped early, if it did
        self.reconnecting = False  # its stream is lost and being reopened
        self.no_server_since: float | None = None  # monotonic: since when no server was ready for its frames
        self.threads: list[threading.Thread] = []


class MultiCameraRunner:
    def __init__(
        self,
        cameras: Sequence[tuple[str, FrameSource] | tuple[str, FrameSource, CameraPlan]],
        client: InspectionClient,
        writer: JsonlWriter,
        options: RunOptions | None = None,
        observer: RunObserver | None = None,
    ):
        """cameras: (name, source) or (name, source, CameraPlan): a camera's plan gives its product's client and
        its own request limits (default: `client` and `options`)."""
        names = [camera[0] for camera in cameras]
        if not cameras:
            raise ValueError("at least one --camera is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {', '.join(names)}")
        self.options = options or RunOptions()
        self.client = client
        self.writer = writer
        self.cameras = []
        for name, source, *rest in cameras:
            plan: CameraPlan = rest[0] if rest else CameraPlan()
            self.cameras.append(_Camera(name, source, plan.options(self.options), plan.client or client))
        self._clients = {c.product: c.client for c in reversed(self.cameras)}  # product -> client (the first's)
        self.stop_event = threading.Event()
        self.abort_event = threading.Event()  # stop waiting for answers in flight (a second Ctrl-C)
        self.observer = observer or RunObserver()
        self._observer_failed = False
        self._by_name = {c.name: c for c in self.cameras}
        self._cameras_done = threading.Event()  # every camera's reader and dispatcher ended
        self._spool_in_flight = 0
        self._spool_lock = threading.Condition()

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
            self._set_state(camera, CameraState.RUNNING, announce=True)
            for target, role in ((self._read, "reader"), (self._dispatch, "dispatcher")):
                thread = threading.Thread(target=target, args=(camera,), name=f"{camera.name}-{role}", daemon=True)
                camera.threads.append(thread)
                thread.start()
        spooler = None
        if self.options.spool is not None:
            spooler = threading.Thread(target=self._drain_spool, name="spool", daemon=True)
            spooler.start()
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
        self._cameras_done.set()
        while spooler is not None and spooler.is_alive():
            spooler.join(_POLL_S)
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
        self._record_left_in_spool()
        for camera in self.cameras:
            camera.stats.finished = time.monotonic()
            self._set_state(camera, CameraState.STOPPED)
            camera.source.close()
        return [c.stats.summary() for c in self.cameras]

    # -- threads -------------------------------------------------------------------------------------------------
    def _read(self, camera: _Camera) -> None:
        try:
            for item in camera.source.read(camera.name, self.stop_event):
                if isinstance(item, SourceEvent):
                    self._source_event(camera, item)
                    continue
                frame = item
                camera.stats.frame_read()
                self._enqueue(camera, frame)
                if self.options.max_frames is not None and frame.index + 1 >= self.options.max_frames:
                    break
        except Exception as exc:  # the source broke (stream lost for good, codec error): this camera gives up
            camera.failure = redact(str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}")
            print(f"camera {camera.name}: gave up: {camera.failure}", file=sys.stderr, flush=True)
            camera.stats.gave_up(camera.failure)
            self._record_event(camera, EVENT_GAVE_UP, time.time(), error=camera.failure,
                               frames_read=camera.stats.read)
        finally:
            camera.reconnecting = False
            camera.queue.close()

    def _source_event(self, camera: _Camera, event: SourceEvent) -> None:
        if event.kind == "reconnecting":
            camera.reconnecting = True
            self._set_state(camera, CameraState.RECONNECTING)
            print(f"camera {camera.name}: {event.reason}; reconnecting", file=sys.stderr, flush=True)
        elif event.kind == "gap":
            camera.reconnecting = False
            camera.stats.gap()
            self._set_state(camera, CameraState.RUNNING)
            print(f"camera {camera.name}: back after {event.seconds:.1f} s ({event.attempts} attempts)",
                  file=sys.stderr, flush=True)
            self._record_event(camera, EVENT_GAP, event.started, seconds=round(event.seconds, 3),
                               attempts=event.attempts, reason=event.reason)

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

    def _refresh_state(self, camera: _Camera, server_ready: bool) -> None:
        if camera.reconnecting:
            state = CameraState.RECONNECTING
        elif not server_ready and (len(camera.queue) or camera.pending):
            state = CameraState.WAITING_FOR_SERVER
        else:
            state = CameraState.RUNNING
        self._set_state(camera, state)

    def _server_ready(self, camera: _Camera) -> bool:
        """Whether a server is ready; keeps track of since when none is (for the frames' waits)."""
        if camera.client.pool.has_ready():
            camera.no_server_since = None
            return True
        if camera.no_server_since is None:
            camera.no_server_since = time.monotonic()
        return False

    def _waited_too_long(self, camera: _Camera, frame: Frame) -> bool:
        """A queued frame's wait for a ready server is over (see the module docstring)."""
        since = camera.no_server_since
        if since is None:
            return False
        return time.monotonic() - max(frame.read_at, since) >= self.options.retry_timeout

    def _expire_waiting(self, camera: _Camera) -> None:
        """Spools (or without a spool, records as errors) the queued frames, oldest first, that waited
        `retry_timeout` s for a ready server."""
        while (frame := camera.queue.get_if(lambda f: self._waited_too_long(camera, f))) is not None:
            reason = f"no server ready within {self.options.retry_timeout:g} s ({camera.client.pool.last_errors()})"
            if self.options.spool is None or frame.image is None or not self._to_spool(camera, frame, reason):
                self._record(camera, frame, STATUS_ERROR, error=reason)

    def _dispatch(self, camera: _Camera) -> None:
        while not self.stop_event.is_set():
            server_ready = camera.client.pool.has_ready()
            self._refresh_state(camera, server_ready)
            if not camera.slots.acquire(timeout=_POLL_S):
                continue
            if not self._server_ready(camera):
                # Nothing is sent to be burned as an error: the frames wait in the queue (a live camera drops by
                # its policy when it is full) until a server is ready, each for at most retry_timeout seconds.
                camera.slots.release()
                self._expire_waiting(camera)
                if camera.queue.closed and len(camera.queue) == 0:
                    break
                self._refresh_state(camera, False)
                camera.client.pool.wait_for_ready(_POLL_S)
                continue
            frame = camera.queue.get(timeout=_POLL_S)
            if frame is None:
                camera.slots.release()
                if camera.queue.closed and len(camera.queue) == 0:
                    break
                continue
            self._send(camera, frame)
        with camera.pending_lock:
            if not camera.pending and camera.queue.closed:
                self._set_state(camera, CameraState.STOPPED)

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
                elif error is not None and error.server_fault and self._spool_sent(
                        camera, frame, str(error), server=error.server or None, attempts=error.attempts,
                        latency_ms=round(error.latency_ms, 3)):
                    pass  # in the spool: inspected late when a server is back
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
            camera.client.submit(frame.image, done)
        except Exception as exc:  # the frame could not be encoded: nothing was sent
            self._record(camera, frame, STATUS_ERROR, sent=True, error=f"{type(exc).__name__}: {exc}")
            camera.slots.release()

    # -- shutdown ------------------------------------------------------------------------------------------------
    def _finish(self, camera: _Camera) -> None:
        for frame in camera.queue.drain():
            self._record_drop(camera, frame, "stopped before it was sent")

    def _wait_in_flight(self, camera: _Camera, deadline: float) -> None:
        with camera.pending_lock:
            while ((camera.pending or camera.recording) and not self.abort_event.is_set()
                   and time.monotonic() < deadline):
                camera.pending_lock.wait(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            left = sorted(camera.pending)
        for index in left:
            with camera.pending_lock:
                frame = camera.pending.get(index)
            if frame is not None and not self._spool_sent(camera, frame, "no answer before shutdown"):
                self._record(camera, frame, STATUS_ERROR, sent=True, error="no answer before shutdown")
        with camera.pending_lock:  # answers being written right now: their counts belong in the summary
            while camera.recording:
                camera.pending_lock.wait(_POLL_S)

    # -- the spool ----------------------------------------------------------------------------------------------
    def _to_spool(self, camera: _Camera, frame: Frame, reason: str) -> bool:
        """Writes the frame to the spool (its line comes when it is inspected, or at the end); False when it
        cannot be written (the caller records the error). Frames evicted to make room are recorded as dropped."""
        spool = self.options.spool
        assert spool is not None and frame.image is not None
        try:
            evicted = spool.put(frame.image, camera.name, frame.index, frame.source_name, frame.capture_time, reason,
                                product=camera.product)
        except OSError as exc:
            print(f"camera {camera.name}: cannot write to the spool: {exc}", file=sys.stderr, flush=True)
            return False
        self._record_evicted(evicted)
        return True

    def _spool_sent(self, camera: _Camera, frame: Frame, reason: str, **error_fields: Any) -> bool:
        """A sent frame no server could answer: to the spool, if there is one (taken out of `pending` first, so a
        late answer cannot give it a second line; recorded as an error with `error_fields` if the spool cannot
        take it). False: there is no spool, nothing was done."""
        if self.options.spool is None or frame.image is None:
            return False
        with camera.pending_lock:
            if camera.pending.pop(frame.index, None) is None:
                return True  # already recorded by someone else: nothing left to do
            camera.recording += 1
        try:
            if not self._to_spool(camera, frame, reason):
                self._write_record(camera, frame, STATUS_ERROR, {**error_fields, "error": reason}, None)
            return True
        finally:
            with camera.pending_lock:
                camera.recording -= 1
                camera.pending_lock.notify_all()

    def _record_evicted(self, evicted: list[SpooledFrame]) -> None:
        for old in evicted:
            self._record_spooled_frame(old, STATUS_DROPPED, drop_reason="evicted from the full spool (oldest first)")

    def _drain_spool(self) -> None:
        """Inspects spooled frames, oldest first, whenever a server is ready. Ends when stopped, or once the
        cameras are done and the spool is empty (or no server was ready for spool_wait seconds since)."""
        spool = self.options.spool
        assert spool is not None
        no_server_since: float | None = None
        done_at: float | None = None
        while not self.abort_event.is_set():
            done = self._cameras_done.is_set()
            if done and done_at is None:
                done_at = time.monotonic()
            if done and (self.stop_event.is_set() or len(spool) == 0):
                break
            if not any(client.pool.has_ready() for client in self._clients.values()):
                no_server_since = no_server_since or time.monotonic()
                # the last wait: spool_wait seconds without a ready server, counted from the cameras' end
                waited = time.monotonic() - max(no_server_since, done_at or math.inf)
                if waited >= self.options.spool_wait:
                    break
                time.sleep(_POLL_S)
                continue
            no_server_since = None
            with self._spool_lock:
                if self._spool_in_flight >= SPOOL_IN_FLIGHT:
                    self._spool_lock.wait(_POLL_S)
                    continue
            entry = spool.take()
            if entry is None:
                time.sleep(_POLL_S)
                continue
            self._send_spooled(entry)
        deadline = time.monotonic() + self.options.shutdown_timeout
        with self._spool_lock:  # answers of spooled frames in flight: written before the run ends
            while self._spool_in_flight and time.monotonic() < deadline and not self.abort_event.is_set():
                self._spool_lock.wait(_POLL_S)

    def _send_spooled(self, entry: SpooledFrame) -> None:
        spool = self.options.spool
        assert spool is not None and entry.image is not None
        with self._spool_lock:
            self._spool_in_flight += 1

        def done(result: InspectionResult | None, error: InspectionError | None) -> None:
            try:
                if result is not None:
                    self._record_late(entry, result)
                    spool.done(entry)
                elif error is not None and error.server_fault and entry.tries + 1 < SPOOL_MAX_TRIES:
                    self._record_evicted(spool.give_back(entry, str(error)))
                else:
                    self._record_spooled_frame(entry, STATUS_ERROR, error=str(error), attempts=error.attempts if
                                               error else None)
                    spool.done(entry)
            finally:
                with self._spool_lock:
                    self._spool_in_flight -= 1
                    self._spool_lock.notify_all()

        try:
            self._spooled_client(entry).submit(entry.image, done)
        except Exception as exc:  # the image could not be encoded: it never will be
            done(None, InspectionError(f"{type(exc).__name__}: {exc}"))

    def _spooled_client(self, entry: SpooledFrame) -> InspectionClient:
        """Its camera's client; for a camera of an earlier run, its product's (else the runner's client)."""
        camera = self._by_name.get(entry.camera)
        return camera.client if camera is not None else self._clients.get(entry.product, self.client)

    def _record_late(self, entry: SpooledFrame, result: InspectionResult) -> None:
        fields: dict[str, Any] = {}
        if not result.finite:
            fields["error"] = (f"the server answered a score that is not a number (score {result.score}, raw score "
                               f"{result.raw_score}): recorded as anomalous")
        self._record_spooled_frame(
            entry, STATUS_LATE, answer=result, server=result.server, latency_ms=round(result.latency_ms, 3),
            score=result.score, raw_score=result.raw_score, verdict=result.verdict, attempts=result.attempts,
            **fields)

    def _record_spooled_frame(self, entry: SpooledFrame, status: str, answer: InspectionResult | None = None,
                              **fields: Any) -> None:
        """The line of a frame that was in the spool (its camera may not be one of this run's)."""
        spool = self.options.spool
        assert spool is not None
        frame = Frame(entry.camera, entry.frame, entry.source, entry.capture_time, entry.image)
        fields["inspected_time"] = _iso(time.time()) if status == STATUS_LATE else None
        fields["spooled_by_earlier_run"] = True if entry.run != spool.run else None
        fields["spool_reason"] = entry.reason if status != STATUS_LATE else None
        camera = self._by_name.get(entry.camera)
        if camera is not None:
            self._write_record(camera, frame, status, fields, answer)
            return
        record = {"camera": entry.camera, **({"product": entry.product} if entry.product else {}),
                  "frame": entry.frame, "source": entry.source, "capture_time": frame.capture_time_iso,
                  "status": status, **{k: v for k, v in fields.items() if v is not None}}
        self.writer.write(record)

    def _record_left_in_spool(self) -> None:
        """Frames this run spooled that are still there: a "spooled" line each (the next run inspects them)."""
        spool = self.options.spool
        if spool is None:
            return
        for entry in spool.left():
            if entry.run == spool.run:
                self._record_spooled_frame(entry, STATUS_SPOOLED, spool=str(spool.folder))

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
        fields: dict[str, Any] = {}
        if not result.finite:
            fields["error"] = (f"the server answered a score that is not a number (score {result.score}, raw score "
                               f"{result.raw_score}): recorded as anomalous")
        self._record(
            camera, frame, result.status, sent=True,
            server=result.server, latency_ms=round(result.latency_ms, 3), score=result.score,
            raw_score=result.raw_score, verdict=result.verdict, attempts=result.attempts, heatmap=heatmap,
            answer=result, **fields,
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
                camera.recording += 1
        try:
            self._write_record(camera, frame, status, fields, answer)
        finally:
            if sent:
                with camera.pending_lock:
                    camera.recording -= 1
                    camera.pending_lock.notify_all()

    def _write_record(self, camera: _Camera, frame: Frame, status: str, fields: dict[str, Any],
                      answer: InspectionResult | None) -> None:
        record: dict[str, Any] = {
            "camera": camera.name,
            "product": camera.product,
            "frame": frame.index,
            "source": frame.source_name,
            "capture_time": frame.capture_time_iso,
            "status": status,
        }
        record.update({k: v for k, v in fields.items() if v is not None})  # NaN stays, and is written as null
        try:
            self.writer.write(record)
        except (TypeError, ValueError) as exc:  # the frame still gets its line, saying what could not be written
            record = {**{k: record[k] for k in ("camera", "product", "frame", "source", "capture_time")},
                      "status": STATUS_ERROR, "error": f"the result could not be recorded: {exc}"}
            self.writer.write(record)
            status = STATUS_ERROR
        camera.stats.add(status, fields.get("latency_ms"), fields.get("verdict") == "anomalous")
        self._notify("frame_recorded", camera.name, frame, record, answer)

    def _record_event(self, camera: _Camera, event: str, when: float, **fields: Any) -> None:
        """A line that is not a frame's: a source gap or a camera that gave up."""
        record = {"camera": camera.name, "product": camera.product, "event": event, "status": event,
                  "time": datetime.fromtimestamp(when, tz=timezone.utc).isoformat(timespec="milliseconds"), **fields}
        self.writer.write(record)

    def _notify(self, event: str, *args: Any) -> None:
        """Tells the observer (see client/events.py); an observer that raises is reported once, never fatal."""
        try:
            getattr(self.observer, event)(*args)
        except Exception as exc:
            if not self._observer_failed:
                self._observer_failed = True
                print(f"observer {type(self.observer).__name__}.{event} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def _set_state(self, camera: _Camera, state: CameraState, announce: bool = False) -> None:
        """Sets the camera's live state and tells the observer when it changed (or when `announce`)."""
        if camera.stats.set_state(state) or announce:
            self._notify("camera_state", camera.name, state.value)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
