"""How a trained MRKD detector's maps become scores: which scales are summed, the smoothing, the image reduction.

  python benchmarks/image_score.py --checkpoint runs/accuracy/textures-grass/mrkd/seed7/checkpoint.pt \\
      --data textures:grass --out runs/diag/grass7-image-score.json
  python benchmarks/image_score.py --checkpoint runs/diag/poly7/checkpoint.pt --data elpv:poly \\
      --scales 0+1+2,1+2,0+1,2 --sigmas 2,4,8 --ks 1,100

No training: the teacher and student features of the test images are computed once (the product's network, torch,
fp32, one thread) and each variant is scored on them with the plain-PyTorch anomaly map (mrkd.ops'
reference). A variant is a set of scales (indices into the network's taps, 0 = stride 4, 1 = stride 8, 2 = stride
16), the local average of the features before the distance (PatchCore's
neighbourhood aggregation), a Gaussian sigma in pixels at the model's image size (the product: 4 at 256 px,
scaled with the size) and k, the number of map pixels averaged for the image score (k = 1 is the product's max).
A variant's pixel AUROC and AU-PRO are what the heat map gives with those scales (the model's --map-scales; the
product: 0+1+2), its top-k image AUROC what the image score gives with them (--score-scales; the product: 2): the two
are chosen separately. With a score reference (the product's default: `--reference-images`, see
mrkd/runtime/reference.py) each variant is also scored the product's way, the max of its map standardised per pixel
by the mean and spread of its maps on the same training images the product picks ("std" in the output). Use a
checkpoint of a seed the reported tables do not use (e.g. 7): choosing a variant on a
reported test split would tune on it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.core.files import user_path, write_json  # noqa: E402
from mrkd.core.preprocess import normalize, prepare_image  # noqa: E402
from mrkd.data import open_dataset  # noqa: E402
from mrkd.ops import anomaly_map_reference  # noqa: E402
from mrkd.runtime.checkpoint import load_checkpoint  # noqa: E402
from mrkd.runtime.detector import Detector  # noqa: E402
from mrkd.runtime.evaluation import resized_masks  # noqa: E402
from mrkd.runtime.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from mrkd.runtime.reference import REFERENCE_IMAGES, ScoreReference, reference_indices  # noqa: E402
from mrkd.runtime.whitening import ResidualMoments  # noqa: E402

DEFAULT_KS = "1,10,100,1000"


def top_k_mean(maps: np.ndarray, k: int) -> np.ndarray:
    """[N, H, W] -> [N]: mean of each map's k largest values (k = 1: the maximum)."""
    flat = maps.reshape(len(maps), -1)
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"k must be in [1, {flat.shape[1]}], got {k}")
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1)


def parse_scales(text: str) -> list[tuple[int, ...]]:
    """"0+1+2,1+2" -> [(0, 1, 2), (1, 2)]."""
    return [tuple(sorted({int(i) for i in part.split("+")})) for part in text.split(",") if part]


@torch.inference_mode()
def test_features(detector: Detector, records: list, batch_size: int = 16) -> tuple[list[list], list[list]]:
    """Teacher and student feature lists of every test record, per batch (CPU tensors)."""
    teachers, students = [], []
    for i in range(0, len(records), batch_size):
        batch = torch.stack([prepare_image(r.load_image(), detector.image_size) for r in records[i : i + batch_size]])
        teacher, student = detector.network(normalize(batch))
        teachers.append([t.float().cpu() for t in teacher])
        students.append([s.float().cpu() for s in student])
    return teachers, students


def variant_maps(teachers: list[list], students: list[list], scales: tuple[int, ...], size: int,
                 sigma: float, pool: int = 1, combine: str = "sum", whitening: list | None = None) -> np.ndarray:
    """[N, S, S] maps summed (or multiplied) over the chosen scales (features averaged over pool x pool first,
    then whitened when `whitening` is given: mrkd.ops.whiten), smoothed."""
    maps = [anomaly_map_reference(t, s, (size, size), sigma, scales, pool, combine=combine,
                                  whitening=whitening)[0][:, 0] for t, s in zip(teachers, students)]
    return torch.cat(maps).numpy()


def fit_whitening(teachers: list[list], students: list[list], scales: tuple[int, ...], pool: int) -> list:
    """The map whitening of these taps and feature mean, fitted as training fits the product's (on the normal
    images' features): the `whitening` argument of mrkd.ops.anomaly_map."""
    moments = ResidualMoments()
    for t, s in zip(teachers, students):
        moments.add(t, s, scales, pool)
    return moments.whitening().as_list()


