"""Metrics against scikit-learn, against brute-force re-implementations of both AU-PRO protocols, and on hand cases
whose value is known analytically."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, roc_auc_score

from mrkd.runtime.metrics import aupro, aupro_per_image, image_auroc, pixel_auroc

# ---------------------------------------------------------------- AUROC

def test_image_auroc_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels * 0.7
    scores[:50] = np.round(scores[:50], 1)  # some ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    "labels, scores, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),
        ([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        # pairs (normal, anomalous): (0.1,0.3) ok, (0.1,0.2) ok, (0.4,0.3) wrong, (0.4,0.2) wrong -> 2/4
        ([0, 1, 0, 1], [0.1, 0.3, 0.4, 0.2], 0.5),
        # 3 normals x 1 anomaly, anomaly above two of them and tied with one -> (2 + 0.5) / 3
        ([0, 0, 0, 1], [0.1, 0.2, 0.6, 0.6], 2.5 / 3),
    ],
)
def test_image_auroc_hand_cases(labels, scores, expected):
    assert image_auroc(labels, scores) == pytest.approx(expected)


def test_image_auroc_refuses_one_class():
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([1, 1], [0.1, 0.2])


def test_image_auroc_refuses_bad_input():
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 .normal. or 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


def test_pixel_auroc_matches_sklearn_over_all_pixels():
    masks, maps = random_case(seed=1, n_images=4, size=24)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(list(masks), list(maps)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        pixel_auroc([np.zeros((4, 4), bool)], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        pixel_auroc(np.full((1, 4, 4), 255, np.uint8), np.zeros((1, 4, 4)))


# ---------------------------------------------------------------- AU-PRO, standard protocol

def test_aupro_perfect_separation_is_one():
    masks, _ = random_case(seed=2, n_images=3, size=20)
    maps = masks.astype(float) + 0.01 * np.random.default_rng(2).random(masks.shape)
    assert aupro(masks, maps) == pytest.approx(1.0)


@pytest.mark.parametrize("limit", [0.3, 0.1, 1.0])
def test_aupro_constant_map_is_half_the_limit(limit):
    # One threshold admits everything: the curve jumps linearly from (0, 0) to (1, 1); area up to L is L^2 / 2.
    masks, _ = random_case(seed=3, n_images=2, size=16)
    assert aupro(masks, np.full(masks.shape, 0.7), fpr_limit=limit) == pytest.approx(limit / 2)


def test_aupro_single_region_with_overlap_linear_in_fpr():
    # 1000 normal pixels with distinct scores 1..1000, one 100-pixel region tied to the top 100 normal scores:
    # at the k-th threshold FPR = k / 1000 and PRO = k / 100, so PRO = 10 FPR up to FPR 0.1, then 1.
    # Area up to 0.3 = 0.5 * 0.1 * 1 + 0.2 * 1 = 0.25 -> normalised 0.25 / 0.3.
    mask = np.zeros((11, 100), bool)
    mask[10, :] = True
    amap = np.zeros((11, 100))
    amap[:10, :] = np.arange(1, 1001).reshape(10, 100)
    amap[10, :] = np.arange(901, 1001)
    assert aupro(mask[None], amap[None]) == pytest.approx(0.25 / 0.3)


def test_aupro_averages_regions_not_pixels():
    # A 4-pixel region scored above everything and a 96-pixel region scored below everything: PRO = 0.5 over the
    # whole FPR range (a pixel-weighted overlap would be 0.04).
    mask = np.zeros((20, 20), bool)
    mask[0:2, 0:2] = True  # small region, found
    mask[10:18, 8:20] = True  # large region, missed
    amap = np.full((20, 20), 0.5)
    amap[0:2, 0:2] = 1.0
    amap[10:18, 8:20] = 0.0
    assert aupro(mask[None], amap[None]) == pytest.approx(0.5)


def test_aupro_counts_false_positives_on_good_images():
    # Anomalous image: 84 normal pixels at 0, its region at 1 (perfect on its own). A good image of 20 pixels all
    # at 2 makes FPR jump to j = 20 / 104 before any region pixel is found: curve (0,0) (j,0) (j,1) (1,1),
    # area up to 0.3 = 0.3 - j.
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 16 anomalous, 84 normal pixels
    amap = mask.astype(float)
    good_mask = np.zeros((4, 5), bool)
    good_map = np.full((4, 5), 2.0)
    assert aupro([mask], [amap]) == pytest.approx(1.0)
    normal = 84
    jump = 20 / (normal + 20)
    expected = (0.3 - jump) / 0.3
    assert aupro([mask, good_mask], [amap, good_map]) == pytest.approx(expected)


def test_aupro_uses_8_connectivity():
    # A 1-pixel block (found) touching a 3x3 block (missed) at a corner: ONE region under 8-connectivity, so
    # PRO = 1/10 throughout; 4-connectivity would see two regions and give PRO = 1/2.
    mask = np.zeros((10, 10), bool)
    mask[4, 4] = True
    mask[5:8, 5:8] = True
    amap = np.full((10, 10), 0.5)
    amap[4, 4] = 1.0
    amap[5:8, 5:8] = 0.0
    assert aupro(mask[None], amap[None]) == pytest.approx(0.1)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_aupro_matches_brute_force_threshold_sweep(seed):
    masks, maps = random_case(seed=seed, n_images=4, size=16, quantize=True)
    masks[3] = False  # a good image
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(brute_force_aupro(masks, maps, 0.05), abs=1e-12)


def test_aupro_errors():
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.raises(ValueError, match="at least one anomalous region"):
        aupro(np.zeros((2, 8, 8), bool), maps)
    with pytest.raises(ValueError, match="needs normal pixels"):
        aupro(np.ones((2, 8, 8), bool), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((2, 8, 8), bool), maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        aupro(np.ones((2, 8, 8), bool), maps[:1])


# ---------------------------------------------------------------- AU-PRO, per-image (RD4AD / MRKD papers)

@pytest.mark.parametrize("seed", [7, 8])
def test_aupro_per_image_matches_a_transcription_of_the_rd4ad_code(seed):
    masks, maps = random_case(seed=seed, n_images=3, size=32)
    masks[1] = False  # good images are not evaluated
    expected = np.mean([rd4ad_compute_pro(m[None].astype(int), a[None]) for m, a in zip(masks, maps) if m.any()])
    assert aupro_per_image(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_aupro_per_image_perfect_separation_is_one():
    # The reference divides by a largest FPR of 0 here (NaN); defined as the PRO reached at FPR 0.
    masks, _ = random_case(seed=9, n_images=3, size=20)
    assert aupro_per_image(masks, masks.astype(float)) == pytest.approx(1.0)


def test_aupro_per_image_averages_images_and_ignores_good_images():
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    found = mask.astype(float)  # perfect: 1.0
    normal_values = np.random.default_rng(10).random((16, 16)) + 0.1
    missed = np.where(mask, 0.0, normal_values)  # the region is the map's minimum: never > threshold -> 0.0
    assert aupro_per_image([mask], [missed]) == pytest.approx(0.0)
    assert aupro_per_image([mask, mask], [found, missed]) == pytest.approx(0.5)
    good_mask, good_map = np.zeros((16, 16), bool), np.full((16, 16), 5.0)
    # A good image scoring above everything lowers the standard AU-PRO but leaves the per-image one unchanged.
    with_good = aupro_per_image([mask, mask, good_mask], [found, missed, good_map])
    assert with_good == pytest.approx(0.5)
    assert aupro([mask, good_mask], [found, good_map]) < 0.5


def test_aupro_per_image_constant_map_is_zero():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    assert aupro_per_image([mask], [np.full((8, 8), 0.3)]) == 0.0


def test_aupro_per_image_exact_curve_with_linear_overlap():
    # Normal pixels: 1000 distinct scores 0..999; one 100-pixel region tied to the top 100 (900..999). With every
    # distinct value as a threshold (map > th), FPR = (999 - th) / 1000 and PRO = (999 - th) / 100 for th >= 899:
    # PRO = 10 FPR on FPR <= 0.1, then 1. Kept: FPR < 0.3 -> FPR 0..0.299, rescaled by 0.299:
    # area = [0.5 * 0.1 * 1 + (0.299 - 0.1) * 1] / 0.299.
    mask = np.zeros((11, 100), bool)
    mask[10, :] = True
    amap = np.zeros((11, 100))
    amap[:10, :] = np.arange(1000).reshape(10, 100)
    amap[10, :] = np.arange(900, 1000)
    expected = (0.5 * 0.1 + (0.299 - 0.1)) / 0.299
    assert aupro_per_image([mask], [amap], num_thresholds=None) == pytest.approx(expected, abs=1e-9)


def test_aupro_per_image_errors():
    with pytest.raises(ValueError, match="at least one anomalous region"):
        aupro_per_image(np.zeros((1, 8, 8), bool), np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="covers every pixel"):
        aupro_per_image(np.ones((1, 8, 8), bool), np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro_per_image(np.ones((1, 8, 8), bool), np.zeros((1, 8, 8)), num_thresholds=0)


# ---------------------------------------------------------------- helpers

def random_case(seed: int, n_images: int, size: int, quantize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blob-shaped masks with several regions and smooth maps that partly follow them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n_images, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    maps = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1)) + 0.3 * rng.random(masks.shape)
    if quantize:
        maps = np.round(maps, 1)  # many ties
    return masks, maps


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Direct sweep over every distinct score; regions by scipy.ndimage.label with a 3x3 structure (MVTec code)."""
    regions = []
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    grid_end = np.interp(limit, fprs, pros) if fprs[-1] >= limit else pros[-1]
    keep = fprs <= limit
    xs, ys = np.append(fprs[keep], limit), np.append(pros[keep], grid_end)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / limit)


def rd4ad_compute_pro(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """RD4AD test.py compute_pro, with the pandas DataFrame replaced by lists."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    rows = []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th] = 0
        binary_amaps[amaps > th] = 1
        pros = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pros.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fpr = np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum()
        rows.append((np.mean(pros), fpr))
    pro, fpr = np.array(rows).T
    keep = fpr < 0.3
    pro, fpr = pro[keep], fpr[keep]
    return float(auc(fpr / fpr.max(), pro))
