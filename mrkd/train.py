"""python -m mrkd.train: train one MRKD model per product on normal images only.

Examples:
  python -m mrkd.train --data elpv:mono --out runs/elpv-mono
  python -m mrkd.train --data /data/mvtec --category bottle --backbone wide_resnet50_2 --epochs 200 --out runs/bottle
  python -m mrkd.train --data /data/parts/widget --ilm-category tile --steps 3000 --out runs/widget
  python -m mrkd.train --data textures:brick --ilm off --flm off --out runs/brick-rd4ad     # RD4AD baseline
  python -m mrkd.train --data elpv:mono --out runs/elpv-mono --steps 2000 --resume        # continue a run
  python -m mrkd.train --data elpv:mono --preset quality --out runs/elpv-mono-quality     # Lite0 teacher, all taps
  python -m mrkd.train --data elpv:mono --out runs/elpv-mono --score-reference off --resume  # raw max, no training
  torchrun --nproc-per-node 2 -m mrkd.train --data /data/mvtec --category screw --out runs/screw   # DDP
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

from .core.config import PRESETS, TrainConfig
from .core.options import add_options, from_args, option, run_command
from .runtime.training import train

log = logging.getLogger("mrkd.train")


@dataclass
class TrainCommand:
    """Options of the command that are not part of the run's config."""

    threads: int | None = option(None, type=int, help="CPU threads for torch (default: torch's choice)")
    preset: str = option("default", choices=sorted(PRESETS),
                         help="a named set of defaults: quality = " + ", ".join(
                             f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                             for k, v in PRESETS["quality"].items())
                         + ", for uniform surfaces; granular ones (poly cells, grass, gravel) score better with the "
                         "default (explicit options still win)")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    """The run's config and the requested torch thread count (None: torch's choice)."""
    p = argparse.ArgumentParser(prog="python -m mrkd.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig, TrainCommand)
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[known.preset])  # under the options given explicitly
    a = p.parse_args(argv)
    return from_args(TrainConfig, a), a.threads


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv); returns its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, threads = parse_args(argv)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()

    def body() -> int:
        path = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"checkpoint": str(path), "seconds": round(time.perf_counter() - start, 1)}))
        return 0

    try:
        return run_command(body, TrainConfig, TrainCommand, log=log)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
