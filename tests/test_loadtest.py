"""The locust load test: a real headless locust run (the venv's locust, as a subprocess) against the served model,
its CSV output, and the plot script on that output."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "loadtest"))

import plot  # noqa: E402  (loadtest/plot.py)

LOCUST = Path(sys.executable).parent / "locust"


def run_locust(served_model, work: Path, seconds: int, *options: str, timeout: float = 180) -> str:
    """A headless locust run of 2 closed-loop users sending the bundled real images; its output. A locust that has
    not exited `timeout` s after it started is stopped with SIGABRT under PYTHONFAULTHANDLER, and the failure
    shows where its threads were."""
    command = [str(LOCUST), "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless", "--host",
               served_model.grpc_url, "--model", served_model.model_name, "-u", "2", "-r", "2", "-t", f"{seconds}s",
               "--only-summary", "--stop-timeout", "30", *options]
    with subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"}) as locust:
        try:
            stdout, stderr = locust.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            locust.send_signal(signal.SIGABRT)
            stdout, stderr = locust.communicate(timeout=30)
            pytest.fail(f"locust ran {seconds} s but had not exited {timeout} s after it started; where its "
                        f"threads were:\n{stdout}{stderr}")
    assert locust.returncode == 0, stdout + stderr
    return stdout + stderr


@pytest.fixture(scope="module")
def locust_run(served_model, tmp_path_factory) -> Path:
    """~20 s of locust; returns the --csv prefix."""
    work = tmp_path_factory.mktemp("locust")
    prefix = work / "load"
    run_locust(served_model, work, 20, "--csv", str(prefix), "--csv-full-history")
    return prefix


def test_locust_exits_by_itself_when_its_run_time_is_over(served_model, tmp_path: Path):
    """Before the locustfile closed and collected its gRPC clients itself, most short runs on busy cores hung after
    "Shutting down (exit code 0)" (5 of 6), in tritonclient's __del__ at the interpreter's exit."""
    for _ in range(3):
        assert "Shutting down (exit code 0)" in run_locust(served_model, tmp_path, 5, timeout=60)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_locust_records_grpc_requests_with_no_failure(locust_run: Path):
    rows = {r["Name"]: r for r in read_rows(Path(f"{locust_run}_stats.csv"))}
    assert set(rows) == {"mrkd bytes", "Aggregated"}
    request = rows["mrkd bytes"]
    assert request["Type"] == "grpc"
    assert int(request["Request Count"]) >= 5
    assert int(request["Failure Count"]) == 0
    assert float(request["Average Content Size"]) > 0  # response length reported from the gRPC answer
    assert 0 < float(request["Min Response Time"]) <= float(request["Median Response Time"]) <= float(
        request["Max Response Time"])
    assert read_rows(Path(f"{locust_run}_failures.csv")) == []


def test_plot_turns_the_history_into_a_png_with_the_runs_totals(locust_run: Path, tmp_path: Path, capsys):
    history = plot.read_history(f"{locust_run}_stats_history.csv")
    assert len(history.seconds) >= 5 and history.seconds == sorted(history.seconds)
    assert max(history.users) == 2 and max(history.rps) > 0
    assert all(v is None or v > 0 for v in history.p50)
    totals = plot.read_totals(f"{locust_run}_stats.csv")
    out = tmp_path / "load.png"
    assert plot.main([str(locust_run), "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (900, 650)
    printed = capsys.readouterr().out
    assert f"{totals.requests} requests, 0 failures" in printed


def test_plot_names_what_is_wrong_with_its_input(tmp_path: Path, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 1
    assert "--csv-full-history" in capsys.readouterr().err
    bad = tmp_path / "bad_stats_history.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a locust stats-history CSV"):
        plot.read_history(bad)
