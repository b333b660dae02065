"""Datasets behind one interface: `open_dataset(spec) -> DatasetSplits` of `ImageRecord`s.

Specs:
  a folder in the MVTec AD layout (MVTec AD itself, or VisA / BTAD / MPDD converted to it): the dataset root with
      `category=`, or the category folder itself;
  `elpv:mono`, `elpv:poly`: the real electroluminescence solar-cell images of the `elpv-dataset` package
      (image-level labels only);
  `textures:brick`, `textures:grass`, `textures:gravel`: crops of scikit-image's real texture photos, with test
      defects (scratches, stains, holes, foreign texture) drawn on crops from a region no training crop touches,
      each with the exact mask of the pixels it changed.

Records load lazily through picklable callables (functools.partial of module-level functions), so they cross
DataLoader worker processes; image files are decoded by `mrkd.core.preprocess.load_image`, the project's one decoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.files import user_path
from .elpv import open_elpv
from .mvtec import open_mvtec_folder
from .records import DatasetLayoutError, DatasetSplits, ImageRecord
from .textures import DEFAULT_CROP_SIZE, TEXTURE_DEFECT_KINDS, TEXTURE_NAMES, open_textures

__all__ = ["DatasetLayoutError", "DatasetSplits", "ImageRecord", "TEXTURE_DEFECT_KINDS", "TEXTURE_NAMES",
           "open_dataset"]


def open_dataset(
    spec: str | Path,
    category: str | None = None,
    *,
    seed: int = 111,
    include_uncertain: bool = False,
    calibration_fraction: float = 0.1,
    crop_size: int = DEFAULT_CROP_SIZE,
) -> DatasetSplits:
    """Opens a dataset by spec (see the module docstring). Same arguments, same splits."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    text = str(spec)
    if text.startswith("elpv:"):
        return open_elpv(text.split(":", 1)[1], seed, include_uncertain, calibration_fraction)
    if text.startswith("textures:"):
        return open_textures(text.split(":", 1)[1], seed, crop_size)
    return open_mvtec_folder(user_path(spec), category, seed, calibration_fraction)

