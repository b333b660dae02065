"""How the product turns features into a map (issue 18): a k x k average of teacher and student features before
the distance, and the taps summed."""
import numpy as np
import pytest
import torch

from mrkd.core.config import (
    DEFAULT_FEATURE_POOL,
    DEFAULT_MAP_SCALES,
    DEFAULT_SCORE_SCALES,
    ModelConfig,
    TrainConfig,
)
from mrkd.core.errors import OptionError
from mrkd.ops import anomaly_map_reference, local_average


def neighbourhood_mean_by_loops(x: np.ndarray, k: int) -> np.ndarray:
    """[B, C, H, W]: the mean of the pixels of each k x k window that lie inside the map (written out)."""
    out = np.empty_like(x, dtype=np.float64)
    r = k // 2
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            window = x[..., max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[..., i, j] = window.mean(axis=(-2, -1))
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 2, 9), (3, 1, 8, 8)])
@pytest.mark.parametrize("pool", [1, 3, 5])
def test_local_average_is_the_mean_over_the_window_inside_the_map(shape, pool):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + pool))
    (got,) = local_average([x], pool)
    np.testing.assert_allclose(got.numpy(), neighbourhood_mean_by_loops(x.numpy(), pool), rtol=1e-5, atol=1e-6)


def test_local_average_keeps_non_finite_values_non_finite():
    x = torch.zeros(1, 2, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    (got,) = local_average([x], 3)
    assert torch.isnan(got[0, 1, 1:4, 2:5]).all() and torch.isfinite(got[0, 1, 4:, :2]).all()
    assert torch.isinf(got[0, 0, :2, :2]).all()
    _, scores = anomaly_map_reference(local_average([x], 3), local_average([torch.ones_like(x)], 3), (12, 12), 1.0)
    assert torch.isnan(scores).all()  # never a finite, "normal" score


def test_local_average_in_half_precision_follows_float32():
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(3))
    (want,) = local_average([x], 3)
    for dtype in (torch.float16, torch.bfloat16):
        (got,) = local_average([x.to(dtype)], 3)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("pool", [3, 5])
