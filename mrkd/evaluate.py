"""python -m mrkd.evaluate: metrics of a checkpoint on a dataset's test split.

Examples:
  python -m mrkd.evaluate --checkpoint runs/elpv-mono/checkpoint.pt --data elpv:mono --out runs/elpv-mono/eval
  python -m mrkd.evaluate --checkpoint runs/bottle/checkpoint.pt --data /data/mvtec --category bottle --out runs/bottle/eval

Writes <out>/metrics.json (image_auroc, pixel_auroc, aupro, aupro_per_image, n_normal, n_anomalous,
ms_per_image), <out>/scores.csv, <out>/roc.png and heat-map overlays of the worst false positives and negatives.
The split is the one training used: the seed defaults to the checkpoint's training seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .runtime.checkpoint import CheckpointError
from .runtime.evaluation import evaluate

log = logging.getLogger("mrkd.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mrkd.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by mrkd.train (or its folder)")
    p.add_argument("--data", required=True, help="MVTec-layout folder, elpv:mono|poly or textures:brick|grass|gravel")
    p.add_argument("--category", default=None)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the checkpoint's training seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv)
    try:
        metrics = evaluate(a.checkpoint, a.data, a.out, a.category, a.seed, a.device, a.batch_size)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    print(json.dumps({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image",
                                               "n_normal", "n_anomalous", "ms_per_image")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
