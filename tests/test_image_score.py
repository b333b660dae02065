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
