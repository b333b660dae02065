"""The detector network (teacher + bottleneck + student) on torch, ONNX Runtime or OpenVINO, behind one interface:
the runners. Converting the network for ONNX Runtime / OpenVINO, and loading a converted one: `convert.py`.

A runner maps a normalised float32 batch [B, 3, S, S] to (teacher features, student features): lists of
[B, C, H, W] torch tensors, one per scale, in the order `MRKDModel.forward` returns them. The fused anomaly-map
operator (mrkd.ops) then runs on those tensors in the same process, whatever the runtime.

- `torch`: the MRKDModel module itself, the reference. fp32 eager on CPU; bf16 autocast + channels_last when
  `precision="bf16"` (the default on CUDA, as before).
- `onnxruntime`: the exported ONNX graph run by ONNX Runtime's CPU execution provider, fp32 only.
- `openvino`: the same ONNX graph (or its OpenVINO IR) compiled for the CPU with an explicit inference precision:
  f32, or bf16 (OpenVINO's own default on a CPU with bf16 support, which is why f32 is always requested
  explicitly).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..core.config import ModelConfig
from .errors import NetworkRuntimeError

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
DEFAULT_CPU_RUNTIME = "onnxruntime"  # the fastest exact runtime measured on CPU (docs/serving.md, "Runtimes")
INPUT_NAME = "image"


Features = tuple[list[Tensor], list[Tensor]]


class NetworkRunner(Protocol):
    """normalised float32 [B, 3, S, S] -> (teacher features, student features), one tensor per scale."""

    runtime: str
    precision: str

    def __call__(self, x: Tensor) -> Features: ...


# ------------------------------------------------------------------------------------------------------ choices


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"auto" is bf16 on CUDA (bf16 autocast, as the GPU path always ran) and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise NetworkRuntimeError(f"precision must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    return precision


def check_choice(runtime: str, precision: str, device: str | torch.device, config: ModelConfig) -> None:
    """Raises NetworkRuntimeError naming why `runtime` at `precision` cannot run this model on `device`."""
    if runtime not in RUNTIMES:
        raise NetworkRuntimeError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise NetworkRuntimeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runtime == "torch":
        return
    if torch.device(device).type != "cpu":
        raise NetworkRuntimeError(
            f"runtime {runtime} runs on the CPU here; on a GPU use runtime torch (docs/serving.md says how ONNX "
            f"Runtime's CUDA and TensorRT providers would plug in)")
    if runtime == "onnxruntime" and precision != "fp32":
        raise NetworkRuntimeError("onnxruntime runs fp32 only on the CPU; for bf16 use runtime openvino or torch")
    if config.inference_mask:
        raise NetworkRuntimeError(
            f"this model draws a random FLM mask at inference (inference_mask=True); runtime {runtime} would bake "
            f"one draw into the graph. Use runtime torch")


# ------------------------------------------------------------------------------------------------------ runners


def check_finite(x: Tensor) -> None:
    """Every runner refuses NaN/Inf input: OpenVINO's clamps would turn it into finite, normal-looking features."""
    if not bool(torch.isfinite(x).all()):
        raise NetworkRuntimeError(f"the network input holds NaN or Inf ({int((~torch.isfinite(x)).sum())} values)")


class TorchRunner:
    """The MRKDModel module itself (the reference every other runtime is checked against)."""

    runtime = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.channels_last = precision == "bf16" or self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Features:
        x = x.to(self.device, non_blocking=True)
        check_finite(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            teacher, student = self.model(x)
        return list(teacher), list(student)


def _split_outputs(outputs: list[np.ndarray]) -> Features:
    tensors = [torch.from_numpy(np.asarray(o)) for o in outputs]
    half = len(tensors) // 2
    return tensors[:half], tensors[half:]


class OnnxRuntimeRunner:
    """The exported ONNX graph on ONNX Runtime's CPU execution provider."""

    runtime = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: str | Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        # idle threads sleep instead of spinning: the cores are shared with pre/postprocessing and the fused map
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: Tensor) -> Features:
        check_finite(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return _split_outputs(self.session.run(None, {INPUT_NAME: array}))


class OpenVinoRunner:
    """The network compiled by OpenVINO for the CPU, at an explicit inference precision (f32 or bf16)."""

    runtime = "openvino"

    def __init__(self, model_path: str | Path, threads: int, precision: str = "fp32") -> None:
        import openvino as ov

        hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        core = ov.Core()
        # no CPU pinning: the detector shares the cores with pre/postprocessing (and on a busy host with others)
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
        effective = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        # a CPU without bf16 instructions runs f32 whatever was asked: say what actually runs
        self.precision = "bf16" if "bfloat16" in effective or effective == "bf16" else "fp32"
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls from several threads take turns

    def __call__(self, x: Tensor) -> Features:
        check_finite(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            result = self.request.infer({0: array})
            outputs = [np.array(result[port]) for port in self.compiled.outputs]
        return _split_outputs(outputs)


# --------------------------------------------------------------------------------------------------- conversion
