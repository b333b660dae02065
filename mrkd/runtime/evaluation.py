"""Metrics of a checkpoint on a dataset's test split, and the reports behind `python -m mrkd.evaluate`."""
from __future__ import annotations

import csv
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.files import atomic_path, user_path, write_json
from ..core.preprocess import prepare_image
from ..data import ImageRecord, open_dataset
from .checkpoint import load_checkpoint
from .detector import Detector
from .metrics import aupro, aupro_per_image, image_auroc, pixel_auroc
from .visualize import overlay, save_png

log = logging.getLogger("mrkd.evaluate")
N_WORST = 4


@dataclass
class TestRun:
    records: list[ImageRecord]
    scores: np.ndarray
    normalized: np.ndarray
    maps: np.ndarray  # [N, S, S] raw
    seconds: float


def run_detector(detector: Detector, records: list[ImageRecord], show: bool = True) -> TestRun:
    """Scores and maps of every test record, in batches; with the time per image."""
    scores, normalized, maps, seconds = [], [], [], 0.0
    bs = detector.batch_size
    hide_bar = not (show and sys.stderr.isatty())
    for i in tqdm(range(0, len(records), bs), desc="evaluating", disable=hide_bar, leave=False):
        batch = torch.stack([prepare_image(r.load_image(), detector.image_size) for r in records[i : i + bs]])
        start = time.perf_counter()
        pred = detector.predict_prepared(batch)
        seconds += time.perf_counter() - start
        scores.append(pred.scores)
        normalized.append(pred.normalized_scores)
        maps.append(pred.maps.astype(np.float32))
    return TestRun(records, np.concatenate(scores), np.concatenate(normalized), np.concatenate(maps), seconds)


def resized_masks(records: list[ImageRecord], size: int) -> np.ndarray:
    """Ground truth at the model's resolution (nearest), where the maps live."""
    masks = []
    for r in records:
        mask = r.load_mask() if r.load_mask is not None else None
        if mask is None:
            masks.append(np.zeros((size, size), dtype=bool))
            continue
        t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
        masks.append(F.interpolate(t, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5)
    return np.stack(masks)


def compute_metrics(run: TestRun, has_masks: bool, image_size: int) -> dict:
    """Image AUROC, and with masks pixel AUROC and both AU-PRO protocols, plus counts and timing."""
    labels = np.array([r.label for r in run.records])
    metrics = {
        "image_auroc": image_auroc(labels, run.scores),
        "pixel_auroc": None,
        "aupro": None,
        "aupro_per_image": None,
        "n_normal": int((labels == 0).sum()),
        "n_anomalous": int((labels == 1).sum()),
        "ms_per_image": 1000.0 * run.seconds / max(1, len(run.records)),
        "threshold_accuracy": float(np.mean((run.normalized > 0.5) == (labels == 1))),
    }
    if has_masks:
        masks = resized_masks(run.records, image_size)
        metrics["pixel_auroc"] = pixel_auroc(masks, run.maps)
        metrics["aupro"] = aupro(masks, run.maps)
        metrics["aupro_per_image"] = aupro_per_image(masks, run.maps)
    return metrics


def write_reports(run: TestRun, detector: Detector, out: Path) -> None:
    """scores.csv, roc.png and heat-map overlays of the worst false positives and negatives."""
    labels = np.array([r.label for r in run.records])
    with atomic_path(out / "scores.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "defect", "label", "raw_score", "normalized_score", "is_anomalous"])
        for r, s, n in zip(run.records, run.scores, run.normalized):
            writer.writerow([r.name, r.defect, r.label, f"{s:.6f}", f"{n:.4f}", int(n > 0.5)])
    save_roc_plot(out / "roc.png", labels, run.scores)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    worst = {
        "false_positive": normal[np.argsort(-run.scores[normal])][:N_WORST],
        "false_negative": anomalous[np.argsort(run.scores[anomalous])][:N_WORST],
    }
    for kind, indices in worst.items():
        for rank, i in enumerate(indices):
            record = run.records[i]
            heat = detector.calibration.normalize_map(run.maps[i])
            name = Path(record.name).stem.replace("/", "_")
            save_png(out / "worst" / f"{kind}_{rank}_{name}.png", overlay(record.load_image(), heat))


def save_roc_plot(path: Path, labels: np.ndarray, scores: np.ndarray) -> None:
    """The ROC curve with its AUROC, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUROC {image_auroc(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("image-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate(checkpoint: str | Path, data: str, out: str | Path, category: str | None = None,
             seed: int | None = None, device: str = "cpu", batch_size: int = 16, show_progress: bool = True) -> dict:
    """Metrics of a checkpoint on a dataset's test split (the training split's seed by default), written to `out`."""
    out = user_path(out)
    payload = load_checkpoint(checkpoint)
    train_config = payload.get("train_config") or {}
    seed = seed if seed is not None else int(train_config.get("seed", 111))
    detector = Detector.from_payload(payload, device=device, batch_size=batch_size)
    splits = open_dataset(data, category or train_config.get("category"), seed=seed)
    if not splits.test:
        raise ValueError(f"{data}: no test images")
    run = run_detector(detector, splits.test, show_progress)
    metrics = compute_metrics(run, splits.has_masks, detector.image_size)
    metrics.update({"checkpoint": str(checkpoint), "data": data, "category": splits.category, "seed": seed})
    write_json(out / "metrics.json", metrics)
    write_reports(run, detector, out)
    return metrics
