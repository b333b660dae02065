"""The detector network converted for ONNX Runtime / OpenVINO, checked against torch, with its manifest; and
`load_runner`, which gives the runner of a runtime (from converted files, or converting at load).

The export is generic over the module: the graph's outputs are whatever lists the module returns, named
teacher_0.., student_0... (`torch.onnx.export`, TorchScript exporter, opset 17, dynamic batch). Every converted
network is checked against the torch module it came from (`max_relative_error`); `convert` refuses an fp32
conversion above `FP32_TOLERANCE`. `network.json` (the manifest) records runtime, precision, files, checkpoint
sha256, errors and versions.
"""
from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.config import ModelConfig
from ..core.files import atomic_path
from ..core.preprocess import normalize
from ..ops import anomaly_map
from .errors import NetworkRuntimeError
from .runners import (
    INPUT_NAME,
    Features,
    NetworkRunner,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    check_choice,
    resolve_precision,
)

FP32_TOLERANCE = 1e-4  # largest max relative error of an fp32 conversion against torch
ONNX_OPSET = 17
ONNX_FILE = "network.onnx"
OPENVINO_FILE = "network.xml"  # OpenVINO IR; its weights are network.bin beside it
MANIFEST_FILE = "network.json"
MANIFEST_FORMAT = "mrkd-network"
VERIFY_BATCH = 3  # not the export's trace batch (1): the check also proves that the batch dimension is dynamic
VERIFY_SEED = 20231


class _FlatFeatures(nn.Module):
    """model(x) -> (teacher..., student...): a flat tuple of tensors, what an ONNX graph can return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        teacher, student = self.model(x)
        return (*teacher, *student)


_ONNX_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


def export_onnx(model: nn.Module, image_size: int, path: str | Path) -> list[str]:
    """Writes the module as ONNX (fp32, dynamic batch, fixed image size) atomically; returns the output names."""
    model = model.to("cpu", torch.float32).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode():
        teacher, student = model(example)
    names = [f"teacher_{i}" for i in range(len(teacher))] + [f"student_{i}" for i in range(len(student))]
    with _ONNX_EXPORT_LOCK, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            _FlatFeatures(model), (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *names]}, do_constant_folding=True)
    return names


def convert_onnx_to_openvino(onnx_path: str | Path, xml_path: str | Path) -> None:
    """ONNX -> OpenVINO IR (network.xml + network.bin) with fp32 weights (save_model's default is fp16)."""
    import openvino as ov

    xml_path = Path(xml_path)
    model = ov.Core().read_model(str(onnx_path))
    with tempfile.TemporaryDirectory(prefix=".ir-", dir=xml_path.parent) as tmp:
        staged = Path(tmp) / xml_path.name  # OpenVINO insists on the .xml name and writes the .bin beside it
        ov.save_model(model, str(staged), compress_to_fp16=False)
        staged.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
        staged.replace(xml_path)


def verification_batch(image_size: int, batch: int = VERIFY_BATCH, seed: int = VERIFY_SEED) -> Tensor:
    """Seeded uint8 noise images, normalised as real images are: the inputs of every runtime check."""
    generator = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (batch, 3, image_size, image_size), generator=generator,
                                   dtype=torch.uint8))


def max_relative_error(features: Features, reference: Features) -> float:
    """Largest max|difference| / max|reference| over all feature maps (0 = identical; NaN anywhere = inf)."""
    worst = 0.0
    for got, want in zip([*features[0], *features[1]], [*reference[0], *reference[1]]):
        got, want = got.detach().float().cpu(), want.detach().float().cpu()
        if got.shape != want.shape:
            raise NetworkRuntimeError(f"feature shape {tuple(got.shape)} != torch's {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            return float("inf")
        scale = float(want.abs().max())
        worst = max(worst, float((got - want).abs().max()) / max(scale, 1e-12))
    return worst


def score_relative_error(features: Features, reference: Features, config: ModelConfig) -> float:
    """Largest |score difference| / |torch score| of the image scores (the model's map settings) of both sets."""
    size, options = (config.image_size, config.image_size), config.map_options()
    _, got = anomaly_map([t.float() for t in features[0]], [s.float() for s in features[1]], size, **options)
    _, want = anomaly_map([t.float() for t in reference[0]], [s.float() for s in reference[1]], size, **options)
    return float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())


