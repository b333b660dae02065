"""The score reference (issue 18): the image score is the max of the score map standardised per pixel by the mean and
spread of normal training images' maps. Checked against numpy, on the fused op and its reference, through training,
resume and the Detector."""
import numpy as np
import pytest
import torch

from mrkd.ops import anomaly_map, anomaly_map_reference
from mrkd.runtime.checkpoint import load_checkpoint
from mrkd.runtime.errors import CheckpointError
from mrkd.runtime.reference import SCALE_FLOOR, ScoreReference

OPS = (anomaly_map, anomaly_map_reference)


def _features(seed: int, batch: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = ((4, 16), (6, 8), (8, 4))
    return ([torch.randn(batch, c, s, s, generator=g) for c, s in sizes],
            [torch.randn(batch, c, s, s, generator=g) for c, s in sizes])


def _reference(seed: int, size: tuple[int, int] = (32, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, generator=g), torch.rand(size, generator=g) + 0.1


def test_fit_is_the_per_pixel_mean_and_floored_standard_deviation():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(9, 5, 7)).astype(np.float32) * np.linspace(0.01, 2.0, 35).reshape(5, 7)
    maps[:, 0, 0] = 3.0  # a pixel that never varies: its scale is the floor, not 0
    fitted = ScoreReference.fit(torch.from_numpy(maps))
    std = maps.astype(np.float64).std(axis=0)
    floor = SCALE_FLOOR * std.mean()
    np.testing.assert_allclose(fitted.mean.numpy(), maps.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.scale.numpy(), np.maximum(std, floor), rtol=1e-5, atol=1e-7)
    assert fitted.scale[0, 0] == pytest.approx(floor, rel=1e-5) and (std < floor).sum() > 1


@pytest.mark.parametrize("maps, message", [
    (torch.zeros(1, 4, 4), "at least 2 normal images"),
    (torch.zeros(4, 4), "at least 2 normal images"),
    (torch.tensor([[[0.0, float("nan")]], [[0.0, 1.0]]]), "NaN or infinity"),
    (torch.tensor([[[0.0, float("inf")]], [[0.0, 1.0]]]), "NaN or infinity"),
])
def test_fit_refuses_what_cannot_make_a_reference(maps, message):
    with pytest.raises(ValueError, match=message):
        ScoreReference.fit(maps)


@pytest.mark.parametrize("map_scales, score_scales", [((0, 1, 2), (2,)), ((1, 2), (1, 2)), ((0,), (0, 1, 2))])
@pytest.mark.parametrize("pool", [1, 3])
def test_the_score_is_the_max_of_the_standardised_score_map(map_scales, score_scales, pool):
    """Both implementations against numpy on the score taps' own map; the heat map is left as it is."""
    teacher, student = _features(1)
    mean, scale = _reference(2)
    want_maps, _ = anomaly_map_reference(teacher, student, (32, 24), 2.0, map_scales, pool)
    score_maps, _ = anomaly_map_reference(teacher, student, (32, 24), 2.0, score_scales, pool)
    want = ((score_maps[:, 0].numpy() - mean.numpy()) / scale.numpy()).reshape(3, -1).max(axis=1)
    for op in OPS:
        maps, scores = op(teacher, student, (32, 24), 2.0, scales=map_scales, pool=pool, score_scales=score_scales,
                          score_reference=(mean, scale))
        torch.testing.assert_close(maps, want_maps, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores.numpy(), want, rtol=1e-4, atol=1e-5)


def test_a_spot_hot_on_every_normal_image_no_longer_sets_the_score():
    """Normal maps share a hot spot; a defect elsewhere, weaker than the spot in raw terms, wins after
    standardisation (and loses without it)."""
    rng = np.random.default_rng(3)
    normal = rng.normal(1.0, 0.05, size=(20, 16, 16)).astype(np.float32)
    normal[:, 2, 3] += 2.0 + rng.normal(0, 0.05, size=20).astype(np.float32)  # e.g. a busbar
    reference = ScoreReference.fit(torch.from_numpy(normal))
    defective = rng.normal(1.0, 0.05, size=(16, 16)).astype(np.float32)
    defective[2, 3] += 2.0
    defective[10, 12] += 1.0  # the defect: 2.0 in raw terms against the spot's 3.0
    raw = torch.from_numpy(defective)
    standardised = (raw - reference.mean) / reference.scale
    assert raw.argmax() == 2 * 16 + 3 and standardised.argmax() == 10 * 16 + 12


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("broken_tap", [0, 1, 2])
def test_a_non_finite_feature_anywhere_still_makes_the_score_nan(bad, broken_tap):
    """Tap 0 only in the map, tap 1 in neither, tap 2 in the score: standardising never hides a broken image."""
    teacher, student = _features(4)
    student[broken_tap][1, 0, 1, 1] = bad
    for op in OPS:
        _, scores = op(teacher, student, (32, 24), 2.0, scales=(0,), pool=3, score_scales=(2,),
                       score_reference=_reference(5))
        assert torch.isfinite(scores[[0, 2]]).all() and torch.isnan(scores[1])


def test_a_reference_of_another_size_is_refused_naming_it():
    teacher, student = _features(6)
    for op in OPS:
        with pytest.raises(ValueError, match="fitted at another image size"):
            op(teacher, student, (32, 24), 2.0, score_reference=_reference(7, (24, 32)))


def test_the_detector_scores_with_the_reference_its_training_fitted(tiny_checkpoint):
    """The shipped checkpoint holds a reference; the Detector's score is max((score-tap map - mean) / scale)."""
    from mrkd.runtime.detector import Detector

    payload = load_checkpoint(tiny_checkpoint)
    stored = payload["score_reference"]
    size = payload["model_config"]["image_size"]
    assert stored["mean"].shape == stored["scale"].shape == (size, size) and (stored["scale"] > 0).all()
    detector = Detector.load(tiny_checkpoint, precision="fp32")
    batch = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _, scores = detector.raw_maps(batch)
    score_maps = detector.score_maps(batch).numpy()
    want = ((score_maps - stored["mean"].numpy()) / stored["scale"].numpy()).reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(scores.numpy(), score_maps.reshape(3, -1).max(axis=1), rtol=1e-3)


def test_a_malformed_reference_in_a_checkpoint_is_refused_and_a_missing_one_means_the_raw_max():
    good = {"mean": torch.zeros(4, 4), "scale": torch.ones(4, 4)}
    assert ScoreReference.from_payload({}) is None and ScoreReference.from_payload({"score_reference": None}) is None
    assert torch.equal(ScoreReference.from_payload({"score_reference": good}).scale, torch.ones(4, 4))
    for bad in ({"mean": torch.zeros(4, 4), "scale": torch.zeros(4, 4)},
                {"mean": torch.zeros(4, 4), "scale": torch.ones(4, 5)},
                {"mean": torch.full((4, 4), float("nan")), "scale": torch.ones(4, 4)},
                {"mean": torch.zeros(4, 4), "scale": torch.full((4, 4), float("inf"))},
                {"mean": [0.0], "scale": [1.0]}, [torch.zeros(4, 4), torch.ones(4, 4)]):
        with pytest.raises(CheckpointError, match="score reference is malformed"):
            ScoreReference.from_payload({"score_reference": bad})


def test_the_reference_can_be_switched_on_a_trained_run_without_training(tmp_path):
    """--score-reference off writes none (the raw max); resuming the finished run with it on fits one and refits the
    threshold, every weight bit for bit (what benchmarks/accuracy.py does to older runs)."""
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.training import train

    options = dict(data="elpv:mono", out=str(tmp_path), image_size=64, batch_size=4, max_train_images=8,
                   save_every=0, steps=3, seed=5)
    off = load_checkpoint(train(TrainConfig(**options, score_reference=False), show_progress=False))
    assert off["score_reference"] is None
    on = load_checkpoint(train(TrainConfig(**options, resume=True), show_progress=False))
    assert on["score_reference"] is not None and on["step"] == off["step"] == 3
    for key, value in off["state_dict"].items():
        assert torch.equal(value, on["state_dict"][key]), key
    assert on["calibration"]["threshold"] != off["calibration"]["threshold"]
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = Detector.from_payload(off, precision="fp32")
    _, raw = plain.raw_maps(batch)
    torch.testing.assert_close(raw, plain.score_maps(batch).flatten(1).amax(dim=1))


def test_a_run_with_one_training_image_trains_without_a_reference_and_says_so(tmp_path, caplog):
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.training import train

    with caplog.at_level("WARNING", logger="mrkd.train"):
        path = train(TrainConfig(data="elpv:mono", out=str(tmp_path), image_size=64, batch_size=4, max_train_images=1,
                                 save_every=0, steps=2), show_progress=False)
    assert load_checkpoint(path)["score_reference"] is None and load_checkpoint(path)["map_whitening"] is None
    assert "needs at least 2 training images" in caplog.text
