"""PatchCore (Roth et al., CVPR 2022, arXiv 2106.08265): the training-free peer of docs/results.md. Benchmark only,
not in the product.

  python benchmarks/patchcore.py --data textures:grass --seed 7 --image-size 128 --out runs/pc/grass7
  python benchmarks/patchcore.py --data elpv:mono --coreset 0.01 --out runs/pc/mono111     # 1% bank
  python benchmarks/patchcore.py --data textures:grass --seed 7 --image-size 128 --taps expanded --out runs/pc/x

On the project's teacher registry (default: MobileNetV2 with its packaged ImageNet weights, the MRKD teacher), the
project's datasets and splits, and the project's metrics code. As the paper (and its reference code,
amazon-research/patchcore-inspection) defines it:
- locally aware patch features: two mid-level taps (the teacher's stride-8 and stride-16 outputs); each position's
  3x3 neighbourhood (zero padded) is flattened per tap, the deeper tap's neighbourhoods are bilinearly upsampled to
  the stride-8 grid; each tap's flattened vector is adaptively average-pooled to `pretrain_dim`, the two are stacked
  and pooled again to `target_dim` (the reference's Preprocessing + Aggregator, 1024 / 1024);
- memory bank: the patch features of every training image, subsampled by greedy k-center coreset selection computed
  on a `projection_dim`-d Gaussian random projection (Johnson-Lindenstrauss, 128-d as in the paper);
- patch score: Euclidean distance to the nearest bank entry (faiss exact L2 search); the map is the patch scores
  bilinearly upsampled to the image and Gaussian smoothed (sigma 4 at 256 px, scaled with the image size, as MRKD's;
  scipy "reflect" border);
- image score: the paper's reweighted maximum (eq. 7): s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* -
  m|) * s*, with m_test* the patch of largest score s*, m* its nearest bank entry and N_b(m*) the b nearest bank
  entries of m* (m* itself included; b = 9 as anomalib).

Writes <out>/metrics.json (the metrics of mrkd.evaluate plus the bank size, the fit's CPU seconds and the CPU
ms/image of inference: time.process_time, so a busy machine does not inflate it) and <out>/scores.csv (the columns
of mrkd.evaluate's that benchmarks/accuracy.py reads, and the unweighted maximum).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.core.config import SIGMA_AT_256  # noqa: E402
from mrkd.core.files import atomic_path, user_path, write_json  # noqa: E402
from mrkd.core.preprocess import normalize, prepare_image  # noqa: E402
from mrkd.data import ImageRecord, open_dataset  # noqa: E402
from mrkd.model.backbones import Backbone  # noqa: E402
from mrkd.runtime.evaluation import resized_masks  # noqa: E402
from mrkd.runtime.metrics import aupro, aupro_per_image, image_auroc, pixel_auroc  # noqa: E402
from mrkd.runtime.weights import load_backbone  # noqa: E402

TAPS = ("bottleneck", "expanded")


@dataclass(frozen=True)
class PatchCoreConfig:
    backbone: str = "mobilenet_v2"
    taps: str = "bottleneck"  # the teacher's own stride-8/16 outputs; "expanded": MobileNetV2's inner 192/576 ch
    image_size: int = 256
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    coreset_fraction: float = 0.1
    projection_dim: int = 128
    num_neighbors: int = 9
    seed: int = 0  # random projection and the coreset's first pick
    batch_size: int = 16

    @property
    def sigma(self) -> float:
        return SIGMA_AT_256 * self.image_size / 256.0


# ----------------------------------------------------------------------------------------------------------------
# features


def tap_features(backbone: Backbone, x: Tensor, taps: str) -> list[Tensor]:
    """The two mid-level taps [stride 8, stride 16] of an ImageNet-normalised batch."""
    if taps == "bottleneck":
        return backbone(x)[1:]
    if taps != "expanded":
        raise ValueError(f"taps must be one of {TAPS}, got {taps!r}")
    if not hasattr(backbone, "stage8"):
        raise ValueError("expanded taps exist for mobilenet_v2 only")
    # post-ReLU6 output of the depthwise conv inside the last inverted residual of the 32- and 96-channel stages
    # (features[6] and features[13]: 192 and 576 channels)
    inner = [backbone.stage8[2].conv[1], backbone.stage16[6].conv[1]]
    found: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out)) for m in inner]
    try:
        backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def patch_features(taps: list[Tensor], patch_size: int, pretrain_dim: int, target_dim: int) -> Tensor:
    """Taps [B, C_l, H_l, W_l] (first = finest) -> locally aware patch features [B, H_0 * W_0, target_dim]."""
    batch, _, height, width = taps[0].shape
    per_tap = []
    for tap in taps:
        channels, h, w = tap.shape[1:]
        neighbourhoods = F.unfold(tap.float(), patch_size, padding=(patch_size - 1) // 2)  # [B, C*p*p, h*w]
        if (h, w) != (height, width):
            grid = neighbourhoods.reshape(batch, channels * patch_size * patch_size, h, w)
            neighbourhoods = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        flat = neighbourhoods.reshape(batch, -1, height * width).permute(0, 2, 1).reshape(batch * height * width, 1, -1)
        per_tap.append(F.adaptive_avg_pool1d(flat, pretrain_dim))
    stacked = torch.cat(per_tap, dim=1).reshape(batch * height * width, 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(batch, height * width, target_dim)


def random_projection(dim_in: int, dim_out: int, seed: int) -> Tensor:
    """A Gaussian Johnson-Lindenstrauss map [dim_in, dim_out] (entries N(0, 1 / dim_out))."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)