@dataclass
class NetworkManifest:
    """network.json beside the converted files: what they are, what they came from, how well they match torch."""

    runtime: str
    precision: str  # as requested (what the export checked)
    effective_precision: str  # what the runtime runs: a CPU without bf16 instructions runs fp32
    files: list[str]
    checkpoint_sha256: str
    image_size: int
    max_relative_error: float
    score_relative_error: float
    opset: int = ONNX_OPSET
    versions: dict[str, str] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "NetworkManifest | None":
        path = folder / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {MANIFEST_FORMAT!r}")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise NetworkRuntimeError(f"{path} is not a valid network manifest ({exc}); re-export") from exc


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks (what a manifest ties a converted network to)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def runtime_versions() -> dict[str, str]:
    """The versions of torch, onnx, ONNX Runtime, OpenVINO and Python, recorded in a manifest."""
    import onnx
    import onnxruntime
    import openvino

    return {"torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__.split("-")[0], "python": platform.python_version()}


def _load_converted(runtime: str, precision: str, folder: Path, threads: int) -> NetworkRunner:
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(folder / ONNX_FILE, threads)
    model_file = folder / OPENVINO_FILE if (folder / OPENVINO_FILE).is_file() else folder / ONNX_FILE
    return OpenVinoRunner(model_file, threads, precision)


def convert(model: nn.Module, config: ModelConfig, runtime: str, precision: str, folder: str | Path,
            checkpoint_sha256: str = "", threads: int | None = None, write_ir: bool = True) -> NetworkManifest:
    """Converts `model` for `runtime` into `folder` (network.onnx, + network.xml/.bin for openvino when `write_ir`),
    checks the result against the torch module and writes network.json. An fp32 conversion whose max relative
    error exceeds FP32_TOLERANCE raises NetworkRuntimeError (its files are left out of the manifest)."""
    check_choice(runtime, precision, "cpu", config)
    if runtime == "torch":
        raise NetworkRuntimeError("runtime torch runs the checkpoint itself; there is nothing to convert")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threads = threads or torch.get_num_threads()
    export_onnx(model, config.image_size, folder / ONNX_FILE)
    files = [ONNX_FILE]
    if runtime == "openvino" and write_ir:
        convert_onnx_to_openvino(folder / ONNX_FILE, folder / OPENVINO_FILE)
        files += [OPENVINO_FILE, Path(OPENVINO_FILE).with_suffix(".bin").name]
    runner = _load_converted(runtime, precision, folder, threads)
    x = verification_batch(config.image_size)
    reference = TorchRunner(model, "cpu", "fp32")(x)
    got = runner(x)
    error = max_relative_error(got, reference)
    if precision == "fp32" and not error <= FP32_TOLERANCE:
        raise NetworkRuntimeError(
            f"{runtime} does not reproduce the torch network: max relative error {error:.2e} > {FP32_TOLERANCE:.0e} "
            f"on {VERIFY_BATCH} seeded images; the network cannot be served with this runtime")
    manifest = NetworkManifest(
        runtime=runtime, precision=precision, effective_precision=runner.precision, files=files,
        checkpoint_sha256=checkpoint_sha256,
        image_size=config.image_size, max_relative_error=error,
        score_relative_error=score_relative_error(got, reference, config),
        versions=runtime_versions())
    manifest.write(folder)
    return manifest


def load_runner(model: nn.Module, config: ModelConfig, runtime: str = "torch", precision: str = "auto",
                device: str | torch.device = "cpu", threads: int | None = None, network_dir: str | Path | None = None,
                checkpoint_sha256: str | None = None) -> NetworkRunner:
    """The runner for `runtime`. Non-torch runtimes load the converted files of `network_dir` (written and checked
    by `convert` at export; their manifest must name this runtime, precision and checkpoint) or, without a
    `network_dir`, convert `model` into a temporary folder now (checked against torch the same way)."""
    precision = resolve_precision(precision, device)
    check_choice(runtime, precision, device, config)
    if runtime == "torch":
        return TorchRunner(model, device, precision)
    threads = threads or torch.get_num_threads()
    if network_dir is None:
        with tempfile.TemporaryDirectory(prefix="mrkd-network-") as tmp:
            convert(model, config, runtime, precision, tmp, threads=threads, write_ir=False)
            return _load_converted(runtime, precision, Path(tmp), threads)
    folder = Path(network_dir)
    manifest = NetworkManifest.read(folder)
    fix = f"re-export it for them (python -m mrkd.export --runtime {runtime} --precision {precision})"
    if manifest is None:
        raise NetworkRuntimeError(f"no {MANIFEST_FILE} in {folder}: the network was not converted for {runtime}; {fix}")
    if manifest.runtime != runtime or manifest.precision != precision:
        raise NetworkRuntimeError(f"{folder / MANIFEST_FILE} holds a {manifest.runtime} {manifest.precision} "
                                  f"network, not {runtime} {precision}; {fix}")
    if checkpoint_sha256 is not None and manifest.checkpoint_sha256 != checkpoint_sha256:
        raise NetworkRuntimeError(f"{folder / MANIFEST_FILE} was converted from another checkpoint; {fix}")
    if manifest.image_size != config.image_size:
        raise NetworkRuntimeError(f"{folder / ONNX_FILE} takes {manifest.image_size} px images, the checkpoint "
                                  f"{config.image_size} px; {fix}")
    missing = [name for name in manifest.files if not (folder / name).is_file()]
    if missing:
        raise NetworkRuntimeError(f"{folder} lacks {', '.join(missing)} listed in {MANIFEST_FILE}; {fix}")
    return _load_converted(runtime, precision, folder, threads)
