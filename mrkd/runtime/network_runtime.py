"""The detector network's runtimes, re-exported under the name callers have used: the runners (`runners.py`) and
the conversion for ONNX Runtime / OpenVINO with its manifest (`convert.py`)."""
from __future__ import annotations

from .convert import (
                      FP32_TOLERANCE,
                      MANIFEST_FILE,
                      ONNX_FILE,
                      OPENVINO_FILE,
                      NetworkManifest,
                      convert,
                      file_sha256,
                      load_runner,
                      max_relative_error,
                      runtime_versions,
                      score_relative_error,
                      verification_batch,
)
from .errors import NetworkRuntimeError
from .runners import (
                      DEFAULT_CPU_RUNTIME,
                      PRECISIONS,
                      RUNTIMES,
                      NetworkRunner,
                      OnnxRuntimeRunner,
                      OpenVinoRunner,
                      TorchRunner,
                      check_choice,
                      check_finite,
                      resolve_precision,
)

__all__ = ["DEFAULT_CPU_RUNTIME", "FP32_TOLERANCE", "MANIFEST_FILE", "NetworkManifest", "NetworkRunner",
           "NetworkRuntimeError", "ONNX_FILE", "OPENVINO_FILE", "OnnxRuntimeRunner", "OpenVinoRunner", "PRECISIONS",
           "RUNTIMES", "TorchRunner", "check_choice", "check_finite", "convert", "file_sha256", "load_runner",
           "max_relative_error", "resolve_precision", "runtime_versions", "score_relative_error",
           "verification_batch"]
