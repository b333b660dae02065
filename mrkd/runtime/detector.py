"""In-process inference: checkpoint -> raw scores, raw maps, normalised scores and verdicts.

Evaluation, the Triton detector model and the client's reference checks all go through this class, so a score
computed here and one served by Triton come from the same code.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .calibration import Calibration
from .checkpoint import load_checkpoint
from ..core.config import ModelConfig
from ..ops import anomaly_map
from ..core.preprocess import normalize, prepare_batch
from ..model.network import MRKDModel


@dataclass
class Prediction:
    scores: np.ndarray  # [B] float32, raw: the max of the smoothed map
    maps: np.ndarray  # [B, S, S] float32, raw, at the model's image size
    normalized_scores: np.ndarray  # [B] float32 in [0, 1], 0.5 = threshold
    is_anomalous: np.ndarray  # [B] bool

    def __len__(self) -> int:
        return len(self.scores)


class Detector:
    """A trained MRKD model ready for inference."""

    def __init__(
        self,
        model: MRKDModel,
        config: ModelConfig,
        calibration: Calibration,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        self.calibration = calibration
        self.batch_size = batch_size
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> "Detector":
        return cls.from_payload(load_checkpoint(checkpoint, map_location="cpu"), device, batch_size)

    @classmethod
    def from_payload(cls, data: dict, device: str | torch.device = "cpu", batch_size: int = 16) -> "Detector":
        """From an already loaded checkpoint (see mrkd.runtime.checkpoint.load_checkpoint)."""
        config = ModelConfig.from_dict(data["model_config"])
        model = MRKDModel.from_config(config)
        model.load_state_dict(data["state_dict"])
        return cls(model, config, Calibration.from_dict(data["calibration"]), device, batch_size)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def predict(self, images: Sequence[np.ndarray | str | Path] | np.ndarray) -> Prediction:
        """Images: H x W / H x W x 3 uint8 arrays (or a stacked B x H x W (x 3) array) or file paths."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8:
            if images.ndim == 2 or images.shape[-1] in (1, 3):
                images = [images]
        parts = [
            self.predict_prepared(prepare_batch(images[i : i + self.batch_size], self.image_size))
            for i in range(0, len(images), self.batch_size)
        ]
        if not parts:
            raise ValueError("predict() needs at least one image")
        return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in Prediction.__dataclass_fields__))

    @torch.inference_mode()
    def raw_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, S, S] -> (raw maps [B, S, S], raw scores [B]) on the detector's device."""
        x = normalize(batch.to(self.device, non_blocking=True))
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            teacher, student = self.model(x)
        maps, scores = anomaly_map(teacher, student, (x.shape[-2], x.shape[-1]), self.config.blur_sigma)
        return maps[:, 0], scores

    def predict_prepared(self, batch: torch.Tensor) -> Prediction:
        maps, scores = self.raw_maps(batch)
        scores_np = scores.float().cpu().numpy()
        return Prediction(
            scores=scores_np,
            maps=maps.float().cpu().numpy(),
            normalized_scores=self.calibration.normalize(scores_np),
            is_anomalous=np.asarray(self.calibration.is_anomalous(scores_np), dtype=bool),
        )
