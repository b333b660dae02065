"""A product's config.pbtxt files: the export options they come from, rendering them, and reading them back.

The six models of a product NAME (ensembles NAME and NAME_raw; python models NAME_preprocess,
NAME_frame_preprocess, NAME_detector, NAME_postprocess) and their inputs and outputs follow mrkd.core.wire. Every
config of an export pins its version (python models: `version_policy: { specific: { versions: [ V ] } }`;
ensembles: each step's `model_version: V`), so a server serves the six models of one export together. The reading
side (`served_version`, `config_field`, `ensemble_steps`) is what `mrkd.serve` checks a repository with.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core import wire
from ..core.files import atomic_path, user_path
from ..core.options import int_list, option
from ..core.wire import DEFAULT_NAME, MAP_CONFIG_TYPES, MAP_DTYPES, model_names
from ..runtime.runners import DEFAULT_CPU_RUNTIME, PRECISIONS, RUNTIMES
from .errors import ExportError

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # matched entirely (fullmatch): no trailing newline
MODEL_CLASSES = {
    "preprocess": "PreprocessModel",
    "frame_preprocess": "FramePreprocessModel",
    "detector": "DetectorModel",
    "postprocess": "PostprocessModel",
}


@dataclass
class ExportOptions:
    """How a product is exported and served; each field is also an option of `python -m mrkd.export`."""

    name: str = option(DEFAULT_NAME, help="product name; prefixes the model names (default: mrkd)")
    # where the detector runs: "cpu" (KIND_CPU) or "gpu" (KIND_GPU); the command's "auto" picks one
    device: str = option("cpu", choices=["cpu", "gpu", "auto"], cli_default="auto",
                         help="where the detector runs (auto: gpu if this machine has CUDA)")
    max_batch_size: int = option(32, type=int)
    map_size: int = option(64, type=int, help="ANOMALY_MAP resolution (default 64)")
    map_dtype: str = option("fp16", choices=sorted(MAP_DTYPES))
    instances: int = option(1, type=int, help="detector instances")  # per GPU on a GPU host
    # per detector instance on CPU; 0 = the host's cores / instances, decided at load
    torch_threads: int = option(0, flags=("--threads", "--torch-threads"), type=int, metavar="N",
                                help="threads per detector instance on CPU, for every runtime (0 = cores / instances)")
    runtime: str = option("auto", choices=["auto", *RUNTIMES],
                          help=f"detector network runtime (auto: {DEFAULT_CPU_RUNTIME} on cpu, torch on gpu)")
    precision: str = option("auto", choices=["auto", *PRECISIONS],
                            help="network precision (auto: fp32 on cpu, bf16 autocast on gpu); bf16 on cpu is checked "
                                 "on real images")
    calibration_images: str | None = option(
        None, metavar="DIR", help="normal images of the product for the bf16 check (default: the checkpoint's data)")
    recalibrate: bool = option(
        False, action="store_true",
        help="bf16: fit the threshold to the bf16 scores instead of refusing a model whose verdicts change")
    preprocess_instances: int = option(1, type=int)
    max_queue_delay_us: int = option(2000, type=int)
    preferred_batch_sizes: list[int] = option(default_factory=list, type=int_list, help="e.g. 4,8,16")
    warmup_batch_sizes: list[int] = option(default_factory=lambda: [1], type=int_list,
                                           help="detector warm-up (default 1)")

    @property
    def detector_runtime(self) -> str:
        if self.runtime != "auto":
            return self.runtime
        return "torch" if self.device == "gpu" else DEFAULT_CPU_RUNTIME

    @property
    def detector_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.device == "gpu" else "fp32"

    def validate(self) -> None:
        """Raises ExportError naming the parameter whose value cannot work."""
        if not NAME_PATTERN.fullmatch(self.name):
            raise ExportError(f"name must match {NAME_PATTERN.pattern} (letters, digits, _ and -), got {self.name!r}",
                              "name")
        if self.device not in ("cpu", "gpu"):
            raise ExportError(f"device must be cpu or gpu, got {self.device!r}", "device")
        if self.map_dtype not in MAP_DTYPES:
            raise ExportError(f"map_dtype must be one of {sorted(MAP_DTYPES)}, got {self.map_dtype!r}", "map_dtype")
        for label in ("max_batch_size", "map_size", "instances", "preprocess_instances"):
            if getattr(self, label) < 1:
                raise ExportError(f"{label} must be at least 1, got {getattr(self, label)}", label)
        if self.torch_threads < 0 or self.max_queue_delay_us < 0:
            raise ExportError("torch_threads and max_queue_delay_us must not be negative", "torch_threads",
                              "max_queue_delay_us")
        if self.runtime not in ("auto", *RUNTIMES) or self.precision not in ("auto", *PRECISIONS):
            raise ExportError(f"runtime must be auto or one of {', '.join(RUNTIMES)} and precision auto or one "
                              f"of {', '.join(PRECISIONS)}, got {self.runtime!r} / {self.precision!r}",
                              "runtime", "precision")
        if self.device == "gpu" and self.detector_runtime != "torch":
            raise ExportError(f"runtime {self.runtime} runs on the CPU; on a GPU the detector runs torch "
                              f"(docs/serving.md: how ONNX Runtime's CUDA/TensorRT providers would plug in)", "runtime")
        too_big = [b for b in self.preferred_batch_sizes + self.warmup_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ExportError(f"batch sizes {too_big} are outside 1..max_batch_size ({self.max_batch_size})",
                              "max_batch_size")


# ---------------------------------------------------------------------------------------------------------- writing


def _tensor(name: str, data_type: str, dims: str) -> str:
    """One entry of an input or output list: `{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }`."""
    return f'{{ name: "{name}" data_type: {data_type} dims: [ {dims} ] }}'


def _tensor_list(kind: str, tensors: list[str]) -> str:
    """`input [ ... ]` / `output [ ... ]`: one line for one tensor, one tensor a line for several."""
    if len(tensors) == 1:
        return f"{kind} [ {tensors[0]} ]"
    return f"{kind} [\n" + ",\n".join(f"  {t}" for t in tensors) + "\n]"


def _parameters(values: dict[str, object]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in values.items())


def _dynamic_batching(opts: ExportOptions) -> str:
    preferred = f"preferred_batch_size: [ {', '.join(map(str, opts.preferred_batch_sizes))} ] " if (
        opts.preferred_batch_sizes) else ""
    return f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: {opts.max_queue_delay_us} }}"


def _version_policy(version: int | None) -> list[str]:
    """The line that pins a model to one export's version (none for the unversioned templates)."""
    return [] if version is None else [f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}"]


