"""python -m mrkd.train: train one MRKD model per product on normal images only.

Examples:
  python -m mrkd.train --data elpv:mono --out runs/elpv-mono
  python -m mrkd.train --data /data/mvtec --category bottle --backbone wide_resnet50_2 --epochs 200 --out runs/bottle
  python -m mrkd.train --data /data/parts/widget --ilm-category tile --steps 3000 --out runs/widget
  python -m mrkd.train --data textures:brick --ilm off --flm off --out runs/brick-rd4ad     # RD4AD baseline
  python -m mrkd.train --data elpv:mono --out runs/elpv-mono --steps 2000 --resume        # continue a run
  torchrun --nproc-per-node 2 -m mrkd.train --data /data/mvtec --category screw --out runs/screw   # DDP
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from .core.config import TrainConfig
from .runtime.training import train

log = logging.getLogger("mrkd.train")


def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected 'on' or 'off'")
    return value == "on"


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    """The run's config and the requested torch thread count (None: torch's choice)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m mrkd.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data, help="MVTec-layout folder, elpv:mono|poly or textures:brick|grass|gravel")
    p.add_argument("--category", default=None, help="category folder under an MVTec-layout root (also picks ILM settings)")
    p.add_argument("--out", default=d.out, help="output folder (checkpoint.pt, losses.json, loss_curve.png)")
    p.add_argument("--backbone", default=d.backbone, help="teacher network (see mrkd.model.backbones.available_backbones())")
    p.add_argument("--weights", default=None, help="ImageNet weights file for the backbone (else the hub cache)")
    p.add_argument("--no-pretrained", action="store_true", help="random teacher (tests and ablations only)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"training budget in optimizer steps (default {d.steps}: about 10 minutes for the embedded "
                        f"default on 2 CPU cores)")
    p.add_argument("--epochs", type=int, default=None,
                   help="budget in passes over the training set instead of --steps (e.g. the paper's 200)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ilm", type=on_off, default=True, metavar="on|off", help="image-level masking (default on)")
    p.add_argument("--ilm-category", default=None,
                   help="use this MVTec AD category's ILM patch settings (default: the data's category, or the row "
                        "measured for a built-in source; unknown categories get the texture row)")
    p.add_argument("--flm", type=on_off, default=True, metavar="on|off", help="feature-level masking (default on)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps (0: only at the end)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="training compute (default auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--max-train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    a = p.parse_args(argv)
    return TrainConfig(data=a.data, out=a.out, category=a.category, backbone=a.backbone, weights=a.weights,
                       pretrained=not a.no_pretrained, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                       image_size=a.image_size, lr=a.lr, seed=a.seed, ilm=a.ilm, ilm_category=a.ilm_category, flm=a.flm,
                       save_every=a.save_every, device=a.device, precision=a.precision, max_train_images=a.max_train_images,
                       resume=a.resume), a.threads


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, threads = parse_args(argv)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        path = train(cfg)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(path), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