# ----------------------------------------------------------------------------------------------------------------
# memory bank


def greedy_coreset(points: Tensor, count: int, first: int = 0) -> Tensor:
    """Greedy k-center selection (the paper's Algorithm 1): start at `first`, then repeatedly add the point farthest
    from everything selected so far. Returns `count` indices in selection order. One pass over `points` per pick."""
    n = points.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"coreset size must be in [1, {n}], got {count}")
    points = points.float().contiguous()
    sq_norms = (points * points).sum(1)
    selected = torch.empty(count, dtype=torch.long)
    selected[0] = first
    nearest = (sq_norms - 2.0 * (points @ points[first]) + sq_norms[first]).clamp_min_(0)
    for k in range(1, count):
        pick = int(torch.argmax(nearest))
        selected[k] = pick
        distance = sq_norms - 2.0 * (points @ points[pick]) + sq_norms[pick]
        torch.minimum(nearest, distance.clamp_min_(0), out=nearest)
    return selected


def exact_index(bank: np.ndarray) -> faiss.IndexFlatL2:
    """An exact (flat L2) faiss index over the memory bank."""
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index


def nearest_distances(index: faiss.IndexFlatL2, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances [N, k] and bank indices [N, k] of each query's k nearest bank entries, nearest first."""
    squared, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(squared, 0.0)), indices


def reweighted_scores(patches: np.ndarray, patch_scores: np.ndarray, nearest: np.ndarray, bank: np.ndarray,
                      index: faiss.IndexFlatL2, num_neighbors: int) -> np.ndarray:
    """The paper's image score (eq. 7) per image. patches [B, P, D]; patch_scores, nearest [B, P] (distance to and
    index of each patch's nearest bank entry)."""
    rows = np.arange(len(patches))
    worst = patch_scores.argmax(1)
    m_test = patches[rows, worst]  # [B, D]
    m_star = nearest[rows, worst]  # bank indices
    b = min(num_neighbors, len(bank))
    _, found = nearest_distances(index, bank[m_star], b)  # N_b(m*): the b nearest bank entries of m*
    # m* first (it is its own nearest entry; with duplicates in the bank faiss may list a twin first)
    support = np.stack([np.r_[m, [i for i in row if i != m][: b - 1]] for m, row in zip(m_star, found)])
    distances = np.linalg.norm(bank[support] - m_test[:, None, :], axis=2).astype(np.float64)  # [B, b]
    log_share = distances[:, 0] - np.logaddexp.reduce(distances, axis=1)
    return (1.0 - np.exp(log_share)) * patch_scores[rows, worst]


