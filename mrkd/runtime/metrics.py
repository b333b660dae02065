"""Anomaly-detection metrics: image AUROC, pixel AUROC and the two AU-PRO protocols. Numpy in, float out.

Masks are boolean (or 0/1) H x W arrays, maps are float H x W arrays; a batch is an [N, H, W] array or a sequence
of H x W arrays (sizes may differ between images, a mask and its map must match). Connected components of the
ground truth use 8-connectivity (skimage.measure.label(connectivity=2)), as the MVTec AD evaluation code
(scipy.ndimage.label with a 3x3 structure), anomalib (OpenCV, connectivity 8) and RD4AD (measure.label's default).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.measure import label as label_components
from sklearn.metrics import roc_auc_score

ArrayBatch = np.ndarray | Sequence[np.ndarray]

PAPER_NUM_THRESHOLDS = 200  # RD4AD test.py compute_pro(num_th=200)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of image scores against image labels (0 normal, 1 anomalous)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y).tolist()}")
    _require_finite(s, "scores")
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(
            f"image AUROC needs both normal (0) and anomalous (1) images; all {len(y)} labels are {present.tolist()}"
        )
    return float(roc_auc_score(y.astype(np.int8), s))


def pixel_auroc(masks: ArrayBatch, maps: ArrayBatch) -> float:
    """ROC AUC over every pixel of every image (exact: no subsampling, no threshold grid)."""
    pairs = _pairs(masks, maps)
    truth = np.concatenate([m.ravel() for m, _ in pairs])
    score = np.concatenate([a.ravel() for _, a in pairs])
    if truth.all() or not truth.any():
        raise ValueError("pixel AUROC needs both normal and anomalous pixels in the masks")
    return float(roc_auc_score(truth, score))


def aupro(masks: ArrayBatch, maps: ArrayBatch, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve, standard protocol (MVTec AD paper and its evaluation code, anomalib).

    For every threshold t (every distinct score, predicted anomalous = score >= t):
      FPR(t) = normal pixels of ALL test images (good images included) predicted anomalous / all normal pixels;
      PRO(t) = mean over every ground-truth region of every image (8-connected components) of the fraction of the
               region predicted anomalous; each region counts once, whatever its size.
    The curve (starting at (0, 0)) is integrated with the trapezoid rule up to FPR = fpr_limit (PRO linearly
    interpolated there) and divided by fpr_limit, so a perfect map gives 1.0 and a constant one fpr_limit / 2.
    Exact: the curve is computed from one sort of all pixel scores with cumulative sums, no threshold grid.
    """
    _check_fpr_limit(fpr_limit)
    pairs = _pairs(masks, maps)
    n_normal = sum(int((~m).sum()) for m, _ in pairs)
    if n_normal == 0:
        raise ValueError("AU-PRO needs normal pixels; every pixel of every mask is anomalous")
    scores, region_ids, region_sizes = _scores_with_regions(pairs)
    n_regions = len(region_sizes)
    if n_regions == 0:
        raise ValueError("AU-PRO needs at least one anomalous region; all masks are empty")

    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_regions = region_ids[order]
    is_normal = sorted_regions < 0
    fp_counts = np.cumsum(is_normal)
    # Each pixel of region r adds 1 / (size_r * n_regions) to the mean overlap.
    weight = np.zeros(len(sorted_regions), dtype=np.float64)
    weight[~is_normal] = 1.0 / (region_sizes[sorted_regions[~is_normal]] * n_regions)
    pro = np.cumsum(weight)
    # A threshold admits every pixel of its score at once: keep the last index of each run of equal scores.
    last_of_run = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    fpr = np.concatenate(([0.0], fp_counts[last_of_run] / n_normal))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_run], 1.0)))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_per_image(
    masks: ArrayBatch,
    maps: ArrayBatch,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = PAPER_NUM_THRESHOLDS,
) -> float:
    """AU-PRO as the RD4AD and MRKD papers computed it (RD4AD test.py `compute_pro`, called once per image).

    For each test image whose mask has anomalous pixels (good images are skipped entirely):
      thresholds th = np.arange(min, max, (max - min) / num_thresholds) of THAT image's map (num_thresholds=None:
      every distinct value of the map, the exact curve); predicted anomalous = map > th (strict);
      PRO(th) = mean over that image's regions of the fraction predicted anomalous;
      FPR(th) = that image's normal pixels predicted anomalous / that image's normal pixels;
      keep the points with FPR < fpr_limit, divide their FPR by the largest kept FPR, and take the trapezoid area
      under PRO over the kept points (sklearn.metrics.auc).
    The result is the mean of these per-image areas.

    How it differs from `aupro` (the standard protocol): FPR counts only the image's own normal pixels (good images
    never add false positives), regions are averaged per image and then images averaged (an image with many
    regions weighs as much as one with one), thresholds are a 200-step grid per image, and the curve is rescaled
    by the largest FPR reached below the limit and is NOT anchored at FPR = 0: the area runs from the smallest
    kept FPR (divided by the largest) to 1. It therefore rewards a map more than `aupro` does; numbers from the
    two are not comparable.
    Degenerate cases the reference leaves as NaN or an exception, defined here: when the largest kept FPR is 0
    (the map separates the image perfectly at every kept threshold) the image scores the highest kept PRO; with
    fewer than two kept points the area is 0 (a constant map scores 0).
    """
    _check_fpr_limit(fpr_limit)
    if num_thresholds is not None and (not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 1):
        raise ValueError(f"num_thresholds must be a positive integer or None, got {num_thresholds!r}")
    areas = []
    for index, (mask, amap) in enumerate(_pairs(masks, maps)):
        if not mask.any():
            continue
        if mask.all():
            raise ValueError(f"image {index}: the mask covers every pixel, so its FPR is undefined")
        areas.append(_paper_image_pro_area(mask, amap, fpr_limit, num_thresholds))
    if not areas:
        raise ValueError("AU-PRO needs at least one anomalous region; all masks are empty")
    return float(np.mean(areas))


