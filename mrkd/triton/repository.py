"""A trained checkpoint -> a new version of a product's models in a Triton model repository (mrkd.export's work).

The six models of a product NAME (ensembles NAME and NAME_raw; python models NAME_preprocess,
NAME_frame_preprocess, NAME_detector, NAME_postprocess), their inputs and outputs: `python -m mrkd.export --help`.
The version folder of NAME_detector holds the checkpoint (and the exported network), that of NAME_postprocess its
calibration; model.py files are one-line imports of mrkd.triton.models.

One export is one version V of the whole product, all or nothing:
- every config.pbtxt pins V (python models: `version_policy: { specific: { versions: [ V ] } }`; ensembles: each
  step's `model_version: V`), so a server serves the six models of one export together, never a new detector with
  an old calibration;
- everything is written first, under temporary names that Triton ignores, and fsynced; then a journal lists the
  renames that publish it (version folders, which the old pinned configs do not serve, then the configs), and the
  renames are made. A crash before the journal leaves the old version served (the temporary files are removed by
  the next export); a crash after it is completed by the next export or `mrkd.serve` (`finish_interrupted_exports`);
- an exclusive lock on the repository (`EXPORT_LOCK` at its root) serialises exports, so two exports at the same
  time get two different versions; `mrkd.serve` holds it shared while tritonserver reads the configs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..core.config import ModelConfig
from ..core.files import atomic_path, file_lock, fsync_path, user_path
from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..runtime.network_export import PreparedNetwork, prepare_network
from ..runtime.network_runtime import DEFAULT_CPU_RUNTIME, PRECISIONS, RUNTIMES, NetworkRuntimeError
from .models import CALIBRATION_FILE, CHECKPOINT_FILE, MAP_DTYPES

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # matched entirely (fullmatch): no trailing newline
DEFAULT_NAME = "mrkd"
ROLES = ("ensemble", "raw_ensemble", "preprocess", "frame_preprocess", "detector", "postprocess")
ROLE_SUFFIX = {
    "ensemble": "",
    "raw_ensemble": "_raw",
    "preprocess": "_preprocess",
    "frame_preprocess": "_frame_preprocess",
    "detector": "_detector",
    "postprocess": "_postprocess",
}
MODEL_CLASSES = {
    "preprocess": "PreprocessModel",
    "frame_preprocess": "FramePreprocessModel",
    "detector": "DetectorModel",
    "postprocess": "PostprocessModel",
}
TRITON_MAP_TYPES = {"fp16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
EXPORT_LOCK = ".mrkd-export.lock"  # a file at the repository root (Triton only looks at folders)
JOURNAL_SUFFIX = ".export-journal.json"  # ".NAME.export-journal.json" at the root while an export is published
STAGING_SUFFIX = ".tmp"  # temporary names: ".V.<random>.tmp" version folders, ".config.pbtxt.<random>.tmp" configs


class ExportError(ValueError):
    """Export options or a repository state that cannot produce a servable version."""


@dataclass
class ExportOptions:
    name: str = DEFAULT_NAME
    device: str = "cpu"  # where the detector runs: "cpu" (KIND_CPU) or "gpu" (KIND_GPU)
    max_batch_size: int = 32
    map_size: int = 64
    map_dtype: str = "fp16"
    instances: int = 1  # detector instances (per GPU on a GPU host)
    torch_threads: int = 0  # per detector instance on CPU; 0 = the host's cores / instances, decided at load
    preprocess_instances: int = 1
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: list[int] = field(default_factory=list)
    warmup_batch_sizes: list[int] = field(default_factory=lambda: [1])
    runtime: str = "auto"  # the detector network's runtime; auto: onnxruntime on CPU, torch on GPU
    precision: str = "auto"  # fp32 | bf16; auto: fp32 on CPU, bf16 autocast on GPU (as before)
    calibration_images: str | None = None  # real images for the bf16 check (default: the checkpoint's data)
    recalibrate: bool = False  # bf16: fit the calibration to the bf16 scores instead of refusing

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
        if not NAME_PATTERN.fullmatch(self.name):
            raise ExportError(f"--name must match {NAME_PATTERN.pattern} (letters, digits, _ and -), got {self.name!r}")
        if self.device not in ("cpu", "gpu"):
            raise ExportError(f"--device must be cpu or gpu, got {self.device!r}")
        if self.map_dtype not in MAP_DTYPES:
            raise ExportError(f"--map-dtype must be one of {sorted(MAP_DTYPES)}, got {self.map_dtype!r}")
        for label, value in (("--max-batch-size", self.max_batch_size), ("--map-size", self.map_size),
                             ("--instances", self.instances), ("--preprocess-instances", self.preprocess_instances)):
            if value < 1:
                raise ExportError(f"{label} must be at least 1, got {value}")
        if self.torch_threads < 0 or self.max_queue_delay_us < 0:
            raise ExportError("--torch-threads and --max-queue-delay-us must not be negative")
        if self.runtime not in ("auto", *RUNTIMES) or self.precision not in ("auto", *PRECISIONS):
            raise ExportError(f"--runtime must be auto or one of {', '.join(RUNTIMES)} and --precision auto or one "
                              f"of {', '.join(PRECISIONS)}, got {self.runtime!r} / {self.precision!r}")
        if self.device == "gpu" and self.detector_runtime != "torch":
            raise ExportError(f"--runtime {self.runtime} runs on the CPU; on a GPU the detector runs torch "
                              f"(docs/serving.md: how ONNX Runtime's CUDA/TensorRT providers would plug in)")
        too_big = [b for b in self.preferred_batch_sizes + self.warmup_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ExportError(f"batch sizes {too_big} are outside 1..--max-batch-size ({self.max_batch_size})")


@dataclass(frozen=True)
class ExportResult:
    repo: Path
    version: int
    models: dict[str, str]  # role -> model name
    network: PreparedNetwork | None = None  # the detector network's conversion and precision check


def model_names(name: str) -> dict[str, str]:
    """Product name -> {role: Triton model name}."""
    return {role: f"{name}{ROLE_SUFFIX[role]}" for role in ROLES}


# ---------------------------------------------------------------------------------------------------------- configs


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


def _ensemble(name: str, input_line: str, pre_name: str, names: dict[str, str], opts: ExportOptions,
              input_name: str, version: int | None = None) -> str:
    s = opts.map_size
    map_type = TRITON_MAP_TYPES[opts.map_dtype]
    step_version = -1 if version is None else version
    policy = "".join(f"{line}\n" for line in _version_policy(version))
    return f"""# Generated by `python -m mrkd.export` (ensemble of product "{opts.name}").
