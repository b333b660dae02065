"""The PatchCore peer of benchmarks/patchcore.py against independent references on small data."""
import itertools
import math

import numpy as np
import pytest
import torch
from helpers import load_benchmark
from scipy.spatial.distance import cdist

pc = load_benchmark("patchcore")


def covering_radius(points: np.ndarray, centres) -> float:
    return float(cdist(points, points[list(centres)]).min(1).max())


def naive_greedy(points: np.ndarray, count: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < count:
        chosen.append(int(cdist(points, points[chosen]).min(1).argmax()))
    return chosen


def test_greedy_coreset_is_the_k_center_greedy_and_within_twice_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 0.3, size=(4, 2)) for c in ((0, 0), (6, 0), (0, 6), (9, 9))])
    for count in (2, 3, 4, 5):
        got = pc.greedy_coreset(torch.from_numpy(points).float(), count, first=1).tolist()
        assert got == naive_greedy(points, count, first=1)
        optimum = min(covering_radius(points, c) for c in itertools.combinations(range(len(points)), count))
        assert covering_radius(points, got) <= 2 * optimum + 1e-6
    # four well separated clusters: four centres cover each cluster, so the radius is a within-cluster one
    four = pc.greedy_coreset(torch.from_numpy(points).float(), 4, first=0).tolist()
    assert sorted(i // 4 for i in four) == [0, 1, 2, 3]


def test_greedy_coreset_refuses_a_size_outside_the_bank():
    with pytest.raises(ValueError, match="coreset size"):
        pc.greedy_coreset(torch.zeros(5, 2), 6)


def test_faiss_neighbour_distances_match_torch_cdist():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(300, 64)).astype(np.float32)
    queries = rng.normal(size=(50, 64)).astype(np.float32)
    distances, indices = pc.nearest_distances(pc.exact_index(bank), queries, k=3)
    reference = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(bank).double())
    want, want_idx = reference.topk(3, dim=1, largest=False)
    np.testing.assert_allclose(distances, want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(indices, want_idx.numpy())


def test_reweighted_image_score_matches_the_papers_formula_by_hand():
    bank = np.array([[0, 0], [1, 0], [0, 2], [5, 5]], dtype=np.float32)
    patches = np.array([[[0, 0.1], [3, 0], [0, 2]]], dtype=np.float32)  # one image, three patches
    index = pc.exact_index(bank)
    distances, nearest = pc.nearest_distances(index, patches[0])
    patch_scores, nearest = distances[:, 0][None], nearest[:, 0][None]
    # by hand: the worst patch is (3, 0) with s* = 2 to m* = (1, 0); the 3 bank entries nearest to m* are m* itself,
    # (0, 0) and (0, 2); from (3, 0) they lie at 2, 3 and sqrt(13)
    expected = (1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(13)))) * 2.0
    got = pc.reweighted_scores(patches, patch_scores, nearest, bank, index, num_neighbors=3)
    assert got.shape == (1,) and got[0] == pytest.approx(expected, rel=1e-5)


def test_patch_features_aggregate_each_3x3_neighbourhood_and_upsample_the_deeper_tap():
    torch.manual_seed(0)
    fine = torch.randn(1, 2, 4, 4)
    deep = torch.full((1, 3, 2, 2), 5.0)
    # pretrain_dim 1: each tap's zero-padded 3x3 neighbourhood (all channels) averaged to one number
    got = pc.patch_features([fine, deep], 3, pretrain_dim=1, target_dim=2)
    assert got.shape == (1, 16, 2)
    padded = torch.nn.functional.pad(fine, (1, 1, 1, 1))
    for y, x in itertools.product(range(4), range(4)):
        assert got[0, y * 4 + x, 0] == pytest.approx(float(padded[0, :, y : y + 3, x : x + 3].mean()), abs=1e-6)
    # every position of the 2x2 deep map sees 4 of its 9 neighbours inside the map: 5 * 4 / 9 everywhere
    torch.testing.assert_close(got[0, :, 1], torch.full((16,), 20.0 / 9.0))
    # with the full dimension the centre position's vector is its neighbourhood, channel by channel
    full = pc.patch_features([fine], 3, pretrain_dim=18, target_dim=18)
    torch.testing.assert_close(full[0, 1 * 4 + 2], fine[0, :, 0:3, 1:4].reshape(-1))


def test_expanded_taps_are_the_inner_192_and_576_channel_features_at_strides_8_and_16():
    from mrkd.model.backbones import create_backbone

    backbone = create_backbone("mobilenet_v2")
    x = torch.randn(1, 3, 64, 64)
    expanded = pc.tap_features(backbone, x, "expanded")
    assert [tuple(t.shape) for t in expanded] == [(1, 192, 8, 8), (1, 576, 4, 4)]
    assert min(float(t.min()) for t in expanded) >= 0  # post-ReLU6
    assert [tuple(t.shape) for t in pc.tap_features(backbone, x, "bottleneck")] == [(1, 32, 8, 8), (1, 96, 4, 4)]


def test_patchcore_finds_a_bright_square_on_a_flat_texture():
    from mrkd.runtime.weights import load_backbone

    torch.set_num_threads(1)
    rng = np.random.default_rng(2)

    def texture() -> torch.Tensor:
        return torch.from_numpy(rng.integers(100, 130, size=(3, 64, 64), dtype=np.uint8))

    config = pc.PatchCoreConfig(image_size=64, coreset_fraction=0.25, pretrain_dim=64, target_dim=64)
    model = pc.PatchCore(config, load_backbone("mobilenet_v2"))
    model.fit([texture() for _ in range(8)])
    assert model.bank.shape == (round(0.25 * 8 * 8 * 8), 64)
    defective = texture()
    defective[:, 36:48, 40:52] = 255
    scored = model.score(torch.stack([texture(), defective]))
    assert scored.image_scores[1] > 2 * scored.image_scores[0]
    assert 0 < scored.image_scores[1] < scored.max_scores[1]  # the reweighting only shrinks
    peak = np.unravel_index(scored.maps[1].argmax(), scored.maps[1].shape)
    assert 30 <= peak[0] <= 54 and 34 <= peak[1] <= 58
