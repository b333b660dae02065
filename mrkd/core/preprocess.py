"""The one input path shared by training, evaluation, the Detector and the Triton models (decoding and RGB
conversion live in the torch-free mrkd.core.images and are re-exported here).

Images become uint8 [3, S, S] tensors (grayscale repeated to three channels, antialiased bilinear resize) and are
normalised with the ImageNet statistics on the device that runs the network. Keeping the resized image in uint8
until the last step keeps what crosses process boundaries (Triton's ensemble, DataLoader workers) small.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from .config import IMAGENET_MEAN, IMAGENET_STD
from .images import MAX_PIXELS, SUPPORTED_FORMATS, InvalidImageError, decode_image, load_image, to_rgb

__all__ = [
    "MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "InvalidImageError",
    "decode_image",
    "load_image",
    "to_rgb",
    "prepare_image",
    "prepare_batch",
    "normalize",
]


def prepare_image(image: np.ndarray, image_size: int) -> torch.Tensor:
    """One image -> uint8 [3, S, S]: RGB, antialiased bilinear resize (torchvision)."""
    array = to_rgb(image)
    if not array.flags.writeable:  # PIL and Triton hand out read-only buffers; torch wants to own a writable one
        array = array.copy()
    rgb = torch.from_numpy(array).permute(2, 0, 1)
    if rgb.shape[1] == image_size and rgb.shape[2] == image_size:
        return rgb.contiguous()
    return TF.resize(rgb, [image_size, image_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def prepare_batch(images: Sequence[np.ndarray | str | Path], image_size: int) -> torch.Tensor:
    """Arrays or file paths -> uint8 [B, 3, S, S]."""
    tensors = [prepare_image(load_image(i) if isinstance(i, (str, Path)) else i, image_size) for i in images]
    return torch.stack(tensors)


def normalize(
    batch: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32, scaled to [0, 1] and standardised, on the batch's device."""
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
        raise InvalidImageError(f"expected a uint8 [B, 3, H, W] batch, got {batch.dtype} {tuple(batch.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean_t) / std_t
