"""A trained checkpoint -> a new version of a product's models in a Triton model repository (mrkd.export's work).

The configs come from `configs.py` (rendering, and reading them back), the all-or-nothing publication and the
repository lock from `publish.py`; this module puts them together, and re-exports what callers import from it.
The version folder of NAME_detector holds the checkpoint (and the exported network), that of NAME_postprocess its
calibration; model.py files are one-line imports of mrkd.triton.models.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..core.config import ModelConfig
from ..core.files import user_path
from ..core.wire import CALIBRATION_FILE, CHECKPOINT_FILE, DEFAULT_NAME, ROLES, model_names
from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..runtime.errors import NetworkRuntimeError
from ..runtime.network_export import PreparedNetwork, prepare_network
from .configs import ExportOptions, model_py_source, render_configs, write_configs
from .errors import ExportError
from .publish import existing_versions, finish_interrupted_exports, prepare_repository, publish, repository_lock, stage

__all__ = ["DEFAULT_NAME", "ROLES", "ExportError", "ExportOptions", "ExportResult", "existing_versions", "export",
           "finish_interrupted_exports", "model_names", "prepare_repository", "render_configs", "repository_lock",
           "write_configs"]


@dataclass(frozen=True)
class ExportResult:
    repo: Path
    version: int
    models: dict[str, str]  # role -> model name
    network: PreparedNetwork | None = None  # the detector network's conversion and precision check


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
        raise ExportError(f"cannot export: {exc}", *exc.parameters) from exc
    if checkpoint.is_dir():
        checkpoint = checkpoint / CHECKPOINT_FILE
    model_config = ModelConfig.from_dict(data["model_config"])
    if version is not None and version < 1:
        raise ExportError(f"version must be at least 1, got {version}", "version")
    names = model_names(opts.name)
    try:  # the converted network (checked against torch) and, for bf16, its check on real images
        network = prepare_network(checkpoint, data, opts.detector_runtime, opts.detector_precision, opts.device,
                                  opts.calibration_images, opts.recalibrate)
    except NetworkRuntimeError as exc:
        raise ExportError(f"cannot export: {exc}", *exc.parameters) from exc
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
                    f"version {version} of product {opts.name!r} already exists in {repo}; pick another version",
                    "version")
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
            renames = stage(repo, version, {names[role]: files for role, files in contents.items()}, ordered)
            publish(repo, opts.name, version, renames)
    finally:
        network.cleanup()
    return ExportResult(repo=repo, version=version, models=names, network=network)
