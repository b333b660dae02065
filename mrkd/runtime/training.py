"""The training loop behind `python -m mrkd.train`: data, ILM, the model, Adam, checkpoints, calibration.

Single process or DDP (torchrun). Checkpoints are written atomically every `save_every` epochs, on Ctrl-C and at
the end (with the calibration fitted on held-out normal images); `resume=True` continues from `<out>/checkpoint.pt`.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .calibration import Calibration
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..core.config import ModelConfig, TrainConfig
from ..data import ImageRecord, open_dataset
from .detector import Detector
from ..core.files import write_json
from ..model.loss import cosine_distillation_loss
from ..model.masking import ILM_SETTINGS, ilm_config_for, ilm_corrupt
from ..core.preprocess import normalize, prepare_image
from ..model.network import MRKDModel
from .weights import build_model
from .visualize import save_line_plot

log = logging.getLogger("mrkd.train")
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    losses: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_distributed(device: torch.device) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def load_images(records: list[ImageRecord], image_size: int, desc: str, show: bool) -> torch.Tensor:
    """Decodes and resizes once; training epochs then read uint8 tensors from memory."""
    return torch.stack(
        [prepare_image(r.load_image(), image_size) for r in tqdm(records, desc=desc, disable=not show, leave=False)]
    )


def corrupt_batch(images: torch.Tensor, indices: torch.Tensor, cfg: TrainConfig, epoch: int, category: str | None):
    """ILM: one seeded generator per (seed, epoch, image), so runs and resumed runs corrupt identically."""
    ilm = ilm_config_for(category)
    out = images.clone()
    for row, index in enumerate(indices.tolist()):
        rng = np.random.default_rng([cfg.seed, epoch, index])
        out[row], _ = ilm_corrupt(images[row], ilm, rng)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def build_payload(model: torch.nn.Module, cfg: TrainConfig, state: TrainState, optimizer, calibration) -> dict:
    return {
        "model_config": cfg.model_config().to_dict(),
        "train_config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "epoch": state.epoch,
        "losses": list(state.losses),
    }


def calibrate(model: MRKDModel, cfg: TrainConfig, images: torch.Tensor, device: torch.device) -> Calibration:
    detector = Detector(model, cfg.model_config(), Calibration(threshold=1.0, low=0.0), device, cfg.batch_size)
    scores = torch.cat([detector.raw_maps(images[i : i + cfg.batch_size])[1].cpu()
                        for i in range(0, len(images), cfg.batch_size)])
    return Calibration.fit(scores.numpy())


def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Trains, calibrates on held-out normal images and writes `<out>/checkpoint.pt`. Returns its path."""
    device = resolve_device(cfg.device)
    ddp = setup_distributed(device)
    show = show_progress and ddp.is_main
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    splits = open_dataset(cfg.data, cfg.category, seed=cfg.seed)
    if cfg.ilm_category and cfg.ilm_category not in ILM_SETTINGS:
        raise ValueError(f"--ilm-category {cfg.ilm_category!r} is not one of {', '.join(sorted(ILM_SETTINGS))}")
    category = cfg.ilm_category or cfg.category or splits.category
    train_records = splits.train[: cfg.max_train_images] if cfg.max_train_images else splits.train
    if not train_records:
        raise ValueError(f"{cfg.data}: no training images")
    if ddp.is_main:
        log.info("data %s: %d train, %d calibration, %d test", cfg.data, len(train_records),
                 len(splits.calibration), len(splits.test))
    train_images = load_images(train_records, cfg.image_size, "loading train images", show)

    model = build_model(cfg.model_config(), pretrained=cfg.pretrained, weights=cfg.weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    state = TrainState()
    if cfg.resume and ckpt_path.exists():
        state = resume_into(ckpt_path, model, optimizer, cfg)
        if ddp.is_main:
            log.info("resumed from %s after epoch %d", ckpt_path, state.epoch)

    net = model
    if ddp.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    per_rank_batch = max(1, cfg.batch_size // ddp.world_size)

    def save(calibration: Calibration | None = None) -> None:
        if ddp.is_main:
            save_checkpoint(ckpt_path, build_payload(model, cfg, state, optimizer, calibration))

    try:
        for epoch in range(state.epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 1000 + epoch)  # FLM masks: reproducible per epoch, also after resume
            order = epoch_order(len(train_images), cfg.seed, epoch)[ddp.rank :: ddp.world_size]
            n_batches = max(1, len(order) // per_rank_batch)
            model.train()
            epoch_loss = 0.0
            bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
            for b in bar:
                idx = order[b * per_rank_batch : (b + 1) * per_rank_batch]
                clean = train_images[idx]
                corrupted = corrupt_batch(clean, idx, cfg, epoch, category) if cfg.ilm else clean
                x_target = normalize(clean.to(device))
                x_input = normalize(corrupted.to(device)) if cfg.ilm else x_target
                if device.type == "cuda":
                    x_target = x_target.contiguous(memory_format=torch.channels_last)
                    x_input = x_input.contiguous(memory_format=torch.channels_last)
                with autocast:
                    teacher, student = net(x_input, x_target)
                loss = cosine_distillation_loss(teacher, student)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            state.epoch = epoch + 1
            state.losses.append(epoch_loss / n_batches)
            if show:
                tqdm.write(f"epoch {state.epoch}/{cfg.epochs}  loss {state.losses[-1]:.4f}")
            if cfg.save_every and state.epoch % cfg.save_every == 0 and state.epoch < cfg.epochs:
                save()
    except KeyboardInterrupt:
        save()
        if ddp.is_main:
            log.warning("interrupted: saved %s after epoch %d; continue with --resume", ckpt_path, state.epoch)
        raise

    if ddp.world_size > 1:
        dist.barrier()
    if ddp.is_main:
        calib_records = splits.calibration or train_records
        calib_images = load_images(calib_records, cfg.image_size, "calibrating", show)
        calibration = calibrate(model, cfg, calib_images, device)
        save(calibration)
        write_json(out / "losses.json", {"epoch_loss": state.losses})
        save_line_plot(out / "loss_curve.png", {"loss": state.losses}, "epoch", "distillation loss",
                       f"{cfg.data} {cfg.backbone} ILM {'on' if cfg.ilm else 'off'} FLM {'on' if cfg.flm else 'off'}")
        log.info("wrote %s (threshold %.5f, %d calibration images)", ckpt_path, calibration.threshold, len(calib_images))
    if ddp.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


def resume_into(path: Path, model: MRKDModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    data = load_checkpoint(path, for_inference=False)
    saved = ModelConfig.from_dict(data["model_config"])
    if saved != cfg.model_config():
        raise CheckpointError(f"cannot resume {path}: it was trained with {saved}, not {cfg.model_config()}")
    model.load_state_dict(data["state_dict"])
    if data.get("optimizer"):
        optimizer.load_state_dict(data["optimizer"])
    return TrainState(epoch=int(data.get("epoch", 0)), losses=list(data.get("losses", [])))
