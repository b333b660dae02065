"""What every data source returns: ImageRecord lists in DatasetSplits, and the shared helpers for them."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import MRKDError
from ..core.preprocess import load_image

GOOD = "good"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(MRKDError):
    """The base of mrkd.data's errors."""


class DatasetLayoutError(DataError, ValueError):
    """A dataset folder that does not follow the expected layout; the message says what was expected and found."""


@dataclass(frozen=True)
class ImageRecord:
    """One image. `load_image()` -> uint8 H x W or H x W x 3; `load_mask()` -> bool H x W, or None (no masks)."""

    name: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type
    load_image: Callable[[], np.ndarray]
    load_mask: Callable[[], np.ndarray] | None


@dataclass(frozen=True)
class DatasetSplits:
    """train: normal images for training; calibration: held-out normal images for the threshold; test: both."""

    name: str
    category: str
    train: list[ImageRecord]
    calibration: list[ImageRecord]
    test: list[ImageRecord]
    has_masks: bool

    def describe(self) -> str:
        n_anomalous = sum(r.label for r in self.test)
        defects = sorted({r.defect for r in self.test if r.label == 1})
        return (
            f"{self.name} [{self.category}]: {len(self.train)} train, {len(self.calibration)} calibration, "
            f"{len(self.test)} test ({len(self.test) - n_anomalous} good, {n_anomalous} anomalous: "
            f"{', '.join(defects) or 'none'}), pixel masks: {'yes' if self.has_masks else 'no'}"
        )

    def __str__(self) -> str:
        return self.describe()




def image_loader(path: Path) -> Callable[[], np.ndarray]:
    """A picklable loader of an image file (crosses DataLoader worker processes)."""
    return functools.partial(load_image, str(path))


def read_grayscale(path: str) -> np.ndarray:
    """A grayscale image file -> uint8 H x W (the decoder returns it with the gray value repeated in 3 channels)."""
    return np.ascontiguousarray(load_image(path)[:, :, 0])
