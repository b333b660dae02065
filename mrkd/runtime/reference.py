"""The score reference: where normal parts are hot. Per pixel, the mean and spread of the score maps of normal
training images; the image score is then the maximum of (score map - mean) / scale (mrkd.ops.anomaly_map's
`score_reference`).

Why: on aligned parts the student's error is not uniform even on normal images (a solar cell's busbars and edges,
the border of the field of view), so the raw maximum of the map is often set by the same normal pixel. Measured
over 3 seeds on the same networks (docs/results.md, issue 18): image AUROC +0.003 (ELPV mono) to +0.029 (gravel),
+0.010 on ELPV poly, level on brick. The heat map is left as it is (standardising it lowered grass's AU-PRO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError

# Training images whose score maps make the reference (the first of a seeded shuffle when there are more): enough
# for a per-pixel mean and spread, a few seconds of forward passes.
REFERENCE_IMAGES = 256
# The scale is the per-pixel standard deviation, floored at this fraction of its mean over the map: a pixel that
# barely varies on normal images must not turn a small excursion into a huge score.
SCALE_FLOOR = 0.5


def reference_indices(n_images: int, seed: int, limit: int = REFERENCE_IMAGES) -> torch.Tensor:
    """Which of `n_images` training images make the reference: up to `limit`, a seeded choice, in order."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:limit]
    return order.sort().values


@dataclass(frozen=True, eq=False)
class ScoreReference:
    mean: torch.Tensor  # [H, W] float32
    scale: torch.Tensor  # [H, W] float32, > 0

    @classmethod
    def fit(cls, maps: torch.Tensor, floor: float = SCALE_FLOOR) -> "ScoreReference":
        """From the score maps [N, H, W] of normal images."""
        maps = maps.detach().float().cpu()
        if maps.ndim != 3 or maps.shape[0] < 2:
            raise ValueError(f"a score reference needs the maps of at least 2 normal images as [N, H, W], got "
                             f"{list(maps.shape)}")
        if not torch.isfinite(maps).all():
            raise ValueError("the normal images' score maps contain NaN or infinity")
        mean = maps.mean(dim=0)
        std = maps.std(dim=0, unbiased=False)
        scale = torch.clamp(std, min=max(float(std.mean()) * floor, 1e-12))
        return cls(mean.contiguous(), scale.contiguous())

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The `score_reference` argument of mrkd.ops.anomaly_map."""
        return self.mean, self.scale

    def to_payload(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "scale": self.scale}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> "ScoreReference | None":
        """From a checkpoint (None for one written without a reference: its score is the raw maximum)."""
        stored = data.get("score_reference")
        if stored is None:
            return None
        mean, scale = (stored.get("mean"), stored.get("scale")) if isinstance(stored, dict) else (None, None)
        if not (isinstance(mean, torch.Tensor) and isinstance(scale, torch.Tensor) and mean.ndim == 2
                and mean.shape == scale.shape and bool(torch.isfinite(mean).all())
                and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
            # an infinite scale would turn every score into 0, "normal": refused like any other bad value
            raise CheckpointError("the checkpoint's score reference is malformed (want two finite [H, W] maps, "
                                  "scale > 0)")
        return cls(mean.float(), scale.float())
