"""The code behind the Triton python-backend models; each model.py in a repository is one import of a class here.

Models of one product (export names them from the product name, e.g. "mrkd" or "bottle"):
  {name}_preprocess        IMAGE (encoded bytes)        -> PREPARED uint8 [3, S, S]    (decode_image + prepare_image)
  {name}_frame_preprocess  FRAME (uint8 H x W x 3)      -> PREPARED uint8 [3, S, S]    (prepare_image)
  {name}_detector          PREPARED                     -> RAW_SCORE [1], RAW_MAP [M, M] (Detector: network on the
                                                           configured runtime + fused map)
  {name}_postprocess       RAW_SCORE, RAW_MAP           -> SCORE, IS_ANOMALOUS, ANOMALY_MAP (calibration)

The python backend hands execute() a list of requests (a dynamic batch), each holding one or more images. Every
model here answers each request on its own: a request whose input is bad gets an error response naming the
problem, and the other requests of the same batch are answered normally.

Error codes say whose fault it was, because clients act on them: INVALID_ARG only for a bad input (an image that
cannot be decoded, too many pixels, a missing input): retrying it elsewhere cannot help. A failure on the server's
side (the forward pass raised, an unexpected exception, a CUDA out-of-memory) is INTERNAL (UNAVAILABLE for out of
memory, which may pass): the same request may well succeed on another server, and clients retry it there.
The detector concatenates the batch into
one forward pass and splits the results. Feature maps never leave the detector process; what crosses processes is
uint8 images and the (resized) float32 anomaly map.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core import wire
from ..core.preprocess import InvalidImageError, decode_image, prepare_image
from ..core.wire import CALIBRATION_FILE, CHECKPOINT_FILE, MAP_DTYPES, decode_map, encode_map  # noqa: F401 (re-exported)
from ..runtime.calibration import Calibration
from .errors import ServerError

log = logging.getLogger("mrkd.triton.models")

# Decoded pixels one request may hold, all its images together (each image is also limited to
# core.preprocess.MAX_PIXELS): 100 Mpx is 300 MB of RGB, where 32 images at the per-image limit would be 3.8 GB.
MAX_REQUEST_PIXELS = 100_000_000


# ----------------------------------------------------------------------------------------------------------------
# Pure functions: the same code runs inside Triton and in tests/benchmarks that compare against in-process results.


def prepare_encoded(data: bytes, image_size: int) -> torch.Tensor:
    """Encoded JPEG/PNG/BMP bytes -> uint8 [3, S, S] (raises InvalidImageError naming the problem)."""
    return prepare_image(decode_image(data), image_size)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Raw maps [B, S, S] -> [B, size, size] float32 (antialiased bilinear; identity when the size matches)."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps.float()
    resized = torch.nn.functional.interpolate(
        maps.float()[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[:, 0]


@dataclass(frozen=True)
class PostprocessedBatch:
    score: np.ndarray  # [B, 1] float32, normalised (0.5 = threshold)
    is_anomalous: np.ndarray  # [B, 1] bool
    anomaly_map: np.ndarray  # [B, M, M] fp16 or uint8


def postprocess(
    raw_scores: np.ndarray, raw_maps: np.ndarray, calibration: Calibration, map_dtype: str
) -> PostprocessedBatch:
    """Raw scores [B, 1] and raw maps [B, M, M] -> calibrated outputs."""
    raw_scores = np.asarray(raw_scores, dtype=np.float32)
    return PostprocessedBatch(
        score=np.asarray(calibration.normalize(raw_scores), dtype=np.float32),
        is_anomalous=np.asarray(calibration.is_anomalous(raw_scores), dtype=bool),
        anomaly_map=encode_map(np.asarray(calibration.normalize_map(raw_maps)), map_dtype),
    )


def torch_threads_for(requested: int, instances: int, cpu_count: int | None = None) -> int:
    """Threads per model instance: `requested`, or (0 = auto) the cores shared evenly by the instances."""
    if requested > 0:
        return requested
    return max(1, (cpu_count or os.cpu_count() or 1) // max(1, instances))


def check_request_pixels(pixels: Sequence[int], limit: int = MAX_REQUEST_PIXELS) -> None:
    """Raises InvalidImageError when a request's images hold more than `limit` pixels together."""
    total = int(sum(pixels))
    if total > limit:
        raise InvalidImageError(
            f"the request's {len(pixels)} images hold {total} pixels in total, more than the limit of {limit} per "
            f"request; send fewer or smaller images per request"
        )


