"""Heat-map overlays and plots (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.files import atomic_path
from ..core.images import to_rgb


def colorize(normalized_map: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> H x W x 3 uint8 with the 'jet' colour map."""
    from matplotlib import colormaps

    values = np.clip(np.asarray(normalized_map, dtype=np.float32), 0.0, 1.0)
    return (colormaps["jet"](values)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, normalized_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends the coloured map (resized to the image) over the image; both uint8 H x W x 3 out."""
    rgb = to_rgb(image)
    heat = Image.fromarray(colorize(normalized_map)).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR)
    return (rgb * (1 - alpha) + np.asarray(heat) * alpha).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Writes a uint8 image as PNG atomically; returns the path."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def save_line_plot(path: str | Path, series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> Path:
    """One line per series on shared axes, as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
