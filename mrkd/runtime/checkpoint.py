"""Checkpoints: atomic save, weights_only load, clear errors for missing, truncated or foreign files."""
from __future__ import annotations

import pickle
import platform
from pathlib import Path
from typing import Any

import torch

from ..core.config import MRKD_VERSION
from ..core.files import atomic_path, user_path
from .errors import CheckpointError  # noqa: F401 (re-exported)

FORMAT = "mrkd-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_config", "state_dict", "calibration")


def versions() -> dict[str, str]:
    """The versions of mrkd, torch, torchvision and Python, recorded in every checkpoint."""
    import torchvision

    return {"mrkd": MRKD_VERSION, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes `payload` (plus format tags and versions) to `path` atomically."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **payload}
    path = user_path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", for_inference: bool = True
) -> dict[str, Any]:
    """Loads with weights_only=True (never unpickles arbitrary objects) and checks the format.

    A checkpoint written during training (periodic or on Ctrl-C) has no calibration yet: it can be resumed
    (`for_inference=False`) but not served.
    """
    path = user_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        candidate = path / "checkpoint.pt"
        if not candidate.exists():
            raise CheckpointError(f"{path} is a folder without checkpoint.pt")
        path = candidate
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that a checkpoint may not contain; refused to unpickle "
                f"them (weights_only load): {str(exc).splitlines()[-1][:200]}"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an MRKD checkpoint (no '{FORMAT}' format tag)")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {data['format_version']}; this mrkd reads up to {FORMAT_VERSION}"
        )
    required = REQUIRED_KEYS if for_inference else REQUIRED_KEYS[:2]
    missing = [k for k in required if data.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (saved before training finished?)")
    return data