def declared_pixels(data: bytes) -> int:
    """Width x height from an encoded image's header (nothing is decoded); 0 when the header cannot be read (the
    decoder then reports what is wrong)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return int(width) * int(height)


def split_counts(counts: Sequence[int]) -> list[slice]:
    """Per-request item counts -> slices into the concatenated batch."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices


# ----------------------------------------------------------------------------------------------------------------
# Triton python-backend models. `triton_python_backend_utils` exists only inside the backend's stub process, so
# it is imported when Triton initialises a model, never when this module is imported.


@dataclass(frozen=True)
class ModelContext:
    """What Triton tells a model instance about itself (the `args` of initialize)."""

    name: str
    version_dir: Path
    config: dict[str, Any]
    instance_kind: str  # "CPU" or "GPU"
    device_id: int

    @classmethod
    def from_args(cls, args: dict[str, str]) -> "ModelContext":
        return cls(
            name=args["model_name"],
            version_dir=Path(args["model_repository"]) / args["model_version"],
            config=json.loads(args["model_config"]),
            instance_kind=args.get("model_instance_kind", "CPU"),
            device_id=int(args.get("model_instance_device_id", "0") or 0),
        )

    def parameter(self, key: str, default: str | None = None) -> str:
        value = self.config.get("parameters", {}).get(key, {}).get("string_value")
        if value is None:
            if default is None:
                raise ServerError(f"model {self.name}: config.pbtxt lacks parameter {key!r}")
            return default
        return value

    @property
    def instance_count(self) -> int:
        return sum(int(group.get("count", 1)) for group in self.config.get("instance_group", [])) or 1

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device_id}" if self.instance_kind == "GPU" else "cpu"


class _PythonModel:
    """Shared skeleton: per-request error responses around a batch-level `_run`."""

    input_name: str = ""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.ctx = ModelContext.from_args(args)
        threads = torch_threads_for(int(self.ctx.parameter("torch_threads", "1")), self.ctx.instance_count)
        torch.set_num_threads(threads)
        self._setup()
        self._warm_up()
        log.info("model %s ready (%s, %d torch threads)", self.ctx.name, self.ctx.torch_device, threads)

    def _setup(self) -> None:
        raise NotImplementedError

    def _warm_up(self) -> None:
        """Runs the model once so that the first real request does not pay for lazy initialisation."""

    def _error(self, message: str, code: str = "INVALID_ARG"):
        """A per-request error response with a Triton status code (see the module docstring)."""
        value = getattr(self.pb.TritonError, code, None)
        error = self.pb.TritonError(message, value) if value is not None else self.pb.TritonError(message)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    def _invalid(self, message: str):
        """The request's fault (bad input): INVALID_ARG, clients do not retry it."""
        return self._error(message, "INVALID_ARG")

    def _failed(self, message: str, exc: BaseException | None = None):
        """The server's fault: INTERNAL (UNAVAILABLE for out of memory), clients retry on another server."""
        out_of_memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
        return self._error(message, "UNAVAILABLE" if out_of_memory else "INTERNAL")

    def _input(self, request, name: str) -> np.ndarray:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise InvalidImageError(f"request has no input {name!r}")
        return tensor.as_numpy()

    def finalize(self) -> None:
        log.info("model %s unloaded", getattr(getattr(self, "ctx", None), "name", "?"))


