"""Fused anomaly-map operator (mrkd._C) against the PyTorch reference, scipy and a per-pixel formula."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mrkd import ops

FP32_TOL = 1e-4
HALF_TOL = 2e-2
HALF_DTYPES = (torch.float16, torch.bfloat16)
WRN50_SHAPES_SMALL = [(32, 16, 16), (64, 8, 8), (128, 4, 4)]  # wide_resnet50_2 layout, scaled down

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(scope="module", autouse=True)
def native_op_is_built() -> None:
    assert ops.native_available(), "mrkd._C is not built: run `python setup.py build_ext --inplace`"


def random_features(
    batch: int, shapes: list[tuple[int, int, int]], seed: int, noise: float = 0.5
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(batch, *shape, generator=g) for shape in shapes]
    student = [t + noise * torch.randn(t.shape, generator=g) for t in teacher]
    return teacher, student


def structured_features(batch: int,
                        shapes: list[tuple[int, int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Student equals teacher except for a bright square 'defect' per image at a different place each."""
    g = torch.Generator().manual_seed(7)
    teacher, student = [], []
    for c, h, w in shapes:
        t = torch.randn(batch, c, h, w, generator=g).abs() + 0.1
        s = t.clone()
        for b in range(batch):
            y0, x0 = (b * 3) % max(h - 1, 1), (b * 5) % max(w - 1, 1)
            s[b, :, y0 : y0 + max(h // 4, 1), x0 : x0 + max(w // 4, 1)] *= -1.0
        teacher.append(t)
        student.append(s)
    return teacher, student


def per_pixel_formula(teacher, student, out_size, sigma) -> tuple[np.ndarray, np.ndarray]:
    """F.cosine_similarity + F.interpolate(align_corners=True) + scipy gaussian_filter, image by image."""
    total = sum(
        F.interpolate((1 - F.cosine_similarity(t.float(), s.float(), dim=1)).unsqueeze(1), size=out_size,
                      mode="bilinear", align_corners=True)
        for t, s in zip(teacher, student)
    )
    maps = total[:, 0].double().numpy()
    if sigma > 0:
        maps = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in maps])
    return maps, maps.reshape(len(maps), -1).max(axis=1)


def max_error(a: torch.Tensor, b: torch.Tensor | np.ndarray) -> float:
    b_tensor = torch.as_tensor(b, dtype=torch.float64)
    return (a.double().cpu() - b_tensor.cpu()).abs().max().item()


def check_against_reference(teacher, student, out_size, sigma, tol=FP32_TOL) -> None:
    maps, scores = ops.anomaly_map(teacher, student, out_size, sigma)
    ref_maps, ref_scores = ops.anomaly_map_reference(teacher, student, out_size, sigma)
    batch = teacher[0].shape[0]
    assert maps.shape == (batch, 1, *out_size) and maps.dtype == torch.float32
    assert scores.shape == (batch,) and scores.dtype == torch.float32
    assert max_error(maps, ref_maps) <= tol
    assert max_error(scores, ref_scores) <= tol
    assert torch.equal(scores, maps.flatten(1).amax(1))


# --- the reference itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
@pytest.mark.parametrize("out_size", [(32, 32), (20, 27)])
def test_reference_matches_per_pixel_formula(out_size, sigma):
    teacher, student = random_features(2, WRN50_SHAPES_SMALL, seed=1)
    maps, scores = ops.anomaly_map_reference(teacher, student, out_size, sigma)
    expected_maps, expected_scores = per_pixel_formula(teacher, student, out_size, sigma)
    assert max_error(maps[:, 0], expected_maps) <= 1e-5
    assert max_error(scores, expected_scores) <= 1e-5


def test_reference_blur_wraps_like_scipy_when_radius_exceeds_image():
    image = torch.rand(1, 1, 3, 5, generator=torch.Generator().manual_seed(3))
    sigma = 2.0  # radius 8 > 3 and 5: the reflected border repeats
    blurred = ops.gaussian_blur_reference(image, sigma)
    expected = gaussian_filter(image[0, 0].double().numpy(), sigma=sigma, mode="reflect", truncate=4.0)
    assert max_error(blurred[0, 0], expected) <= 1e-6


# --- native op on CPU ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_scales", [1, 3, 4])
def test_native_matches_reference_random(batch, n_scales):
    shapes = (WRN50_SHAPES_SMALL + [(17, 3, 5)])[:n_scales]
    teacher, student = random_features(batch, shapes, seed=10 + batch + n_scales)
    check_against_reference(teacher, student, (48, 40), 4.0)


