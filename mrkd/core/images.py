"""Images in and out without torch: decode (PIL) and RGB conversion (numpy). The client (an edge PC that only sends
frames) imports this module, never mrkd.core.preprocess, so that it needs neither torch nor torchvision."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MRKDError

MAX_PIXELS = 40_000_000  # ~6300 x 6300; larger declared sizes are refused before decoding (decompression bombs)
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")


class InvalidImageError(MRKDError, ValueError):
    """An image that cannot be used: empty, corrupt, truncated, too large, or of the wrong dtype/shape."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded JPEG/PNG/BMP/TIFF bytes -> H x W x 3 uint8 RGB array."""
    if data is None or len(data) == 0:
        raise InvalidImageError("empty image bytes")
    return _decode(io.BytesIO(bytes(data)), "image bytes", max_pixels)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> H x W x 3 uint8 RGB array."""
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise InvalidImageError(f"empty image file: {path}")
    with path.open("rb") as handle:
        return _decode(io.BytesIO(handle.read()), str(path), max_pixels)


def _decode(stream: io.BytesIO, what: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"{what}: image declares {width} x {height} pixels, more than the limit of {max_pixels}"
                )
            if image.format not in SUPPORTED_FORMATS:
                raise InvalidImageError(f"{what}: unsupported image format {image.format}")
            image.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{what}: image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{what}: not a decodable image (JPEG, PNG, BMP or TIFF expected)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{what}: corrupt or truncated image: {exc}") from exc
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return to_rgb(np.asarray(image))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """H x W, H x W x 1 or H x W x 3 uint8 -> H x W x 3 uint8 (grayscale repeated)."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageError(f"expected an H x W or H x W x 3 image, got shape {tuple(image.shape)}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise InvalidImageError(
            f"image of {image.shape[1]} x {image.shape[0]} pixels is more than the limit of {MAX_PIXELS}"
        )
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)
