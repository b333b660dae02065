"""Synthetic surface defects with exact pixel masks: scratches, stains, holes and foreign texture.

Each painter returns (alpha, colour) over a clean crop; `paint_defect` composites it and makes the mask exact (a
pixel is defective iff it changed by at least DEFECT_MIN_CHANGE in some channel). Pure numpy: no file I/O.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import draw

DEFECT_KINDS = ("scratch", "stain", "hole", "foreign_texture")
# A defect pixel is one whose value moved by at least this much (of 255) in some channel.
DEFECT_MIN_CHANGE = 16
MIN_DEFECT_PIXELS = 12


def paint_defect(kind: str, rng: np.random.Generator, clean: np.ndarray,
                 foreign_photos: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(defective image uint8 H x W x 3, bool mask of exactly the pixels that differ from `clean`).

    `foreign_photos`: photos of OTHER textures, for the foreign_texture kind."""
    painter = _DEFECT_PAINTERS[kind]
    for _ in range(20):
        alpha, colour = painter(rng, clean, foreign_photos)
        image, mask = _composite(clean, alpha, colour)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return image, mask
    raise RuntimeError(f"could not draw a visible {kind}")  # pragma: no cover - painters draw dozens of pixels


def _composite(clean: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blends `colour` over `clean` with `alpha`, then makes the mask exact: a pixel is defective iff its value
    moved by >= DEFECT_MIN_CHANGE in some channel; every other pixel is restored to the clean value. Inside the
    defect's core (alpha >= 0.5) pixels that the blend happened to leave close to their clean value (a dark stain on
    a dark pebble) are pushed to DEFECT_MIN_CHANGE away, so the ground truth has no pinholes."""
    base = clean.astype(np.float32)
    blended = base * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    blended = np.clip(np.rint(blended), 0, 255)
    change = np.abs(blended - base).max(axis=2)
    weak_core = (alpha >= 0.5) & (change < DEFECT_MIN_CHANGE)
    if weak_core.any():
        direction = np.sign(colour.mean(axis=2) - base.mean(axis=2))[weak_core]
        direction[direction == 0] = 1.0
        values = base[weak_core]
        # Step away from the clean value towards the defect colour, or the other way when that leaves [0, 255].
        up_fits = values.max(axis=1) + DEFECT_MIN_CHANGE <= 255
        down_fits = values.min(axis=1) - DEFECT_MIN_CHANGE >= 0
        direction = np.where(direction > 0, np.where(up_fits, 1.0, -1.0), np.where(down_fits, -1.0, 1.0))
        blended[weak_core] = np.clip(values + direction[:, None] * DEFECT_MIN_CHANGE, 0, 255)
        change = np.abs(blended - base).max(axis=2)
    mask = change >= DEFECT_MIN_CHANGE
    image = np.where(mask[..., None], blended, base).astype(np.uint8)
    return image, mask


def _paint_scratch(rng: np.random.Generator, clean: np.ndarray,
                   foreign_photos: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline: a random walk of 2-5 straight strokes, 1-3 px wide, antialiased."""
    size = clean.shape[0]
    canvas = np.zeros((size, size), np.float32)
    point = rng.uniform(0.15 * size, 0.85 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 6))):
        angle += rng.normal(0, 0.6)
        length = rng.uniform(0.1, 0.3) * size
        end = np.clip(point + length * np.array([np.sin(angle), np.cos(angle)]), 1, size - 2)
        rr, cc, val = draw.line_aa(int(point[0]), int(point[1]), int(end[0]), int(end[1]))
        keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        np.maximum.at(canvas, (rr[keep], cc[keep]), val[keep].astype(np.float32))
        point = end
    width = int(rng.integers(1, 4))
    if width > 1:
        canvas = ndimage.grey_dilation(canvas, size=(width, width))
    bright = rng.random() < 0.5
    value = rng.uniform(225, 255) if bright else rng.uniform(0, 30)
    return np.clip(canvas * rng.uniform(0.85, 1.0), 0, 1), np.full((size, size, 3), value, np.float32)


def _paint_stain(rng: np.random.Generator, clean: np.ndarray,
                 foreign_photos: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A blurred, irregular blob, dark or rust/oil-coloured, semi-transparent."""
    size = clean.shape[0]
    blob = _irregular_blob(rng, size, radius=rng.uniform(0.08, 0.2) * size)
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), sigma=rng.uniform(2.0, 4.0))
    alpha = alpha / max(alpha.max(), 1e-6) * rng.uniform(0.55, 0.85)
    colours = np.array([[40, 35, 30], [150, 80, 30], [90, 60, 20], [30, 40, 70]], np.float32)
    colour = colours[rng.integers(len(colours))]
    return alpha, np.broadcast_to(colour, (size, size, 3)).astype(np.float32)


def _paint_hole(rng: np.random.Generator, clean: np.ndarray,
                foreign_photos: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A dark rotated ellipse with a soft edge, darker towards its centre."""
    size = clean.shape[0]
    ry, rx = rng.uniform(0.04, 0.12, 2) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=(size, size), rotation=rng.uniform(0, np.pi))
    hole = np.zeros((size, size), np.float32)
    hole[rr, cc] = 1.0
    alpha = ndimage.gaussian_filter(hole, sigma=1.2)
    depth = ndimage.distance_transform_edt(hole)
    shade = 25.0 * (1.0 - depth / max(depth.max(), 1.0))  # 0 at the centre, ~25 at the rim
    return np.clip(alpha * 1.1, 0, 1), np.repeat(shade[..., None], 3, axis=2).astype(np.float32)


def _paint_foreign_texture(rng: np.random.Generator, clean: np.ndarray,
                           foreign_photos: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A patch of a DIFFERENT texture photo pasted through an irregular mask with a 1-px soft edge."""
    size = clean.shape[0]
    photo = foreign_photos[int(rng.integers(len(foreign_photos)))]
    y = int(rng.integers(0, photo.shape[0] - size + 1))
    x = int(rng.integers(0, photo.shape[1] - size + 1))
    patch = photo[y : y + size, x : x + size].astype(np.float32)
    # Shift the foreign patch's brightness so it also differs in tone, as foreign material usually does.
    patch = np.clip(patch + rng.choice([-1.0, 1.0]) * rng.uniform(20, 50), 0, 255)
    blob = _irregular_blob(rng, size, radius=rng.uniform(0.1, 0.22) * size)
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), sigma=0.8)
    return alpha, patch


def _irregular_blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """A star-shaped region: a disc whose radius varies smoothly with the angle (low-frequency harmonics)."""
    cy, cx = rng.uniform(radius + 2, size - radius - 2, 2)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(theta, radius)
    for k in range(2, 6):
        r += radius * rng.uniform(0, 0.25 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= r


_DEFECT_PAINTERS = {
    "scratch": _paint_scratch,
    "stain": _paint_stain,
    "hole": _paint_hole,
    "foreign_texture": _paint_foreign_texture,
}
