"""python -m mrkd.evaluate: metrics of a checkpoint on a dataset's test split.

Examples:
  python -m mrkd.evaluate --checkpoint runs/elpv-mono/checkpoint.pt --data elpv:mono --out runs/elpv-mono/eval
  python -m mrkd.evaluate --checkpoint runs/bottle/checkpoint.pt --data /data/mvtec --category bottle --out runs/bottle/eval

Writes <out>/metrics.json (image_auroc, pixel_auroc, aupro, aupro_per_image, n_normal, n_anomalous,
ms_per_image), <out>/scores.csv, <out>/roc.png and heat-map overlays of the worst false positives and negatives.
The split is the one training used: the seed defaults to the checkpoint's training seed.
"""  # noqa: E501 (the examples are whole command lines)
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass

from .core.options import add_options, from_args, option, run_command
from .runtime.evaluation import evaluate

log = logging.getLogger("mrkd.evaluate")


@dataclass(kw_only=True)
class EvaluateOptions:
    """The command's options: the keyword arguments of mrkd.runtime.evaluation.evaluate."""

    checkpoint: str = option(required=True, help="checkpoint.pt written by mrkd.train (or its folder)")
    data: str = option(required=True, help="MVTec-layout folder, elpv:mono|poly or textures:brick|grass|gravel")
    category: str | None = option(None)
    out: str = option(required=True, help="output folder")
    seed: int | None = option(None, type=int, help="split seed (default: the checkpoint's training seed)")
    device: str = option("cpu")
    batch_size: int = option(16, type=int)


def parse_args(argv: list[str] | None = None) -> EvaluateOptions:
    """The command's options from its arguments."""
    p = argparse.ArgumentParser(prog="python -m mrkd.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, EvaluateOptions)
    return from_args(EvaluateOptions, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv); returns its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_args(argv)

    def body() -> int:
        metrics = evaluate(**asdict(opts))
        print(json.dumps({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image",
                                                   "n_normal", "n_anomalous", "ms_per_image")}, indent=2))
        return 0

    return run_command(body, EvaluateOptions, log=log)


if __name__ == "__main__":
    sys.exit(main())