name: "{name}"
platform: "ensemble"
max_batch_size: {opts.max_batch_size}
{policy}input [ {input_line} ]
output [
  {{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "RAW_SCORE" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "IS_ANOMALOUS" data_type: TYPE_BOOL dims: [ 1 ] }},
  {{ name: "ANOMALY_MAP" data_type: {map_type} dims: [ {s}, {s} ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{pre_name}"
      model_version: {step_version}
      input_map {{ key: "{input_name}" value: "{input_name}" }}
      output_map {{ key: "PREPARED" value: "prepared" }}
    }},
    {{
      model_name: "{names['detector']}"
      model_version: {step_version}
      input_map {{ key: "PREPARED" value: "prepared" }}
      output_map {{ key: "RAW_SCORE" value: "RAW_SCORE" }}
      output_map {{ key: "RAW_MAP" value: "raw_map" }}
    }},
    {{
      model_name: "{names['postprocess']}"
      model_version: {step_version}
      input_map {{ key: "RAW_SCORE" value: "RAW_SCORE" }}
      input_map {{ key: "RAW_MAP" value: "raw_map" }}
      output_map {{ key: "SCORE" value: "SCORE" }}
      output_map {{ key: "IS_ANOMALOUS" value: "IS_ANOMALOUS" }}
      output_map {{ key: "ANOMALY_MAP" value: "ANOMALY_MAP" }}
    }}
  ]
}}
"""


def render_configs(image_size: int, opts: ExportOptions, version: int | None = None) -> dict[str, str]:
    """{model name: config.pbtxt text} for every model of the product; `version` pins every model (and every
    ensemble step) to that version, None gives the unversioned templates (Triton's default: the latest)."""
    opts.validate()
    names = model_names(opts.name)
    s, m = image_size, opts.map_size
    prepared_out = f'output [ {{ name: "PREPARED" data_type: TYPE_UINT8 dims: [ 3, {s}, {s} ] }} ]'
    cpu_one = "instance_group [ { count: %d kind: KIND_CPU } ]"
    kind = "KIND_GPU" if opts.device == "gpu" else "KIND_CPU"
    batching = _dynamic_batching(opts)
    image_in = '{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }'
    frame_in = '{ name: "FRAME" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }'
    return {
        names["ensemble"]: _ensemble(names["ensemble"], image_in, names["preprocess"], names, opts, "IMAGE", version),
        names["raw_ensemble"]: _ensemble(names["raw_ensemble"], frame_in, names["frame_preprocess"], names, opts,
                                         "FRAME", version),
        names["preprocess"]: _python_model(
            names["preprocess"], "preprocess", opts, f"input [ {image_in} ]", prepared_out,
            cpu_one % opts.preprocess_instances, {"image_size": s, "torch_threads": 1}, batching, version),
        names["frame_preprocess"]: _python_model(
            # the dynamic batcher only groups frames of equal size; others wait their turn
            names["frame_preprocess"], "frame_preprocess", opts, f"input [ {frame_in} ]", prepared_out,
            cpu_one % 1, {"image_size": s, "torch_threads": 1}, batching, version),
        names["detector"]: _python_model(
            names["detector"], "detector", opts,
            f'input [ {{ name: "PREPARED" data_type: TYPE_UINT8 dims: [ 3, {s}, {s} ] }} ]',
            "output [\n"
            '  { name: "RAW_SCORE" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            f'  {{ name: "RAW_MAP" data_type: TYPE_FP32 dims: [ {m}, {m} ] }}\n]',
            f"instance_group [ {{ count: {opts.instances} kind: {kind} }} ]",
            {"image_size": s, "map_size": m, "torch_threads": opts.torch_threads,
             "warmup_batch_sizes": ",".join(map(str, opts.warmup_batch_sizes)),
             "runtime": opts.detector_runtime, "precision": opts.detector_precision},
            batching, version),
        names["postprocess"]: _python_model(
            names["postprocess"], "postprocess", opts,
            'input [\n  { name: "RAW_SCORE" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            f'  {{ name: "RAW_MAP" data_type: TYPE_FP32 dims: [ {m}, {m} ] }}\n]',
            "output [\n"
            '  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "IS_ANOMALOUS" data_type: TYPE_BOOL dims: [ 1 ] },\n'
            f'  {{ name: "ANOMALY_MAP" data_type: {TRITON_MAP_TYPES[opts.map_dtype]} dims: [ {m}, {m} ] }}\n]',
            cpu_one % 1, {"map_dtype": opts.map_dtype, "torch_threads": 1}, batching, version),
    }


