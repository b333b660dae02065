"""Dataclass configs shared by training, checkpoints and serving."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import OptionError
from .options import int_list, on_off, option

MRKD_VERSION = "0.1.0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "mobilenet_v2"
SIGMA_AT_256 = 4.0
# Teacher and student features are averaged over this neighbourhood before the distance (PatchCore's locally aware
# features); checkpoints written before the option existed used 1 (none).
DEFAULT_FEATURE_POOL = 3
# The teacher taps whose distances make the heat map (0 = stride 4, 1 = stride 8, 2 = stride 16; combined as
# DEFAULT_MAP_COMBINE says), and those whose summed, smoothed map's maximum is the image score. The fine stride-4 tap
# localises small defects best; the stride-16 tap alone separates normal from defective images best
# (docs/results.md, chosen on a dropped seed). Checkpoints written before the options existed summed all three taps
# for both.
DEFAULT_MAP_SCALES = (0, 1, 2)
DEFAULT_SCORE_SCALES = (2,)
N_TAPS = 3
# How the heat map's taps are combined: their distances multiplied (RD4AD's and anomalib's "multiply" mode), so a
# pixel is hot only where every tap disagrees: one tap's error on normal grain no longer lights it. Higher AU-PRO
# than the sum on every texture and seed measured (docs/results.md, issue 18). The score's taps are always summed
# (the product scored ELPV mono lower). Checkpoints written before the option summed the heat map too.
DEFAULT_MAP_COMBINE = "product"
MAP_COMBINES = ("sum", "product")  # mrkd.ops.COMBINES (a leaf layer like this one)
# ModelConfig fields that only say how the map is read from the features (a run may resume with other values)
MAP_SETTINGS = ("sigma", "feature_pool", "map_scales", "score_scales", "map_combine")
# Optimizer steps of the embedded default (elpv:mono, MobileNetV2, 256 px): about 10 minutes of 2 CPU cores of the
# slower kind (fp32); more steps did not help on the dropped seed (docs/results.md, issue 18).
DEFAULT_STEPS = 600
# Named sets of training defaults (`mrkd.train --preset NAME`); an option given explicitly still wins. "quality":
# the EfficientNet-Lite0 teacher, scored on all three taps; chosen on ELPV mono's dropped seed, where it beat every
# MobileNetV2 setting (docs/results.md, issue 18); it trains about 1.13x longer on 2 cores. It is for uniform
# surfaces (mono cells, brick): on granular ones (poly cells, grass, gravel) the all-tap score is 0.04-0.05 worse
# than the default's stride-16 one, over 3 seeds.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quality": {"backbone": "efficientnet_lite0", "score_scales": [0, 1, 2]},
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and its post-processing."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = 256
    flm: bool = True
    flm_ratio: float = 0.2
    inference_mask: bool = False  # the reference code's random test-time mask; off = deterministic
    sigma: float | None = None  # Gaussian sigma in pixels; None = 4 at 256 px, scaled with image_size
    feature_pool: int = DEFAULT_FEATURE_POOL  # k x k local average of the features before the distance (1 = none)
    map_scales: tuple[int, ...] = DEFAULT_MAP_SCALES  # taps combined into the heat map
    score_scales: tuple[int, ...] = DEFAULT_SCORE_SCALES  # taps whose smoothed map's max is the image score
    map_combine: str = DEFAULT_MAP_COMBINE  # how the heat map's taps are combined: "sum" or "product"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise OptionError(f"feature_pool must be an odd size >= 1, got {self.feature_pool}", "feature_pool")
        self.map_scales = _tap_set(self.map_scales, "map_scales")
        self.score_scales = _tap_set(self.score_scales, "score_scales")
        if self.map_combine not in MAP_COMBINES:
            raise OptionError(f"map_combine must be 'sum' or 'product', got {self.map_combine!r}", "map_combine")

    @property
    def blur_sigma(self) -> float:
        return self.sigma if self.sigma is not None else SIGMA_AT_256 * self.image_size / 256.0

    def map_options(self) -> dict[str, Any]:
        """The keyword arguments of mrkd.ops.anomaly_map after the features and the output size."""
        return {"sigma": self.blur_sigma, "scales": self.map_scales, "pool": self.feature_pool,
                "score_scales": self.score_scales, "combine": self.map_combine}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        values.setdefault("feature_pool", 1)  # what a checkpoint from before these options computed
        values.setdefault("map_scales", tuple(range(N_TAPS)))
        values.setdefault("score_scales", values["map_scales"])  # the score was the max of the heat map
        values.setdefault("map_combine", "sum")
        return cls(**values)


def _tap_set(scales: Any, name: str) -> tuple[int, ...]:
    taps = tuple(scales)
    if not taps or len(set(taps)) != len(taps) or not set(taps) <= set(range(N_TAPS)):
        raise OptionError(f"{name} must be distinct tap indices among 0, 1, 2 (stride 4, 8, 16), got {list(taps)}",
                          name)
    return tuple(sorted(taps))


@dataclass
class TrainConfig:
    """One training run (python -m mrkd.train). Defaults are the embedded, offline-capable ones."""

    data: str = option("elpv:mono", help="MVTec-layout folder, elpv:mono|poly or textures:brick|grass|gravel")
    category: str | None = option(None, help="category folder under an MVTec-layout root (also picks ILM settings)")
    out: str = option("runs/elpv-mono", help="output folder (checkpoint.pt, losses.json, loss_curve.png)")
    backbone: str = option(DEFAULT_BACKBONE,
                           help="teacher network (see mrkd.model.backbones.available_backbones())")
    weights: str | None = option(None, help="ImageNet weights file for the backbone (else the hub cache)")
    pretrained: bool = option(True, flags=("--no-pretrained",), action="store_false",
                              help="random teacher (tests and ablations only)")
    # optimizer steps: the training budget, whatever the size of the training set
    steps: int = option(DEFAULT_STEPS, type=int,
                        help=f"training budget in optimizer steps (default {DEFAULT_STEPS}: about 10 minutes for the "
                             f"embedded default on 2 CPU cores)")
    # another way to give the budget: passes over the training set (overrides steps)
    epochs: int | None = option(None, type=int,
                                help="budget in passes over the training set instead of --steps (e.g. the paper's 200)")
    batch_size: int = option(16, type=int)
    image_size: int = option(256, type=int)
    lr: float = option(0.005, type=float)
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = option(111, type=int)
    ilm: bool = option(True, type=on_off, metavar="on|off", help="image-level masking (default on)")
    # ILM table row to use; default: the data's category (texture row if unknown)
    ilm_category: str | None = option(
        None, help="use this MVTec AD category's ILM patch settings (default: the data's category, or the row "
                   "measured for a built-in source; unknown categories get the texture row)")
    flm: bool = option(True, type=on_off, metavar="on|off", help="feature-level masking (default on)")
    flm_ratio: float = 0.2
    feature_pool: int = option(DEFAULT_FEATURE_POOL, type=int,
                               help=f"average teacher and student features over a k x k neighbourhood before their "
                                    f"distance (default {DEFAULT_FEATURE_POOL}; 1: none)")
    map_scales: tuple[int, ...] = option(DEFAULT_MAP_SCALES, type=int_list,
                                         help="teacher taps combined into the heat map (see --map-combine), 0 = "
                                              "stride 4, 1 = stride 8, 2 = stride 16 (default 0,1,2; all three are "
                                              "trained)")
    score_scales: tuple[int, ...] = option(DEFAULT_SCORE_SCALES, type=int_list,
                                           help="teacher taps whose summed, smoothed map's maximum is the image "
                                                "score (default 2)")
    map_combine: str = option(
        DEFAULT_MAP_COMBINE, choices=list(MAP_COMBINES),
        help="how the heat map combines its taps' distances (default product: a pixel is hot where every tap "
             "disagrees; sum: where any does, the paper's; the score's taps are always summed; changing it on a "
             "trained run needs only --resume)")
    score_reference: bool = option(
        True, type=on_off, metavar="on|off",
        help="standardise the score map per pixel by the mean and spread of normal training images' maps before its "
             "maximum (default on: a spot that is hot on every normal part, e.g. a solar cell's busbar, no longer "
             "sets the score; changing it on a trained run needs only --resume)")
    map_whitening: bool = option(
        True, type=on_off, metavar="on|off",
        help="whiten the heat map's taps by the spread of the student's error on normal training images (default "
             "on: normal grain the student never restores exactly no longer lights the map; changing it on a "
             "trained run needs only --resume)")
    save_every: int = option(250, type=int, help="checkpoint every K steps (0: only at the end)")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    # training compute: fp32, bf16, or auto (bf16 on CUDA and on CPUs with native bf16)
    precision: str = option("auto", choices=["auto", "fp32", "bf16"],
                            help="training compute (default auto: bf16 on CUDA and on CPUs with native bf16, else "
                                 "fp32)")
    feature_cache_gb: float = 4.0  # teacher features of the clean training images are cached up to this size
    max_train_images: int | None = option(None, type=int, help="use only the first N training images")
    resume: bool = option(False, action="store_true", help="continue from <out>/checkpoint.pt")

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, image_size=self.image_size, flm=self.flm, flm_ratio=self.flm_ratio,
                           feature_pool=self.feature_pool, map_scales=tuple(self.map_scales),
                           score_scales=tuple(self.score_scales), map_combine=self.map_combine)

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
