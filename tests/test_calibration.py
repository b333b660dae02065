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


def test_heat_maps_get_their_own_mapping_fitted_on_the_normal_maps_maxima():
    scores = np.linspace(0.1, 0.3, 101)
    maxima = np.linspace(1.0, 3.0, 101)  # the heat map reads other taps: another range than the scores
    cal = Calibration.fit(scores, quantile=0.99, normal_map_maxima=maxima)
    assert cal.threshold == pytest.approx(0.298) and cal.low == pytest.approx(0.1)
    assert cal.map_threshold == pytest.approx(2.98) and cal.map_low == pytest.approx(1.0)
    np.testing.assert_allclose(cal.normalize_map(np.array([1.0, 2.98, 4.96, 9.0])), [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(cal.normalize(np.array([0.298])), [0.5], atol=1e-6)
    heat = torch.tensor([[1.99, float("nan")]])
    normalized = cal.normalize_map(heat)
    assert normalized[0, 0] == pytest.approx(0.25, abs=1e-5) and torch.isnan(normalized[0, 1])
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(ValueError, match="heat map maxima contain NaN"):
        Calibration.fit(scores, normal_map_maxima=np.array([1.0, np.inf]))


def test_a_calibration_from_before_the_map_mapping_normalises_maps_like_scores():
    old = Calibration.from_dict({"threshold": 0.4, "low": 0.1})
    assert old.map_threshold is None
    x = np.array([0.1, 0.25, 0.4, 0.7, 0.9], np.float32)
    np.testing.assert_array_equal(old.normalize_map(x), old.normalize(x))


def test_training_calibrates_scores_on_the_score_taps_and_heat_maps_on_the_map_taps(tiny_checkpoint):
    """calibrate() against the reference op run on the network's features of the same normal images."""
    from mrkd.core.config import TrainConfig
    from mrkd.core.preprocess import normalize
    from mrkd.model.network import MRKDModel
    from mrkd.ops import anomaly_map_reference
    from mrkd.runtime.checkpoint import load_checkpoint
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.training import calibrate

    detector = Detector.load(tiny_checkpoint, precision="fp32")
    config = detector.config
    assert config.map_scales != config.score_scales
    images = torch.randint(0, 256, (7, 3, config.image_size, config.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(image_size=config.image_size, batch_size=3, map_scales=config.map_scales,
                      score_scales=config.score_scales, feature_pool=config.feature_pool,
                      map_combine=config.map_combine)
    payload = load_checkpoint(tiny_checkpoint)
    model = MRKDModel.from_config(config)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    fitted = calibrate(model, cfg, images, torch.device("cpu"))
    with torch.no_grad():
        teacher, student = model(normalize(images))
    size = (config.image_size, config.image_size)
    heat, _ = anomaly_map_reference(teacher, student, size, config.blur_sigma, config.map_scales, config.feature_pool,
                                    combine=config.map_combine)
    _, scores = anomaly_map_reference(teacher, student, size, config.blur_sigma, config.score_scales,
                                      config.feature_pool)
    maxima = heat.flatten(1).amax(dim=1).numpy()
    assert fitted.threshold == pytest.approx(float(np.quantile(scores.numpy(), 0.99)), rel=1e-4)
    assert fitted.map_threshold == pytest.approx(float(np.quantile(maxima, 0.99)), rel=1e-4)
    assert fitted.map_low == pytest.approx(float(maxima.min()), rel=1e-4)
    assert not fitted.map_threshold == pytest.approx(fitted.threshold, rel=1e-2)
    whitening = Detector.load(tiny_checkpoint).map_whitening  # with it, the heat map's threshold is the whitened one
    whitened = calibrate(model, cfg, images, torch.device("cpu"), map_whitening=whitening)
    heat, _ = anomaly_map_reference(teacher, student, size, config.blur_sigma, config.map_scales, config.feature_pool,
                                    combine=config.map_combine, whitening=whitening.as_list())
    assert whitened.map_threshold == pytest.approx(float(np.quantile(heat.flatten(1).amax(dim=1).numpy(), 0.99)),
                                                   rel=1e-4)
    assert whitened.threshold == fitted.threshold and whitened.map_threshold != fitted.map_threshold
    saved = Detector.load(tiny_checkpoint).calibration  # what the training run wrote has both mappings
    assert saved.map_threshold is not None and saved.map_low is not None