def test_native_matches_reference_structured():
    teacher, student = structured_features(4, WRN50_SHAPES_SMALL)
    maps, scores = ops.anomaly_map(teacher, student, (64, 64), 4.0)
    ref_maps, ref_scores = ops.anomaly_map_reference(teacher, student, (64, 64), 4.0)
    assert max_error(maps, ref_maps) <= FP32_TOL
    assert max_error(scores, ref_scores) <= FP32_TOL
    assert scores.min() > 0.5  # the defect squares light up every image


def test_identical_features_give_zero_map():
    teacher, _ = random_features(2, WRN50_SHAPES_SMALL, seed=4)
    maps, scores = ops.anomaly_map(teacher, [t.clone() for t in teacher], (32, 32), 4.0)
    assert maps.abs().max() <= 1e-5 and scores.abs().max() <= 1e-5


@pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 4.0])
def test_native_blur_matches_scipy(sigma):
    # Feature maps already at out_size: upsampling is the identity, so the op is cosine distance + blur.
    teacher, student = random_features(2, [(8, 13, 21)], seed=5)
    maps, scores = ops.anomaly_map(teacher, student, (13, 21), sigma)
    distance = (1 - F.cosine_similarity(teacher[0], student[0], dim=1)).double().numpy()
    expected = np.stack([gaussian_filter(d, sigma=sigma, mode="reflect", truncate=4.0) for d in distance])
    assert max_error(maps[:, 0], expected) <= FP32_TOL
    assert max_error(scores, expected.reshape(2, -1).max(1)) <= FP32_TOL


def test_native_blur_wraps_more_than_once():
    teacher, student = random_features(2, [(4, 3, 4)], seed=6)
    sigma = 3.0  # radius 12 > out_size (5, 7): the reflected border wraps several times
    maps, _ = ops.anomaly_map(teacher, student, (5, 7), sigma)
    expected, _ = per_pixel_formula(teacher, student, (5, 7), sigma)
    assert max_error(maps[:, 0], expected) <= FP32_TOL
    check_against_reference(teacher, student, (5, 7), sigma)


@pytest.mark.parametrize(
    "shapes,out_size",
    [
        ([(8, 1, 1)], (9, 6)),  # 1x1 feature maps
        ([(8, 1, 1), (4, 2, 3)], (1, 1)),  # 1x1 output
        ([(16, 12, 12)], (5, 7)),  # out_size smaller than the feature map
        ([(1, 9, 9), (1, 4, 4)], (16, 16)),  # one channel
        ([(5, 6, 10)], (24, 64)),  # non-square
        ([(3, 7, 5), (6, 4, 4), (9, 2, 3), (12, 1, 2)], (19, 23)),  # 4 scales, odd sizes
    ],
)
def test_native_edge_shapes(shapes, out_size):
    teacher, student = random_features(2, shapes, seed=8)
    check_against_reference(teacher, student, out_size, 2.0)
    check_against_reference(teacher, student, out_size, 0.0)


