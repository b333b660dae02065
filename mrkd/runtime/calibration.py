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
    `2 * threshold - low` to 1. Heat maps get the same mapping fitted on the maxima of the normal images' maps
    (`map_threshold`, `map_low`), so a pixel above 0.5 in a normalised heat map is hotter than the hottest pixel of
    the normal images at the same quantile. When the score is the max of the heat map (the same taps) the two
    mappings are one; calibrations written before the map's own fields use the score's for both.
    """

    threshold: float
    low: float
    map_threshold: float | None = None
    map_low: float | None = None

    @classmethod
    def fit(cls, normal_scores: np.ndarray, quantile: float = DEFAULT_QUANTILE,
            normal_map_maxima: np.ndarray | None = None) -> "Calibration":
        threshold, low = _fit(normal_scores, quantile, "scores")
        if normal_map_maxima is None:
            return cls(threshold=threshold, low=low)
        map_threshold, map_low = _fit(normal_map_maxima, quantile, "heat map maxima")
        return cls(threshold=threshold, low=low, map_threshold=map_threshold, map_low=map_low)

    def normalize(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw image scores -> [0, 1], 0.5 = the threshold (NaN stays NaN)."""
        return _normalize(values, self.threshold, self.low)

    def normalize_map(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw heat map pixels -> [0, 1], 0.5 = the heat map threshold (NaN stays NaN)."""
        if self.map_threshold is None or self.map_low is None:
            return _normalize(values, self.threshold, self.low)
        return _normalize(values, self.map_threshold, self.map_low)

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
        maps = {k: float(data[k]) for k in ("map_threshold", "map_low") if data.get(k) is not None}
        return cls(threshold=float(data["threshold"]), low=float(data["low"]), **maps)


def _fit(values: np.ndarray, quantile: float, what: str) -> tuple[float, float]:
    """(threshold, low) of normal images' values: the quantile and the minimum."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError(f"calibration needs at least one normal image ({what})")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"calibration {what} contain NaN or infinity")
    threshold = float(np.quantile(values, quantile))
    low = float(values.min())
    if threshold - low < 1e-6:  # one image, or identical scores: keep the mapping finite
        low = threshold - max(abs(threshold) * 0.1, 1e-3)
    return threshold, low


def _normalize(values: np.ndarray | torch.Tensor, threshold: float, low: float) -> np.ndarray | torch.Tensor:
    scale = 0.5 / (threshold - low)
    if isinstance(values, torch.Tensor):
        return ((values - threshold) * scale + 0.5).clamp_(0.0, 1.0)
    return np.clip((np.asarray(values, dtype=np.float32) - threshold) * scale + 0.5, 0.0, 1.0)
