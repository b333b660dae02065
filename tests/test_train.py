"""Training on real images: determinism, resume, checkpoint contents, CLI errors; the Detector on its output."""
import logging

import numpy as np
import pytest
import torch

from mrkd import Detector
from mrkd.core.config import ModelConfig, TrainConfig
from mrkd.data import open_dataset
from mrkd.runtime.checkpoint import load_checkpoint
from mrkd.runtime.errors import CheckpointError
from mrkd.runtime.training import train
from mrkd.train import main as train_main

TINY = dict(data="textures:brick", image_size=64, batch_size=4, max_train_images=8, save_every=0, seed=5)


def tiny(out, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), **(TINY | {"steps": 4} | kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(tiny(out), show_progress=False)


def test_checkpoint_holds_what_serving_needs(trained):
    data = load_checkpoint(trained)
    assert data["model_config"]["backbone"] == "mobilenet_v2" and data["model_config"]["image_size"] == 64
    assert data["train_config"]["ilm"] and data["train_config"]["flm"] and data["train_config"]["seed"] == 5
    assert data["calibration"]["threshold"] > data["calibration"]["low"]
    assert data["step"] == 4 and len(data["losses"]) == 4
    assert {"torch", "mrkd", "torchvision"} <= set(data["versions"])
    assert any(k.startswith("teacher.") for k in data["state_dict"])  # serves without the original weight files
    assert (trained.parent / "loss_curve.png").stat().st_size > 0


def test_same_seed_same_losses_and_weights(trained, tmp_path):
    again = train(tiny(tmp_path), show_progress=False)
    a, b = load_checkpoint(trained), load_checkpoint(again)
    assert a["losses"] == b["losses"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    other = load_checkpoint(train(tiny(tmp_path / "other", seed=6), show_progress=False))
    assert other["losses"] != a["losses"]


def test_resume_continues_exactly(trained, tmp_path):
    train(tiny(tmp_path, steps=3), show_progress=False)  # stops mid-epoch (2 steps per epoch)
    first = load_checkpoint(tmp_path / "checkpoint.pt")
    assert first["step"] == 3
    resumed = load_checkpoint(train(tiny(tmp_path, steps=4, resume=True), show_progress=False))
    straight = load_checkpoint(trained)
    assert resumed["losses"][:3] == first["losses"]
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)


def test_resume_may_change_how_the_map_is_read_but_not_the_network(trained, tmp_path):
    """A run trained before the map options existed (or with other values) continues; its checkpoint then holds the
    new map settings. Another network or masking is refused."""
    train(tiny(tmp_path, steps=3, feature_pool=1, map_scales=(1, 2), score_scales=(1, 2), map_combine="sum"),
          show_progress=False)
    resumed = load_checkpoint(train(tiny(tmp_path, steps=4, resume=True), show_progress=False))
    np.testing.assert_allclose(resumed["losses"], load_checkpoint(trained)["losses"], rtol=1e-6)
    config = resumed["model_config"]
    assert config["feature_pool"] == 3 and tuple(config["map_scales"]) == (0, 1, 2)
    assert tuple(config["score_scales"]) == (2,) and config["map_combine"] == "product"
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(tiny(tmp_path, steps=5, flm=False, resume=True), show_progress=False)


def test_resuming_a_finished_run_with_new_map_settings_recalibrates_and_keeps_every_weight(tmp_path):
    """How a trained model moves to other map settings without training (what benchmarks/accuracy.py does to runs
    made before a map default changed): weights and BatchNorm statistics stay bit for bit, the calibration is
    refitted for the new score; one more step does change them."""
    old = load_checkpoint(train(tiny(tmp_path, map_scales=(1, 2), score_scales=(1, 2)), show_progress=False))
    new = load_checkpoint(train(tiny(tmp_path, resume=True), show_progress=False))
    assert new["step"] == old["step"] == 4 and new["losses"] == old["losses"]
    assert new["state_dict"].keys() == old["state_dict"].keys()
    for key, value in old["state_dict"].items():
        assert torch.equal(value, new["state_dict"][key]), key
    assert tuple(new["model_config"]["score_scales"]) == (2,) and tuple(old["model_config"]["score_scales"]) == (1, 2)
    assert new["calibration"]["threshold"] != old["calibration"]["threshold"]
    more = load_checkpoint(train(tiny(tmp_path, steps=5, resume=True), show_progress=False))
    bn = [k for k in old["state_dict"] if k.endswith("running_mean") and not k.startswith("teacher.")]
    assert more["step"] == 5 and bn and not all(torch.equal(old["state_dict"][k], more["state_dict"][k]) for k in bn)


@pytest.mark.slow  # trains a model with the Lite0 teacher
def test_the_quality_preset_trains_the_lite0_teacher_scored_on_every_tap_and_explicit_options_win(tmp_path):
    from mrkd.ops import anomaly_map_reference
    from mrkd.train import parse_args

    default = parse_args([])[0].model_config()
    assert (default.backbone, default.score_scales) == ("mobilenet_v2", (2,))
    mixed = parse_args(["--preset", "quality", "--score-scales", "2", "--steps", "7"])[0]
    assert (mixed.backbone, tuple(mixed.score_scales), mixed.steps) == ("efficientnet_lite0", (2,), 7)
    out = tmp_path / "quality"
    assert train_main(["--preset", "quality", "--data", "textures:brick", "--image-size", "64", "--batch-size", "4",
                       "--max-train-images", "8", "--steps", "2", "--save-every", "0", "--out", str(out)]) == 0
    saved = load_checkpoint(out / "checkpoint.pt")
    config = saved["model_config"]
    assert config["backbone"] == "efficientnet_lite0" and tuple(config["score_scales"]) == (0, 1, 2)
    assert tuple(saved["state_dict"]["teacher.trunk._conv_stem.weight"].shape) == (32, 3, 3, 3)
    detector = Detector.load(out / "checkpoint.pt")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    maps, scores = detector.raw_maps(images)
    teacher, student = detector._features(images)
    config = detector.config
    assert config.map_combine == "product"  # the heat map multiplies the taps; the score sums them (every tap)
    summed, _ = anomaly_map_reference(teacher, student, (64, 64), config.blur_sigma, (0, 1, 2), config.feature_pool)
    reference = detector.score_reference
    torch.testing.assert_close(scores, ((summed[:, 0] - reference.mean) / reference.scale).flatten(1).amax(1))
    assert not torch.allclose(maps, summed[:, 0], atol=1e-3)


@pytest.mark.slow  # trains a model
def test_rd4ad_mode_has_no_generation_blocks(tmp_path):
    data = load_checkpoint(train(tiny(tmp_path, steps=2, ilm=False, flm=False), show_progress=False))
    assert not any(k.startswith("generation.") for k in data["state_dict"])
    assert data["model_config"]["flm"] is False


def test_detector_is_deterministic_and_batch_invariant(trained):
    images = [r.load_image() for r in open_dataset("textures:brick", seed=5).test[:5]]
    one = Detector.load(trained, batch_size=1).predict(images)
    many = Detector.load(trained, batch_size=4).predict(images)
    again = Detector.load(trained, batch_size=4).predict(images)
    np.testing.assert_array_equal(many.scores, again.scores)
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-5, atol=1e-6)
    assert many.maps.shape == (5, 64, 64)
    # (the score reads the stride-16 tap, the heat map all three: tests/test_feature_pool.py checks each)
    assert ((many.normalized_scores > 0.5) == many.is_anomalous).all()


