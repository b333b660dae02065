"""The heat map's product of the taps' distances (`combine="product"`, RD4AD's and anomalib's "multiply" mode):
the fused operator and its reference against an independent formula, edge cases, non-finite input, and the
detector's default (product heat map, summed score; old checkpoints keep the sum)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mrkd import Detector, ops
from mrkd.core.config import MAP_COMBINES, ModelConfig, TrainConfig
from mrkd.core.errors import OptionError
from mrkd.runtime.checkpoint import load_checkpoint

FP32_TOL = 1e-5
HALF_TOL = 1e-4
SHAPES = [(32, 16, 16), (64, 8, 8), (128, 4, 4)]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def random_features(batch: int, shapes, seed: int, noise: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(batch, *shape, generator=g) for shape in shapes]
    return teacher, [t + noise * torch.randn(t.shape, generator=g) for t in teacher]


def product_formula(teacher, student, out_size, sigma) -> np.ndarray:
    """numpy/scipy, image by image: the product over scales of the upsampled 1 - cosine, scipy's blur, then the
    n-th root for n scales."""
    product = np.ones((teacher[0].shape[0], *out_size))
    for t, s in zip(teacher, student):
        distance = (1 - F.cosine_similarity(t.double(), s.double(), dim=1)).unsqueeze(1)
        product *= F.interpolate(distance, size=out_size, mode="bilinear", align_corners=True)[:, 0].numpy()
    if sigma > 0:
        product = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in product])
    return np.sign(product) * np.abs(product) ** (1.0 / len(teacher))  # back on the distances' scale


def max_error(a: torch.Tensor, b) -> float:
    return (a.double().cpu() - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
@pytest.mark.parametrize("out_size", [(32, 32), (20, 27)])
def test_product_matches_an_independent_formula(fn, out_size, sigma):
    teacher, student = random_features(2, SHAPES, seed=1)
    maps, scores = fn(teacher, student, out_size, sigma, combine="product")
    expected = product_formula(teacher, student, out_size, sigma)
    assert max_error(maps[:, 0], expected) <= FP32_TOL
    assert max_error(scores, expected.reshape(2, -1).max(1)) <= FP32_TOL
    summed, _ = fn(teacher, student, out_size, sigma)
    assert max_error(summed, maps) > 0.1  # really another map


@pytest.mark.parametrize(
    "shapes,out_size",
    [
        ([(8, 1, 1)], (9, 6)),  # 1x1 feature map, one scale: the product is that scale's distance
        ([(8, 1, 1), (4, 2, 3)], (1, 1)),  # 1x1 output
        ([(1, 9, 9), (1, 4, 4)], (16, 16)),  # one channel
        ([(3, 7, 5), (6, 4, 4), (9, 2, 3), (12, 1, 2)], (19, 23)),  # 4 scales (more than one CUDA launch), odd sizes
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_native_product_matches_reference_on_edge_shapes(shapes, out_size, batch):
    teacher, student = random_features(batch, shapes, seed=8)
    for sigma in (0.0, 2.0):
        maps, scores = ops.anomaly_map(teacher, student, out_size, sigma, combine="product")
        ref_maps, ref_scores = ops.anomaly_map_reference(teacher, student, out_size, sigma, combine="product")
        assert maps.shape == (batch, 1, *out_size) and scores.shape == (batch,)
        assert max_error(maps, ref_maps) <= FP32_TOL and max_error(scores, ref_scores) <= FP32_TOL


def test_one_scale_product_is_the_sum():
    teacher, student = random_features(2, SHAPES[:1], seed=2)
    product = ops.anomaly_map(teacher, student, (24, 24), 2.0, combine="product")
    summed = ops.anomaly_map(teacher, student, (24, 24), 2.0)
    assert torch.equal(product[0], summed[0]) and torch.equal(product[1], summed[1])


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
def test_the_product_map_is_on_the_distances_scale(fn):
    # Three taps with the same distance d everywhere: the product map is d (the cube root of d^3), the sum 3 d.
    teacher, student = random_features(2, [(16, 12, 12)], seed=6)
    product, product_scores = fn(teacher * 3, student * 3, (12, 12), 0.0, combine="product")
    summed, _ = fn(teacher * 3, student * 3, (12, 12), 0.0)
    assert max_error(product, summed / 3) <= FP32_TOL
    assert max_error(product_scores, (summed / 3).flatten(1).amax(1)) <= FP32_TOL


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
def test_a_scale_that_agrees_everywhere_zeroes_the_product(fn):
    # The product lights a pixel only where every tap disagrees (the sum lights it where any one does).
    teacher, student = random_features(2, SHAPES, seed=3)
    student[1] = teacher[1].clone()
    maps, scores = fn(teacher, student, (32, 32), 2.0, combine="product")
    assert maps.abs().max() <= 0.01 and scores.abs().max() <= 0.01  # the cube root of float32 rounding
    _, summed_scores = fn(teacher, student, (32, 32), 2.0)
    assert summed_scores.min() > 0.2  # the other taps still disagree


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_product_half_precision_and_channels_last(dtype, channels_last):
    teacher, student = random_features(2, SHAPES + [(3, 5, 7)], seed=9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    low_t = [t.to(dtype).contiguous(memory_format=fmt) for t in teacher]
    low_s = [s.to(dtype).contiguous(memory_format=fmt) for s in student]
    maps, scores = ops.anomaly_map(low_t, low_s, (30, 26), 4.0, combine="product")
    ref_maps, ref_scores = ops.anomaly_map_reference(low_t, low_s, (30, 26), 4.0, combine="product")
    assert maps.dtype == torch.float32
    assert max_error(maps, ref_maps) <= HALF_TOL and max_error(scores, ref_scores) <= HALF_TOL


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [(0, 3, 2, 2), (2, 100, 3, 0)])
def test_non_finite_feature_makes_that_images_product_score_nan(fn, bad, where):
    # A zero distance at another scale must not hide it (0 * NaN is NaN, but 0 * a finite bad guess would not be).
    k, c, y, x = where
    teacher, student = random_features(3, SHAPES, seed=21)
    student[1 - (k > 0)] = teacher[1 - (k > 0)].clone()  # another scale agrees everywhere: a product of 0
    clean_maps, clean_scores = fn(teacher, student, (32, 32), 4.0, combine="product")
    poisoned = [t.clone() for t in teacher]
    poisoned[k][1, c, y, x] = bad
    maps, scores = fn(poisoned, student, (32, 32), 4.0, combine="product")
    assert torch.isnan(scores[1])
    for b in (0, 2):
        assert torch.equal(scores[b], clean_scores[b]) and torch.equal(maps[b], clean_maps[b])


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
def test_unknown_combine_is_a_clear_error(fn):
    teacher, student = random_features(1, SHAPES, seed=4)
    with pytest.raises(ValueError, match="combine must be 'sum' or 'product', got 'mean'"):
        fn(teacher, student, (16, 16), 2.0, combine="mean")


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
def test_score_taps_are_summed_whatever_the_map_combine(fn):
    # The heat map's product, the score the max of the summed score taps: even when both read the same taps.
    teacher, student = random_features(2, SHAPES, seed=5)
    maps, scores = fn(teacher, student, (32, 32), 2.0, scales=(0, 1, 2), score_scales=(0, 1, 2), combine="product")
    expected = product_formula(teacher, student, (32, 32), 2.0)
    assert max_error(maps[:, 0], expected) <= FP32_TOL
    _, summed_scores = fn(teacher, student, (32, 32), 2.0)
    assert max_error(scores, summed_scores) <= FP32_TOL
    _, tap2 = fn(teacher, student, (32, 32), 2.0, scales=(2,))
    _, split = fn(teacher, student, (32, 32), 2.0, scales=(0, 1, 2), score_scales=(2,), combine="product")
    assert max_error(split, tap2) <= FP32_TOL


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", [SHAPES, [(3, 7, 5), (6, 4, 4), (9, 2, 3), (12, 1, 2)], [(1, 9, 9)]])
def test_cuda_product_matches_cpu(dtype, shapes):
    teacher, student = random_features(3, shapes, seed=14)
    teacher, student = [t.to(dtype) for t in teacher], [s.to(dtype) for s in student]
    cpu_maps, cpu_scores = ops.anomaly_map(teacher, student, (33, 29), 3.0, combine="product")
    gpu_maps, gpu_scores = ops.anomaly_map([t.cuda() for t in teacher], [s.cuda() for s in student], (33, 29), 3.0,
                                           combine="product")
    assert max_error(gpu_maps, cpu_maps) <= HALF_TOL and max_error(gpu_scores, cpu_scores) <= HALF_TOL
    poisoned = [t.clone() for t in teacher]
    poisoned[-1][1, 0, 0, 0] = float("nan")
    _, scores = ops.anomaly_map([t.cuda() for t in poisoned], [s.cuda() for s in student], (33, 29), 3.0,
                                combine="product")
    assert torch.isnan(scores[1]).item() and torch.isfinite(scores[[0, 2]]).all().item()


# --- the detector's setting ------------------------------------------------------------------------------------------


def test_new_models_multiply_the_heat_map_and_old_checkpoints_keep_the_sum():
    assert ModelConfig().map_combine == "product"
    assert TrainConfig().model_config().map_combine == "product"
    assert TrainConfig(map_combine="sum").model_config().map_combine == "sum"
    assert ModelConfig.from_dict({"backbone": "mobilenet_v2"}).map_combine == "sum"  # written before the option
    assert ModelConfig.from_dict(ModelConfig().to_dict()).map_combine == "product"
    with pytest.raises(OptionError, match="map_combine must be 'sum' or 'product'"):
        ModelConfig(map_combine="max")
    assert MAP_COMBINES == ops.COMBINES  # the config accepts what the operator does


def test_detector_heat_map_is_the_product_and_its_score_the_summed_score_taps(tiny_checkpoint):
    payload = load_checkpoint(tiny_checkpoint)
    detector = Detector.from_payload(payload, precision="fp32")
    assert detector.config.map_combine == "product"
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, detector.image_size, detector.image_size), generator=g, dtype=torch.uint8)
    result = detector.raw_maps(batch)
    teacher, student = detector._features(batch)
    options = detector.config
    pooled = ops.local_average(teacher, options.feature_pool), ops.local_average(student, options.feature_pool)
    # the heat map's taps are whitened before their distances (tests/test_map_whitening.py)
    pooled = ops.whiten(*pooled, detector.map_whitening.as_list())
    expected_map = product_formula(*pooled, (detector.image_size, detector.image_size), options.blur_sigma)
    assert max_error(result[0], expected_map) <= FP32_TOL
    payload["model_config"]["map_combine"] = "sum"
    summed = Detector.from_payload(payload, precision="fp32").raw_maps(batch)
    assert torch.equal(summed[1], result[1])  # the score does not read the heat map's combination
    assert max_error(summed[0], result[0]) > 1e-3
