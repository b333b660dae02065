"""The map whitening (issue 18): the heat map's taps moved by a square root of the inverse covariance of normal
student-teacher residuals before the cosine distance. Checked against numpy, on the fused op and its reference
(random and edge-case inputs), through training, resume, the Detector and checkpoints."""
import numpy as np
import pytest
import torch

from mrkd.ops import anomaly_map, anomaly_map_reference, local_average
from mrkd.runtime.checkpoint import load_checkpoint
from mrkd.runtime.errors import CheckpointError
from mrkd.runtime.whitening import RIDGE, MapWhitening, ResidualMoments

OPS = (anomaly_map, anomaly_map_reference)


def _features(seed: int, batch: int = 3, sizes=((4, 16), (6, 8), (8, 4)), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, c, s, s, generator=g).to(dtype) for c, s in sizes],
            [torch.randn(batch, c, s, s, generator=g).to(dtype) for c, s in sizes])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def _numpy_whitening(teachers: list[np.ndarray], students: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One tap: (mean, inverse of the ridged covariance) of the unit residuals over every position, in numpy."""
    residuals = [(_unit(t) - _unit(s)).transpose(0, 2, 3, 1).reshape(-1, t.shape[1])
                 for t, s in zip(teachers, students)]
    flat = np.concatenate(residuals).astype(np.float64)
    covariance = np.atleast_2d(np.cov(flat, rowvar=False))
    covariance += RIDGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return flat.mean(axis=0), np.linalg.inv(covariance)


def _whitening(seed: int, sizes=((4, 16), (6, 8), (8, 4))) -> MapWhitening:
    moments = ResidualMoments()
    teacher, student = _features(seed, batch=4, sizes=sizes)
    moments.add([t * 0.2 + s for t, s in zip(teacher, student)], student)  # residuals with structure
    return moments.whitening()


def test_the_fit_is_the_mean_and_ridged_inverse_covariance_of_the_residuals_over_batches():
    """Two batches fed one after the other give numpy's mean and inverse covariance of all their positions."""
    first, second = _features(1, batch=2), _features(2, batch=3)
    moments = ResidualMoments()
    for teacher, student in (first, second):
        moments.add([t + 0.5 * s for t, s in zip(teacher, student)], student)
    fitted = moments.whitening()
    for k in range(3):
        teachers = [(t[k] + 0.5 * s[k]).numpy() for t, s in (first, second)]
        mean, inverse = _numpy_whitening(teachers, [first[1][k].numpy(), second[1][k].numpy()])
        np.testing.assert_allclose(fitted.means[k].numpy(), mean, rtol=1e-5, atol=1e-6)
        matrix = fitted.matrices[k].double().numpy()
        np.testing.assert_allclose(matrix.T @ matrix, inverse, rtol=1e-4, atol=1e-4 * np.abs(inverse).max())


@pytest.mark.parametrize("features, message", [
    (([torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 2, 1, 1)]), "at least 2 feature positions"),
    (([torch.full((1, 2, 2, 2), float("nan"))], [torch.ones(1, 2, 2, 2)]), "NaN or infinity"),
    (([torch.ones(1, 2, 2, 2)], [torch.full((1, 2, 2, 2), float("inf"))]), "NaN or infinity"),
])
def test_the_fit_refuses_what_cannot_make_a_whitening(features, message):
    moments = ResidualMoments()
    with pytest.raises(ValueError, match=message):
        moments.add(*features)
        moments.whitening()


def test_the_whitened_map_is_the_cosine_distance_of_the_moved_features_in_numpy():
    """One tap, no upsampling and no blur: each map pixel is 1 - cos(W unit(t), W (unit(s) + mean))."""
    teacher, student = _features(3, sizes=((5, 7),))
    whitening = _whitening(4, sizes=((5, 7),))
    mean, matrix = whitening.means[0].double().numpy(), whitening.matrices[0].double().numpy()
    t = np.einsum("dc,bchw->bdhw", matrix, _unit(teacher[0].double().numpy()))
    s = np.einsum("dc,bchw->bdhw", matrix, _unit(student[0].double().numpy()) + mean[None, :, None, None])
    want = 1.0 - (t * s).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1))
    for op in OPS:
        maps, scores = op(teacher, student, (7, 7), 0.0, whitening=whitening.as_list())
        np.testing.assert_allclose(maps[:, 0].numpy(), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores.numpy(), want.reshape(3, -1).max(axis=1), rtol=1e-4, atol=1e-5)
    plain, _ = anomaly_map_reference(teacher, student, (7, 7), 0.0)
    assert not np.allclose(plain[:, 0].numpy(), want, atol=1e-2)


