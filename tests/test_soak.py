"""The soak (benchmarks/soak.py) in its 2-minute version: 8 cameras against two real tritonservers, one SIGKILLed
and restarted; no frame read may go without its line, and the client's memory may not grow."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(2400)  # two tritonservers start, one restarts: minutes each on a busy 2-core machine
def test_a_two_minute_soak_loses_no_frame_and_does_not_grow(tiny_checkpoint, tmp_path):
    report = tmp_path / "soak.json"
    process = subprocess.Popen(
        [sys.executable, "benchmarks/soak.py", "--minutes", "2", "--kill-every", "40", "--down", "10",
         "--rss-at", "45", "--checkpoint", str(tiny_checkpoint), "--json", str(report)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=2300)
    finally:
        if process.poll() is None:  # SIGTERM: soak.py stops its servers and client
            process.terminate()
            process.communicate(timeout=120)
    run = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["kills"], result  # a server was killed and came back during the run
    assert result["frames_read"] > 8 * 60 and result["lost"] == 0 and result["duplicate_lines"] == 0, result
    assert result["frame_lines"] == result["frames_read"], result
    assert result["rss_growth"] < 0.10, result
    assert run.returncode == 0 and result["passed"], run.stdout[-3000:]
