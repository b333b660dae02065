"""ILM (image-level cut-and-paste) and FLM (feature-level mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mrkd.model.masking import (
    DEFAULT_ILM,
    ILM_SETTINGS,
    ILMConfig,
    flm_mask,
    ilm_config_for,
    ilm_corrupt,
    object_mask,
)


def textured_gray(size: int, seed: int = 0) -> np.ndarray:
    """Mid-gray noise: every pixel is 'object' for both MVTec backgrounds ((200, 60) and (20, 20))."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, 156, size=(size, size, 3), dtype=np.uint8)


def test_table_has_the_fifteen_mvtec_categories_with_the_reference_rows():
    assert sorted(ILM_SETTINGS) == sorted([
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
        "toothbrush", "transistor", "wood", "zipper"])
    assert ILM_SETTINGS["metal_nut"] == ILMConfig((0.01, 0.05), (0.01, 0.01), 1, (20, 20), 0.5)
    assert ILM_SETTINGS["hazelnut"] == ILMConfig((0.03, 0.35), (0.03, 0.35), 3, (20, 20), 0.7)
    assert ILM_SETTINGS["toothbrush"].min_object == 0.25 and ILM_SETTINGS["toothbrush"].h_range == (0.01, 0.01)
    assert ILM_SETTINGS["screw"].background == (200, 60) and ILM_SETTINGS["grid"].background is None
    assert ILM_SETTINGS["zipper"].w_range == (0.01, 0.01) and ILM_SETTINGS["cable"].w_range == (0.01, 0.1)
    assert all(cfg.min_overlap == 0.25 for cfg in ILM_SETTINGS.values())


def test_config_lookup():
    assert ilm_config_for("Screw") is ILM_SETTINGS["screw"]
    assert ilm_config_for("metal-nut") is ILM_SETTINGS["metal_nut"]
    assert ilm_config_for("mono") is DEFAULT_ILM
    assert ilm_config_for(None) is DEFAULT_ILM
    assert DEFAULT_ILM == ILM_SETTINGS["carpet"]
    with pytest.raises(ValueError, match="h_range"):
        ILMConfig((0.2, 0.1), (0.1, 0.2), 1)


@pytest.mark.parametrize("category", ["carpet", "screw", "wood", "toothbrush", "cable", "metal_nut"])
def test_patch_sizes_respect_category_bounds(category):
    cfg = ILM_SETTINGS[category]
    size = 256
    image = textured_gray(size)
    rng = np.random.default_rng(1)
    seen = []
    for _ in range(60):
        _, patches = ilm_corrupt(image, cfg, rng)
        assert 1 <= len(patches) <= cfg.max_patches
        for patch in patches:
            assert round(cfg.h_range[0] * size) <= patch.half_height <= round(cfg.h_range[1] * size)
            assert round(cfg.w_range[0] * size) <= patch.half_width <= round(cfg.w_range[1] * size)
            assert (patch.source.height, patch.source.width) == (2 * patch.half_height, 2 * patch.half_width)
            assert (patch.dest.height, patch.dest.width) == (patch.source.height, patch.source.width)
            for box in (patch.source, patch.dest):
                assert box.top >= 0 and box.left >= 0
                assert box.top + box.height <= size and box.left + box.width <= size
            seen.append(patch.half_width)
    largest = round(cfg.w_range[1] * size)
    if cfg.w_range[1] < 0.1:
        # 0.03 + Gamma(2, 0.05) exceeds such small bounds most of the time: most patches sit at the upper bound
        assert np.mean(np.array(seen) == largest) > 0.8
    else:
        assert len(set(seen)) > 3  # sizes vary within the bounds


def test_half_width_and_patch_count_distributions():
    size = 200
    image = textured_gray(size)
    rng = np.random.default_rng(7)
    halves, counts = [], []
    for _ in range(1500):
        _, patches = ilm_corrupt(image, DEFAULT_ILM, rng)
        counts.append(len(patches))
        halves += [p.half_height / size for p in patches] + [p.half_width / size for p in patches]
    # 0.03 + Gamma(2, 0.05): mean 0.13; clipping at 0.4 removes < 1% of the mass; int() floors by < 0.5 px.
    assert abs(np.mean(halves) - 0.13) < 0.008
    assert abs(np.std(halves) - np.sqrt(2) * 0.05) < 0.01
    assert min(halves) >= 0.03 - 1e-9 and max(halves) <= 0.4 + 1e-9
    # first patch always, each of the 3 further ones independently with probability 0.5: 1 + Binomial(3, 0.5)
    counts = np.array(counts)
    assert abs(counts.mean() - 2.5) < 0.1
    for k, p in zip(range(1, 5), (1 / 8, 3 / 8, 3 / 8, 1 / 8)):
        assert abs((counts == k).mean() - p) < 0.04


