"""Image score from a trained MRKD detector's maps: the maximum of the smoothed map against top-k means, on one run.

  python benchmarks/image_score.py --checkpoint runs/accuracy/textures-grass/mrkd/seed7/checkpoint.pt \\
      --data textures:grass --out runs/diag/grass7-image-score.json

No training: the test maps of one checkpoint are computed once (the product's Detector, torch, fp32, one thread)
and each pooling is scored on them. Use a checkpoint of a seed the reported tables do not use (e.g. 7): choosing the
pooling on a reported test split would tune on it. k counts pixels of the S x S map (k = 1 is the product's max).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.core.files import user_path, write_json  # noqa: E402
from mrkd.data import open_dataset  # noqa: E402
from mrkd.runtime.checkpoint import load_checkpoint  # noqa: E402
from mrkd.runtime.detector import Detector  # noqa: E402
from mrkd.runtime.evaluation import run_detector  # noqa: E402
from mrkd.runtime.metrics import image_auroc  # noqa: E402

DEFAULT_KS = "1,10,100,1000"


def top_k_mean(maps: np.ndarray, k: int) -> np.ndarray:
    """[N, H, W] -> [N]: mean of each map's k largest values (k = 1: the maximum)."""
    flat = maps.reshape(len(maps), -1)
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"k must be in [1, {flat.shape[1]}], got {k}")
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1)


def main(argv: list[str] | None = None) -> int:
    """The command line: prints the image AUROC of each image-score reduction."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ks", default=DEFAULT_KS, help=f"comma-separated pixel counts (default {DEFAULT_KS})")
    p.add_argument("--out", default=None, help="write the AUROCs to this JSON file")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    checkpoint = user_path(a.checkpoint)
    payload = load_checkpoint(checkpoint)
    seed = int((payload.get("train_config") or {}).get("seed", 111))
    detector = Detector.from_payload(payload, precision="fp32")
    test = open_dataset(a.data, seed=seed).test
    run = run_detector(detector, test, show=False)
    labels = np.array([r.label for r in test])
    if not np.allclose(top_k_mean(run.maps, 1), run.scores, rtol=1e-5, atol=1e-6):
        raise RuntimeError("the map maximum differs from the detector's score: maps and scores do not match")
    results = {f"top{k}": image_auroc(labels, top_k_mean(run.maps, int(k))) for k in a.ks.split(",")}
    for name, value in results.items():
        print(f"{a.data} seed {seed} {name:8s} image AUROC {value:.4f}")
    if a.out:
        write_json(user_path(a.out), {"checkpoint": str(checkpoint), "data": a.data, "seed": seed, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