def _paper_image_pro_area(mask: np.ndarray, amap: np.ndarray, fpr_limit: float, num_thresholds: int | None) -> float:
    lo, hi = float(amap.min()), float(amap.max())
    if num_thresholds is None:
        thresholds = np.unique(amap)
    elif hi > lo:
        thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)
    else:
        thresholds = np.array([lo])
    normal_scores = np.sort(amap[~mask])
    fpr = (normal_scores.size - np.searchsorted(normal_scores, thresholds, side="right")) / normal_scores.size
    components = label_components(mask, connectivity=2)
    overlaps = []
    for region in range(1, int(components.max()) + 1):
        region_scores = np.sort(amap[components == region])
        detected = region_scores.size - np.searchsorted(region_scores, thresholds, side="right")
        overlaps.append(detected / region_scores.size)
    pro = np.mean(overlaps, axis=0)
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size == 0:
        return 0.0
    if fpr.max() == 0.0:
        return float(pro.max())
    if fpr.size < 2:
        return 0.0
    # Thresholds rise, so FPR falls; integrate with FPR increasing (what sklearn.metrics.auc does for a
    # decreasing x).
    x = (fpr / fpr.max())[::-1]
    y = pro[::-1]
    return float(_trapezoid(y, x))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x increasing) from x[0] to x_max, interpolating y at x_max."""
    inside = np.searchsorted(x, x_max, side="right")  # points with x <= x_max
    xs, ys = x[:inside], y[:inside]
    if inside < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(_trapezoid(ys, xs))


def _scores_with_regions(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pixel scores, each pixel's global region id (-1 for normal pixels), and the size of every region."""
    scores, ids, sizes = [], [], []
    next_id = 0
    for mask, amap in pairs:
        components = label_components(mask, connectivity=2).ravel().astype(np.int64)
        n = int(components.max())
        region_id = np.where(components > 0, components - 1 + next_id, -1)
        sizes.append(np.bincount(components, minlength=n + 1)[1:])
        scores.append(amap.ravel())
        ids.append(region_id)
        next_id += n
    return np.concatenate(scores), np.concatenate(ids), np.concatenate(sizes).astype(np.float64)


def _pairs(masks: ArrayBatch, maps: ArrayBatch) -> list[tuple[np.ndarray, np.ndarray]]:
    mask_list, map_list = _as_images(masks, "masks"), _as_images(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"{len(mask_list)} masks but {len(map_list)} maps")
    if not mask_list:
        raise ValueError("no images given")
    pairs = []
    for i, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise ValueError(f"image {i}: mask shape {mask.shape} differs from map shape {amap.shape}")
        pairs.append((_as_bool_mask(mask, i), _as_score_map(amap, i)))
    return pairs


def _as_images(batch: ArrayBatch, what: str) -> list[np.ndarray]:
    if isinstance(batch, np.ndarray):
        if batch.ndim == 2:
            return [batch]
        if batch.ndim != 3:
            raise ValueError(f"{what} must be [N, H, W] or a sequence of H x W arrays, got shape {batch.shape}")
        return list(batch)
    images = [np.asarray(item) for item in batch]
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise ValueError(f"{what}[{i}] must be an H x W array, got shape {image.shape}")
    return images


def _as_bool_mask(mask: np.ndarray, index: int) -> np.ndarray:
    if mask.dtype == bool:
        return mask
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask {index} must be boolean or 0/1, got values such as {np.unique(mask)[:5].tolist()}")
    return mask.astype(bool)


def _as_score_map(amap: np.ndarray, index: int) -> np.ndarray:
    if not np.issubdtype(amap.dtype, np.number) or np.issubdtype(amap.dtype, np.complexfloating):
        raise ValueError(f"map {index} must be real numbers, got dtype {amap.dtype}")
    amap = amap.astype(np.float64, copy=False)
    _require_finite(amap, f"map {index}")
    return amap


def _require_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