def _python_model(name: str, role: str, opts: ExportOptions, inputs: str, outputs: str, instances: str,
                  params: dict[str, object], batching: str, version: int | None = None) -> str:
    header = (f"# Generated by `python -m mrkd.export` ({role} of product \"{opts.name}\"); code: "
              f"mrkd.triton.models.{MODEL_CLASSES[role]}.")
    return "\n".join([header, f'name: "{name}"', 'backend: "python"', f"max_batch_size: {opts.max_batch_size}",
                      *_version_policy(version), inputs, outputs, instances, batching,
                      _parameters({"mrkd_role": role, **params})]) + "\n"


def _outputs(opts: ExportOptions) -> list[str]:
    """What both ensembles answer."""
    m, map_type = opts.map_size, MAP_CONFIG_TYPES[opts.map_dtype]
    return [_tensor(wire.OUTPUT_SCORE, "TYPE_FP32", "1"), _tensor(wire.OUTPUT_RAW_SCORE, "TYPE_FP32", "1"),
            _tensor(wire.OUTPUT_IS_ANOMALOUS, "TYPE_BOOL", "1"),
            _tensor(wire.OUTPUT_ANOMALY_MAP, map_type, f"{m}, {m}")]


def _step(model: str, version: int, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    lines = [f'model_name: "{model}"', f"model_version: {version}", *maps]
    return "    {\n" + "".join(f"      {line}\n" for line in lines) + "    }"


def _ensemble(name: str, input_line: str, pre_name: str, names: dict[str, str], opts: ExportOptions,
              input_name: str, version: int | None = None) -> str:
    step_version = -1 if version is None else version
    policy = "".join(f"{line}\n" for line in _version_policy(version))
    score, raw_score, flag, amap = (wire.OUTPUT_SCORE, wire.OUTPUT_RAW_SCORE, wire.OUTPUT_IS_ANOMALOUS,
                                    wire.OUTPUT_ANOMALY_MAP)
    steps = [
        _step(pre_name, step_version, {input_name: input_name}, {wire.PREPARED: "prepared"}),
        _step(names["detector"], step_version, {wire.PREPARED: "prepared"},
              {raw_score: raw_score, wire.RAW_MAP: "raw_map"}),
        _step(names["postprocess"], step_version, {raw_score: raw_score, wire.RAW_MAP: "raw_map"},
              {score: score, flag: flag, amap: amap}),
    ]
    return (f'# Generated by `python -m mrkd.export` (ensemble of product "{opts.name}").\n'
            f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {opts.max_batch_size}\n'
            f"{policy}input [ {input_line} ]\n{_tensor_list('output', _outputs(opts))}\n"
            "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def render_configs(image_size: int, opts: ExportOptions, version: int | None = None) -> dict[str, str]:
    """{model name: config.pbtxt text} for every model of the product; `version` pins every model (and every
    ensemble step) to that version, None gives the unversioned templates (Triton's default: the latest)."""
    opts.validate()
    names = model_names(opts.name)
    s, m = image_size, opts.map_size
    prepared = _tensor(wire.PREPARED, "TYPE_UINT8", f"3, {s}, {s}")
    raw_score = _tensor(wire.OUTPUT_RAW_SCORE, "TYPE_FP32", "1")
    raw_map = _tensor(wire.RAW_MAP, "TYPE_FP32", f"{m}, {m}")
    cpu_one = "instance_group [ { count: %d kind: KIND_CPU } ]"
    kind = "KIND_GPU" if opts.device == "gpu" else "KIND_CPU"
    batching = _dynamic_batching(opts)
    image_in = _tensor(wire.INPUT_IMAGE, wire.IMAGE_CONFIG_TYPE, "1")
    frame_in = _tensor(wire.INPUT_FRAME, wire.FRAME_CONFIG_TYPE, "-1, -1, 3")
    return {
        names["ensemble"]: _ensemble(names["ensemble"], image_in, names["preprocess"], names, opts,
                                     wire.INPUT_IMAGE, version),
        names["raw_ensemble"]: _ensemble(names["raw_ensemble"], frame_in, names["frame_preprocess"], names, opts,
                                         wire.INPUT_FRAME, version),
        names["preprocess"]: _python_model(
            names["preprocess"], "preprocess", opts, f"input [ {image_in} ]", f"output [ {prepared} ]",
            cpu_one % opts.preprocess_instances, {"image_size": s, "torch_threads": 1}, batching, version),
        names["frame_preprocess"]: _python_model(
            # the dynamic batcher only groups frames of equal size; others wait their turn
            names["frame_preprocess"], "frame_preprocess", opts, f"input [ {frame_in} ]", f"output [ {prepared} ]",
            cpu_one % 1, {"image_size": s, "torch_threads": 1}, batching, version),
        names["detector"]: _python_model(
            names["detector"], "detector", opts, f"input [ {prepared} ]", _tensor_list("output", [raw_score, raw_map]),
            f"instance_group [ {{ count: {opts.instances} kind: {kind} }} ]",
            {"image_size": s, "map_size": m, "torch_threads": opts.torch_threads,
             "warmup_batch_sizes": ",".join(map(str, opts.warmup_batch_sizes)),
             "runtime": opts.detector_runtime, "precision": opts.detector_precision},
            batching, version),
        names["postprocess"]: _python_model(
            names["postprocess"], "postprocess", opts, _tensor_list("input", [raw_score, raw_map]),
            _tensor_list("output", [o for o in _outputs(opts) if wire.OUTPUT_RAW_SCORE not in o]),
            cpu_one % 1, {"map_dtype": opts.map_dtype, "torch_threads": 1}, batching, version),
    }


def model_py_source(role: str) -> str:
    """The one-line model.py of a python model's version folder: an import of its class in mrkd.triton.models."""
    return (
        f"# Generated by `python -m mrkd.export`; the code lives in the mrkd package (mrkd/triton/models.py).\n"
        f"from mrkd.triton.models import {MODEL_CLASSES[role]} as TritonPythonModel  # noqa: F401\n"
    )


def write_configs(repo: Path, image_size: int, opts: ExportOptions) -> dict[str, str]:
    """Writes (atomically) the unversioned config.pbtxt templates of the product (`--configs-only`); returns
    {role: model name}."""
    repo = user_path(repo)
    for model, text in render_configs(image_size, opts).items():
        with atomic_path(repo / model / "config.pbtxt") as tmp:
            tmp.write_text(text)
    return model_names(opts.name)


# ---------------------------------------------------------------------------------------------------------- reading


_PINNED_VERSION = re.compile(r"version_policy\s*:\s*{\s*specific\s*:\s*{\s*versions\s*:\s*\[\s*(\d+)\s*\]")
_ENSEMBLE_STEP = re.compile(r'model_name:\s*"([^"]+)"\s*model_version:\s*(-?\d+)')


def config_field(text: str, key: str) -> str | None:
    """A top-level string field of config.pbtxt text (`backend`, `platform`, `name`), or None."""
    match = re.search(rf'^\s*{key}\s*:\s*"([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


def ensemble_steps(text: str) -> list[tuple[str, int]]:
    """(model name, pinned version; -1 = the latest) of every step of an ensemble's config."""
    return [(name, int(version)) for name, version in _ENSEMBLE_STEP.findall(text)]


def served_version(folder: Path, text: str) -> int | None:
    """The version Triton serves for a model folder: the pinned one (`version_policy: { specific ... }`, what
    mrkd.export writes), else the latest numeric version folder; None when there is none."""
    pinned = _PINNED_VERSION.search(text)
    if pinned:
        return int(pinned.group(1))
    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    return versions[-1] if versions else None
