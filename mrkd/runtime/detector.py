"""In-process inference: checkpoint -> raw scores, raw maps, normalised scores and verdicts.

Evaluation, the Triton detector model and the client's reference checks all go through this class, so a score
computed here and one served by Triton come from the same code. The network runs on the runtime chosen at load
(torch, onnxruntime or openvino: mrkd.runtime.runners); the fused anomaly map always runs here, on its
features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.config import ModelConfig
from ..core.preprocess import normalize, prepare_batch
from ..model.network import MRKDModel
from ..ops import anomaly_map
from .calibration import Calibration
from .checkpoint import load_checkpoint
from .convert import file_sha256, load_runner
from .errors import NonFiniteScoreError
from .reference import ScoreReference
from .runners import NetworkRunner, TorchRunner, resolve_precision
from .whitening import MapWhitening, ResidualMoments


@dataclass
class Prediction:
    scores: np.ndarray  # [B] float32, raw: the max of the smoothed score map (standardised by the score reference)
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
        network: NetworkRunner | None = None,
        score_reference: ScoreReference | None = None,
        map_whitening: MapWhitening | None = None,
    ) -> None:
        """`network`: the runner of `model` to use (default: torch at the device's default precision);
        `score_reference`: the per-pixel normal statistics the score is standardised by (None: the raw maximum);
        `map_whitening`: the normal residuals' statistics the heat map's taps are whitened by (None: plain cosine
        distances)."""
        self.device = torch.device(device)
        self.config = config
        self.calibration = calibration
        self.score_reference = score_reference
        if score_reference is not None and tuple(score_reference.mean.shape) != (config.image_size,) * 2:
            raise ValueError(f"the score reference is {list(score_reference.mean.shape)} but the model's image size "
                             f"is {config.image_size}")
        self._reference = None if score_reference is None else tuple(
            t.to(self.device) for t in score_reference.as_tuple())
        self.map_whitening = map_whitening
        if map_whitening is not None and len(map_whitening.means) != len(config.map_scales):
            raise ValueError(f"the map whitening has {len(map_whitening.means)} taps but the heat map reads "
                             f"{len(config.map_scales)}")
        self._whitening = None if map_whitening is None else map_whitening.as_list(self.device)
        self.batch_size = batch_size
        self.network = network or TorchRunner(model, self.device, resolve_precision("auto", self.device))

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
             runtime: str = "torch", precision: str = "auto", threads: int | None = None,
             network_dir: str | Path | None = None) -> "Detector":
        """`runtime`: torch | onnxruntime | openvino (see mrkd.runtime.runners); `precision`: fp32 | bf16 |
        auto (bf16 on CUDA, fp32 on CPU); `threads`: ONNX Runtime / OpenVINO threads (default: torch's count);
        `network_dir`: a folder with the converted network written by mrkd.export (default: convert now)."""
        data = load_checkpoint(checkpoint, map_location="cpu")
        path = Path(checkpoint) / "checkpoint.pt" if Path(checkpoint).is_dir() else Path(checkpoint)
        sha = file_sha256(path) if network_dir is not None and runtime != "torch" else None
        return cls.from_payload(data, device, batch_size, runtime, precision, threads, network_dir, sha)

    @classmethod
    def from_payload(cls, data: dict, device: str | torch.device = "cpu", batch_size: int = 16,
                     runtime: str = "torch", precision: str = "auto", threads: int | None = None,
                     network_dir: str | Path | None = None, checkpoint_sha256: str | None = None) -> "Detector":
        """From an already loaded checkpoint (see mrkd.runtime.checkpoint.load_checkpoint)."""
        config = ModelConfig.from_dict(data["model_config"])
        model = MRKDModel.from_config(config)
        model.load_state_dict(data["state_dict"])
        network = load_runner(model, config, runtime, precision, device, threads, network_dir, checkpoint_sha256)
        return cls(model, config, Calibration.from_dict(data["calibration"]), device, batch_size, network,
                   ScoreReference.from_payload(data), MapWhitening.from_payload(data, len(config.map_scales)))

    @property
    def runtime(self) -> str:
        return self.network.runtime

    @property
    def precision(self) -> str:
        return self.network.precision

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
        teacher, student = self._features(batch)
        maps, scores = anomaly_map(teacher, student, batch.shape[-2:], **self.config.map_options(),
                                   score_reference=self._reference, whitening=self._whitening)
        self._refuse_non_finite(scores)
        return maps[:, 0], scores

    def _features(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """uint8 [B, 3, S, S] -> the network's teacher and student features on the detector's device."""
        return self.network(normalize(batch.to(self.device, non_blocking=True)))

    def _refuse_non_finite(self, scores: torch.Tensor) -> None:
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteScoreError(f"the {self.runtime} {self.precision} network gave NaN/Inf anomaly scores for "
                                      f"batch items {bad}; the model or its conversion is broken")

    @torch.inference_mode()
    def score_maps(self, batch: torch.Tensor, residuals: ResidualMoments | None = None) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> the raw smoothed maps of the score's taps [B, S, S] (what a score reference is
        fitted on); NonFiniteScoreError as raw_maps. `residuals`: the batch's heat-map taps (after the feature mean)
        are also added to these running moments (what a map whitening is fitted on), from the same forward pass."""
        teacher, student = self._features(batch)
        options = self.config.map_options()
        maps, scores = anomaly_map(teacher, student, batch.shape[-2:], options["sigma"], options["score_scales"],
                                   options["pool"])
        self._refuse_non_finite(scores)  # a NaN in any tap, read or not: a broken network, before any fit sees it
        if residuals is not None:
            residuals.add(teacher, student, options["scales"], options["pool"])
        return maps[:, 0]

    def predict_prepared(self, batch: torch.Tensor) -> Prediction:
        maps, scores = self.raw_maps(batch)
        scores_np = scores.float().cpu().numpy()
        return Prediction(
            scores=scores_np,
            maps=maps.float().cpu().numpy(),
            normalized_scores=self.calibration.normalize(scores_np),
            is_anomalous=np.asarray(self.calibration.is_anomalous(scores_np), dtype=bool),
        )
