"""The training loop behind `python -m mrkd.train`: data, ILM, the model, Adam, checkpoints, calibration.

The budget is a number of optimizer steps (`TrainConfig.steps`, or `epochs` passes over the data), so a small
training set gets as many updates as a large one. One step:

- target: the teacher's features of the CLEAN images, computed once before the first step and cached (they never
  change: the teacher is frozen), up to `feature_cache_gb`; above that they are computed per step;
- input: the teacher's features of the ILM-corrupted images (with ILM off, RD4AD, the cached clean features);
- bottleneck + student + FLM generation blocks, the flattened-cosine loss, Adam.

Compute runs in channels_last and, where the hardware has native bf16 (CUDA, CPUs with AVX512-BF16 or AMX), under
bf16 autocast; the loss and the cached targets stay float32. After the last step the BatchNorm statistics of the
bottleneck and student are recomputed over the clean training images with the final weights, so the statistics
used at test time are those of the trained network however few steps were taken.

Single process or DDP (torchrun). Checkpoints are written atomically every `save_every` steps, on Ctrl-C and at the
end (with the score reference fitted on the clean training images and the calibration on held-out normal images,
runtime.reference and runtime.calibration); `resume=True` continues exactly from
`<out>/checkpoint.pt` (every random choice is seeded by (seed, step) or (seed, epoch, image)).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from ..core.config import MAP_SETTINGS, ModelConfig, TrainConfig
from ..core.errors import OptionError
from ..core.files import user_path, write_json
from ..core.preprocess import normalize, prepare_image
from ..data import ImageRecord, open_dataset
from ..model.loss import cosine_distillation_loss
from ..model.masking import ILM_SETTINGS, ilm_config_for, ilm_corrupt, ilm_row_for_source
from ..model.network import MRKDModel
from .calibration import Calibration
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .detector import Detector
from .reference import REFERENCE_IMAGES, ScoreReference, reference_indices
from .visualize import save_line_plot
from .weights import build_model
from .whitening import MapWhitening, ResidualMoments

log = logging.getLogger("mrkd.train")
CHECKPOINT_NAME = "checkpoint.pt"
PRECISIONS = ("auto", "fp32", "bf16")
PROGRESS_LINES = 10  # concise log lines per run (besides the live bar)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    losses: list[float] = field(default_factory=list)  # one per step


@dataclass(frozen=True)
class StepOptions:
    """How a step is computed (the method is the same either way; benchmarks/train_speed.py compares them)."""

    cache_targets: bool = True  # clean-image teacher features computed once, not every step
    bf16: bool = False  # autocast the teacher on corrupted images and the student in bf16
    channels_last: bool = True


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; other names as torch spells them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (Linux): bf16 matmuls and convolutions run natively, not emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: asked for, or auto on CUDA and on CPUs with native bf16."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
    if precision == "auto":
        return device.type == "cuda" or cpu_has_native_bf16()
    return precision == "bf16"


def setup_distributed(device: torch.device) -> Distributed:
    """Joins the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def load_images(records: list[ImageRecord], image_size: int, desc: str, show: bool) -> torch.Tensor:
    """Decodes and resizes once; training steps then read uint8 tensors from memory."""
    return torch.stack(
        [prepare_image(r.load_image(), image_size) for r in tqdm(records, desc=desc, disable=not show, leave=False)]
    )