def test_clipping_to_tiny_bounds():
    cfg = ILM_SETTINGS["toothbrush"]  # 0.01-0.01 on both axes
    _, patches = ilm_corrupt(textured_gray(300), cfg, np.random.default_rng(0))
    assert [(p.half_height, p.half_width) for p in patches] == [(3, 3)]


def test_hard_replacement_copies_source_pixels_exactly():
    image = textured_gray(128, seed=3)
    cfg = ILMConfig((0.05, 0.2), (0.05, 0.2), 1)
    for seed in range(10):
        corrupted, (patch,) = ilm_corrupt(image, cfg, np.random.default_rng(seed))
        np.testing.assert_array_equal(corrupted[patch.dest.slices()], image[patch.source.slices()])
        outside = np.ones(image.shape[:2], dtype=bool)
        outside[patch.dest.slices()] = False
        np.testing.assert_array_equal(corrupted[outside], image[outside])
    assert image.min() >= 100  # the input was not modified in place (textured_gray range)


def test_tensor_input_and_determinism():
    image = torch.from_numpy(textured_gray(96, seed=5)).permute(2, 0, 1).contiguous()
    out1, patches1 = ilm_corrupt(image, DEFAULT_ILM, np.random.default_rng(42))
    out2, patches2 = ilm_corrupt(image, DEFAULT_ILM, np.random.default_rng(42))
    assert isinstance(out1, torch.Tensor) and out1.shape == (3, 96, 96) and out1.dtype == torch.uint8
    assert torch.equal(out1, out2) and patches1 == patches2
    assert not torch.equal(out1, image)
    out3, _ = ilm_corrupt(image, DEFAULT_ILM, np.random.default_rng(43))
    assert not torch.equal(out1, out3)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        ilm_corrupt(np.zeros((32, 32, 3), dtype=np.float32), DEFAULT_ILM, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        ilm_corrupt(torch.zeros(32, 32, 3, dtype=torch.uint8), DEFAULT_ILM, np.random.default_rng(0))


def bright_disk(size: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[disk] = 230
    image[..., 1] += (xx % 7 * 3).astype(np.uint8)  # some texture, so pastes are visible
    return image


def test_object_categories_keep_patches_on_the_object():
    image = bright_disk(128, 40)
    objects = object_mask(image, (20, 20))
    assert 0.3 < objects.mean() < 0.35  # pi * 40^2 / 128^2 = 0.307
    cfg = ILMConfig((0.03, 0.1), (0.03, 0.1), 3, background=(20, 20), min_object=0.7)
    rng = np.random.default_rng(0)
    n_patches = 0
    for _ in range(40):
        _, patches = ilm_corrupt(image, cfg, rng)
        for patch in patches:
            assert objects[patch.source.slices()].mean() >= 0.7
            assert objects[patch.dest.slices()].mean() >= 0.25
        n_patches += len(patches)
    assert n_patches >= 40


def test_impossible_placement_returns_the_clean_image():
    image = np.full((64, 64, 3), 5, dtype=np.uint8)  # all background for background (20, 20)
    corrupted, patches = ilm_corrupt(image, ILM_SETTINGS["hazelnut"], np.random.default_rng(0))
    assert patches == []
    np.testing.assert_array_equal(corrupted, image)


def test_flm_mask_drops_exact_ratio_independently_per_sample():
    gen = torch.Generator().manual_seed(0)
    keep = flm_mask(6, 16, 20, 0.2, generator=gen)
    assert keep.shape == (6, 1, 16, 20) and keep.dtype == torch.bool
    dropped = (~keep).flatten(1).sum(1)
    assert dropped.tolist() == [round(0.2 * 16 * 20)] * 6
    patterns = {tuple(m.flatten().tolist()) for m in keep}
    assert len(patterns) == 6  # independent per sample
    again = flm_mask(6, 16, 20, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    # every position is dropped with probability ~0.2 over many draws (uniform, no positional bias)
    many = flm_mask(2000, 4, 4, 0.25, generator=gen)
    frequency = (~many).float().mean(0)
    assert torch.all((frequency - 0.25).abs() < 0.05)


def test_flm_mask_edge_cases():
    assert flm_mask(3, 1, 1, 0.2).all()  # a 1x1 map is never wiped out
    assert flm_mask(2, 8, 8, 0.0).all()
    with pytest.raises(ValueError, match="ratio"):
        flm_mask(2, 8, 8, 1.0)
