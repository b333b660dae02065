"""MRKD's two masks: ILM (image-level cut-and-paste, per-category settings) and FLM (feature-level random mask).

ILM follows the reference implementation (NSA-style same-image patch exchange without blending or resizing):
half-width of a patch along each axis = (0.03 + Gamma(shape 2, scale 0.05)) * image size along that axis, clipped to
the category's bounds; the first patch is always pasted, each further one (up to `max_patches`) independently with
probability 0.5. For object categories the object is the set of pixels whose mean RGB differs from the background
brightness by more than a threshold (then a 7x7 median filter); the source patch must be at least `min_object`
object and the destination at least `min_overlap` (0.25) object. A patch that finds no valid source or destination
in 200 tries is skipped, so an image where nothing fits comes back clean.

Patches are always whole rectangles of 2 x half-width pixels per axis, placed uniformly at random where they fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch import Tensor

__all__ = [
    "DEFAULT_ILM",
    "ILM_SETTINGS",
    "Box",
    "ILMConfig",
    "Patch",
    "flm_mask",
    "ilm_config_for",
    "ilm_row_for_source",
    "ilm_corrupt",
    "object_mask",
]

GAMMA_SHAPE = 2.0
GAMMA_SCALE = 0.05
HALF_WIDTH_OFFSET = 0.03
EXTRA_PATCH_PROBABILITY = 0.5
MAX_PLACEMENT_TRIES = 200
OBJECT_MEDIAN_SIZE = 7


@dataclass(frozen=True)
class ILMConfig:
    """ILM settings of one category. Ranges are (min, max) patch half-widths as fractions of the image size."""

    h_range: tuple[float, float]
    w_range: tuple[float, float]
    max_patches: int
    background: tuple[int, int] | None = None  # (background brightness, threshold); None = no object test
    min_object: float = 0.0  # least object fraction of the source patch (object categories)
    min_overlap: float = 0.25  # least object fraction of the destination (object categories)

    def __post_init__(self) -> None:
        for name, (low, high) in (("h_range", self.h_range), ("w_range", self.w_range)):
            if not 0.0 < low <= high < 0.5:
                raise ValueError(f"ILMConfig.{name} must satisfy 0 < min <= max < 0.5, got {(low, high)}")
        if self.max_patches < 1:
            raise ValueError(f"ILMConfig.max_patches must be >= 1, got {self.max_patches}")
        if not (0.0 <= self.min_object <= 1.0 and 0.0 <= self.min_overlap <= 1.0):
            raise ValueError("ILMConfig.min_object and min_overlap must lie in [0, 1]")


def _row(h: tuple[float, float], w: tuple[float, float], patches: int,
         background: tuple[int, int] | None = None, min_object: float = 0.0) -> ILMConfig:
    return ILMConfig(h, w, patches, background, min_object)


_LARGE, _SMALL, _TINY = (0.03, 0.4), (0.01, 0.05), (0.01, 0.01)
_BRIGHT_BG, _DARK_BG = (200, 60), (20, 20)

# MVTec AD categories, from the reference implementation (MRKD.md's table).
ILM_SETTINGS: dict[str, ILMConfig] = {
    "bottle": _row(_LARGE, _LARGE, 3, _BRIGHT_BG, 0.7),
    "cable": _row(_SMALL, (0.01, 0.1), 3),
    "capsule": _row(_SMALL, _SMALL, 1, _BRIGHT_BG, 0.7),
    "carpet": _row(_LARGE, _LARGE, 4),
    "grid": _row(_SMALL, (0.01, 0.1), 4),
    "hazelnut": _row((0.03, 0.35), (0.03, 0.35), 3, _DARK_BG, 0.7),
    "leather": _row(_LARGE, _LARGE, 4),
    "metal_nut": _row(_SMALL, _TINY, 1, _DARK_BG, 0.5),
    "pill": _row(_SMALL, _SMALL, 1, _DARK_BG, 0.7),
    "screw": _row(_SMALL, _SMALL, 1, _BRIGHT_BG, 0.5),
    "tile": _row(_SMALL, (0.01, 0.1), 4),
    "toothbrush": _row(_TINY, _TINY, 1, _DARK_BG, 0.25),
    "transistor": _row(_LARGE, _LARGE, 3),
    "wood": _row(_SMALL, _TINY, 4),
    "zipper": _row(_SMALL, _TINY, 1, _BRIGHT_BG, 0.7),
}

# Unknown categories (ELPV cells, textures, users' products): the texture row (carpet/leather). Defects of unknown
# products can be of any size, and these images fill the frame, so no background test and the widest size range.
DEFAULT_ILM = _row(_LARGE, _LARGE, 4)


# Built-in data sources outside MVTec AD -> the table row measured best for them (docs/results.md, "ILM row";
# chosen on a seed that is not reported). A user's own product: --ilm-category <row> (see the README).
ILM_ROW_FOR_SOURCE: dict[str, str] = {
    "textures:brick": "tile",  # periodic: a large pasted patch of brick is still brick; small patches break it
    "textures:gravel": "tile",
    "textures:grass": "carpet",
}


def ilm_row_for_source(spec: str) -> str | None:
    """The measured ILM row for a built-in data source spec (e.g. "elpv:mono"), or None."""
    return ILM_ROW_FOR_SOURCE.get(str(spec))


def ilm_config_for(category: str | None) -> ILMConfig:
    """The MVTec AD row for a known category name (case-insensitive), else DEFAULT_ILM."""
    if category is None:
        return DEFAULT_ILM
    return ILM_SETTINGS.get(category.strip().lower().replace("-", "_"), DEFAULT_ILM)


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class Patch:
    """One pasted patch: `source` region copied over `dest`; half-widths in pixels before any placement."""

    source: Box
    dest: Box
    half_height: int
    half_width: int


ImageT = TypeVar("ImageT", np.ndarray, Tensor)


def object_mask(image_hwc: np.ndarray, background: tuple[int, int]) -> np.ndarray:
    """Bool H x W: |mean RGB - background brightness| > threshold, then a 7x7 median filter."""
    brightness, threshold = background
    raw = np.abs(image_hwc.astype(np.float32).mean(axis=-1) - brightness) > threshold
    return median_filter(raw.astype(np.uint8), size=OBJECT_MEDIAN_SIZE, mode="nearest").astype(bool)


def _half_width(size: int, bounds: tuple[float, float], rng: np.random.Generator) -> int:
    low = max(1, round(bounds[0] * size))
    high = max(low, round(bounds[1] * size))
    unclipped = (HALF_WIDTH_OFFSET + rng.gamma(GAMMA_SHAPE, GAMMA_SCALE)) * size
    return int(np.clip(unclipped, low, high))


def _place(rng: np.random.Generator, image_h: int, image_w: int, height: int, width: int,
           objects: np.ndarray | None, min_fraction: float) -> Box | None:
    """A uniformly random box of this size, inside the image, with >= min_fraction object pixels (when tested)."""
    for _ in range(MAX_PLACEMENT_TRIES):
        box = Box(int(rng.integers(0, image_h - height + 1)), int(rng.integers(0, image_w - width + 1)),
                  height, width)
        if objects is None or objects[box.slices()].mean() >= min_fraction:
            return box
    return None


def _as_hwc_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"ilm_corrupt expects a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"ilm_corrupt expects a uint8 array H x W x 3, got {image.dtype} {image.shape}")
        return image
    raise TypeError(f"ilm_corrupt expects a torch.Tensor or numpy.ndarray, got {type(image).__name__}")


def ilm_corrupt(image: ImageT, cfg: ILMConfig, rng: np.random.Generator) -> tuple[ImageT, list[Patch]]:
    """Same-image cut-and-paste with hard replacement. Returns (corrupted copy, pasted patches).

    `image` is a uint8 tensor [3, H, W] or a uint8 array H x W x 3; the result has the same type, layout and device.
    The input is not modified. Deterministic given `rng`.
    """
    clean = _as_hwc_uint8(image)
    height, width = clean.shape[:2]
    objects = object_mask(clean, cfg.background) if cfg.background is not None else None
    corrupted = clean.copy()
    patches: list[Patch] = []
    for index in range(cfg.max_patches):
        if index > 0 and rng.random() >= EXTRA_PATCH_PROBABILITY:
            continue
        half_h = _half_width(height, cfg.h_range, rng)
        half_w = _half_width(width, cfg.w_range, rng)
        patch_h, patch_w = min(2 * half_h, height), min(2 * half_w, width)
        source = _place(rng, height, width, patch_h, patch_w, objects, cfg.min_object)
        if source is None:
            continue
        dest = _place(rng, height, width, patch_h, patch_w, objects, cfg.min_overlap)
        if dest is None:
            continue
        # The source is cut from the clean image (as the reference does), so patches never copy earlier pastes.
        corrupted[dest.slices()] = clean[source.slices()]
        patches.append(Patch(source, dest, half_h, half_w))
    if isinstance(image, Tensor):
        return torch.from_numpy(corrupted).permute(2, 0, 1).contiguous().to(image.device), patches
    return corrupted, patches


def flm_mask(batch: int, height: int, width: int, ratio: float, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Keep-mask for FLM: bool [B, 1, H, W], True where the feature is KEPT.

    Exactly round(ratio * H * W) positions are dropped per sample, chosen independently per sample; the mask
    broadcasts over channels, so every channel loses the same positions. A 1x1 map (round(ratio) = 0 for ratio < 0.5)
    is never dropped entirely unless ratio >= 0.5.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"FLM ratio must lie in [0, 1), got {ratio}")
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"flm_mask needs positive sizes, got batch={batch} height={height} width={width}")
    positions = height * width
    dropped = round(ratio * positions)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, positions, generator=generator, device=noise_device)
    # The `dropped` smallest noise values of each row are dropped: a uniform random subset per sample.
    ranks = noise.argsort(dim=1).argsort(dim=1)
    keep = ranks >= dropped
    return keep.view(batch, 1, height, width).to(device if device is not None else keep.device)
