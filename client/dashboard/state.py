"""What the dashboard shows, kept live and bounded: the RunObserver that the runner calls for every frame.

The observer methods run on the runner's threads (readers, dispatchers, gRPC callbacks): each one only counts,
appends to fixed-size windows and keeps a reference to at most a few frames; no image work happens there. The
dashboard's tick thread renders the kept frames into JPEG thumbnails (`render_pending`) and builds the snapshot the
page and /api/cameras get (`snapshot`), at a fixed rate whatever the cameras' frame rates.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..events import CAMERA_STATES, RunObserver
from ..stats import CameraState, percentile
from .metrics import VERDICT_ANOMALOUS, VERDICT_INVALID, VERDICT_NORMAL, ClientMetrics, error_code, verdict_label

THRESHOLD = 0.5  # the normalised score's threshold (the calibration contract, docs/serving.md)


@dataclass
class DashboardOptions:
    push_interval_s: float = 0.5  # the page gets a new snapshot this often, whatever the frame rate
    anomaly_thumbnails: int = 8  # the last N anomalous frames with a thumbnail, per camera
    thumbnails_per_s: float = 2.0  # at most this many anomalous frames per camera and second get a thumbnail
    thumbnail_width: int = 320  # the newest frame, pixels; larger frames are scaled down before the JPEG is made
    anomaly_thumbnail_width: int = 160  # the gallery's thumbnails (shown at 96 px)
    jpeg_quality: int = 80
    chart_seconds: int = 300  # the score strip chart: the highest score of each second, over the last 5 minutes
    latency_window: int = 512  # p50/p99 over a camera's last N answers
    fps_window_s: float = 5.0  # frames/s over the last N seconds
    max_connections: int = 64  # open HTTP connections; one more is closed at once (connections.py)
    max_event_streams: int = 16  # open pages (event streams); one more gets 503
    request_timeout_s: float = 10.0  # a connection must deliver a whole request this soon (after connecting or
    # after its last answer), else it is closed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this long (uvicorn)
    listen_backlog: int = 32  # connections waiting to be accepted; open descriptors peak near max_connections + this

    def __post_init__(self) -> None:
        if self.push_interval_s <= 0:
            raise ValueError(f"push interval must be positive, got {self.push_interval_s}")
        for name in ("anomaly_thumbnails", "thumbnail_width", "anomaly_thumbnail_width", "chart_seconds",
                     "latency_window", "max_connections", "max_event_streams", "listen_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be between 1 and 100, got {self.jpeg_quality}")
        if self.request_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise ValueError("request_timeout_s and keep_alive_s must be positive")


@dataclass
class _Picture:
    """A frame to show: its arrays until the tick thread made the JPEG, then only the JPEG."""

    info: dict[str, Any]  # frame, source, score, verdict, server, time
    image: np.ndarray | None
    anomaly_map: np.ndarray | None
    jpeg: bytes | None = None


@dataclass
class _CameraView:
    name: str
    source: str
    live: bool
    options: DashboardOptions
    product: str = ""  # the Triton ensemble its frames go to
    state: str = "starting"
    started: float | None = None  # monotonic, when the camera started running
    sent: int = 0
    answered: int = 0
    normal: int = 0
    anomalous: int = 0
    invalid: int = 0
    dropped: int = 0
    errors: int = 0
    server: str = ""  # the server that answered last
    last_error: str = ""
    last_drop_reason: str = ""
    pending: _Picture | None = None  # the newest answered frame, not rendered yet
    latest: _Picture | None = None  # the newest rendered one
    latest_seq: int = 0
    last_thumbnail: float = -math.inf  # monotonic time of the last anomalous frame kept for a thumbnail
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.latencies_ms: deque[float] = deque(maxlen=self.options.latency_window)
        # answer times for frames/s; at most a window's worth at 1000 frames/s is kept
        self.answer_times: deque[float] = deque(maxlen=int(1000 * self.options.fps_window_s))
        self.anomalies: deque[_Picture] = deque(maxlen=self.options.anomaly_thumbnails)
        self.chart: deque[list[float]] = deque(maxlen=self.options.chart_seconds)  # [epoch second, max score]


def _server_entry(url: str, product: str) -> dict[str, Any]:
    return {"url": url, "product": product, "up": False, "detail": ""}


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class LineState(RunObserver):
    """The live state of every camera and server, and the Prometheus metrics (`metrics`)."""

    def __init__(self, cameras: Sequence[tuple[str, str, bool] | tuple[str, str, bool, str]],
                 urls: Sequence[str | tuple[str, str]] = (), options: DashboardOptions | None = None):
        """cameras: (name, source description, live[, product]) per camera; urls: the servers' HOST:PORT, or
        (HOST:PORT, product) pairs: a server's readiness is per product."""
        self.options = options or DashboardOptions()
        self.cameras = {name: _CameraView(name, source, live, self.options, *product)
                        for name, source, live, *product in cameras}
        servers = [(url, "") if isinstance(url, str) else tuple(url) for url in urls]
        self.metrics = ClientMetrics({name: view.product for name, view in self.cameras.items()}, servers)
        self.servers: dict[tuple[str, str], dict[str, Any]] = {
            (url, product): _server_entry(url, product) for url, product in servers}
        self.finished = False
        self.spool: dict[str, Any] | None = None  # frames, bytes, evicted of the run's spool (none: no spool)
        self._servers_lock = threading.Lock()
        self.mqtt_status: Callable[[], dict[str, Any]] | None = None  # client/mqtt.py, with --mqtt

    # -- RunObserver (runner threads) ------------------------------------------------------------------------------
    def camera_state(self, camera: str, state: str) -> None:
        if state not in CAMERA_STATES:
            raise ValueError(f"unknown camera state {state!r}; expected one of {', '.join(CAMERA_STATES)}")
        view = self.cameras[camera]
        with view.lock:
            view.state = state
            if state == CameraState.RUNNING and view.started is None:
                view.started = time.monotonic()

    def frame_sent(self, camera: str, frame) -> None:
        view = self.cameras[camera]
        with view.lock:
            view.sent += 1

    def frame_answered(self, camera: str, frame, record: dict[str, Any], result) -> None:
        score = _finite(record.get("score"))
        verdict = verdict_label(record.get("verdict"), score)
        latency_ms = _finite(record.get("latency_ms"))
        self.metrics.answered(camera, verdict, score, None if latency_ms is None else latency_ms / 1000.0)
        now, wall = time.monotonic(), time.time()
        view = self.cameras[camera]
        info = {"frame": record.get("frame"), "source": record.get("source"), "score": score, "verdict": verdict,
                "server": record.get("server"), "time": wall}
        image = getattr(frame, "image", None)
        anomaly_map = getattr(result, "anomaly_map", None)
        with view.lock:
            view.answered += 1
            if verdict == VERDICT_NORMAL:
                view.normal += 1
            elif verdict == VERDICT_ANOMALOUS:
                view.anomalous += 1
            else:
                view.invalid += 1
            view.server = str(record.get("server") or "")
            view.answer_times.append(now)
            if latency_ms is not None:
                view.latencies_ms.append(latency_ms)
            if score is not None:
                second = float(int(wall))
                if view.chart and view.chart[-1][0] == second:
                    view.chart[-1][1] = max(view.chart[-1][1], score)
                else:
                    view.chart.append([second, score])
            if image is not None:
                view.pending = _Picture(info, image, anomaly_map)
                if verdict == VERDICT_ANOMALOUS and now - view.last_thumbnail >= 1.0 / self.options.thumbnails_per_s:
                    view.last_thumbnail = now
                    view.anomalies.append(_Picture(dict(info), image, anomaly_map))

    def frame_dropped(self, camera: str, frame, record: dict[str, Any]) -> None:
        self.metrics.dropped_frame(camera)
        view = self.cameras[camera]
        with view.lock:
            view.dropped += 1
            view.invalid += 1
            view.last_drop_reason = str(record.get("drop_reason", ""))

    def frame_spooled(self, camera: str, frame, record: dict[str, Any]) -> None:
        self.metrics.unanswered(camera)

    def frame_failed(self, camera: str, frame, record: dict[str, Any]) -> None:
        message = str(record.get("error", ""))
        self.metrics.failed_frame(camera, error_code(message))
        view = self.cameras[camera]
        with view.lock:
            view.errors += 1
            view.invalid += 1
            view.last_error = message

    def server_state(self, url: str, up: bool, detail: str = "", product: str = "") -> None:
        self.metrics.set_server(url, up, product)
        with self._servers_lock:
            entry = self.servers.setdefault((url, product), _server_entry(url, product))
            entry.update(up=bool(up), detail=detail)

    def spool_state(self, frames: int, bytes: int, evicted: int,
                    products: dict[str, dict[str, int]] | None = None) -> None:
        """The spool's depth (frames waiting to be inspected late), its size and how many frames it evicted, in all
        (the page) and per product (`products`, /metrics; default: all under product "")."""
        self.spool = {"frames": frames, "bytes": bytes, "evicted": evicted}
        self.metrics.set_spool(products if products is not None else {"": dict(self.spool)})

    def update_server(self, url: str, product: str = "", **figures: Any) -> None:
        """Extra per-server figures for the page (requests, in_flight, failures)."""
        with self._servers_lock:
            self.servers.setdefault((url, product), _server_entry(url, product)).update(figures)

    # -- tick thread -----------------------------------------------------------------------------------------------
    def render_pending(self) -> int:
        """Makes the JPEGs of the frames kept since the last call; returns how many it made."""
        from .images import thumbnail_jpeg

        made = 0
        for view in self.cameras.values():
            with view.lock:
                latest, view.pending = view.pending, None
                todo = [p for p in view.anomalies if p.jpeg is None and p.image is not None]
            jobs = [(p, self.options.anomaly_thumbnail_width) for p in todo]
            if latest is not None:
                jobs.append((latest, self.options.thumbnail_width))
            for picture, width in jobs:
                assert picture.image is not None
                picture.jpeg = thumbnail_jpeg(picture.image, picture.anomaly_map, width, self.options.jpeg_quality)
                picture.image = picture.anomaly_map = None
                made += 1
            if latest is not None:
                with view.lock:
                    view.latest = latest
                    view.latest_seq += 1
        return made

    def latest_jpeg(self, camera: str) -> bytes | None:
        view = self.cameras[camera]
        with view.lock:
            return view.latest.jpeg if view.latest is not None else None

    def anomaly_jpeg(self, camera: str, frame: int) -> bytes | None:
        view = self.cameras[camera]
        with view.lock:
            for picture in view.anomalies:
                if picture.info["frame"] == frame and picture.jpeg is not None:
                    return picture.jpeg
        return None

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data (also /api/cameras)."""
        with self._servers_lock:
            servers = [dict(s) for s in self.servers.values()]
        any_up = any(s.get("up") for s in servers) if servers else True
        return {
            "time": time.time(),
            "finished": self.finished,
            "threshold": THRESHOLD,
            "push_interval_s": self.options.push_interval_s,
            "chart_seconds": self.options.chart_seconds,
            "servers": servers,
            "spool": self.spool,
            "cameras": [self._camera_snapshot(view, any_up) for view in self.cameras.values()],
            "mqtt": self.mqtt_status() if self.mqtt_status is not None else None,
        }

    def _camera_snapshot(self, view: _CameraView, any_server_up: bool) -> dict[str, Any]:
        now = time.monotonic()
        window = self.options.fps_window_s
        with view.lock:
            recent = sum(1 for t in view.answer_times if now - t <= window)
            span = min(window, now - view.started) if view.started is not None else 0.0
            latencies = list(view.latencies_ms)
            state = view.state
            if state == CameraState.RUNNING and not any_server_up:
                state = CameraState.WAITING_FOR_SERVER
            base = f"/api/cameras/{view.name}"
            latest = None
            if view.latest is not None:
                latest = dict(view.latest.info, image=f"{base}/latest.jpg?seq={view.latest_seq}")
            anomalies = [dict(p.info, image=f"{base}/anomalies/{p.info['frame']}.jpg")
                         for p in reversed(view.anomalies) if p.jpeg is not None]
            snapshot = {
                "name": view.name,
                "product": view.product,
                "source": view.source,
                "live": view.live,
                "state": state,
                "sent": view.sent,
                "answered": view.answered,
                "normal": view.normal,
                "anomalous": view.anomalous,
                "invalid": view.invalid,
                "dropped": view.dropped,
                "errors": view.errors,
                "server": view.server,
                "last_error": view.last_error,
                "last_drop_reason": view.last_drop_reason,
                "latest": latest,
                "anomalies": anomalies,
                "chart": [list(point) for point in view.chart],
            }
        snapshot["fps"] = recent / span if span > 0 else 0.0
        snapshot["p50_ms"] = percentile(latencies, 50)
        snapshot["p99_ms"] = percentile(latencies, 99)
        return snapshot

    def finish(self) -> None:
        """The run ended: every camera is stopped."""
        for view in self.cameras.values():
            with view.lock:
                view.state = CameraState.STOPPED.value
        self.finished = True


__all__ = ["DashboardOptions", "LineState", "THRESHOLD", "VERDICT_INVALID"]