def corrupt_batch(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, ilm_row: str | None):
    """ILM: one seeded generator per (seed, epoch, image), so runs and resumed runs corrupt identically."""
    ilm = ilm_config_for(ilm_row)
    out = images.clone()
    for row, index in enumerate(indices.tolist()):
        rng = np.random.default_rng([seed, epoch, index])
        out[row], _ = ilm_corrupt(images[row], ilm, rng)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of the training images in one epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class PhaseTimer:
    """Seconds spent per phase of a step (benchmarks/train_speed.py); a no-op unless enabled."""

    def __init__(self, enabled: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.enabled, self.clock = enabled, clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = self.clock()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + self.clock() - start


class FeatureRestorer(nn.Module):
    """The trainable part of MRKDModel as its own module (bottleneck, student, generation blocks): what DDP wraps
    and what the BatchNorm refresh walks, without the frozen teacher."""

    def __init__(self, model: MRKDModel) -> None:
        super().__init__()
        self.bottleneck, self.student, self.generation = model.bottleneck, model.student, model.generation
        self._restore: Callable[[list[Tensor]], list[Tensor]] = model.restore

    def forward(self, teacher_feats: list[Tensor]) -> list[Tensor]:
        return self._restore(teacher_feats)


class TeacherFeatures:
    """Teacher features of the clean training images: cached once (float32, on the training device) when they fit
    in `cache_gb`, else computed on demand."""

    def __init__(self, model: MRKDModel, images: Tensor, device: torch.device, cache: bool, cache_gb: float,
                 batch_size: int, channels_last: bool, show: bool) -> None:
        self.model, self.images, self.device, self.channels_last = model, images, device, channels_last
        size = images.shape[-1]
        per_image = sum(c * (size // s) ** 2 for c, s in zip(model.channels, (4, 8, 16))) * 4
        self.cached: list[Tensor] | None = None
        if cache and per_image * len(images) <= cache_gb * 2**30:
            parts = [self.compute(images[i : i + batch_size])
                     for i in tqdm(range(0, len(images), batch_size), desc="teacher features", disable=not show,
                                   leave=False)]
            self.cached = [torch.cat([p[k] for p in parts]) for k in range(3)]

    def compute(self, uint8_batch: Tensor, autocast: AbstractContextManager | None = None) -> list[Tensor]:
        x = normalize(uint8_batch.to(self.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), (autocast or nullcontext()):
            return self.model.teacher(x)

    def __getitem__(self, indices: Tensor) -> list[Tensor]:
        if self.cached is not None:
            return [f[indices.to(f.device)] for f in self.cached]
        return [f.float() for f in self.compute(self.images[indices])]

    def batches(self, batch_size: int) -> Iterator[list[Tensor]]:
        for i in range(0, len(self.images), batch_size):
            yield self[torch.arange(i, min(i + batch_size, len(self.images)))]


def refresh_batchnorm(restorer: FeatureRestorer, features: TeacherFeatures, batch_size: int) -> None:
    """BatchNorm running statistics of the final weights over the clean training images (cumulative average)."""
    update_bn(((feats,) for feats in features.batches(batch_size)), restorer)


def build_payload(model: MRKDModel, cfg: TrainConfig, state: TrainState, optimizer, calibration,
                  score_reference: ScoreReference | None = None, map_whitening: MapWhitening | None = None) -> dict:
    """What a checkpoint holds: network, configs, optimizer, calibration, score reference and map whitening (None
    mid-run), step, losses."""
    return {
        "model_config": cfg.model_config().to_dict(),
        "train_config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "score_reference": score_reference.to_payload() if score_reference is not None else None,
        "map_whitening": map_whitening.to_payload() if map_whitening is not None else None,
        "step": state.step,
        "losses": list(state.losses),
    }


def fit_normal_statistics(model: MRKDModel, cfg: TrainConfig, images: torch.Tensor,
                          device: torch.device) -> tuple[ScoreReference | None, MapWhitening | None]:
    """The score reference (on the score maps) and the map whitening (on the heat map taps' residuals) of (up to
    REFERENCE_IMAGES of) the clean training images, in one pass; each None where `cfg` turns it off."""
    if not (cfg.score_reference or cfg.map_whitening):
        return None, None
    detector = Detector(model, cfg.model_config(), Calibration(threshold=1.0, low=0.0), device, cfg.batch_size)
    chosen = images[reference_indices(len(images), cfg.seed)]
    residuals = ResidualMoments() if cfg.map_whitening else None
    maps = [detector.score_maps(chosen[i : i + cfg.batch_size], residuals).float().cpu()
            for i in range(0, len(chosen), cfg.batch_size)]
    return (ScoreReference.fit(torch.cat(maps)) if cfg.score_reference else None,
            residuals.whitening() if residuals is not None else None)


def calibrate(model: MRKDModel, cfg: TrainConfig, images: torch.Tensor, device: torch.device,
              score_reference: ScoreReference | None = None, map_whitening: MapWhitening | None = None) -> Calibration:
    """The calibration fitted on the raw scores and heat map maxima of held-out normal images."""
    detector = Detector(model, cfg.model_config(), Calibration(threshold=1.0, low=0.0), device, cfg.batch_size,
                        score_reference=score_reference, map_whitening=map_whitening)
    scores, map_maxima = [], []
    for i in range(0, len(images), cfg.batch_size):
        maps, batch_scores = detector.raw_maps(images[i : i + cfg.batch_size])
        scores.append(batch_scores.cpu())
        map_maxima.append(maps.flatten(1).amax(dim=1).cpu())
    return Calibration.fit(torch.cat(scores).numpy(), normal_map_maxima=torch.cat(map_maxima).numpy())


def ilm_row(cfg: TrainConfig, data_category: str) -> str | None:
    """The ILM table row: --ilm-category, else the MVTec category, else the measured default for a built-in source,
    else the data's category name (unknown names get the default row)."""
    if cfg.ilm_category and cfg.ilm_category not in ILM_SETTINGS:
        raise OptionError(f"ilm_category {cfg.ilm_category!r} is not one of {', '.join(sorted(ILM_SETTINGS))}",
                          "ilm_category")
    return cfg.ilm_category or cfg.category or ilm_row_for_source(cfg.data) or data_category


class Trainer:
    """One run: `Trainer(cfg).run()` trains, calibrates and writes `<out>/checkpoint.pt`."""

    def __init__(self, cfg: TrainConfig, show_progress: bool = True, options: StepOptions | None = None,
                 timer: PhaseTimer | None = None) -> None:
        self.cfg = cfg
        self.timer = timer or PhaseTimer()
        self.device = resolve_device(cfg.device)
        self.ddp = setup_distributed(self.device)
        self.show = show_progress and self.ddp.is_main  # the concise progress lines
        self.bars = self.show and sys.stderr.isatty()  # live bars only on a terminal, not in logs
        self.options = options or StepOptions(bf16=use_bf16(cfg.precision, self.device))
        self.out = user_path(cfg.out)
        self.ckpt_path = self.out / CHECKPOINT_NAME
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.splits = open_dataset(cfg.data, cfg.category, seed=cfg.seed)
        self.ilm_row = ilm_row(cfg, self.splits.category)
        records = self.splits.train[: cfg.max_train_images] if cfg.max_train_images else self.splits.train
        if not records:
            raise ValueError(f"{cfg.data}: no training images")
        self.train_records = records
        self.images = load_images(records, cfg.image_size, "loading train images", self.bars)

        self.model = build_model(cfg.model_config(), pretrained=cfg.pretrained, weights=cfg.weights).to(self.device)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.restorer = FeatureRestorer(self.model)
        self.optimizer = torch.optim.Adam(list(self.model.trainable_parameters()), lr=cfg.lr, betas=tuple(cfg.betas))
        self.state = TrainState()
        if cfg.resume and self.ckpt_path.exists():
            self.state = resume_into(self.ckpt_path, self.model, self.optimizer, cfg)
            if self.ddp.is_main:
                log.info("resumed from %s after step %d", self.ckpt_path, self.state.step)
        self.net: nn.Module = self.restorer
        if self.ddp.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.restorer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.per_rank_batch = max(1, cfg.batch_size // self.ddp.world_size)
        self.steps_per_epoch = cfg.steps_per_epoch(len(self.images), self.ddp.world_size)
        self.total_steps = cfg.total_steps(len(self.images), self.ddp.world_size)
        self.features = TeacherFeatures(self.model, self.images, self.device, self.options.cache_targets,
                                        cfg.feature_cache_gb, cfg.batch_size, self.options.channels_last, self.bars)

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.options.bf16 else nullcontext()

    def batch_indices(self, step: int) -> tuple[int, Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.images), self.cfg.seed, epoch)[self.ddp.rank :: self.ddp.world_size]
        return epoch, order[index * self.per_rank_batch : (index + 1) * self.per_rank_batch]

    def step(self, step: int) -> float:
        """One optimizer step; returns its loss."""
        cfg, timer = self.cfg, self.timer
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # FLM masks: reproducible per step, also after resume
        epoch, idx = self.batch_indices(step)
        with timer("teacher (clean target)"):
            target = self.features[idx]
        if cfg.ilm:
            with timer("ILM"):
                corrupted = corrupt_batch(self.images[idx], idx, cfg.seed, epoch, self.ilm_row)
            with timer("teacher (corrupted input)"):
                student_in = self.features.compute(corrupted, self._autocast())
        else:
            student_in = target
        with timer("bottleneck + student forward"), self._autocast():
            student = self.net(student_in)
        with timer("loss + backward + Adam"):
            loss = cosine_distillation_loss(target, student)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss.item()

    def save(self, calibration: Calibration | None = None, score_reference: ScoreReference | None = None,
             map_whitening: MapWhitening | None = None) -> None:
        if self.ddp.is_main:
            save_checkpoint(self.ckpt_path, build_payload(self.model, self.cfg, self.state, self.optimizer,
                                                          calibration, score_reference, map_whitening))

    def train_steps(self, until: int | None = None) -> None:
        cfg, state = self.cfg, self.state
        until = self.total_steps if until is None else min(until, self.total_steps)
        if self.ddp.is_main:
            log.info("%s: %d train images, %d steps of %d (%.1f epochs), %s%s, ILM %s (row %s), FLM %s",
                     cfg.data, len(self.images), self.total_steps, cfg.batch_size,
                     self.total_steps / self.steps_per_epoch, "bf16" if self.options.bf16 else "fp32",
                     ", cached targets" if self.features.cached is not None else "",
                     "on" if cfg.ilm else "off",
                     self.ilm_row if self.ilm_row in ILM_SETTINGS else "carpet, the default",
                     "on" if cfg.flm else "off")
        self.model.train()
        report_every = max(1, self.total_steps // PROGRESS_LINES)
        bar = tqdm(total=until, initial=state.step, desc="training", unit="step", leave=False, disable=not self.bars)
        start, start_step = time.perf_counter(), state.step
        try:
            while state.step < until:
                state.losses.append(self.step(state.step))
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
                if self.show and (state.step % report_every == 0 or state.step == self.total_steps):
                    done = state.step - start_step
                    rate = done * cfg.batch_size / max(time.perf_counter() - start, 1e-9)
                    recent = state.losses[-report_every:]
                    tqdm.write(f"step {state.step}/{self.total_steps}  loss {np.mean(recent):.4f}  "
                               f"{rate:.1f} images/s  "
                               f"eta {(self.total_steps - state.step) * cfg.batch_size / rate:.0f} s")
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.total_steps:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            if self.ddp.is_main:
                log.warning("interrupted: saved %s after step %d; continue with --resume", self.ckpt_path,
                            state.step)
            raise
        finally:
            bar.close()

    def finish(self) -> Path:
        """BatchNorm refresh, calibration on held-out normal images, the final checkpoint and the loss curve."""
        cfg = self.cfg
        if self.ddp.world_size > 1:
            dist.barrier()
        if self.ddp.is_main:
            refresh_batchnorm(self.restorer, self.features, cfg.batch_size)
            reference, whitening = None, None
            if (cfg.score_reference or cfg.map_whitening) and len(self.images) < 2:
                log.warning("no score reference or map whitening: each needs at least 2 training images, this run "
                            "has %d; the score is the raw maximum of the map, the map the plain cosine distance",
                            len(self.images))
            else:
                reference, whitening = fit_normal_statistics(self.model, cfg, self.images, self.device)
            calib_records = self.splits.calibration or self.train_records
            calib_images = load_images(calib_records, cfg.image_size, "calibrating", self.bars)
            calibration = calibrate(self.model, cfg, calib_images, self.device, reference, whitening)
            self.save(calibration, reference, whitening)
            write_json(self.out / "losses.json", {"step_loss": self.state.losses})
            save_line_plot(self.out / "loss_curve.png", {"loss": _smooth(self.state.losses)}, "step",
                           "distillation loss", f"{cfg.data} {cfg.backbone} ILM {'on' if cfg.ilm else 'off'} "
                                                f"FLM {'on' if cfg.flm else 'off'}")
            fitted = " and ".join(name for name, part in (("score reference", reference),
                                                          ("map whitening", whitening)) if part is not None)
            log.info("wrote %s (threshold %.5f, %d calibration images, %s)", self.ckpt_path, calibration.threshold,
                     len(calib_images), f"{fitted} from {min(len(self.images), REFERENCE_IMAGES)} training images"
                     if fitted else "no score reference or map whitening")
        if self.ddp.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        return self.ckpt_path

    def run(self) -> Path:
        self.train_steps()
        return self.finish()


def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Trains, calibrates on held-out normal images and writes `<out>/checkpoint.pt`. Returns its path."""
    return Trainer(cfg, show_progress).run()


def _smooth(values: list[float], window: int = 25) -> list[float]:
    if len(values) <= window:
        return list(values)
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid").tolist()


def resume_into(path: Path, model: MRKDModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    """Loads a run's checkpoint into the model and optimizer; refuses one of another configuration."""
    data = load_checkpoint(path, for_inference=False)
    saved = ModelConfig.from_dict(data["model_config"])
    # how the map is read from the features does not change training: a run may continue with other map settings
    saved = replace(saved, **{k: getattr(cfg.model_config(), k) for k in MAP_SETTINGS})
    if saved != cfg.model_config():
        raise CheckpointError(f"cannot resume {path}: it was trained with {saved}, not {cfg.model_config()}")
    if "step" not in data:
        raise CheckpointError(f"cannot resume {path}: it was written by an older version that counted epochs")
    model.load_state_dict(data["state_dict"])
    if data.get("optimizer"):
        optimizer.load_state_dict(data["optimizer"])
    return TrainState(step=int(data["step"]), losses=list(data.get("losses", [])))
