"""textures:brick|grass|gravel: crops of scikit-image's real texture photos (CC0), with seeded test defects
(mrkd.data.defects), each with its exact pixel mask.

The 512 x 512 photo is cut into four 256 x 256 quadrants, interleaved like a checkerboard: training crops come from
the top-left and bottom-right quadrants, calibration and test crops from the top-right and bottom-left ones. So no
held-out crop contains a training pixel, and both sides see the top and the bottom of the photo alike (brick's
perspective changes its period from about 32 px at the top to 39 px at the bottom: a top/bottom split would test
on a different texture than it trains on). Crops alternate between the two quadrants of their side.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from ..core.preprocess import load_image
from .defects import DEFECT_KINDS, paint_defect
from .records import GOOD, DatasetSplits, ImageRecord

TEXTURE_NAMES = ("brick", "grass", "gravel")
TEXTURE_DEFECT_KINDS = DEFECT_KINDS
# Large enough to tell two methods apart: a difference of a few AUROC points is outside the noise of 120 + 120.
TEXTURE_TRAIN_CROPS = 240
TEXTURE_CALIBRATION_CROPS = 20
TEXTURE_TEST_GOOD_CROPS = 120
TEXTURE_TEST_DEFECT_CROPS = 120  # 30 of each defect kind
DEFAULT_CROP_SIZE = 128
MIN_CROP_SIZE = 32


def open_textures(texture: str, seed: int, crop_size: int) -> DatasetSplits:
    """Crops of one of scikit-image's texture photos, with seeded test defects and their masks, as splits."""
    if texture not in TEXTURE_NAMES:
        expected = ", ".join(f"textures:{t}" for t in TEXTURE_NAMES)
        raise ValueError(f"unknown texture '{texture}': expected one of {expected}")
    height, width = _texture_photo(texture).shape[:2]
    if not MIN_CROP_SIZE <= crop_size <= min(height, width) // 2:
        raise ValueError(f"crop_size must be between {MIN_CROP_SIZE} and {min(height, width) // 2} for a "
                         f"{height} x {width} photo, got {crop_size}")
    regions = _texture_regions(height, width)

    def normal_records(split: str, count: int) -> list[ImageRecord]:
        records = []
        for i in range(count):
            y, x = _crop_origin(regions[split][i % 2], crop_size, [seed, _texture_id(texture), _stream_id(split), i])
            loader = functools.partial(_texture_crop, texture, y, x, crop_size)
            mask = functools.partial(_all_false, crop_size)
            records.append(ImageRecord(f"{split}/good/{i:03d}_y{y}_x{x}", 0, GOOD, loader, mask))
        return records

    train = normal_records("train", TEXTURE_TRAIN_CROPS)
    calibration = normal_records("calibration", TEXTURE_CALIBRATION_CROPS)
    test = normal_records("test", TEXTURE_TEST_GOOD_CROPS)
    for i in range(TEXTURE_TEST_DEFECT_CROPS):
        kind = TEXTURE_DEFECT_KINDS[i % len(TEXTURE_DEFECT_KINDS)]
        y, x = _crop_origin(regions["test"][(i // len(TEXTURE_DEFECT_KINDS)) % 2], crop_size,
                            [seed, _texture_id(texture), _stream_id("defect"), i])
        args = (texture, y, x, crop_size, kind, seed, i)
        test.append(ImageRecord(
            f"test/{kind}/{i:03d}_y{y}_x{x}", 1, kind,
            functools.partial(_texture_defect_image, *args), functools.partial(_texture_defect_mask, *args),
        ))
    return DatasetSplits(f"textures:{texture}", texture, train, calibration, test, has_masks=True)


Region = tuple[int, int, int, int]  # (top, left, bottom, right)


def _texture_regions(height: int, width: int) -> dict[str, tuple[Region, Region]]:
    """The two quadrants each split draws its crops from: training on one diagonal, held-out on the other."""
    my, mx = height // 2, width // 2
    train = ((0, 0, my, mx), (my, mx, height, width))
    held_out = ((0, mx, my, width), (my, 0, height, mx))
    return {"train": train, "calibration": held_out, "test": held_out}


def _crop_origin(region: Region, crop_size: int, entropy: list[int]) -> tuple[int, int]:
    top, left, bottom, right = region
    rng = np.random.default_rng(entropy)
    return int(rng.integers(top, bottom - crop_size + 1)), int(rng.integers(left, right - crop_size + 1))


def _stream_id(stream: str) -> int:
    return {"train": 1, "calibration": 2, "test": 3, "defect": 4}[stream]


def _texture_id(texture: str) -> int:
    return TEXTURE_NAMES.index(texture)


@functools.lru_cache(maxsize=len(TEXTURE_NAMES))
def _texture_photo(texture: str) -> np.ndarray:
    """scikit-image's texture photo as uint8 H x W x 3 (read-only; the photos are grayscale)."""
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("textures:* need scikit-image (pip install scikit-image)")
    photo = load_image(Path(spec.origin).parent / f"{texture}.png")
    photo.setflags(write=False)
    return photo


def _texture_crop(texture: str, y: int, x: int, crop_size: int) -> np.ndarray:
    return _texture_photo(texture)[y : y + crop_size, x : x + crop_size].copy()


def _all_false(size: int) -> np.ndarray:
    return np.zeros((size, size), dtype=bool)


def _texture_defect_image(*args) -> np.ndarray:
    return _texture_defect(*args)[0].copy()


def _texture_defect_mask(*args) -> np.ndarray:
    return _texture_defect(*args)[1].copy()


@functools.lru_cache(maxsize=1024)
def _texture_defect(
    texture: str, y: int, x: int, crop_size: int, kind: str, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(defective image uint8 H x W x 3, bool mask of exactly the pixels that differ from the clean crop)."""
    clean = _texture_crop(texture, y, x, crop_size)
    rng = np.random.default_rng(
        [seed, _texture_id(texture), _stream_id("defect"), index, TEXTURE_DEFECT_KINDS.index(kind), 1]
    )
    others = [_texture_photo(t) for t in TEXTURE_NAMES if t != texture]
    image, mask = paint_defect(kind, rng, clean, others)
    image.setflags(write=False)
    mask.setflags(write=False)
    return image, mask