def test_a_direction_normal_residuals_always_take_no_longer_lights_the_map():
    """The student is always off along channel 0 on normal images: there, whitened, a normal-looking residual
    scores low and a defect (off along channel 1) scores high; unwhitened, both score alike."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(16, 4, 6, 6, generator=g)
    normal_student = base.clone()
    normal_student[:, 0] += 1.5 + 0.05 * torch.randn(16, 6, 6, generator=g)
    moments = ResidualMoments()
    moments.add([base], [normal_student])
    whitening = moments.whitening().as_list()
    test = torch.randn(2, 4, 6, 6, generator=g)
    student = test.clone()
    student[0, 0] += 1.5  # the usual normal error
    student[1, 1] += 1.5  # a new one
    plain, _ = anomaly_map_reference([test], [student], (6, 6), 0.0)
    whitened, _ = anomaly_map_reference([test], [student], (6, 6), 0.0, whitening=whitening)
    assert plain[1].mean() < 2 * plain[0].mean()
    assert whitened[1].mean() > 5 * whitened[0].mean()


@pytest.mark.parametrize("case", ["random", "odd sizes", "one channel", "batch 1", "half", "channels last"])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_the_fused_op_matches_the_reference_with_whitening(case, combine):
    sizes = {"odd sizes": ((3, 9), (5, 5), (7, 3)), "one channel": ((1, 8), (1, 4))}.get(case, ((4, 16), (6, 8),
                                                                                            (8, 4)))
    teacher, student = _features(6, batch=1 if case == "batch 1" else 3, sizes=sizes,
                                 dtype=torch.float16 if case == "half" else torch.float32)
    if case == "channels last":
        teacher = [t.contiguous(memory_format=torch.channels_last) for t in teacher]
    whitening = _whitening(7, sizes=sizes).as_list()
    out = (33, 27)
    want_maps, want_scores = anomaly_map_reference(teacher, student, out, 2.0, pool=3, combine=combine,
                                                   whitening=whitening)
    maps, scores = anomaly_map(teacher, student, out, 2.0, pool=3, combine=combine, whitening=whitening)
    torch.testing.assert_close(maps, want_maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["teacher", "student"])
def test_a_non_finite_feature_still_makes_the_score_nan(bad, where):
    teacher, student = _features(8)
    (teacher if where == "teacher" else student)[1][1, 2, 3, 5] = bad
    whitening = _whitening(9).as_list()
    for op in OPS:
        _, scores = op(teacher, student, (32, 24), 2.0, pool=3, combine="product", score_scales=(2,),
                       whitening=whitening)
        assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()


def test_the_score_taps_are_not_whitened():
    teacher, student = _features(10)
    whitening = _whitening(11).as_list()
    for op in OPS:
        plain_maps, plain_scores = op(teacher, student, (32, 24), 2.0, pool=3, score_scales=(2,), combine="product")
        maps, scores = op(teacher, student, (32, 24), 2.0, pool=3, score_scales=(2,), combine="product",
                          whitening=whitening)
        torch.testing.assert_close(scores, plain_scores)
        assert not torch.allclose(maps, plain_maps, atol=1e-3)
        # the same taps for map and score: the score still makes its own, unwhitened pass
        _, same_taps = op(teacher, student, (32, 24), 2.0, pool=3, score_scales=(0, 1, 2), whitening=whitening)
        _, unwhitened = op(teacher, student, (32, 24), 2.0, pool=3)
        torch.testing.assert_close(same_taps, unwhitened)


def test_a_whitening_that_does_not_fit_the_taps_is_refused_naming_it():
    teacher, student = _features(12)
    whitening = _whitening(13).as_list()
    for op in OPS:
        with pytest.raises(ValueError, match="whitening has 3 taps but the map reads 2"):
            op(teacher, student, (32, 24), 2.0, scales=(1, 2), whitening=whitening)
        with pytest.raises(ValueError, match="whitening of tap 0 is .* the tap has 6 channels"):
            op(teacher, student, (32, 24), 2.0, scales=(1, 2), whitening=whitening[:2])


def test_a_malformed_whitening_in_a_checkpoint_is_refused_and_a_missing_one_means_plain_cosine():
    good = {"means": [torch.zeros(3)], "matrices": [torch.eye(3)]}
    assert MapWhitening.from_payload({}) is None and MapWhitening.from_payload({"map_whitening": None}) is None
    assert torch.equal(MapWhitening.from_payload({"map_whitening": good}, n_taps=1).matrices[0], torch.eye(3))
    for bad, taps in (({"means": [torch.zeros(3)], "matrices": [torch.eye(4)]}, 1),
                      ({"means": [torch.zeros(3)], "matrices": [torch.full((3, 3), float("nan"))]}, 1),
                      ({"means": [torch.full((3,), float("inf"))], "matrices": [torch.eye(3)]}, 1),
                      ({"means": [], "matrices": []}, None), ({"means": [torch.zeros(3)]}, 1),
                      (good, 3), ([torch.zeros(3), torch.eye(3)], 1)):
        with pytest.raises(CheckpointError, match="map whitening is malformed"):
            MapWhitening.from_payload({"map_whitening": bad}, n_taps=taps)


def test_the_detector_whitens_its_heat_map_with_what_training_fitted(tiny_checkpoint):
    """The tiny run's checkpoint holds a whitening fitted on its training images; the Detector's heat map is the
    reference map with it, its score the unwhitened one."""
    from mrkd.runtime.detector import Detector

    payload = load_checkpoint(tiny_checkpoint)
    stored = payload["map_whitening"]
    assert len(stored["means"]) == len(payload["model_config"]["map_scales"])
    detector = Detector.load(tiny_checkpoint, precision="fp32")
    size = detector.image_size
    batch = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    maps, scores = detector.raw_maps(batch)
    teacher, student = detector._features(batch)
    options = detector.config.map_options()
    want_maps, _ = anomaly_map_reference(teacher, student, (size, size), options["sigma"], options["scales"],
                                         options["pool"], combine=options["combine"],
                                         whitening=list(zip(stored["means"], stored["matrices"])))
    torch.testing.assert_close(maps, want_maps[:, 0], rtol=1e-4, atol=1e-5)
    plain = Detector.from_payload({**payload, "map_whitening": None}, precision="fp32")
    plain_maps, plain_scores = plain.raw_maps(batch)
    torch.testing.assert_close(scores, plain_scores)
    assert not torch.allclose(maps, plain_maps, atol=1e-3)


def test_the_whitening_can_be_switched_on_a_trained_run_without_training(tmp_path):
    """--map-whitening off writes none; resuming the finished run with it on fits one on the same training images'
    heat-map taps (numpy), every weight bit for bit."""
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.reference import reference_indices
    from mrkd.runtime.training import train

    options = dict(data="elpv:mono", out=str(tmp_path), image_size=64, batch_size=4, max_train_images=6,
                   save_every=0, steps=3, seed=5)
    off = load_checkpoint(train(TrainConfig(**options, map_whitening=False), show_progress=False))
    assert off["map_whitening"] is None and off["score_reference"] is not None
    on = load_checkpoint(train(TrainConfig(**options, resume=True), show_progress=False))
    assert on["step"] == off["step"] == 3
    for key, value in off["state_dict"].items():
        assert torch.equal(value, on["state_dict"][key]), key
    for key in ("mean", "scale"):
        torch.testing.assert_close(on["score_reference"][key], off["score_reference"][key])

    from mrkd.core.preprocess import prepare_image
    from mrkd.data import open_dataset

    detector = Detector.from_payload(off, precision="fp32")
    records = open_dataset("elpv:mono", seed=5).train[:6]
    chosen = [records[int(i)] for i in reference_indices(len(records), 5)]
    batch = torch.stack([prepare_image(r.load_image(), 64) for r in chosen])
    teacher, student = detector._features(batch)
    pool, taps = detector.config.feature_pool, detector.config.map_scales
    for k, tap in enumerate(taps):
        t, s = local_average([teacher[tap]], pool)[0], local_average([student[tap]], pool)[0]
        mean, inverse = _numpy_whitening([t.double().numpy()], [s.double().numpy()])
        np.testing.assert_allclose(on["map_whitening"]["means"][k].numpy(), mean, rtol=1e-4, atol=1e-5)
        matrix = on["map_whitening"]["matrices"][k].double().numpy()
        np.testing.assert_allclose(matrix.T @ matrix, inverse, rtol=1e-3, atol=1e-3 * np.abs(inverse).max())