def test_local_average_matches_torch_avg_pool2d_on_any_layout_and_non_finite_values(layout, pool):
    """Shifted sums, not torch's pooling: the same numbers as F.avg_pool2d(count_include_pad=False), NaN and Inf
    where it has them, maps smaller than the window included."""
    g = torch.Generator().manual_seed(pool)
    for shape in [(2, 3, 7, 5), (1, 1, 1, 1), (1, 2, 2, 3), (2, 4, 16, 16)]:
        x = torch.randn(*shape, generator=g)
        flat = x.view(-1)
        flat[0], flat[flat.numel() // 2], flat[-1] = float("nan"), float("inf"), -float("inf")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.cat([x, x], dim=-1)[..., ::2]
        want = torch.nn.functional.avg_pool2d(x, pool, stride=1, padding=pool // 2, count_include_pad=False)
        before = x.clone()
        (got,) = local_average([x], pool)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)  # the features are not modified


@pytest.mark.parametrize("pool", [0, 2, -3])
def test_a_pool_that_is_not_an_odd_size_is_refused(pool):
    with pytest.raises(ValueError, match="odd size"):
        local_average([torch.zeros(1, 1, 4, 4)], pool)


def test_new_models_pool_map_every_tap_score_the_stride_16_tap_and_older_checkpoints_keep_their_map():
    new = TrainConfig().model_config()
    assert new.feature_pool == DEFAULT_FEATURE_POOL == 3
    assert new.map_scales == DEFAULT_MAP_SCALES == (0, 1, 2) and new.score_scales == DEFAULT_SCORE_SCALES == (2,)
    assert TrainConfig(feature_pool=1, map_scales=[2, 0]).model_config().map_scales == (0, 2)
    old = ModelConfig().to_dict()
    del old["feature_pool"], old["map_scales"], old["score_scales"]
    restored = ModelConfig.from_dict(old)  # the paper's map: no mean, all taps, the score is the map's max
    assert restored.feature_pool == 1 and restored.map_scales == restored.score_scales == (0, 1, 2)
    first_issue_18 = ModelConfig().to_dict()  # written with --map-scales but before --score-scales
    first_issue_18["map_scales"] = [1, 2]
    del first_issue_18["score_scales"]
    assert ModelConfig.from_dict(first_issue_18).score_scales == (1, 2)
    saved = ModelConfig(feature_pool=5, map_scales=(0, 2), score_scales=(1,)).to_dict()
    restored = ModelConfig.from_dict(saved)
    assert restored.feature_pool == 5 and restored.map_scales == (0, 2) and restored.score_scales == (1,)


BAD_MAP_SETTINGS = [({"feature_pool": 4}, "feature_pool"), ({"feature_pool": 0}, "feature_pool"),
                    ({"map_scales": ()}, "map_scales"), ({"map_scales": (1, 1)}, "map_scales"),
                    ({"map_scales": (3,)}, "map_scales"), ({"map_scales": (-1,)}, "map_scales"),
                    ({"score_scales": ()}, "score_scales"), ({"score_scales": (2, 2)}, "score_scales"),
                    ({"score_scales": (4,)}, "score_scales")]


@pytest.mark.parametrize("options, named", BAD_MAP_SETTINGS)
def test_a_map_setting_that_cannot_work_is_refused_naming_it(options, named):
    with pytest.raises(OptionError, match=named) as caught:
        ModelConfig(**options)
    assert caught.value.parameters == (named,)


def test_the_detector_maps_every_pooled_tap_and_scores_the_pooled_stride_16_tap(tiny_checkpoint):
    from mrkd.core.preprocess import normalize
    from mrkd.runtime.detector import Detector

    detector = Detector.load(tiny_checkpoint, precision="fp32")
    assert detector.config.map_scales == (0, 1, 2) and detector.config.score_scales == (2,)
    assert detector.config.map_combine == "product"  # the heat map's taps multiplied (tests/test_map_combine.py)
    batch = torch.randint(0, 256, (2, 3, detector.image_size, detector.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    maps, scores = detector.raw_maps(batch)
    teacher, student = detector.network(normalize(batch))
    pooled = [[torch.from_numpy(neighbourhood_mean_by_loops(f.numpy(), 3)).float() for f in fs]
              for fs in (teacher, student)]
    size, sigma = (detector.image_size, detector.image_size), detector.config.blur_sigma
    # the heat map's taps are whitened before their distances (tests/test_map_whitening.py)
    want_maps, heat_max = anomaly_map_reference(*pooled, size, sigma, combine="product",
                                                whitening=detector.map_whitening.as_list())
    score_maps, _ = anomaly_map_reference(pooled[0][2:], pooled[1][2:], size, sigma)
    reference = detector.score_reference  # the score is standardised by it (tests/test_score_reference.py)
    want_scores = ((score_maps[:, 0] - reference.mean) / reference.scale).flatten(1).amax(dim=1)
    torch.testing.assert_close(maps, want_maps[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-5)
    standardised_heat = ((want_maps[:, 0] - reference.mean) / reference.scale).flatten(1).amax(dim=1)
    assert not torch.allclose(standardised_heat, scores, rtol=1e-3)  # the score is not read from the heat map
    unpooled, _ = anomaly_map_reference(teacher, student, size, sigma, combine="product")
    assert not torch.allclose(maps, unpooled[:, 0], atol=1e-4)


def _features(seed: int, batch: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = ((4, 16), (6, 8), (8, 4))
    return ([torch.randn(batch, c, s, s, generator=g) for c, s in sizes],
            [torch.randn(batch, c, s, s, generator=g) for c, s in sizes])


@pytest.mark.parametrize("map_scales, score_scales", [((0, 1, 2), (2,)), ((1, 2), (0,)), ((0, 2), (1, 2)),
                                                      ((0, 1, 2), (0, 1, 2))])
@pytest.mark.parametrize("pool", [1, 3])
def test_the_score_reads_its_own_taps_and_the_map_its_own(map_scales, score_scales, pool):
    """Fused op and reference against maps made from the hand-pooled taps alone."""
    from mrkd.ops import anomaly_map

    teacher, student = _features(8)
    by_hand = [[torch.from_numpy(neighbourhood_mean_by_loops(f.numpy(), pool)).float() for f in fs]
               for fs in (teacher, student)]

    def only(taps):
        return [[fs[i] for i in taps] for fs in by_hand]

    want_maps, _ = anomaly_map_reference(*only(map_scales), (32, 32), 2.0)
    score_maps, _ = anomaly_map_reference(*only(score_scales), (32, 32), 2.0)
    want_scores = score_maps.flatten(1).amax(dim=1)
    for op in (anomaly_map, anomaly_map_reference):
        maps, scores = op(teacher, student, (32, 32), 2.0, scales=map_scales, pool=pool, score_scales=score_scales)
        torch.testing.assert_close(maps, want_maps, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("broken_tap", [0, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_in_any_tap_makes_a_split_score_nan(broken_tap, bad):
    """Tap 0 only in the map, tap 1 in neither, tap 2 only in the score: the broken image never scores normal."""
    from mrkd.ops import anomaly_map

    teacher, student = _features(9)
    teacher[broken_tap][1, 0, 1, 1] = bad
    for op in (anomaly_map, anomaly_map_reference):
        _, scores = op(teacher, student, (32, 32), 2.0, scales=(0,), pool=3, score_scales=(2,))
        assert torch.isfinite(scores[0]) and torch.isnan(scores[1])


def test_the_fused_op_and_the_reference_pick_and_pool_the_same_features():
    from mrkd.ops import anomaly_map

    g = torch.Generator().manual_seed(5)
    teacher = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 16), (6, 8), (8, 4))]
    student = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 16), (6, 8), (8, 4))]
    by_hand = [[torch.from_numpy(neighbourhood_mean_by_loops(f[i].numpy(), 3)).float() for i in (0, 2)]
               for f in (teacher, student)]
    want_maps, want_scores = anomaly_map_reference(*by_hand, (32, 32), 2.0)
    for op in (anomaly_map, anomaly_map_reference):
        maps, scores = op(teacher, student, (32, 32), 2.0, scales=(0, 2), pool=3)
        torch.testing.assert_close(maps, want_maps, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scales must be indices of the 3 feature maps"):
        anomaly_map(teacher, student, (32, 32), 2.0, scales=(1, 3))
    with pytest.raises(ValueError, match="scales must be indices of the 3 feature maps"):
        anomaly_map(teacher, student, (32, 32), 2.0, scales=(0, 1), pool=3, score_scales=(3,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_in_a_tap_the_map_leaves_out_still_makes_the_score_nan(bad):
    """A broken network never scores as normal because its broken part is not read (only image 1 is broken)."""
    from mrkd.ops import anomaly_map

    g = torch.Generator().manual_seed(6)
    teacher = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 16), (6, 8), (8, 4))]
    student = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 16), (6, 8), (8, 4))]
    student[0][1, 2, 3, 4] = bad
    for op in (anomaly_map, anomaly_map_reference):
        maps, scores = op(teacher, student, (32, 32), 2.0, scales=(1, 2), pool=3)
        assert torch.isfinite(scores[0]) and torch.isnan(scores[1])
        assert torch.isfinite(maps).all()  # the map itself never read the bad tap
