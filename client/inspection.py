"""InspectionClient: one image in, a verdict out, over gRPC to one or more Triton servers.

The same object serves the CLI (asynchronous `submit` with a callback), the locust load test and users' own code
(blocking `infer`). Images are numpy arrays (H x W, H x W x 3 uint8 RGB), which are encoded per `encoding`, or
already-encoded JPEG/PNG bytes, which are sent as they are. A request that fails on one server is retried once on
another ready server; if that fails too (or there is no other), the error is returned.

Transports:
- `bytes` (default): the ensemble's IMAGE input, TYPE_STRING [1, 1], one encoded image. Works across a network.
- `raw`: the decoded frame, UINT8 [1, H, W, 3], to the raw-frame entry point (no encode/decode; 3*H*W bytes).
- `shm`: like `raw`, but the frame is written to Triton system shared memory and only its name crosses gRPC; the
  client must run on the same host as every server it uses.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mrkd.core.preprocess import to_rgb

from .servers import Server, ServerPool

ENCODINGS = ("jpeg", "png")
TRANSPORTS = ("bytes", "raw", "shm")

# Names in the serving contract (model_repository/, docs/serving.md).
INPUT_IMAGE = "IMAGE"
INPUT_FRAME = "FRAME"
DEFAULT_RAW_MODEL_SUFFIX = "_raw"
OUTPUT_SCORE = "SCORE"
OUTPUT_RAW_SCORE = "RAW_SCORE"
OUTPUT_IS_ANOMALOUS = "IS_ANOMALOUS"
OUTPUT_ANOMALY_MAP = "ANOMALY_MAP"

# A request rejected as malformed would be rejected by every server: not retried, and the server stays ready.
_NOT_RETRIED = ("StatusCode.INVALID_ARGUMENT",)
# Failures that say the server (not the request) is in trouble: it gets no requests until a probe finds it ready.
# Other errors (e.g. INTERNAL from one model execution) are retried elsewhere but leave the server in the pool.
_SERVER_DOWN = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.UNKNOWN", "StatusCode.NOT_FOUND", "StatusCode.RESOURCE_EXHAUSTED")


@dataclass
class InspectionResult:
    server: str
    latency_ms: float  # from the first send to the answer, retries included
    score: float  # normalised: 0.5 is the threshold
    raw_score: float
    is_anomalous: bool
    attempts: int
    response_bytes: int
    anomaly_map: np.ndarray | None = None  # float32 [h, w] in [0, 1] (0.5 = threshold), when requested

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"


class InspectionError(RuntimeError):
    """A frame that got no answer: the last server tried, the number of attempts and the reason."""

    def __init__(self, message: str, server: str = "", attempts: int = 0, latency_ms: float = 0.0):
        super().__init__(message)
        self.server = server
        self.attempts = attempts
        self.latency_ms = latency_ms


ResultCallback = Callable[[InspectionResult | None, InspectionError | None], None]


@dataclass
class _Payload:
    """What one frame sends, prepared once and reused by the retry."""

    encoded: bytes | None = None  # transport 'bytes'
    frame: np.ndarray | None = None  # transports 'raw' and 'shm': [1, H, W, 3] uint8


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
    ):
        """servers: HOST:PORT strings (a ServerPool is made and started) or a ServerPool the caller owns.
        wait_ready > 0 waits that long for a ready server and raises NoServerReady if none comes."""
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100, got {jpeg_quality}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.model = model
        self.encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.transport = transport
        self.raw_model = raw_model or model + DEFAULT_RAW_MODEL_SUFFIX
        self.want_map = want_map
        self.timeout = timeout
        self._owns_pool = not isinstance(servers, ServerPool)
        if isinstance(servers, ServerPool):
            self.pool = servers
        else:
            probe_model = self.raw_model if transport != "bytes" else model
            self.pool = ServerPool(list(servers), probe_model, probe_interval=probe_interval)
            self.pool.start()
        self._shm = _SharedMemoryRegions() if transport == "shm" else None
        if wait_ready > 0:
            self.pool.wait_until_ready(wait_ready)

    @property
    def target_model(self) -> str:
        return self.model if self.transport == "bytes" else self.raw_model

    # -- public API ------------------------------------------------------------------------------------------------
    def infer(self, image: np.ndarray | bytes) -> InspectionResult:
        """Blocking: one image -> InspectionResult; raises InspectionError when no server answered."""
        payload = self._payload(image)
        started = time.perf_counter()
        tried: list[Server] = []
        last_error = ""
        while len(tried) < 2:
            server = self.pool.acquire(exclude=tried)
            if server is None:
                break
            tried.append(server)
            try:
                inputs, region = self._inputs(payload, server)
                try:
                    response = server.connection.infer(
                        self.target_model, inputs, outputs=self._outputs(), client_timeout=self.timeout
                    )
                finally:
                    self._release_region(region)
            except Exception as exc:
                last_error = _describe(exc)
                retry = _retryable(exc)
                self._server_failed(server, _server_down(exc), last_error)
                if not retry:
                    break
                continue
            self.pool.release(server)
            return self._result(response, server, started, len(tried))
        raise self._error(last_error, tried, started)

    def submit(self, image: np.ndarray | bytes, callback: ResultCallback) -> None:
        """Asynchronous: sends now, calls callback(result, None) or callback(None, error) from a gRPC thread.
        Encoding errors (bad image) are raised here, before anything is sent."""
        payload = self._payload(image)
        self._send(payload, callback, [], time.perf_counter(), "")

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close(self.pool.servers)
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> "InspectionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------
    def _send(self, payload: _Payload, callback: ResultCallback, tried: list[Server], started: float, last: str):
        server = self.pool.acquire(exclude=tried) if len(tried) < 2 else None
        if server is None:
            callback(None, self._error(last, tried, started))
            return
        tried = tried + [server]
        region = None

        # tritonclient calls this with keywords: callback(result=..., error=...)
        def done(result, error) -> None:
            self._release_region(region)
            if error is None:
                self.pool.release(server)
                try:
                    answer = self._result(result, server, started, len(tried))
                except Exception as exc:  # a response that does not follow the contract
                    callback(None, self._error(_describe(exc), tried, started))
                    return
                callback(answer, None)
                return
            message = _describe(error)
            retry = _retryable(error)
            self._server_failed(server, _server_down(error), message)
            if retry:
                self._send(payload, callback, tried, started, message)
            else:
                callback(None, self._error(message, tried, started))

        try:
            inputs, region = self._inputs(payload, server)
            server.connection.async_infer(
                self.target_model, inputs, done, outputs=self._outputs(), client_timeout=self.timeout
            )
        except Exception as exc:  # the send itself failed (closed channel, shared memory registration)
            done(result=None, error=exc)

    def _payload(self, image: np.ndarray | bytes) -> _Payload:
        if isinstance(image, (bytes, bytearray, memoryview)):
            if self.transport != "bytes":
                from mrkd.core.preprocess import decode_image

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

    def _server_failed(self, server: Server, mark_not_ready: bool, message: str) -> None:
        if self._shm is not None:
            self._shm.forget(server)  # a restarted server has lost its registrations
        self.pool.release(server, failed=mark_not_ready, error=message)

    def _error(self, message: str, tried: list[Server], started: float) -> InspectionError:
        if not tried:
            names = ", ".join(s.url for s in self.pool.servers)
            message = f"no server is ready for model {self.target_model!r} ({names})"
        elif len(tried) == 1 and _message_retryable(message):
            message = f"{message} (no other ready server to retry on)"
        return InspectionError(
            message,
            server=tried[-1].url if tried else "",
            attempts=len(tried),
            latency_ms=(time.perf_counter() - started) * 1000.0,
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
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def _retryable(error: BaseException) -> bool:
    status = error.status() if isinstance(error, InferenceServerException) else None
    return status not in _NOT_RETRIED


def _server_down(error: BaseException) -> bool:
    """True for transport-level failures and for anything that is not an answer from Triton."""
    if not isinstance(error, InferenceServerException):
        return True
    status = error.status()
    return status is None or status in _SERVER_DOWN


def _message_retryable(message: str) -> bool:
    return not any(code in message for code in _NOT_RETRIED)


def _describe(error: BaseException) -> str:
    if isinstance(error, InferenceServerException):
        status = error.status() or ""
        text = (error.message() or "").strip().splitlines()
        return f"[{status}] {text[0] if text else ''}".strip()
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@dataclass
class _Region:
    name: str
    handle: object
    size: int


class _SharedMemoryRegions:
    """Triton system shared-memory regions for frames: one per request in flight, reused, registered per server."""

    _ids = itertools.count()

    def __init__(self):
        from tritonclient.utils import shared_memory

        self._shm = shared_memory
        self._free: list[_Region] = []
        self._all: list[_Region] = []
        self._registered: dict[str, set[str]] = {}  # server url -> region names registered there
        self._lock = threading.Lock()

    def acquire(self, frame: np.ndarray, server: Server) -> _Region:
        with self._lock:
            fitting = [r for r in self._free if r.size >= frame.nbytes]
            region = min(fitting, key=lambda r: r.size) if fitting else None
            if region is not None:
                self._free.remove(region)
        if region is None:
            name = f"mrkd_client_{os.getpid()}_{next(self._ids)}"
            handle = self._shm.create_shared_memory_region(name, "/" + name, frame.nbytes, create_only=True)
            region = _Region(name, handle, frame.nbytes)
            with self._lock:
                self._all.append(region)
        try:
            self._shm.set_shared_memory_region(region.handle, [frame])
            with self._lock:
                known = region.name in self._registered.setdefault(server.url, set())
            if not known:
                server.connection.register_system_shared_memory(region.name, "/" + region.name, region.size)
                with self._lock:
                    self._registered[server.url].add(region.name)
        except Exception:
            self.release(region)
            raise
        return region

    def release(self, region: _Region) -> None:
        with self._lock:
            if region not in self._free:
                self._free.append(region)

    def forget(self, server: Server) -> None:
        with self._lock:
            self._registered.pop(server.url, None)

    def close(self, servers: Sequence[Server]) -> None:
        for server in servers:
            with self._lock:
                names = self._registered.pop(server.url, set())
            for name in names:
                try:
                    server.connection.unregister_system_shared_memory(name)
                except Exception:
                    pass  # the server may be gone; its registrations went with it
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            try:
                self._shm.destroy_shared_memory_region(region.handle)
            except Exception:
                pass