def model_py_source(role: str) -> str:
    return (
        f"# Generated by `python -m mrkd.export`; the code lives in the mrkd package (mrkd/triton/models.py).\n"
        f"from mrkd.triton.models import {MODEL_CLASSES[role]} as TritonPythonModel  # noqa: F401\n"
    )


# ---------------------------------------------------------------------------------------------------------- versions


def existing_versions(repo: Path, name: str) -> list[int]:
    """Version numbers present in any model of the product."""
    found: set[int] = set()
    for model in model_names(name).values():
        folder = repo / model
        if folder.is_dir():
            found.update(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    return sorted(found)


def write_configs(repo: Path, image_size: int, opts: ExportOptions) -> dict[str, str]:
    """Writes (atomically) the unversioned config.pbtxt templates of the product (`--configs-only`); returns
    {role: model name}."""
    repo = user_path(repo)
    for model, text in render_configs(image_size, opts).items():
        with atomic_path(repo / model / "config.pbtxt") as tmp:
            tmp.write_text(text)
    return model_names(opts.name)


# ---------------------------------------------------------------------------------------------------------- publishing


def _discard(paths: list[Path]) -> None:
    """Removes staged (temporary) folders and files."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_durable(path: Path, content: str | Path) -> None:
    """Writes text, or copies a file, and fsyncs it."""
    if isinstance(content, Path):
        shutil.copyfile(content, path)
    else:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
    fsync_path(path)


def _stage(repo: Path, version: int, versions: dict[str, dict[str, str | Path]],
           configs: dict[str, str]) -> list[tuple[Path, Path]]:
    """Writes every version folder and config under temporary names (fsynced); returns the (temporary, final)
    renames that publish them: the version folders first, then the configs in the order given."""
    folders, config_files = [], []
    try:
        for model, files in versions.items():
            model_dir = repo / model
            model_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=STAGING_SUFFIX, dir=model_dir))
            folders.append((tmp, model_dir / str(version)))
            for filename, content in files.items():
                _write_durable(tmp / filename, content)
            tmp.chmod(0o755)
            fsync_path(tmp)
        for model, text in configs.items():
            fd, name = tempfile.mkstemp(prefix=".config.pbtxt.", suffix=STAGING_SUFFIX, dir=repo / model)
            os.close(fd)
            tmp = Path(name)
            config_files.append((tmp, repo / model / "config.pbtxt"))
            tmp.chmod(0o644)
            _write_durable(tmp, text)
    except BaseException:
        _discard([tmp for tmp, _ in folders + config_files])
        raise
    return folders + config_files


def _journal_path(repo: Path, name: str) -> Path:
    return repo / f".{name}{JOURNAL_SUFFIX}"


def _publish(repo: Path, name: str, version: int, renames: list[tuple[Path, Path]]) -> None:
    """Records the renames in the product's journal (durably), makes them, syncs the folders, drops the journal."""
    journal = _journal_path(repo, name)
    entries = [[str(src.relative_to(repo)), str(dst.relative_to(repo))] for src, dst in renames]
    try:
        with atomic_path(journal) as tmp:
            tmp.write_text(json.dumps({"product": name, "version": version, "renames": entries}, indent=2) + "\n")
    except BaseException:
        _discard([src for src, _ in renames])  # nothing is visible yet: take the staged files away again
        raise
    _apply_journal(repo, journal)


def _apply_journal(repo: Path, journal: Path) -> None:
    """Makes (or finishes) the renames a journal lists; every step can be repeated after a crash."""
    data = json.loads(journal.read_text())
    folders = set()
    for src_name, dst_name in data["renames"]:
        src, dst = repo / src_name, repo / dst_name
        if src.exists():
            os.replace(src, dst)
        elif not dst.exists():
            raise ExportError(f"{journal}: {src_name} is gone before it was published as {dst_name}; export the "
                              f"checkpoint again")
        folders.add(dst.parent)
    for folder in sorted(folders):
        fsync_path(folder)
    journal.unlink()
    fsync_path(repo)


def finish_interrupted_exports(repo: str | Path) -> list[str]:
    """Completes every export whose publication a crash interrupted (its journal is still there), and removes the
    temporary files of exports that died before publishing. Returns the products completed. The caller holds the
    repository lock, or calls `prepare_repository`."""
    repo = user_path(repo).resolve()
    done = []
    for journal in sorted(repo.glob(f".*{JOURNAL_SUFFIX}")):
        _apply_journal(repo, journal)
        done.append(journal.name[1:-len(JOURNAL_SUFFIX)])
    _discard(list(repo.glob(f"*/.*{STAGING_SUFFIX}")))
    return done


def repository_lock(repo: str | Path, shared: bool = False):
    """The repository's export lock (see the module docstring); a context manager."""
    return file_lock(user_path(repo) / EXPORT_LOCK, shared=shared)


def prepare_repository(repo: str | Path) -> list[str]:
    """Under the exclusive lock: completes interrupted exports (what `mrkd.serve` runs before it starts the
    server). A read-only repository is left as it is."""
    repo = user_path(repo).resolve()
    if not repo.is_dir():
        return []
    with repository_lock(repo) as locked:
        if not locked:
            return []
        return finish_interrupted_exports(repo)


def export(checkpoint: str | Path, repo: str | Path, opts: ExportOptions, version: int | None = None) -> ExportResult:
    """Copies the checkpoint and generated configs into `repo` as a new version of product `opts.name`: all six
    models at once, or nothing (see the module docstring)."""
    opts.validate()
    # Absolute and free of symlinks: staged files (tempfile returns absolute names) are journalled relative to it.
    repo = user_path(repo).resolve()
    checkpoint = user_path(checkpoint)
    try:
        data = load_checkpoint(checkpoint)  # the same checks the server will make, before anything is written
    except CheckpointError as exc:
        raise ExportError(f"cannot export: {exc}") from exc
    if checkpoint.is_dir():
        checkpoint = checkpoint / CHECKPOINT_FILE
    model_config = ModelConfig.from_dict(data["model_config"])
    if version is not None and version < 1:
        raise ExportError(f"--version must be at least 1, got {version}")
    names = model_names(opts.name)
    try:  # the converted network (checked against torch) and, for bf16, its check on real images
        network = prepare_network(checkpoint, data, opts.detector_runtime, opts.detector_precision, opts.device,
                                  opts.calibration_images, opts.recalibrate)
    except NetworkRuntimeError as exc:
        raise ExportError(f"cannot export: {exc}") from exc
    calibration = network.calibration
    try:
        repo.mkdir(parents=True, exist_ok=True)
        with repository_lock(repo) as locked:
            if not locked:
                raise ExportError(f"cannot write to the model repository {repo}")
            finish_interrupted_exports(repo)
            present = existing_versions(repo, opts.name)
            if version is None:
                version = (max(present) + 1) if present else 1
            elif version in present:
                raise ExportError(
                    f"version {version} of product {opts.name!r} already exists in {repo}; pick another --version")
            export_info = json.dumps({
                "source_checkpoint": str(checkpoint), "version": version,
                "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model_config": model_config.to_dict(), "calibration": calibration.to_dict(), "options": asdict(opts),
                "network": network.info(),
            }, indent=2, sort_keys=True) + "\n"
            # role -> the files of its version folder (text, or a file to copy)
            contents: dict[str, dict[str, str | Path]] = {
                "ensemble": {},
                "raw_ensemble": {},
                "preprocess": {"model.py": model_py_source("preprocess")},
                "frame_preprocess": {"model.py": model_py_source("frame_preprocess")},
                "detector": {"model.py": model_py_source("detector"), CHECKPOINT_FILE: checkpoint,
                             "export.json": export_info, **network.paths()},
                "postprocess": {"model.py": model_py_source("postprocess"),
                                CALIBRATION_FILE: json.dumps(calibration.to_dict(), indent=2) + "\n"},
            }
            configs = render_configs(model_config.image_size, opts, version)
            ensembles = (names["ensemble"], names["raw_ensemble"])  # published last: they name the steps' version
            ordered = {m: t for m, t in configs.items() if m not in ensembles} | {m: configs[m] for m in ensembles}
            renames = _stage(repo, version, {names[role]: files for role, files in contents.items()}, ordered)
            _publish(repo, opts.name, version, renames)
    finally:
        network.cleanup()
    return ExportResult(repo=repo, version=version, models=names, network=network)
