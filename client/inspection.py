"""InspectionClient: one image in, a verdict out, over gRPC to one or more Triton servers.

The same object serves the CLI (asynchronous `submit` with a callback), the locust load test and users' own code
(blocking `infer`). Images are numpy arrays (H x W, H x W x 3 uint8 RGB), which are encoded per `encoding`, or
already-encoded JPEG/PNG bytes, which are sent as they are.

Failures: a bad input (INVALID_ARGUMENT: the image cannot be decoded, too many pixels) is the request's fault and is
returned at once, never retried, and the server stays in use. Any other failure (unreachable, timed out, INTERNAL,
UNAVAILABLE, a response without the expected outputs) is the server's: that server is marked not ready (it needs a
passing probe, a real inference included, to come back; see servers.py) and the frame is sent to another ready
server. When no server is ready the frame waits for one, up to `retry_timeout` seconds from when it started
waiting, and then fails with the last error. A frame is sent at most `max_attempts` times.

A score that is not a finite number (NaN, inf: a bad feature value in the model) comes back as an anomalous result
with `status == "invalid_score"`, never as normal.

Transports:
- `bytes` (default): the ensemble's IMAGE input, TYPE_STRING [1, 1], one encoded image. Works across a network.
- `raw`: the decoded frame, UINT8 [1, H, W, 3], to the raw-frame entry point (no encode/decode; 3*H*W bytes).
- `shm`: like `raw`, but the frame is written to Triton system shared memory and only its name crosses gRPC; the
  client must run on the same host as every server it uses.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mrkd.core.images import to_rgb
from mrkd.core.wire import (
    INPUT_FRAME,
    INPUT_IMAGE,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_IS_ANOMALOUS,
    OUTPUT_RAW_SCORE,
    OUTPUT_SCORE,
    RAW_MODEL_SUFFIX,
    STATUS_INVALID_SCORE,
    STATUS_OK,
    decode_map,
)

from ._shm import SharedMemoryRegions
from .servers import Server, ServerPool

ENCODINGS = ("jpeg", "png")
TRANSPORTS = ("bytes", "raw", "shm")

# Names in the serving contract: mrkd.core.wire.
DEFAULT_RAW_MODEL_SUFFIX = RAW_MODEL_SUFFIX

# A request rejected as malformed would be rejected by every server: not retried, and the server stays ready.
# Every other failure is the server's: retried elsewhere, and the server gets no requests until a probe passes.
_NOT_RETRIED = ("StatusCode.INVALID_ARGUMENT",)

DEFAULT_RETRY_TIMEOUT = 60.0  # seconds a frame may wait for a ready server


@dataclass
class InspectionResult:
    server: str
    latency_ms: float  # from the first send to the answer, retries and waits included
    score: float  # normalised: 0.5 is the threshold (NaN when the model's score was not a number)
    raw_score: float
    is_anomalous: bool  # always True when the score is not finite
    attempts: int
    response_bytes: int
    anomaly_map: np.ndarray | None = None  # float32 [h, w] in [0, 1] (0.5 = threshold), when requested

    def __post_init__(self) -> None:
        if not self.finite:
            self.is_anomalous = True  # a bad number is never "normal"

    @property
    def finite(self) -> bool:
        return math.isfinite(self.score) and math.isfinite(self.raw_score)

    @property
    def status(self) -> str:
        """"ok", or "invalid_score" when the server answered a score that is not a finite number."""
        return STATUS_OK if self.finite else STATUS_INVALID_SCORE

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"


class InspectionError(RuntimeError):
    """A frame that got no answer: the last server tried, the number of attempts and the reason."""

    def __init__(self, message: str, server: str = "", attempts: int = 0, latency_ms: float = 0.0,
                 server_fault: bool = False):
        super().__init__(message)
        self.server = server
        self.attempts = attempts
        self.latency_ms = latency_ms
        self.server_fault = server_fault  # no server could answer (down, failing): another try later may succeed


ResultCallback = Callable[[InspectionResult | None, InspectionError | None], None]


@dataclass
class _Payload:
    """What one frame sends, prepared once and reused by the retries."""

    encoded: bytes | None = None  # transport 'bytes'
    frame: np.ndarray | None = None  # transports 'raw' and 'shm': [1, H, W, 3] uint8


@dataclass
class _Job:
    """One frame on its way: its attempts so far and, while no server is ready, until when it may wait."""

    payload: _Payload
    callback: ResultCallback
    started: float  # perf_counter() of the first send attempt
    tried: list = field(default_factory=list)  # servers sent to, in order
    last_error: str = ""
    wait_deadline: float | None = None  # monotonic; set when the frame first has to wait for a ready server

    @property
    def attempts(self) -> int:
        return len(self.tried)


class InspectionClient:
    def __init__(
        self,
        servers: Sequence[str] | ServerPool,
        model: str = "mrkd",
        *,
        encoding: str = "jpeg",
        jpeg_quality: int = 90,
        transport: str = "bytes",
        raw_model: str | None = None,
        want_map: bool = False,
        timeout: float = 30.0,
        probe_interval: float = 1.0,
        wait_ready: float = 0.0,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        max_attempts: int | None = None,
    ):
        """servers: HOST:PORT strings (a ServerPool is made and started) or a ServerPool the caller owns (its
        inference probe is set to this client's unless it has one). wait_ready > 0 waits that long for a ready
        server and raises NoServerReady if none comes. retry_timeout: how long a frame may wait for a ready server
        (0: fail at once). max_attempts: sends per frame (default: the number of servers + 2)."""
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100, got {jpeg_quality}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if retry_timeout < 0:
            raise ValueError(f"retry timeout must not be negative, got {retry_timeout}")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max attempts must be at least 1, got {max_attempts}")
        self.model = model
        self.encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.transport = transport
        self.raw_model = raw_model or model + DEFAULT_RAW_MODEL_SUFFIX
        self.want_map = want_map
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._owns_pool = not isinstance(servers, ServerPool)
        if isinstance(servers, ServerPool):
            self.pool = servers
            if self.pool.probe_request is None:
                self.pool.probe_request = self.probe_request
        else:
            probe_model = self.raw_model if transport != "bytes" else model
            self.pool = ServerPool(list(servers), probe_model, probe_interval=probe_interval,
                                   probe_request=self.probe_request, probe_request_timeout=timeout)
            self.pool.start()
        self.max_attempts = max_attempts or len(self.pool.servers) + 2
        self._shm = SharedMemoryRegions() if transport == "shm" else None
        self._waiting: list[_Job] = []  # frames waiting for a ready server, oldest first
        self._waiting_lock = threading.Condition()
        self._closed = False
        self._scheduler: threading.Thread | None = None
        if wait_ready > 0:
            self.pool.wait_until_ready(wait_ready)

    @property
    def target_model(self) -> str:
        return self.model if self.transport == "bytes" else self.raw_model

    # -- public API ------------------------------------------------------------------------------------------------
    def infer(self, image: np.ndarray | bytes) -> InspectionResult:
        """Blocking: one image -> InspectionResult; raises InspectionError when no server answered (a bad input,
        or no server ready within `retry_timeout`, or `max_attempts` failed sends). The same retry policy as
        `submit` (`_wait_is_over`, `_retry_after`), with a blocking call: it also runs under gevent (locust),
        where a callback from gRPC's threads could not wake a waiting greenlet."""
        job = _Job(self._payload(image), callback=lambda result, error: None, started=time.perf_counter())
        while True:
            server = self.pool.acquire()
            if server is None:
                if self._wait_is_over(job):
                    raise self._error(job)
                self.pool.wait_for_ready(min(0.5, max(job.wait_deadline - time.monotonic(), 0.0)))
                continue
            job.tried.append(server)
            try:
                inputs, region = self._inputs(job.payload, server)
                try:
                    response = server.connection.infer(
                        self.target_model, inputs, outputs=self._outputs(), client_timeout=self.timeout
                    )
                finally:
                    self._release_region(region)
                result = self._result(response, server, job.started, job.attempts)
            except Exception as exc:
                if not self._retry_after(job, server, exc):
                    raise self._error(job) from None
                continue
            self.pool.release(server)
            return result

    def submit(self, image: np.ndarray | bytes, callback: ResultCallback) -> None:
        """Asynchronous: sends now (or as soon as a server is ready), calls callback(result, None) or
        callback(None, error) from a gRPC or the client's scheduler thread. Encoding errors (bad image) are raised
        here, before anything is sent."""
        self._send(_Job(self._payload(image), callback, started=time.perf_counter()))

    def probe_request(self, connection: grpcclient.InferenceServerClient, timeout: float | None = None) -> None:
        """One real inference of a small blank image (the servers' health probe); raises when it fails."""
        blank = np.full((32, 32, 3), 128, np.uint8)
        payload = _Payload(encoded=encode_image(blank, "png")) if self.transport == "bytes" else _Payload(
            frame=blank[None])
        if payload.encoded is not None:
            tensor = grpcclient.InferInput(INPUT_IMAGE, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[payload.encoded]], dtype=np.object_))
        else:
            tensor = grpcclient.InferInput(INPUT_FRAME, list(payload.frame.shape), "UINT8")
            tensor.set_data_from_numpy(payload.frame)
        response = connection.infer(self.target_model, [tensor], outputs=[grpcclient.InferRequestedOutput(
            OUTPUT_SCORE)], client_timeout=timeout or self.timeout)
        if response.as_numpy(OUTPUT_SCORE) is None:
            raise ValueError(f"the probe's response lacks {OUTPUT_SCORE}")

    def close(self) -> None:
        with self._waiting_lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._waiting_lock.notify_all()
        for job in waiting:
            job.last_error = job.last_error or "the client was closed"
            job.callback(None, self._error(job))
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
            self._scheduler = None
        if self._shm is not None:
            self._shm.close(self.pool.servers)
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> "InspectionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------
    def _send(self, job: _Job) -> None:
        server = self.pool.acquire()
        if server is None:
            self._wait(job)
            return
        job.tried.append(server)
        region = None

        # tritonclient calls this with keywords: callback(result=..., error=...)
        def done(result, error) -> None:
            self._release_region(region)
            answer = None
            if error is None:
                try:
                    answer = self._result(result, server, job.started, job.attempts)
                except Exception as exc:  # a response that does not follow the contract: the server's fault
                    error = exc
            if error is None:
                self.pool.release(server)
                job.callback(answer, None)
                return
            if self._retry_after(job, server, error):
                self._send(job)
            else:
                job.callback(None, self._error(job))

        try:
            inputs, region = self._inputs(job.payload, server)
            server.connection.async_infer(
                self.target_model, inputs, done, outputs=self._outputs(), client_timeout=self.timeout
            )
        except Exception as exc:  # the send itself failed (closed channel, shared memory registration)
            done(result=None, error=exc)

    # -- the retry policy (one, for infer and submit) ----------------------------------------------------------------
    def _retry_after(self, job: _Job, server: Server, error: BaseException) -> bool:
        """A send failed: whether to send the frame again. A bad input is the request's fault (the server stays
        ready, nothing is retried); any other failure is the server's (it is marked not ready) and the frame goes
        again, `max_attempts` sends at most, with a new wait for a ready server."""
        job.last_error = _describe(error)
        if not _retryable(error):
            self.pool.release(server)
            return False
        self._server_failed(server, job.last_error)
        if job.attempts >= self.max_attempts:
            return False
        job.wait_deadline = None  # a new wait, if there is one, starts now
        return True

    def _wait_is_over(self, job: _Job) -> bool:
        """No server is ready: starts the frame's wait (`retry_timeout`) if it has none; True once it is over or
        the client is closed."""
        now = time.monotonic()
        if job.wait_deadline is None:
            job.wait_deadline = now + self.retry_timeout
        return now >= job.wait_deadline or self._closed

    def _wait(self, job: _Job) -> None:
        """No server is ready: the frame waits (the scheduler thread sends it when one is), until its deadline."""
        over = self._wait_is_over(job)
        with self._waiting_lock:
            closed = self._closed
            if not closed and not over:
                self._waiting.append(job)
                if self._scheduler is None:
                    self._scheduler = threading.Thread(target=self._schedule, name="retry-scheduler", daemon=True)
                    self._scheduler.start()
                self._waiting_lock.notify_all()
                return
        job.callback(None, self._error(job))

    def _schedule(self) -> None:
        """Sends waiting frames, oldest first, as soon as a server is ready; fails those whose wait is over."""
        while True:
            with self._waiting_lock:
                while not self._waiting and not self._closed:
                    self._waiting_lock.wait()
                if self._closed:
                    return  # close() fails what is still waiting
            self.pool.wait_for_ready(0.1)
            now = time.monotonic()
            with self._waiting_lock:
                if self._closed:
                    return
                jobs, self._waiting = self._waiting, []
            for job in jobs:
                if self.pool.has_ready():
                    self._send(job)  # back to the waiting list if the server is gone again meanwhile
                elif job.wait_deadline is not None and now >= job.wait_deadline:
                    job.callback(None, self._error(job))
                else:
                    with self._waiting_lock:
                        closed = self._closed
                        if not closed:
                            self._waiting.append(job)
                    if closed:
                        job.callback(None, self._error(job))

    def _payload(self, image: np.ndarray | bytes) -> _Payload:
        if isinstance(image, (bytes, bytearray, memoryview)):
            if self.transport != "bytes":
                from mrkd.core.images import decode_image

                return _Payload(frame=decode_image(bytes(image))[None])
            if len(image) == 0:
                raise ValueError("empty image bytes")
            return _Payload(encoded=bytes(image))
        rgb = to_rgb(image)
        if self.transport == "bytes":
            return _Payload(encoded=encode_image(rgb, self.encoding, self.jpeg_quality))
        return _Payload(frame=rgb[None])

    def _inputs(self, payload: _Payload, server: Server):
        if payload.encoded is not None:
            tensor = grpcclient.InferInput(INPUT_IMAGE, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[payload.encoded]], dtype=np.object_))
            return [tensor], None
        frame = payload.frame
        assert frame is not None
        tensor = grpcclient.InferInput(INPUT_FRAME, list(frame.shape), "UINT8")
        if self._shm is None:
            tensor.set_data_from_numpy(frame)
            return [tensor], None
        region = self._shm.acquire(frame, server)
        tensor.set_shared_memory(region.name, frame.nbytes)
        return [tensor], region

    def _release_region(self, region) -> None:
        if region is not None and self._shm is not None:
            self._shm.release(region)

    def _outputs(self) -> list:
        names = [OUTPUT_SCORE, OUTPUT_RAW_SCORE, OUTPUT_IS_ANOMALOUS]
        if self.want_map:
            names.append(OUTPUT_ANOMALY_MAP)
        return [grpcclient.InferRequestedOutput(n) for n in names]

    def _result(self, response, server: Server, started: float, attempts: int) -> InspectionResult:
        latency_ms = (time.perf_counter() - started) * 1000.0
        score = response.as_numpy(OUTPUT_SCORE)
        raw = response.as_numpy(OUTPUT_RAW_SCORE)
        flag = response.as_numpy(OUTPUT_IS_ANOMALOUS)
        if score is None or raw is None or flag is None:
            raise ValueError(f"the response of {server.url} lacks SCORE, RAW_SCORE or IS_ANOMALOUS")
        anomaly_map = None
        if self.want_map:
            anomaly_map = _normalized_map(response.as_numpy(OUTPUT_ANOMALY_MAP))
        return InspectionResult(
            server=server.url,
            latency_ms=latency_ms,
            score=float(np.asarray(score).reshape(-1)[0]),
            raw_score=float(np.asarray(raw).reshape(-1)[0]),
            is_anomalous=bool(np.asarray(flag).reshape(-1)[0]),
            attempts=attempts,
            response_bytes=response.get_response().ByteSize(),
            anomaly_map=anomaly_map,
        )

    def _server_failed(self, server: Server, message: str) -> None:
        """A failure on the server's side: it gets no requests until a probe (a real inference) passes."""
        if self._shm is not None:
            self._shm.forget(server)  # a restarted server has lost its registrations
        self.pool.release(server, failed=True, error=message)

    def _error(self, job: _Job) -> InspectionError:
        message = job.last_error
        if job.wait_deadline is not None and time.monotonic() >= job.wait_deadline and _message_retryable(message):
            waited = f"no server ready for model {self.target_model!r} within {self.retry_timeout:g} s"
            message = f"{waited} (last error: {message})" if message else f"{waited} ({self.pool.last_errors()})"
        elif not job.tried:
            message = message or f"no server is ready for model {self.target_model!r} ({self.pool.last_errors()})"
        elif job.attempts >= self.max_attempts and _message_retryable(message):
            message = f"{message} (failed {job.attempts} times, on {', '.join(s.url for s in job.tried)})"
        return InspectionError(
            message,
            server=job.tried[-1].url if job.tried else "",
            attempts=job.attempts,
            latency_ms=(time.perf_counter() - job.started) * 1000.0,
            server_fault=_message_retryable(job.last_error),
        )


def encode_image(rgb: np.ndarray, encoding: str = "jpeg", jpeg_quality: int = 90) -> bytes:
    """H x W x 3 uint8 RGB -> JPEG or PNG bytes (OpenCV)."""
    import cv2

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if encoding == "jpeg":
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    elif encoding == "png":
        ok, buffer = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as {encoding}")
    return buffer.tobytes()


def _normalized_map(values: np.ndarray | None) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values)
    while array.ndim > 2:
        array = array[0]
    return decode_map(array)


def _retryable(error: BaseException) -> bool:
    """False only for a bad input (INVALID_ARGUMENT): every other failure is the server's."""
    status = error.status() if isinstance(error, InferenceServerException) else None
    return status not in _NOT_RETRIED


def _message_retryable(message: str) -> bool:
    return not any(code in message for code in _NOT_RETRIED)


def _describe(error: BaseException) -> str:
    if isinstance(error, InferenceServerException):
        status = error.status() or ""
        text = (error.message() or "").strip().splitlines()
        return f"[{status}] {text[0] if text else ''}".strip()
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