def test_cosine_epsilon_matches_torch():
    # Zero and tiny vectors: each norm is clamped to eps like F.cosine_similarity.
    t = torch.zeros(1, 2, 1, 4)
    s = torch.zeros(1, 2, 1, 4)
    t[0, :, 0, 1] = torch.tensor([1e-5, 0.0])
    s[0, :, 0, 1] = torch.tensor([1e-5, 0.0])
    t[0, :, 0, 2] = torch.tensor([1e-9, 0.0])
    s[0, :, 0, 2] = torch.tensor([1.0, 0.0])
    t[0, :, 0, 3] = torch.tensor([3e-9, 4e-9])
    s[0, :, 0, 3] = torch.tensor([3e-9, 4e-9])
    maps, _ = ops.anomaly_map([t], [s], (1, 4), 0.0)
    expected = 1 - F.cosine_similarity(t, s, dim=1)
    assert torch.allclose(maps[:, 0], expected, atol=1e-6)
    assert maps[0, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.9, 0.75], abs=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_native_half_precision(dtype):
    teacher, student = random_features(2, WRN50_SHAPES_SMALL, seed=9)
    low_t, low_s = [t.to(dtype) for t in teacher], [s.to(dtype) for s in student]
    maps, scores = ops.anomaly_map(low_t, low_s, (40, 40), 4.0)
    ref_maps, ref_scores = ops.anomaly_map_reference(teacher, student, (40, 40), 4.0)  # float32 originals
    assert maps.dtype == torch.float32
    assert max_error(maps, ref_maps) <= HALF_TOL and max_error(scores, ref_scores) <= HALF_TOL
    # Same half inputs through the reference (float32 accumulation in both): much closer.
    check_against_reference(low_t, low_s, (40, 40), 4.0, tol=FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_channels_last(dtype):
    teacher, student = random_features(2, WRN50_SHAPES_SMALL + [(3, 5, 7)], seed=11)
    teacher = [t.to(dtype).contiguous(memory_format=torch.channels_last) for t in teacher]
    student = [s.to(dtype).contiguous(memory_format=torch.channels_last) for s in student]
    assert not teacher[0].is_contiguous()
    check_against_reference(teacher, student, (30, 26), 4.0)
    # Mixed layouts at one scale, and a non-contiguous slice.
    mixed_student = [s.contiguous() for s in student]
    check_against_reference(teacher, mixed_student, (30, 26), 4.0)
    sliced = [t[:, :, :, : max(t.shape[3] - 1, 1)] for t in teacher]
    sliced_s = [s[:, :, :, : max(s.shape[3] - 1, 1)] for s in mixed_student]
    check_against_reference(sliced, sliced_s, (30, 26), 4.0)


# --- bad input --------------------------------------------------------------------------------------------------------


def _good():
    return random_features(2, WRN50_SHAPES_SMALL[:2], seed=12)


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference])
def test_bad_input_raises_value_error_naming_the_problem(fn):
    t, s = _good()
    cases = [
        ((t, s[:1], (8, 8), 4.0), "2 scales but student has 1"),
        (([], [], (8, 8), 4.0), "must not be empty"),
        ((t, [s[0][:1], s[1]], (8, 8), 4.0), "batch mismatch"),
        ((t, [s[0][:, :5], s[1]], (8, 8), 4.0), "shape mismatch at scale 0"),
        ((t, [s[0], s[1].double()], (8, 8), 4.0), "mixed dtypes"),
        ((t, [s[0], s[1].to("meta")], (8, 8), 4.0), "mixed devices"),
        ((t, s, (0, 8), 4.0), "out_size must be positive"),
        ((t, s, (8, -2), 4.0), "out_size must be positive"),
        ((t, s, (8, 8), -1.0), "sigma must be finite and >= 0"),
        ((t, s, (8, 8, 8), 4.0), "out_size must be"),
        (([x.double() for x in t], [x.double() for x in s], (8, 8), 4.0), "unsupported dtype"),
        (([t[0][0]], [s[0][0]], (8, 8), 4.0), "must be 4-D"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*args)


def test_cpp_op_checks_inputs_too():
    t, s = _good()
    with pytest.raises(RuntimeError, match="teacher has 2 scales but student has 1"):
        torch.ops.mrkd.anomaly_map(t, s[:1], [8, 8], 4.0)
    with pytest.raises(RuntimeError, match="sigma must be finite and >= 0"):
        torch.ops.mrkd.anomaly_map(t, s, [8, 8], -0.5)
    with pytest.raises(RuntimeError, match="shape mismatch at scale 1"):
        torch.ops.mrkd.anomaly_map(t, [s[0], s[1][:, :3]], [8, 8], 4.0)
    with pytest.raises(RuntimeError, match="out_size must be positive"):
        torch.ops.mrkd.anomaly_map(t, s, [8, 0], 4.0)


def test_no_fallback_warning_when_native(recwarn):
    t, s = _good()
    ops.anomaly_map(t, s, (8, 8))
    assert not [w for w in recwarn if "mrkd._C" in str(w.message)]


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_NATIVE_ERROR", "simulated missing build")
    monkeypatch.setattr(ops, "_fallback_warned", False)
    t, s = _good()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.anomaly_map(t, s, (8, 8))
        ops.anomaly_map(t, s, (8, 8))
    assert len([w for w in caught if "mrkd._C is not built" in str(w.message)]) == 1
    assert torch.equal(first[0], ops.anomaly_map_reference(t, s, (8, 8))[0])


# --- CUDA -------------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(dtype, channels_last):
    shapes = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    teacher, student = random_features(3, shapes, seed=13)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = [t.to(dtype).contiguous(memory_format=fmt) for t in teacher]
    student = [s.to(dtype).contiguous(memory_format=fmt) for s in student]
    cpu_maps, cpu_scores = ops.anomaly_map(teacher, student, (256, 256), 4.0)
    gpu_maps, gpu_scores = ops.anomaly_map([t.cuda() for t in teacher], [s.cuda() for s in student], (256, 256), 4.0)
    assert gpu_maps.is_cuda and gpu_scores.is_cuda
    assert max_error(gpu_maps, cpu_maps) <= FP32_TOL
    assert max_error(gpu_scores, cpu_scores) <= FP32_TOL


@requires_cuda
@pytest.mark.parametrize(
    "shapes,out_size,sigma",
    [
        ([(8, 1, 1)], (9, 6), 2.0),
        ([(16, 12, 12)], (5, 7), 3.0),
        ([(1, 9, 9), (1, 4, 4)], (16, 16), 0.0),
        ([(5, 6, 10)], (24, 64), 4.0),
        ([(3, 7, 5), (6, 4, 4), (9, 2, 3), (12, 1, 2)], (19, 23), 4.0),
        ([(c, 3, 3) for c in range(1, 11)], (12, 10), 1.0),  # more scales than one launch takes
        ([(7, 5, 9)], (300, 1000), 10.0),
    ],
)
def test_cuda_edge_shapes_match_cpu(shapes, out_size, sigma):
    teacher, student = random_features(2, shapes, seed=14)
    cpu_maps, cpu_scores = ops.anomaly_map(teacher, student, out_size, sigma)
    gpu_maps, gpu_scores = ops.anomaly_map([t.cuda() for t in teacher], [s.cuda() for s in student], out_size, sigma)
    assert max_error(gpu_maps, cpu_maps) <= FP32_TOL
    assert max_error(gpu_scores, cpu_scores) <= FP32_TOL
    ref_maps, _ = ops.anomaly_map_reference([t.cuda() for t in teacher], [s.cuda() for s in student], out_size, sigma)
    assert max_error(gpu_maps, ref_maps) <= FP32_TOL


# --- non-finite features and limits ---------------------------------------------------------------------------------
# A NaN or Inf anywhere in the features makes that image's score NaN (never a finite or -inf score, which
# calibration would clip to 0, i.e. "normal"); the other images of the batch are not affected.

# (shapes, out_size, where the bad value goes: (scale, channel, y, x)). The last case downsamples 12 -> 5 rows:
# rows 4, 7 and 10 of the feature map are never read by the bilinear step, so only an explicit check sees them.
NON_FINITE_CASES = [
    ([(8, 6, 6)], (12, 12), (0, 3, 2, 2)),
    ([(32, 16, 16), (64, 8, 8), (128, 4, 4)], (32, 32), (2, 100, 3, 0)),
    ([(8, 12, 12)], (5, 7), (0, 5, 4, 4)),
]


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("sigma", [0.0, 4.0])
@pytest.mark.parametrize("case", range(len(NON_FINITE_CASES)))
def test_non_finite_feature_makes_that_images_score_nan(fn, bad, sigma, case):
    shapes, out_size, (k, c, y, x) = NON_FINITE_CASES[case]
    teacher, student = random_features(3, shapes, seed=21)
    clean_maps, clean_scores = fn(teacher, student, out_size, sigma)
    poisoned = [t.clone() for t in teacher]
    poisoned[k][1, c, y, x] = bad
    maps, scores = fn(poisoned, student, out_size, sigma)
    assert torch.isnan(scores[1]), f"score {scores[1].item()} for an image with a {bad} feature"
    for b in (0, 2):  # the other images of the batch are scored as before
        assert torch.equal(scores[b], clean_scores[b]) and torch.equal(maps[b], clean_maps[b])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_non_finite_feature_in_half_precision_and_channels_last(dtype, channels_last):
    teacher, student = random_features(2, WRN50_SHAPES_SMALL, seed=22)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = [t.to(dtype).contiguous(memory_format=fmt) for t in teacher]
    student = [s.to(dtype).contiguous(memory_format=fmt) for s in student]
    student[0][0, 5, 7, 7] = float("nan")
    teacher[1][1, 9, 2, 3] = float("inf")
    for fn in (ops.anomaly_map, ops.anomaly_map_reference):
        _, scores = fn(teacher, student, (40, 40), 4.0)
        assert torch.isnan(scores).all(), (fn.__name__, scores)


def test_non_finite_features_give_nan_in_the_map_where_they_are_read():
    teacher, student = random_features(1, [(8, 8, 8)], seed=23)
    teacher[0][0, 2, 3, 3] = float("nan")
    for fn in (ops.anomaly_map, ops.anomaly_map_reference):
        maps, scores = fn(teacher, student, (8, 8), 0.0)  # no upsampling, no blur: the pixel and its neighbours
        nan = torch.isnan(maps[0, 0])
        outside = nan.clone()
        outside[2:5, 2:5] = False  # a zero-weight bilinear tap of a neighbour may read it too (0 * NaN = NaN)
        assert nan[3, 3] and not outside.any(), (fn.__name__, nan.nonzero().tolist())
        assert torch.isnan(scores[0])


@pytest.mark.parametrize("fn", [ops.anomaly_map, ops.anomaly_map_reference], ids=["native", "reference"])
def test_sigma_whose_blur_radius_overflows_is_a_clear_error(fn):
    t, s = _good()
    for sigma in (1e9, 1e300):  # radius 4e9 does not fit an int; 4e300 does not fit anything
        with pytest.raises(ValueError, match="blur radius"):
            fn(t, s, (8, 8), sigma)
    fn(t, s, (8, 8), 1000.0)  # a large but supported radius (4000 > the map) still works


def test_cpp_op_refuses_a_blur_radius_that_overflows():
    t, s = _good()
    with pytest.raises(RuntimeError, match="blur radius"):
        torch.ops.mrkd.anomaly_map(t, s, [8, 8], 1e9)
    with pytest.raises(RuntimeError, match="blur radius"):
        torch.ops.mrkd.anomaly_map(t, s, [8, 8], 1e300)


def test_reference_blur_is_plain_float32_arithmetic():
    """The reference blur must not go through conv2d: on CUDA, cuDNN runs fp32 convolutions in TF32 by default
    (about 1e-3 off), which would make the CUDA parity tests compare against a wrong reference."""
    import unittest.mock

    maps = torch.rand(2, 1, 20, 27, generator=torch.Generator().manual_seed(24))
    with unittest.mock.patch.object(F, "conv2d", side_effect=AssertionError("conv2d used")):
        blurred = ops.gaussian_blur_reference(maps, 4.0)
    expected = np.stack([gaussian_filter(m[0].double().numpy(), sigma=4.0, mode="reflect", truncate=4.0)
                         for m in maps])
    assert max_error(blurred[:, 0], expected) <= 1e-6


@requires_cuda
def test_cuda_matches_the_float32_reference_computed_on_cpu():
    """The reference on the CPU is plain fp32 (no TF32 anywhere): the first GPU run tests the kernel itself."""
    teacher, student = random_features(2, [(64, 32, 32), (128, 16, 16), (256, 8, 8)], seed=25)
    ref_maps, ref_scores = ops.anomaly_map_reference(teacher, student, (128, 128), 4.0)
    gpu_maps, gpu_scores = ops.anomaly_map([t.cuda() for t in teacher], [s.cuda() for s in student], (128, 128), 4.0)
    assert max_error(gpu_maps, ref_maps) <= FP32_TOL
    assert max_error(gpu_scores, ref_scores) <= FP32_TOL


@requires_cuda
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("sigma", [0.0, 4.0])
@pytest.mark.parametrize("case", range(len(NON_FINITE_CASES)))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_non_finite_feature_makes_that_images_score_nan(bad, sigma, case, channels_last):
    shapes, out_size, (k, c, y, x) = NON_FINITE_CASES[case]
    teacher, student = random_features(3, shapes, seed=26)
    teacher[k][1, c, y, x] = bad
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cpu_maps, cpu_scores = ops.anomaly_map(teacher, student, out_size, sigma)
    gpu_maps, gpu_scores = ops.anomaly_map([t.cuda().contiguous(memory_format=fmt) for t in teacher],
                                           [s.cuda().contiguous(memory_format=fmt) for s in student], out_size, sigma)
    assert torch.isnan(gpu_scores[1]) and torch.isnan(cpu_scores[1])
    for b in (0, 2):
        assert max_error(gpu_maps[b], cpu_maps[b]) <= FP32_TOL
        assert max_error(gpu_scores[b], cpu_scores[b]) <= FP32_TOL


@requires_cuda
def test_cuda_limits_are_clear_errors():
    t, s = [x.cuda() for x in _good()[0]], [x.cuda() for x in _good()[1]]
    with pytest.raises(RuntimeError, match="blur radius"):
        torch.ops.mrkd.anomaly_map(t, s, [8, 8], 1e9)
    # the vertical blur runs 64 output rows per block and a grid has at most 65535 blocks in y
    tall = 64 * 65535 + 1
    small_t = [torch.randn(1, 4, 2, 2, device="cuda")]
    small_s = [torch.randn(1, 4, 2, 2, device="cuda")]
    with pytest.raises(RuntimeError, match="out_size height 4194241 .* at most 4194240"):
        torch.ops.mrkd.anomaly_map(small_t, small_s, [tall, 1], 1.0)
    maps, scores = torch.ops.mrkd.anomaly_map(small_t, small_s, [tall - 1, 1], 1.0)  # the largest that fits
    assert maps.shape == (1, 1, tall - 1, 1) and torch.isfinite(scores).all()
