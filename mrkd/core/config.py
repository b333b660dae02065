"""Dataclass configs shared by training, checkpoints and serving."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MRKD_VERSION = "0.1.0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "mobilenet_v2"
SIGMA_AT_256 = 4.0
# Optimizer steps of the embedded default (elpv:mono, MobileNetV2, 256 px): what 10 minutes of 2 CPU cores buy.
DEFAULT_STEPS = 1200


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and its post-processing."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = 256
    flm: bool = True
    flm_ratio: float = 0.2
    inference_mask: bool = False  # the reference code's random test-time mask; off = deterministic
    sigma: float | None = None  # Gaussian sigma in pixels; None = 4 at 256 px, scaled with image_size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def blur_sigma(self) -> float:
        return self.sigma if self.sigma is not None else SIGMA_AT_256 * self.image_size / 256.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**values)


@dataclass
class TrainConfig:
    """One training run (python -m mrkd.train). Defaults are the embedded, offline-capable ones."""

    data: str = "elpv:mono"
    out: str = "runs/elpv-mono"
    category: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    pretrained: bool = True
    steps: int = DEFAULT_STEPS  # optimizer steps: the training budget, whatever the size of the training set
    epochs: int | None = None  # another way to give the budget: passes over the training set (overrides steps)
    batch_size: int = 16
    image_size: int = 256
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    ilm: bool = True
    ilm_category: str | None = None  # ILM table row to use; default: the data's category (texture row if unknown)
    flm: bool = True
    flm_ratio: float = 0.2
    save_every: int = 250  # checkpoint every N steps (0: only at the end)
    device: str = "auto"
    precision: str = "auto"  # training compute: fp32, bf16, or auto (bf16 on CUDA and on CPUs with native bf16)
    feature_cache_gb: float = 4.0  # teacher features of the clean training images are cached up to this size
    max_train_images: int | None = None
    resume: bool = False

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, image_size=self.image_size, flm=self.flm, flm_ratio=self.flm_ratio)

    def steps_per_epoch(self, n_train: int, world_size: int = 1) -> int:
        per_rank = max(1, self.batch_size // world_size)
        return max(1, (n_train // world_size) // per_rank)

    def total_steps(self, n_train: int, world_size: int = 1) -> int:
        """The run's optimizer steps: `epochs` passes when given, else `steps`."""
        if self.epochs is not None:
            return self.epochs * self.steps_per_epoch(n_train, world_size)
        return self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})
