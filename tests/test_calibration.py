import numpy as np
import pytest
import torch

from mrkd.runtime.calibration import Calibration


def test_threshold_maps_to_half_and_low_to_zero():
    scores = np.linspace(0.1, 0.3, 101)
    cal = Calibration.fit(scores, quantile=0.99)
    assert cal.threshold == pytest.approx(np.quantile(scores, 0.99))
    assert cal.low == pytest.approx(0.1)
    assert cal.normalize(np.array([cal.threshold]))[0] == pytest.approx(0.5)
    assert cal.normalize(np.array([0.1]))[0] == pytest.approx(0.0)
    assert cal.normalize(np.array([10.0]))[0] == 1.0  # clipped
    assert cal.normalize(np.array([-5.0]))[0] == 0.0


def test_numpy_and_torch_agree():
    cal = Calibration(threshold=0.4, low=0.1)
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(cal.normalize(torch.from_numpy(x.copy())).numpy(), cal.normalize(x), atol=1e-6)


def test_verdict_is_raw_score_above_threshold():
    cal = Calibration(threshold=0.4, low=0.1)
    np.testing.assert_array_equal(cal.is_anomalous(np.array([0.39, 0.41])), [False, True])


def test_degenerate_calibration_stays_finite():
    cal = Calibration.fit(np.array([0.2]))
    assert cal.threshold > cal.low
    assert np.isfinite(cal.normalize(np.array([0.3]))).all()


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="at least one"):
        Calibration.fit(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        Calibration.fit(np.array([0.1, np.nan]))


def test_dict_roundtrip():
    cal = Calibration(threshold=0.4, low=0.1)
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_non_finite_raw_score_is_anomalous_never_normal():
    """A NaN or infinite raw score (a bad feature value) must never pass as "normal"."""
    cal = Calibration(threshold=0.4, low=0.1)
    raw = np.array([np.nan, -np.inf, np.inf, 0.2, 0.5], np.float32)
    np.testing.assert_array_equal(cal.is_anomalous(raw), [True, True, True, False, True])
    np.testing.assert_array_equal(cal.is_anomalous(torch.from_numpy(raw)).numpy(), [True, True, True, False, True])
    # the normalised score does not hide it either: NaN stays NaN (not clipped to 0, which reads as "normal")
    assert np.isnan(cal.normalize(raw)[0]) and torch.isnan(cal.normalize(torch.from_numpy(raw))[0])
