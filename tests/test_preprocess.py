"""The one input path: decoding, bad input, grayscale handling, resize and normalisation."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from mrkd.core.config import IMAGENET_MEAN, IMAGENET_STD
from mrkd.core.preprocess import (
    InvalidImageError,
    decode_image,
    load_image,
    normalize,
    prepare_batch,
    prepare_image,
    to_rgb,
)


def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one tiny data chunk (a decompression bomb shape)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return skdata.brick()  # real 512x512 grayscale photo


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_roundtrip_exactly(brick, fmt):
    decoded = decode_image(encode(brick, fmt))
    assert decoded.shape == (512, 512, 3) and decoded.dtype == np.uint8
    for c in range(3):  # grayscale becomes three identical channels
        np.testing.assert_array_equal(decoded[..., c], brick)


def test_jpeg_decodes_close_to_source(brick):
    decoded = decode_image(encode(brick, "JPEG", quality=95))
    assert np.abs(decoded[..., 0].astype(int) - brick.astype(int)).mean() < 3


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a decodable image"),
        (None, "empty"),
    ],
)
def test_bad_bytes_name_the_problem(payload, words):
    with pytest.raises(InvalidImageError, match=words):
        decode_image(payload)


def test_truncated_png_is_reported(brick):
    data = encode(brick, "PNG")
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(InvalidImageError, match="20000 x 20000|too large"):
        decode_image(png_declaring(20000, 20000))


def test_max_pixels_limit_is_configurable(brick):
    with pytest.raises(InvalidImageError, match="512 x 512"):
        decode_image(encode(brick, "PNG"), max_pixels=100_000)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((8, 8), dtype=np.float32), "dtype float32"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape"),
        (np.zeros((0, 8), dtype=np.uint8), "shape"),
    ],
)
def test_to_rgb_rejects_wrong_dtype_and_shape(array, words):
    with pytest.raises(InvalidImageError, match=words):
        to_rgb(array)


def test_load_image_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_prepare_image_resizes_gray_and_rgb_identically(brick):
    gray = prepare_image(brick, 64)
    rgb = prepare_image(np.repeat(brick[..., None], 3, axis=2), 64)
    assert gray.shape == (3, 64, 64) and gray.dtype == torch.uint8
    assert torch.equal(gray, rgb)
    # an antialiased downscale keeps the mean brightness
    assert abs(gray.float().mean().item() - float(brick.mean())) < 1.5


def test_prepare_batch_accepts_paths_and_arrays(tmp_path, brick):
    path = tmp_path / "brick.png"
    Image.fromarray(brick).save(path)
    batch = prepare_batch([path, brick], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[0], batch[1])


def test_normalize_matches_imagenet_statistics():
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (batch.float() / 255.0 - mean) / std
    torch.testing.assert_close(normalize(batch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidImageError, match="uint8"):
        normalize(batch.float())