class _PreprocessBase(_PythonModel):
    """Turns each request's images into PREPARED uint8 [B, 3, S, S]; a bad image fails only its own request."""

    def _setup(self) -> None:
        self.image_size = int(self.ctx.parameter("image_size"))

    def _prepare_item(self, item: Any) -> torch.Tensor:
        raise NotImplementedError

    def _items(self, request) -> Sequence[Any]:
        raise NotImplementedError

    def _pixels(self, item: Any) -> int:
        """Pixels the item decodes to (checked for the whole request before anything is decoded)."""
        raise NotImplementedError

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                items = self._items(request)
                check_request_pixels([self._pixels(item) for item in items])
                prepared = []
                for index, item in enumerate(items):
                    try:
                        prepared.append(self._prepare_item(item))
                    except InvalidImageError as exc:
                        where = f"{self.input_name}[{index}]" if len(items) > 1 else self.input_name
                        raise InvalidImageError(f"invalid {where}: {exc}") from exc
                batch = torch.stack(prepared).numpy()
                responses.append(self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(wire.PREPARED, batch)]))
            except InvalidImageError as exc:
                responses.append(self._invalid(str(exc)))
            except Exception as exc:  # an unexpected failure still fails only this request, with its cause
                log.exception("preprocess failed")
                responses.append(self._failed(f"preprocess failed: {type(exc).__name__}: {exc}", exc))
        return responses


class PreprocessModel(_PreprocessBase):
    """IMAGE: TYPE_STRING [B, 1], one encoded JPEG/PNG/BMP per item."""

    input_name = wire.INPUT_IMAGE

    def _items(self, request) -> Sequence[Any]:
        return self._input(request, wire.INPUT_IMAGE).reshape(-1)

    def _prepare_item(self, item: Any) -> torch.Tensor:
        if not isinstance(item, (bytes, bytearray, np.bytes_)):
            raise InvalidImageError(f"expected encoded image bytes, got {type(item).__name__}")
        return prepare_encoded(bytes(item), self.image_size)

    def _pixels(self, item: Any) -> int:
        return declared_pixels(bytes(item)) if isinstance(item, (bytes, bytearray, np.bytes_)) else 0

    def _warm_up(self) -> None:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("L", (self.image_size + 7, self.image_size + 5)).save(buffer, format="PNG")
        prepare_encoded(buffer.getvalue(), self.image_size)


class FramePreprocessModel(_PreprocessBase):
    """FRAME: UINT8 [B, H, W, 3] decoded frames (clients that already hold pixels)."""

    input_name = wire.INPUT_FRAME

    def _items(self, request) -> Sequence[Any]:
        return list(self._input(request, wire.INPUT_FRAME))

    def _prepare_item(self, item: Any) -> torch.Tensor:
        return prepare_image(item, self.image_size)

    def _pixels(self, item: Any) -> int:
        return int(item.shape[0]) * int(item.shape[1]) if getattr(item, "ndim", 0) >= 2 else 0

    def _warm_up(self) -> None:
        prepare_image(np.zeros((self.image_size + 7, self.image_size + 5, 3), np.uint8), self.image_size)


