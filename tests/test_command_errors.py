"""Every command's anticipated failures: one line `error: ...` on stderr, exit 2 for a usage error (a bad option,
file or dataset) and 1 for a failure at run time, never a traceback. Each command runs in its own process, as a
user types it; the failures are real ones (a network whose weights are NaN, an address that cannot be resolved),
not stand-ins."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

from mrkd.core.config import TrainConfig

pytestmark = pytest.mark.slow  # each command in its own process, two of them training

# 64 px, random teacher, 8 images: a real calibrated checkpoint in a few seconds
TINY = ["--data", "textures:brick", "--no-pretrained", "--batch-size", "4", "--image-size", "64",
        "--max-train-images", "8", "--save-every", "0", "--threads", "1"]


def command(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Asserts exit `code`, no traceback and exactly one `error:` line holding `words`; returns that line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real trained and calibrated checkpoint whose student weights were then made NaN (a corrupted file): every
    score it gives is NaN."""
    out = tmp_path_factory.mktemp("nan")
    result = command("mrkd.train", *TINY, "--steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = torch.load(out / "checkpoint.pt", weights_only=True)
    state = data["state_dict"]
    key = next(k for k in state if k.startswith("student") and state[k].is_floating_point())
    state[key].fill_(float("nan"))
    torch.save(data, out / "checkpoint.pt")
    return out / "checkpoint.pt"


def test_train_non_finite_scores_while_calibrating_is_one_line(tmp_path: Path):
    """Adam at lr 1e30 drives the weights to overflow: the calibration's forward pass gives NaN scores
    (NonFiniteScoreError, a RuntimeError): a run-time failure, exit 1."""
    result = command("mrkd.train", *TINY, "--steps", "1", "--lr", "1e30", "--out", str(tmp_path / "run"))
    one_line_error(result, 1, "NaN/Inf anomaly scores")


def test_train_names_flags_where_the_library_names_parameters(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The library says `ilm_category`; the command says `--ilm-category`."""
    from mrkd.runtime.training import ilm_row
    from mrkd.train import main as train_main

    with pytest.raises(ValueError, match="^ilm_category 'nonsense' is not one of"):
        ilm_row(TrainConfig(ilm_category="nonsense"), "brick")
    with caplog.at_level(logging.ERROR):
        assert train_main([*TINY, "--steps", "1", "--ilm-category", "nonsense", "--out", str(tmp_path / "a")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: --ilm-category 'nonsense' is not one of"), errors


def test_train_bad_dataset_is_a_usage_error(tmp_path: Path):
    result = command("mrkd.train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    one_line_error(result, 2, str(tmp_path / "nowhere"))


def test_evaluate_a_network_that_gives_nan_is_one_line(nan_checkpoint: Path, tmp_path: Path):
    result = command("mrkd.evaluate", "--checkpoint", str(nan_checkpoint), "--data", "textures:brick",
                     "--out", str(tmp_path / "eval"))
    one_line_error(result, 1, "NaN/Inf anomaly scores")


def test_evaluate_missing_checkpoint_is_a_usage_error(tmp_path: Path):
    result = command("mrkd.evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", "textures:brick",
                     "--out", str(tmp_path / "eval"))
    one_line_error(result, 2, "checkpoint not found")


def test_export_a_network_that_gives_nan_is_one_line(nan_checkpoint: Path, tmp_path: Path):
    result = command("mrkd.export", "--checkpoint", str(nan_checkpoint), "--repo", str(tmp_path / "repo"),
                     "--runtime", "onnxruntime", "--device", "cpu")
    # the conversion check refuses it: the checkpoint is what is wrong (a usage error, as any bad input file)
    one_line_error(result, 2, "cannot export", "max relative error")
    assert not any((tmp_path / "repo").glob("*/1")), "nothing may be published"


def test_export_bad_option_names_the_flag(tmp_path: Path):
    result = command("mrkd.export", "--configs-only", "--repo", str(tmp_path / "repo"), "--max-batch-size", "0")
    one_line_error(result, 2, "--max-batch-size must be at least 1")


def test_serve_unresolvable_host_is_one_line(tmp_path: Path):
    """The repository check passes (templates and a version folder), then the listen address cannot be resolved."""
    repo = tmp_path / "repo"
    assert command("mrkd.export", "--configs-only", "--repo", str(repo), "--image-size", "64").returncode == 0
    for model in repo.iterdir():
        (model / "1").mkdir()
        (model / "1" / "model.py").write_text("")
        (model / "1" / "checkpoint.pt").write_text("")
    result = command("mrkd.serve", "--repo", str(repo), "--host", "no-such-host.invalid", "--grpc-port", "0",
                     "--http-port", "0", "--metrics-port", "0")
    one_line_error(result, 1, "no-such-host.invalid")


def test_serve_missing_repository_is_one_line(tmp_path: Path):
    result = command("mrkd.serve", "--repo", str(tmp_path / "none"))
    one_line_error(result, 1, "model repository not found")


def test_demo_unusable_dashboard_address_is_a_usage_error(tmp_path: Path):
    result = command("mrkd.demo", "--out", str(tmp_path / "demo"), "--dashboard", "127.0.0.1:notaport")
    one_line_error(result, 2, "127.0.0.1:notaport")


def test_demo_unwritable_output_is_a_usage_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = command("mrkd.demo", "--out", str(blocker / "demo"))
    one_line_error(result, 2, "--out")