def test_cli_reports_a_bad_dataset_folder(tmp_path, caplog):
    (tmp_path / "data" / "widget" / "train").mkdir(parents=True)
    with caplog.at_level(logging.ERROR):
        rc = train_main(["--data", str(tmp_path / "data"), "--category", "widget", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "train/good" in caplog.text
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cli_reports_missing_weights(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        rc = train_main(["--data", "textures:brick", "--weights", str(tmp_path / "nowhere.pth"),
                         "--image-size", "64", "--steps", "1", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "nowhere.pth" in caplog.text


def test_evaluate_writes_metrics_plots_and_worst_cases(trained, tmp_path):
    import json

    from mrkd.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(trained), "--data", "textures:brick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_normal"] == 120 and metrics["n_anomalous"] == 120 and metrics["seed"] == 5
    for key in ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["ms_per_image"] > 0
    assert (tmp_path / "roc.png").stat().st_size > 0
    worst = sorted(p.name for p in (tmp_path / "worst").iterdir())
    assert sum(n.startswith("false_positive") for n in worst) == 4
    assert sum(n.startswith("false_negative") for n in worst) == 4
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(rows) == 241 and rows[0].startswith("name,defect,label,raw_score")


def test_evaluate_refuses_a_truncated_checkpoint(trained, tmp_path, caplog):
    from mrkd.evaluate import main as evaluate_main

    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[:1000])
    with caplog.at_level(logging.ERROR):
        assert evaluate_main(["--checkpoint", str(cut), "--data", "textures:brick", "--out", str(tmp_path)]) == 2
    assert "truncated or corrupt" in caplog.text
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_two_process_ddp_training_with_gloo(tmp_path):
    import os
    import subprocess
    import sys

    from mrkd.triton.launcher import free_port

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()),
           "-m", "mrkd.train", "--data", "textures:brick", "--image-size", "64", "--batch-size", "4",
           "--max-train-images", "8", "--steps", "3", "--save-every", "0", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = load_checkpoint(out / "checkpoint.pt")
    assert data["step"] == 3 and len(data["losses"]) == 3 and all(np.isfinite(data["losses"]))
    assert data["calibration"]["threshold"] > data["calibration"]["low"]
    assert not any(k.startswith("module.") for k in data["state_dict"])  # saved unwrapped, loads in Detector
    assert len(Detector.load(out / "checkpoint.pt").predict([np.zeros((64, 64), np.uint8)])) == 1


def test_budget_is_optimizer_steps_whatever_the_data_size():
    small, large = TrainConfig(steps=300, batch_size=16), TrainConfig(steps=300, batch_size=16)
    assert small.total_steps(40) == large.total_steps(4000) == 300
    assert TrainConfig(epochs=3, batch_size=16).total_steps(40) == 3 * 2  # epochs: passes over the data
    assert TrainConfig(epochs=1, batch_size=16).total_steps(8) == 1  # a set smaller than a batch: one step


@pytest.mark.slow  # trains a model
def test_batchnorm_statistics_are_those_of_the_trained_network(tmp_path):
    """After only 2 steps an exponential running mean would still be 81% its initial zeros; the statistics used at
    test time must be the training images' own."""
    cfg = tiny(tmp_path, steps=2, max_train_images=8, batch_size=4)
    data = load_checkpoint(train(cfg, show_progress=False))
    from mrkd.core.preprocess import normalize, prepare_batch
    from mrkd.model.network import MRKDModel

    model = MRKDModel.from_config(ModelConfig.from_dict(data["model_config"]))
    model.load_state_dict(data["state_dict"])
    images = [r.load_image() for r in open_dataset(cfg.data, seed=cfg.seed).train[:8]]
    with torch.no_grad():
        f4 = model.teacher(normalize(prepare_batch(images, cfg.image_size)))[0]
        first_conv = model.bottleneck.down4[0][0](f4)  # the input of the bottleneck's first BatchNorm
    expected_mean = first_conv.mean(dim=(0, 2, 3))
    running_mean = model.bottleneck.down4[0][1].running_mean
    torch.testing.assert_close(running_mean, expected_mean, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # trains a model
def test_cached_teacher_targets_train_exactly_like_computing_them_every_step(tmp_path):
    from mrkd.runtime.training import StepOptions, Trainer

    runs = {}
    for cache in (True, False):
        trainer = Trainer(tiny(tmp_path / str(cache), steps=3), show_progress=False,
                          options=StepOptions(cache_targets=cache, bf16=False))
        assert (trainer.features.cached is not None) == cache
        trainer.train_steps()
        runs[cache] = trainer.state.losses
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)
