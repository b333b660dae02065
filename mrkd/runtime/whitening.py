"""The map whitening: how the student's error varies on normal images, per heat-map tap, so the map can discount it.

Per tap, the residual between the unit teacher and unit student features (after the map's feature mean) has a mean
and a covariance over every position of normal training images. The heat map then takes the cosine distance of
the features moved by a square root of the inverse covariance (mrkd.ops.whiten): a direction in which the student's
error is large on normal grain (a texture it never restores exactly) counts little, one in which it is small on
normal parts counts a lot. PaDiM fits such a Gaussian on a teacher's features; here it is fitted on the
student-teacher residual, which the distillation has already made small.

Why: on the textures the heat map's AU-PRO trailed PatchCore's; on the dropped seeds (docs/results.md, issue 18)
the whitened map's AU-PRO is higher on every texture (grass +0.039, gravel +0.032, brick +0.009 on seed 7). The
image score is left as it is (whitening its taps did not help ELPV mono's score on its dropped seed).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..ops import COSINE_EPS, local_average
from .errors import CheckpointError

# Ridge added to each covariance, as a fraction of its mean variance: directions in which normal residuals barely
# vary must not blow up (PaDiM adds 0.01 I to its covariances; chosen on the dropped seed: 0.01 over 0.1 and 1).
RIDGE = 0.01


class ResidualMoments:
    """Running sums of the per-tap residuals of normal images (float64): feed batches with `add`, then `whitening`."""

    def __init__(self) -> None:
        self.count: list[int] = []
        self.total: list[torch.Tensor] = []
        self.outer: list[torch.Tensor] = []

    def add(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
            taps: Sequence[int] | None = None, pool: int = 1) -> None:
        """A batch of normal images' features ([B, C, H, W] each): the `taps` of the heat map (None: all), averaged
        over `pool` x `pool` first (mrkd.ops.local_average, the map's feature mean)."""
        if taps is not None:
            teacher, student = [teacher[i] for i in taps], [student[i] for i in taps]
        teacher, student = local_average(teacher, pool), local_average(student, pool)
        if not self.count:
            self.count = [0] * len(teacher)
            self.total = [torch.zeros(t.shape[1], dtype=torch.float64) for t in teacher]
            self.outer = [torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64) for t in teacher]
        if len(teacher) != len(self.count):
            raise ValueError(f"got {len(teacher)} taps, earlier batches had {len(self.count)}")
        for k, (t, s) in enumerate(zip(teacher, student)):
            residual = (F.normalize(t.float(), dim=1, eps=COSINE_EPS) - F.normalize(s.float(), dim=1, eps=COSINE_EPS))
            flat = residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1]).double().cpu()
            if not torch.isfinite(flat).all():
                raise ValueError("the normal images' features contain NaN or infinity")
            self.count[k] += flat.shape[0]
            self.total[k] += flat.sum(dim=0)
            self.outer[k] += flat.T @ flat

    def whitening(self, ridge: float = RIDGE) -> "MapWhitening":
        if not self.count or min(self.count) < 2:
            raise ValueError("a map whitening needs the residuals of at least 2 feature positions per tap")
        means, matrices = [], []
        for n, total, outer in zip(self.count, self.total, self.outer):
            mean = total / n
            covariance = (outer - n * torch.outer(mean, mean)) / (n - 1)
            covariance = (covariance + covariance.T) / 2
            channels = covariance.shape[0]
            covariance += ridge * max(float(torch.trace(covariance)) / channels, 1e-12) * torch.eye(
                channels, dtype=torch.float64)
            # inverse = L L^T, so |L^T r|^2 = r^T inverse r: L^T is the square root the features are moved by
            lower = torch.linalg.cholesky(torch.linalg.inv(covariance))
            means.append(mean.float())
            matrices.append(lower.T.contiguous().float())
        return MapWhitening(tuple(means), tuple(matrices))


@dataclass(frozen=True, eq=False)
class MapWhitening:
    means: tuple[torch.Tensor, ...]  # per map tap: [C] float32, the normal residuals' mean
    matrices: tuple[torch.Tensor, ...]  # per map tap: [C, C] float32, a square root of their inverse covariance

    def as_list(self, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The `whitening` argument of mrkd.ops.anomaly_map."""
        return [(m.to(device), w.to(device)) for m, w in zip(self.means, self.matrices)]

    def to_payload(self) -> dict[str, list[torch.Tensor]]:
        return {"means": list(self.means), "matrices": list(self.matrices)}

    @classmethod
    def from_payload(cls, data: dict[str, Any], n_taps: int | None = None) -> "MapWhitening | None":
        """From a checkpoint (None for one written without it: its heat map is the plain cosine distance).
        `n_taps`: how many taps the model's heat map reads."""
        stored = data.get("map_whitening")
        if stored is None:
            return None
        means = stored.get("means") if isinstance(stored, dict) else None
        matrices = stored.get("matrices") if isinstance(stored, dict) else None
        ok = (isinstance(means, (list, tuple)) and isinstance(matrices, (list, tuple)) and len(means) == len(matrices)
              and len(means) > 0 and (n_taps is None or len(means) == n_taps))
        ok = ok and all(isinstance(m, torch.Tensor) and isinstance(w, torch.Tensor) and m.ndim == 1
                        and tuple(w.shape) == (m.shape[0], m.shape[0]) and bool(torch.isfinite(m).all())
                        and bool(torch.isfinite(w).all()) for m, w in zip(means, matrices))
        if not ok:
            raise CheckpointError("the checkpoint's map whitening is malformed (want a finite [C] mean and [C, C] "
                                  "matrix for each tap of the heat map)")
        return cls(tuple(m.float() for m in means), tuple(w.float() for w in matrices))
