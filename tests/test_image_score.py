"""The top-k image score of benchmarks/image_score.py against hand-computed values."""

import numpy as np
import pytest
from helpers import load_benchmark

image_score = load_benchmark("image_score")


def test_top_k_mean_averages_the_k_largest_pixels_of_each_map():
    maps = np.array([[[1.0, 9.0], [3.0, 7.0]], [[4.0, 4.0], [0.0, 2.0]]])
    np.testing.assert_allclose(image_score.top_k_mean(maps, 1), [9.0, 4.0])
    np.testing.assert_allclose(image_score.top_k_mean(maps, 2), [8.0, 4.0])
    np.testing.assert_allclose(image_score.top_k_mean(maps, 3), [19.0 / 3.0, 10.0 / 3.0])
    np.testing.assert_allclose(image_score.top_k_mean(maps, 4), [5.0, 2.5])
    with pytest.raises(ValueError, match="k must be"):
        image_score.top_k_mean(maps, 5)


def test_scale_sets_are_parsed_as_sorted_unique_indices():
    assert image_score.parse_scales("0+1+2,2+1,2,1+1") == [(0, 1, 2), (1, 2), (2,), (1,)]


def test_the_all_scales_variant_gives_the_product_detectors_maps(tiny_checkpoint):
    """The diagnostic's maps (reference op on cached features) are the ones the product scores with (fused op)."""
    import torch

    from mrkd.core.preprocess import prepare_image
    from mrkd.data import open_dataset
    from mrkd.runtime.detector import Detector

    torch.manual_seed(0)
    detector = Detector.load(tiny_checkpoint, precision="fp32")
    records = open_dataset("elpv:mono", seed=111).test[:5]
    teachers, students = image_score.test_features(detector, records, batch_size=2)
    assert len(teachers) == 3 and len(teachers[0]) == 3  # batches of 2, 2, 1; three taps
    sigma, pool = detector.config.blur_sigma, detector.config.feature_pool
    scales = detector.config.map_scales
    whitening = detector.map_whitening.as_list()  # the product whitens its heat map's taps
    ours = image_score.variant_maps(teachers, students, scales, detector.image_size, sigma, pool,
                                    detector.config.map_combine, whitening)
    batch = torch.stack([prepare_image(r.load_image(), detector.image_size) for r in records])
    product = detector.predict_prepared(batch)
    np.testing.assert_allclose(ours, product.maps, rtol=1e-4, atol=1e-5)
    score_maps = image_score.variant_maps(teachers, students, detector.config.score_scales, detector.image_size,
                                          sigma, pool)
    reference = detector.score_reference  # the product standardises the score map before its max
    standardised = (score_maps - reference.mean.numpy()) / reference.scale.numpy()
    np.testing.assert_allclose(image_score.top_k_mean(standardised, 1), product.scores, rtol=1e-4, atol=1e-5)
    summed = image_score.variant_maps(teachers, students, scales, detector.image_size, sigma, pool)
    fewer = image_score.variant_maps(teachers, students, scales[1:], detector.image_size, sigma, pool)
    assert (fewer <= summed + 1e-6).all() and not np.allclose(fewer, summed)  # a dropped scale removes its distance
    assert not np.allclose(summed, ours)  # the product's heat map is another map
    unwhitened = image_score.variant_maps(teachers, students, scales, detector.image_size, sigma, pool,
                                          detector.config.map_combine)
    assert not np.allclose(unwhitened, ours, atol=1e-3)