def main(argv: list[str] | None = None) -> int:
    """The command line: prints image AUROC (and pixel AUROC / AU-PRO where the data has masks) per variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ks", default=DEFAULT_KS, help=f"comma-separated pixel counts (default {DEFAULT_KS})")
    p.add_argument("--scales", default=None, help="comma-separated scale sets, e.g. 0+1+2,1+2 (default: the "
                   "model's map and score scales)")
    p.add_argument("--sigmas", default=None, help="comma-separated sigmas in pixels (default: the model's)")
    p.add_argument("--pools", default=None, help="comma-separated neighbourhood sizes averaged before the distance "
                   "(default: the model's; 1: none; 3: PatchCore's local aggregation)")
    p.add_argument("--combines", default=None, help="comma-separated ways to combine the scales: sum, product "
                   "(default: the model's heat-map setting; the product's row is its heat map and the max of it)")
    p.add_argument("--whitenings", default=None, help="comma-separated: on (the map whitening, fitted for each "
                   "variant's taps and feature mean on the score reference's training images), off (default: the "
                   "checkpoint's setting)")
    p.add_argument("--reference-images", type=int, default=None,
                   help=f"training images each variant's score reference is fitted on (default: "
                        f"{REFERENCE_IMAGES} if the checkpoint holds a reference, as the product does; 0: none)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    checkpoint = user_path(a.checkpoint)
    payload = load_checkpoint(checkpoint)
    seed = int((payload.get("train_config") or {}).get("seed", 111))
    detector = Detector.from_payload(payload, precision="fp32")
    size = detector.image_size
    test = open_dataset(a.data, seed=seed).test
    labels = np.array([r.label for r in test])
    has_masks = any(r.load_mask is not None for r in test)
    masks = resized_masks(test, size) if has_masks else None
    teachers, students = test_features(detector, test)
    n_reference = a.reference_images
    if n_reference is None:
        n_reference = REFERENCE_IMAGES if detector.score_reference is not None else 0
    whitenings = a.whitenings.split(",") if a.whitenings else ["on" if detector.map_whitening is not None else "off"]
    if set(whitenings) - {"on", "off"}:
        p.error(f"--whitenings takes on and off, got {a.whitenings}")
    normal = []
    if n_reference or "on" in whitenings:
        train = open_dataset(a.data, seed=seed).train
        normal = [train[int(i)] for i in reference_indices(len(train), seed, n_reference or REFERENCE_IMAGES)]
    normal_features = test_features(detector, normal) if normal else None
    sigmas = [float(s) for s in a.sigmas.split(",")] if a.sigmas else [detector.config.blur_sigma]
    results = []
    pools = [int(v) for v in a.pools.split(",")] if a.pools else [detector.config.feature_pool]
    scale_sets = parse_scales(a.scales) if a.scales else list(dict.fromkeys([detector.config.map_scales,
                                                                             detector.config.score_scales]))
    combines = a.combines.split(",") if a.combines else [detector.config.map_combine]
    for scales, sigma, pool, combine, whitened in itertools.product(scale_sets, sigmas, pools, combines, whitenings):
        whitening = fit_whitening(*normal_features, scales, pool) if whitened == "on" else None
        maps = variant_maps(teachers, students, scales, size, sigma, pool, combine, whitening)
        row = {"scales": "+".join(map(str, scales)), "sigma": sigma, "pool": pool, "combine": combine,
               "whitening": whitened}
        if has_masks:
            row.update(pixel_auroc=pixel_auroc(masks, maps), aupro=aupro(masks, maps))
        row.update({f"top{k}": image_auroc(labels, top_k_mean(maps, int(k))) for k in a.ks.split(",")})
        if n_reference:
            reference = ScoreReference.fit(torch.from_numpy(variant_maps(*normal_features, scales, size, sigma, pool,
                                                                         combine, whitening)))
            standardised = (maps - reference.mean.numpy()) / reference.scale.numpy()
            row["std"] = image_auroc(labels, top_k_mean(standardised, 1))
        results.append(row)
        print(f"{a.data} seed {seed} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()), flush=True)
    if a.out:
        write_json(user_path(a.out), {"checkpoint": str(checkpoint), "data": a.data, "seed": seed,
                                      "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
