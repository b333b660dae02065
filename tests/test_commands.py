"""The commands as the README writes them: each in its own process, from a working directory of the test's own,
with relative paths (and `~`, and a path through a symlink), the way a user types them after a fresh clone.

Every other test passes absolute temporary folders; these are the ones that caught the quick start's export
crash on a relative `--repo`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, start_serve
from PIL import Image

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # trains in a subprocess first

# A few steps at 64 px: enough for a real, calibrated checkpoint; the accuracy is not what these tests are about.
TRAIN = ["--data", "elpv:mono", "--steps", "3", "--batch-size", "4", "--image-size", "64",
         "--max-train-images", "8", "--save-every", "0"]


def command(cwd: Path, *args: str, home: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <args>` in `cwd`, mrkd importable as from the clone; HOME replaced when given (for `~`)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder with a trained run in it: `python -m mrkd.train ... --out runs/elpv-mono`."""
    cwd = tmp_path_factory.mktemp("user")
    ok(command(cwd, "mrkd.train", *TRAIN, "--out", "runs/elpv-mono"))
    assert (cwd / "runs/elpv-mono/checkpoint.pt").is_file()
    return cwd


def test_train_and_evaluate_write_where_relative_paths_say(workdir: Path):
    assert (workdir / "runs/elpv-mono/losses.json").is_file()
    ok(command(workdir, "mrkd.evaluate", "--checkpoint", "runs/elpv-mono/checkpoint.pt", "--data", "elpv:mono",
               "--out", "runs/elpv-mono/eval"))
    metrics = json.loads((workdir / "runs/elpv-mono/eval/metrics.json").read_text())
    assert metrics["n_normal"] > 0 and metrics["n_anomalous"] > 0


@pytest.mark.triton
@pytest.mark.triton
def test_export_to_a_relative_repository_then_serve_it_and_stream_to_relative_outputs(workdir: Path):
    """The README's serving section, verbatim but for the ports: export --repo model_repository, serve --repo
    model_repository, the client with --out results.jsonl --save-heatmaps heatmaps/."""
    exported = ok(command(workdir, "mrkd.export", "--checkpoint", "runs/elpv-mono/checkpoint.pt",
                          "--repo", "model_repository", "--device", "cpu"))
    assert "version 1" in exported.stdout
    repo = workdir / "model_repository"
    assert (repo / "mrkd_detector/1/checkpoint.pt").is_file()
    assert not list(repo.glob(".*journal*")) and not list(repo.glob("*/.*.tmp")), "staged files left behind"

    cells = workdir / "cells"
    cells.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(cells / f"cell{i}.png")

    server = start_serve(Path("model_repository"), cwd=workdir)
    try:
        url = next(line.split()[1] for line in server.stdout if line.startswith("gRPC "))
        ok(command(workdir, "client", "--url", url, "--model", "mrkd", "--camera", "cam1=cells",
                   "--out", "results.jsonl", "--save-heatmaps", "heatmaps/", "--progress", "none"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    lines = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok"] * 3
    assert len(list((workdir / "heatmaps/cam1").glob("*.png"))) == 3


def test_tilde_and_symlinked_paths_behave_like_the_plain_ones(workdir: Path, tmp_path: Path):
    """`~` (not expanded by a shell: `--repo=~/x`, or a path from a config) and a folder reached through a
    symlink: the same export, the same evaluation."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(workdir / "runs/elpv-mono/checkpoint.pt", home / "models/checkpoint.pt")
    ok(command(workdir, "mrkd.export", "--checkpoint", "~/models/checkpoint.pt", "--repo", "~/repo",
               "--device", "cpu", home=home))
    assert (home / "repo/mrkd_detector/1/checkpoint.pt").is_file()
    assert not (workdir / "~").exists()

    real = tmp_path / "disk/exports"
    real.mkdir(parents=True)
    (workdir / "linked").symlink_to(real, target_is_directory=True)
    ok(command(workdir, "mrkd.export", "--checkpoint", "runs/elpv-mono", "--repo", "linked/repo", "--device", "cpu"))
    ok(command(workdir, "mrkd.export", "--checkpoint", "runs/elpv-mono", "--repo", "linked/repo", "--device", "cpu"))
    assert sorted(p.name for p in (real / "repo/mrkd_detector").iterdir() if p.is_dir()) == ["1", "2"]

    ok(command(workdir, "mrkd.evaluate", "--checkpoint", "~/models/checkpoint.pt", "--data", "elpv:mono",
               "--out", "~/eval", home=home))
    assert (home / "eval/metrics.json").is_file()


def test_demo_refuses_an_unwritable_output_folder_before_training(tmp_path: Path):
    """A failure the demo can see coming costs seconds, not a training run."""
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o555)
    if os.access(tmp_path / "readonly", os.W_OK):  # root ignores permission bits: use a path under a file
        target = tmp_path / "a-file"
        target.write_text("")
        out = "a-file/demo"
    else:
        out = "readonly/demo"
    result = command(tmp_path, "mrkd.demo", "--out", out, "--steps", "1", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not writable" in result.stderr and "--out" in result.stderr
    assert "Traceback" not in result.stderr
    assert "training" not in result.stderr


def test_demo_refuses_a_dashboard_address_in_use_before_training(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = command(tmp_path, "mrkd.demo", "--out", "runs/demo", "--steps", "1",
                         "--dashboard", f"127.0.0.1:{port}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"127.0.0.1:{port}" in result.stderr and "--dashboard" in result.stderr
    assert "training" not in result.stderr


@pytest.mark.timeout(1800)  # trains one step at the demo's 256 px on every training cell: minutes on 2 cores
def test_demo_keeps_its_trained_model_when_a_later_step_fails_and_reuses_it(tmp_path: Path):
    """A failure after training (here: the model repository path is taken by a file, so the export fails) is one
    line naming the problem; running the demo again reuses the trained model instead of training again."""
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/model_repository").write_text("not a folder")
    first = command(tmp_path, "mrkd.demo", "--steps", "1", "--no-dashboard", timeout=1700)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert "[1/5] training" in first.stderr and "is kept" in first.stderr
    assert (tmp_path / "runs/demo/model/checkpoint.pt").is_file()

    second = command(tmp_path, "mrkd.demo", "--steps", "1", "--no-dashboard", timeout=900)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "[1/5] reusing the trained model" in second.stderr
    assert "[1/5] training" not in second.stderr


def test_demo_refuses_a_page_for_other_machines_without_credentials_before_training(tmp_path: Path):
    """The client would refuse such a page after training: the demo says so first."""
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("MRKD_DASHBOARD_")}
    result = subprocess.run([sys.executable, "-m", "mrkd.demo", "--out", "runs/demo", "--steps", "1",
                             "--dashboard", "0.0.0.0:0"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(env_free, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "MRKD_DASHBOARD_TOKEN" in result.stderr and "training" not in result.stderr