@dataclass
class Scored:
    image_scores: np.ndarray  # [B] reweighted
    max_scores: np.ndarray  # [B] s*, the unweighted maximum
    maps: np.ndarray  # [B, S, S] smoothed


class PatchCore:
    def __init__(self, config: PatchCoreConfig, backbone: Backbone) -> None:
        self.config = config
        self.backbone = backbone
        self.bank: np.ndarray | None = None
        self.index: faiss.IndexFlatL2 | None = None
        self.grid: tuple[int, int] = (0, 0)

    @torch.inference_mode()
    def embed(self, batch: Tensor) -> Tensor:
        """uint8 [B, 3, S, S] -> patch features [B, P, target_dim]; sets the patch grid."""
        c = self.config
        taps = tap_features(self.backbone, normalize(batch), c.taps)
        self.grid = tuple(taps[0].shape[-2:])
        return patch_features(taps, c.patch_size, c.pretrain_dim, c.target_dim)

    def fit(self, images: list[Tensor]) -> None:
        c = self.config
        features = torch.cat([self.embed(torch.stack(images[i : i + c.batch_size])).reshape(-1, c.target_dim)
                              for i in range(0, len(images), c.batch_size)])
        count = max(1, int(round(c.coreset_fraction * len(features))))
        if count < len(features):
            print(f"coreset: {count} of {len(features)} patch features", flush=True)
            start = time.perf_counter()
            projected = features @ random_projection(c.target_dim, c.projection_dim, c.seed)
            first = int(torch.randint(len(features), (1,), generator=torch.Generator().manual_seed(c.seed)))
            features = features[greedy_coreset(projected, count, first)]
            print(f"coreset: {time.perf_counter() - start:.0f} s", flush=True)
        self.bank = features.numpy()
        self.index = exact_index(self.bank)

    def score(self, batch: Tensor) -> Scored:
        if self.index is None:
            raise RuntimeError("fit() before score()")
        c = self.config
        patches = self.embed(batch).numpy()
        b, p, d = patches.shape
        distances, nearest = nearest_distances(self.index, patches.reshape(b * p, d))
        patch_scores, nearest = distances[:, 0].reshape(b, p), nearest[:, 0].reshape(b, p)
        image_scores = reweighted_scores(patches, patch_scores, nearest, self.bank, self.index, c.num_neighbors)
        grid = torch.from_numpy(patch_scores).reshape(b, 1, *self.grid)
        up = F.interpolate(grid, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)[:, 0].numpy()
        maps = np.stack([gaussian_filter(m, sigma=c.sigma, mode="reflect", truncate=4.0) for m in up])
        return Scored(image_scores, patch_scores.max(1), maps.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# the benchmark run


def load_images(records: list[ImageRecord], size: int) -> list[Tensor]:
    """The records' images, prepared as the detector prepares them (uint8 [3, S, S])."""
    return [prepare_image(r.load_image(), size) for r in records]


def run(config: PatchCoreConfig, data: str, seed: int, out: Path, mrkd_checkpoint: Path | None = None) -> dict:
    """Fits on the training split, scores the test split, writes the reports. With `mrkd_checkpoint`, that MRKD
    detector (ONNX Runtime, fp32, the process's thread count) is timed on the same batches, alternating with
    PatchCore, so the two CPU ms/image figures are measured side by side."""
    splits = open_dataset(data, seed=seed)
    model = PatchCore(config, load_backbone(config.backbone))
    train = load_images(splits.train, config.image_size)
    start = time.process_time()
    model.fit(train)
    fit_cpu = time.process_time() - start
    detector = None
    if mrkd_checkpoint is not None:
        from mrkd.runtime.detector import Detector

        detector = Detector.load(mrkd_checkpoint, runtime="onnxruntime", precision="fp32",
                                 threads=torch.get_num_threads(), batch_size=config.batch_size)
        if detector.image_size != config.image_size:
            raise ValueError(f"{mrkd_checkpoint} takes {detector.image_size} px images, PatchCore runs at "
                             f"{config.image_size} px")
    scored, cpu, mrkd_cpu = [], 0.0, 0.0
    test = splits.test
    print(f"scoring {len(test)} test images", flush=True)
    for i in range(0, len(test), config.batch_size):
        batch = torch.stack(load_images(test[i : i + config.batch_size], config.image_size))
        start = time.process_time()
        scored.append(model.score(batch))
        cpu += time.process_time() - start
        if detector is not None:
            start = time.process_time()
            detector.predict_prepared(batch)
            mrkd_cpu += time.process_time() - start
    scores = np.concatenate([s.image_scores for s in scored])
    max_scores = np.concatenate([s.max_scores for s in scored])
    maps = np.concatenate([s.maps for s in scored])
    labels = np.array([r.label for r in test])
    metrics = {"image_auroc": image_auroc(labels, scores),
               "image_auroc_unweighted_max": image_auroc(labels, max_scores),
               "pixel_auroc": None, "aupro": None, "aupro_per_image": None,
               "n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum())}
    if splits.has_masks:
        masks = resized_masks(test, config.image_size)
        metrics.update(pixel_auroc=pixel_auroc(masks, maps), aupro=aupro(masks, maps),
                       aupro_per_image=aupro_per_image(masks, maps))
    metrics.update(method="patchcore", data=data, seed=seed, config=asdict(config),
                   cpu_ms_per_image=1000.0 * cpu / len(test), fit_cpu_seconds=fit_cpu,
                   bank_size=int(len(model.bank)), bank_mb=model.bank.nbytes / 2**20,
                   patches_per_image=int(model.grid[0] * model.grid[1]), torch_threads=torch.get_num_threads())
    if detector is not None:
        metrics.update(mrkd_checkpoint=str(mrkd_checkpoint),
                       mrkd_onnxruntime_cpu_ms_per_image=1000.0 * mrkd_cpu / len(test))
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "scores.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "defect", "label", "raw_score", "max_patch_score"])
        for r, s, m in zip(test, scores, max_scores):
            writer.writerow([r.name, r.defect, r.label, f"{s:.6f}", f"{m:.6f}"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    """The command line: one PatchCore run (bank, scores, metrics) on one set and seed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PatchCoreConfig()
    p.add_argument("--data", required=True, help="elpv:mono|poly, textures:brick|grass|gravel or an MVTec folder")
    p.add_argument("--seed", type=int, default=111, help="split seed (as mrkd.train's); also the coreset's")
    p.add_argument("--out", required=True, help="folder for metrics.json and scores.csv")
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--taps", choices=TAPS, default=d.taps)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--coreset", type=float, default=d.coreset_fraction, help="fraction of patches kept (1 = all)")
    p.add_argument("--dim", type=int, default=d.target_dim, help="pretrain and target feature dimension")
    p.add_argument("--neighbors", type=int, default=d.num_neighbors, help="b of the reweighted image score")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument("--mrkd-checkpoint", default=None,
                   help="an MRKD checkpoint.pt at the same image size: its ONNX Runtime detector is timed side by side")
    a = p.parse_args(argv)
    if not 0.0 < a.coreset <= 1.0:
        p.error(f"--coreset must be in (0, 1], got {a.coreset}")
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    config = PatchCoreConfig(backbone=a.backbone, taps=a.taps, image_size=a.image_size, pretrain_dim=a.dim,
                             target_dim=a.dim, coreset_fraction=a.coreset, num_neighbors=a.neighbors, seed=a.seed)
    mrkd = user_path(a.mrkd_checkpoint) if a.mrkd_checkpoint else None
    m = run(config, a.data, a.seed, user_path(a.out), mrkd)
    pixel = f", pixel AUROC {m['pixel_auroc']:.3f}, AU-PRO {m['aupro']:.3f}" if m["pixel_auroc"] is not None else ""
    print(f"{a.data} seed {a.seed} PatchCore {a.coreset:.0%}: image AUROC {m['image_auroc']:.3f}{pixel}; bank "
          f"{m['bank_size']} x {a.dim} ({m['bank_mb']:.0f} MB), fit {m['fit_cpu_seconds']:.0f} CPU s, "
          f"{m['cpu_ms_per_image']:.1f} CPU ms/image"
          + (f" (MRKD ONNX Runtime {m['mrkd_onnxruntime_cpu_ms_per_image']:.1f})" if mrkd else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
