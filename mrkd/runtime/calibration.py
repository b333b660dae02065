"""Threshold and score normalisation calibrated on held-out normal images (0.5 = threshold)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class Calibration:
    """Maps raw anomaly values to [0, 1] so that the threshold lands on 0.5.

    `low` is the lowest normal score seen in calibration; a raw value of `low` maps to 0 and one of
    `2 * threshold - low` to 1. Scores and map pixels use the same mapping, so a pixel above 0.5 in a
    normalised heat map is a pixel above the image threshold.
    """

    threshold: float
    low: float

    @classmethod
    def fit(cls, normal_scores: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> "Calibration":
        scores = np.asarray(normal_scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise ValueError("calibration needs at least one normal image score")
        if not np.all(np.isfinite(scores)):
            raise ValueError("calibration scores contain NaN or infinity")
        threshold = float(np.quantile(scores, quantile))
        low = float(scores.min())
        if threshold - low < 1e-6:  # one image, or identical scores: keep the mapping finite
            low = threshold - max(abs(threshold) * 0.1, 1e-3)
        return cls(threshold=threshold, low=low)

    def normalize(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        scale = 0.5 / (self.threshold - self.low)
        if isinstance(values, torch.Tensor):
            return ((values - self.threshold) * scale + 0.5).clamp_(0.0, 1.0)
        return np.clip((np.asarray(values, dtype=np.float32) - self.threshold) * scale + 0.5, 0.0, 1.0)

    def is_anomalous(self, raw_scores: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw score above the threshold. A non-finite raw score (NaN, +-inf: a bad feature value somewhere) is
        anomalous too: it must never pass as normal. (normalize() keeps NaN as NaN for the same reason.)"""
        if isinstance(raw_scores, torch.Tensor):
            return ~(torch.isfinite(raw_scores) & (raw_scores <= self.threshold))
        raw = np.asarray(raw_scores)
        return ~(np.isfinite(raw) & (raw <= self.threshold))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(threshold=float(data["threshold"]), low=float(data["low"]))