class DetectorModel(_PythonModel):
    """PREPARED [B, 3, S, S] of all requests -> one Detector forward pass -> RAW_SCORE [B, 1], RAW_MAP [B, M, M]."""

    input_name = wire.PREPARED

    def _setup(self) -> None:
        from ..runtime.detector import Detector

        checkpoint = self.ctx.version_dir / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise ServerError(
                f"model {self.ctx.name}: no {CHECKPOINT_FILE} in {self.ctx.version_dir}; export a trained model "
                f"first: python -m mrkd.export --checkpoint CKPT --repo <repository>"
            )
        self.map_size = int(self.ctx.parameter("map_size"))
        # the network on the runtime the export chose and checked (its files sit beside the checkpoint), with the
        # instance's threads; versions exported before runtimes existed run torch
        self.detector = Detector.load(
            checkpoint, device=self.ctx.torch_device, runtime=self.ctx.parameter("runtime", "torch"),
            precision=self.ctx.parameter("precision", "auto"), threads=torch.get_num_threads(),
            network_dir=self.ctx.version_dir)
        log.info("model %s: network on %s %s", self.ctx.name, self.detector.runtime, self.detector.precision)
        expected = int(self.ctx.parameter("image_size"))
        if self.detector.image_size != expected:
            raise ServerError(
                f"model {self.ctx.name}: checkpoint image size {self.detector.image_size} != config image_size "
                f"{expected}; re-export the checkpoint"
            )

    def _warm_up(self) -> None:
        sizes = [int(s) for s in self.ctx.parameter("warmup_batch_sizes", "1").split(",") if s.strip()]
        size = self.detector.image_size
        for batch_size in sizes:
            self.detector.raw_maps(torch.zeros(batch_size, 3, size, size, dtype=torch.uint8))

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, 3, S, S] -> (raw scores [B, 1] float32, raw maps [B, M, M] float32) on the CPU."""
        maps, scores = self.detector.raw_maps(batch)
        maps = resize_maps(maps, self.map_size)
        return scores.float().cpu().numpy().reshape(-1, 1), maps.cpu().numpy()

    def execute(self, requests: list) -> list:
        inputs: list[np.ndarray | None] = []
        for request in requests:
            try:
                inputs.append(self._input(request, wire.PREPARED))
            except Exception as exc:
                inputs.append(None)
                log.warning("bad detector request: %s", exc)
        good = [x for x in inputs if x is not None]
        try:
            results = self.infer(torch.from_numpy(np.concatenate(good))) if good else None
        except Exception as exc:  # the server's fault, not the requests': INTERNAL, so clients retry elsewhere
            log.exception("detector forward pass failed")
            return [self._failed(f"detector failed: {type(exc).__name__}: {exc}", exc) for _ in requests]
        responses, slices = [], iter(split_counts([len(x) for x in good]))
        for x in inputs:
            if x is None:
                responses.append(self._invalid(f"request has no {wire.PREPARED} input"))
                continue
            part = next(slices)
            responses.append(
                self.pb.InferenceResponse(
                    output_tensors=[
                        self.pb.Tensor(wire.OUTPUT_RAW_SCORE, np.ascontiguousarray(results[0][part])),
                        self.pb.Tensor(wire.RAW_MAP, np.ascontiguousarray(results[1][part])),
                    ]
                )
            )
        return responses


class PostprocessModel(_PythonModel):
    """RAW_SCORE, RAW_MAP -> SCORE (normalised), IS_ANOMALOUS, ANOMALY_MAP (normalised, fp16 or uint8)."""

    input_name = wire.OUTPUT_RAW_SCORE

    def _setup(self) -> None:
        path = self.ctx.version_dir / CALIBRATION_FILE
        if not path.is_file():
            raise ServerError(f"model {self.ctx.name}: no {CALIBRATION_FILE} in {self.ctx.version_dir}; re-export")
        self.calibration = Calibration.from_dict(json.loads(path.read_text()))
        self.map_dtype = self.ctx.parameter("map_dtype")
        encode_map(np.zeros((1, 1), np.float32), self.map_dtype)  # rejects an unknown dtype at load time

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                out = postprocess(
                    self._input(request, wire.OUTPUT_RAW_SCORE), self._input(request, wire.RAW_MAP), self.calibration,
                    self.map_dtype,
                )
                responses.append(
                    self.pb.InferenceResponse(
                        output_tensors=[
                            self.pb.Tensor(wire.OUTPUT_SCORE, out.score),
                            self.pb.Tensor(wire.OUTPUT_IS_ANOMALOUS, out.is_anomalous),
                            self.pb.Tensor(wire.OUTPUT_ANOMALY_MAP, out.anomaly_map),
                        ]
                    )
                )
            except Exception as exc:  # its inputs come from the detector, not from the client: the server's fault
                log.exception("postprocess failed")
                responses.append(self._failed(f"postprocess failed: {type(exc).__name__}: {exc}", exc))
        return responses


ROLE_CLASSES: dict[str, Callable[[], _PythonModel]] = {
    "preprocess": PreprocessModel,
    "frame_preprocess": FramePreprocessModel,
    "detector": DetectorModel,
    "postprocess": PostprocessModel,
}
