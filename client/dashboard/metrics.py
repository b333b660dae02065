"""The client's Prometheus metrics (prometheus-client), served at /metrics by the dashboard.

Every frame the client records (one JSONL line) is counted exactly once in `mrkd_frames_total`, so at the end of a
run its per-camera sum equals the camera's number of lines; the other counters break the frames without a verdict
down by why. Each dashboard owns its registry, so several runs in one process (tests) do not share series.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

VERDICT_NORMAL = "normal"
VERDICT_ANOMALOUS = "anomalous"
VERDICT_INVALID = "invalid"  # no valid verdict: dropped, failed, or answered with a score that is not a number
VERDICTS = (VERDICT_NORMAL, VERDICT_ANOMALOUS, VERDICT_INVALID)

# Latency: from 5 ms (one image on a GPU) to 30 s (the default request timeout).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# The normalised score: 0.5 is the threshold, so the buckets are finest around it.
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

_GRPC_STATUS = re.compile(r"^\[StatusCode\.([A-Z_]+)\]")
# The client's own reasons for a frame without an answer (client/runner.py, client/inspection.py).
_CLIENT_ERRORS = (
    ("no server is ready", "NO_SERVER"),
    ("no server ready", "NO_SERVER"),  # a frame that waited --retry-timeout for a ready server
    ("unreadable frame", "UNREADABLE_FRAME"),
    ("no answer before shutdown", "NO_ANSWER"),
)


def error_code(message: str) -> str:
    """The `code` label of an error line: the gRPC status name ("UNAVAILABLE", "INVALID_ARGUMENT", ...) when the
    server or the transport answered, else the client's reason (NO_SERVER, UNREADABLE_FRAME, NO_ANSWER, CLIENT)."""
    match = _GRPC_STATUS.match(message)
    if match:
        return match.group(1)
    lowered = message.lower()
    for prefix, code in _CLIENT_ERRORS:
        if lowered.startswith(prefix):
            return code
    return "CLIENT"


def verdict_label(verdict: object, score: object) -> str:
    """normal / anomalous only for an answer with a finite score and one of those verdicts; else invalid."""
    if verdict in (VERDICT_NORMAL, VERDICT_ANOMALOUS) and isinstance(score, (int, float)) and math.isfinite(score):
        return str(verdict)
    return VERDICT_INVALID


class ClientMetrics:
    """mrkd_frames_total{camera,product,verdict}, mrkd_frames_dropped_total{camera,product},
    mrkd_request_errors_total{camera,product,code}, mrkd_request_latency_seconds{camera,product} (histogram),
    mrkd_anomaly_score{camera,product} (histogram), mrkd_server_up{url,product} (ready for that product's model),
    mrkd_spool_frames{product}, mrkd_spool_bytes{product}, mrkd_spool_evicted_frames_total{product}, and what the
    dashboard itself costs, mrkd_dashboard_cpu_seconds_total (the one series without a product: the page serves
    every product at once)."""

    def __init__(self, cameras: Mapping[str, str], servers: Sequence[tuple[str, str]] = ()):
        """cameras: name -> product; servers: (url, product) pairs."""
        self.registry = CollectorRegistry()
        self.products = dict(cameras)
        self.frames = Counter("mrkd_frames_total", "Frames recorded (one JSONL line each), by verdict; 'invalid': "
                              "no valid verdict (dropped, failed, or a score that is not a number)",
                              ["camera", "product", "verdict"], registry=self.registry)
        self.dropped = Counter("mrkd_frames_dropped_total", "Frames dropped before they were answered",
                               ["camera", "product"], registry=self.registry)
        self.errors = Counter("mrkd_request_errors_total", "Frames that got no answer, by gRPC status or client "
                              "reason", ["camera", "product", "code"], registry=self.registry)
        self.latency = Histogram("mrkd_request_latency_seconds", "Time from the first send to the answer (a retry "
                                 "included), answered frames", ["camera", "product"], buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.score = Histogram("mrkd_anomaly_score", "Normalised anomaly score of answered frames (0.5 = threshold)",
                               ["camera", "product"], buckets=SCORE_BUCKETS, registry=self.registry)
        self.server_up = Gauge("mrkd_server_up", "1 when the Triton server is ready for the product's model, else 0",
                               ["url", "product"], registry=self.registry)
        self.spool_frames = Gauge("mrkd_spool_frames", "Frames in the spool, waiting for a server to be inspected "
                                  "late", ["product"], registry=self.registry)
        self.spool_bytes = Gauge("mrkd_spool_bytes", "Size of the spool's frames on disk", ["product"],
                                 registry=self.registry)
        self.spool_evicted = Counter("mrkd_spool_evicted_frames", "Frames evicted from the full spool (oldest "
                                     "first), each recorded as dropped", ["product"], registry=self.registry)
        self._evicted_counted: dict[str, int] = {}  # product -> evicted frames counted so far
        self.dashboard_cpu = Counter("mrkd_dashboard_cpu_seconds", "CPU time used by the dashboard's own threads "
                                     "(web server, thumbnails, snapshots)", registry=self.registry)
        for camera, product in self.products.items():  # every series exists from the start, at 0
            for verdict in VERDICTS:
                self.frames.labels(camera, product, verdict)
            self.dropped.labels(camera, product)
            self.latency.labels(camera, product)
            self.score.labels(camera, product)
        for url, product in servers:
            self.server_up.labels(url, product).set(0)
        self.set_spool({product: {} for product in self.products.values()})

    def answered(self, camera: str, verdict: str, score: float | None, latency_s: float | None) -> None:
        product = self.products[camera]
        self.frames.labels(camera, product, verdict).inc()
        if latency_s is not None:
            self.latency.labels(camera, product).observe(latency_s)
        if verdict != VERDICT_INVALID and score is not None:
            self.score.labels(camera, product).observe(score)

    def unanswered(self, camera: str) -> None:
        """A frame without a verdict (dropped, failed, left in the spool)."""
        self.frames.labels(camera, self.products[camera], VERDICT_INVALID).inc()

    def dropped_frame(self, camera: str) -> None:
        self.unanswered(camera)
        self.dropped.labels(camera, self.products[camera]).inc()

    def failed_frame(self, camera: str, code: str) -> None:
        self.unanswered(camera)
        self.errors.labels(camera, self.products[camera], code).inc()

    def set_spool(self, products: Mapping[str, Mapping[str, int]]) -> None:
        """The spool's figures per product ({product: {frames, bytes, evicted}}); `evicted` is the spool's running
        count (the counter catches up to it); a product no longer in the spool is at 0 frames."""
        for product in set(self._evicted_counted) | set(products):
            figures = products.get(product, {})
            self.spool_frames.labels(product).set(figures.get("frames", 0))
            self.spool_bytes.labels(product).set(figures.get("bytes", 0))
            evicted, counted = figures.get("evicted", 0), self._evicted_counted.get(product, 0)
            self.spool_evicted.labels(product).inc(max(0, evicted - counted))
            self._evicted_counted[product] = max(evicted, counted)

    def set_server(self, url: str, up: bool, product: str = "") -> None:
        self.server_up.labels(url, product).set(1 if up else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
