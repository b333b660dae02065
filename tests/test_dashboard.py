"""The live dashboard and the client's Prometheus metrics: a real tritonserver, the real client process with
--dashboard, and the page in headless Chromium, checked as a person would look at it; /metrics parsed with
prometheus_client's parser and held against the JSONL file."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from chromium import headless_chromium
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from client.dashboard import Dashboard, DashboardError, DashboardOptions, LineState, error_code, parse_address
from client.events import RunObserver
from client.inspection import InspectionClient
from client.results import JsonlWriter, read_jsonl
from client.runner import MultiCameraRunner, RunOptions
from client.sources import SourceOptions, SyntheticSource, open_source, parse_synthetic
from mrkd.triton.launcher import TritonServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def elpv_cells(folder: Path, count: int, offset: int = 0) -> Path:
    import elpv_dataset

    images = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))
    folder.mkdir(parents=True)
    for path in images[offset:offset + count]:
        shutil.copy(path, folder / path.name)
    return folder


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def get_json(url: str) -> dict:
    status, body, _ = get(url)
    assert status == 200, body
    return json.loads(body)


def wait_until(condition, what: str, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def scrape(base: str) -> dict[str, list]:
    """/metrics parsed by prometheus_client: sample name -> [(labels, value)]."""
    status, body, content_type = get(base + "metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def per_camera(samples: dict[str, list], name: str, **match: str) -> Counter:
    totals: Counter = Counter()
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in match.items()):
            totals[labels["camera"]] += value
    return totals


def assert_metrics_agree_with_jsonl(samples: dict[str, list], records: list[dict], cameras: list[str]) -> None:
    lines = Counter(r["camera"] for r in records)
    by = {status: Counter(r["camera"] for r in records if r["status"] == status) for status in ("ok", "dropped",
                                                                                              "error", "spooled")}
    verdicts = {v: Counter(r["camera"] for r in records if r.get("verdict") == v) for v in ("normal", "anomalous")}
    assert per_camera(samples, "mrkd_frames_total") == lines
    for camera in cameras:
        assert per_camera(samples, "mrkd_frames_total", verdict="normal")[camera] == verdicts["normal"][camera]
        assert per_camera(samples, "mrkd_frames_total", verdict="anomalous")[camera] == verdicts["anomalous"][camera]
        assert per_camera(samples, "mrkd_frames_total", verdict="invalid")[camera] == \
            by["dropped"][camera] + by["error"][camera] + by["spooled"][camera]
        assert per_camera(samples, "mrkd_frames_dropped_total")[camera] == by["dropped"][camera]
        assert per_camera(samples, "mrkd_request_errors_total")[camera] == by["error"][camera]
        assert per_camera(samples, "mrkd_request_latency_seconds_count")[camera] == by["ok"][camera]
        assert per_camera(samples, "mrkd_anomaly_score_count")[camera] == by["ok"][camera]
        ok = [r for r in records if r["camera"] == camera and r["status"] == "ok"]
        latency_sum = per_camera(samples, "mrkd_request_latency_seconds_sum")[camera]
        assert latency_sum == pytest.approx(sum(r["latency_ms"] for r in ok) / 1000, rel=1e-3, abs=1e-3)
        # the score histogram's bucket at the threshold counts exactly the frames at or below it
        at_threshold = per_camera(samples, "mrkd_anomaly_score_bucket", le="0.5")[camera]
        assert at_threshold == sum(1 for r in ok if r["score"] <= 0.5)


def texts(driver, selector: str) -> list[str]:
    """What a person reads in every element matching `selector`, read in one script call: the page re-renders
    its elements on every update, so a found element can be replaced before its text is read."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim());", selector)


def text(driver, selector: str) -> str:
    found = texts(driver, selector)
    return found[0] if found else ""


def counted(driver, camera: str, figure: str) -> int:
    value = text(driver, f'[data-camera="{camera}"] .{figure}')
    return int(value) if value.isdigit() else -1


# ------------------------------------------------------------------------------------------- in a real browser


@pytest.mark.browser
def test_browser_shows_every_camera_live_and_the_server_going_down(served_model, tmp_path):
    """The client process with --dashboard against its own tritonserver; the page in headless Chromium shows each
    camera, counts that rise, the heat-map frame, anomalous thumbnails and, once the server stops, that it is down
    and the cameras wait. At the end /metrics agrees with the JSONL file line for line."""
    repo = tmp_path / "repo"  # the encoded-image ensemble and its steps only: fewer backend processes to start
    shutil.copytree(served_model.repo, repo, ignore=lambda folder, names: [
        n for n in names if Path(folder) == Path(served_model.repo) and n.endswith(("_raw", "_frame_preprocess"))])
    cells = elpv_cells(tmp_path / "cells", 8)
    out = tmp_path / "results.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_file=tmp_path / "triton.log")
    process = None
    with server:
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "client", "--url", server.grpc_url, "--loop", "--fps", "4",
                 "--max-in-flight", "2", "--probe-interval", "0.5", "--camera", f"cells={cells}",
                 "--camera", "texture=synthetic:size=96,defect_every=2", "--out", str(out),
                 "--dashboard", f"127.0.0.1:{port}", "--keep-open", "--progress", "none"],
                cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            )
            stderr_lines: list[str] = []
            threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True).start()
            wait_until(lambda: process.poll() is not None or f"dashboard: {base}" in "".join(stderr_lines),
                       "the client to print the dashboard's address", timeout=60)
            assert process.poll() is None, "".join(stderr_lines)

            with headless_chromium() as driver:
                driver.get(base)
                names = wait_until(lambda: sorted(texts(driver, ".camera h2")),
                                   "the camera cards", timeout=30)
                assert names == ["cells", "texture"]
                assert text(driver, '[data-camera="cells"] .source') == \
                    f"folder {cells} (8 images) (live)"
                assert text(driver, '[data-camera="texture"] .source').startswith(
                    "synthetic brick crops 96px")

                # frame counts rise while frames are sent
                wait_until(lambda: counted(driver, "cells", "answered") > 0, "a first answer")
                first = counted(driver, "cells", "answered")
                wait_until(lambda: counted(driver, "cells", "answered") >= first + 3, "the count to rise")

                # the newest frame with its heat map: a JPEG the browser decoded
                width = wait_until(lambda: driver.execute_script(
                    'const i = document.querySelector(\'[data-camera="cells"] img.latest-image\');'
                    'return i && i.complete ? i.naturalWidth : 0;'), "the heat-map image to load")
                assert width == 300  # the ELPV cells are 300 px wide, below the 320 px thumbnail limit
                src = driver.execute_script(
                    'return document.querySelector(\'[data-camera="cells"] img.latest-image\').src;')
                status, body, content_type = get(src)
                assert status == 200 and content_type == "image/jpeg" and body[:2] == b"\xff\xd8"
                heat = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)
                # the jet overlay makes the gray cell colourful: its channels differ (a gray JPEG would not)
                assert np.abs(heat[..., 0] - heat[..., 2]).mean() > 10
                caption = text(driver, '[data-camera="cells"] .latest-caption')
                assert "score" in caption and ("normal" in caption or "anomalous" in caption)

                # anomalous frames' thumbnails, with their scores; each is anomalous in the JSONL file too
                thumbs = wait_until(lambda: driver.execute_script(
                    'return [...document.querySelectorAll(\'[data-camera="texture"] .anomalies li\')]'
                    '.filter(li => li.querySelector("img") && li.querySelector("img").naturalWidth > 0)'
                    '.map(li => li.innerText);'), "an anomalous frame's thumbnail")
                thumb_frames = [int(t.split("#")[1].split()[0]) for t in thumbs]
                thumb_scores = [float(t.split("score ")[1].split()[0]) for t in thumbs]
                keyed = {(r["camera"], r["frame"]): r for r in read_jsonl(out)}
                for frame, score in zip(thumb_frames, thumb_scores):
                    assert keyed[("texture", frame)]["verdict"] == "anomalous"
                    assert score == pytest.approx(keyed[("texture", frame)]["score"], abs=1e-3)
                driver.save_screenshot(str(tmp_path / "dashboard.png"))
                assert text(driver, ".server .badge") == "up"

                # the server goes away: the page says so, and the cameras wait for a server
                server.stop()
                wait_until(lambda: text(driver, ".server .badge") == "down",
                           "the page to show the server down", timeout=30)
                wait_until(lambda: set(texts(driver, ".camera .state"))
                           == {"waiting for a server"}, "the cameras to wait for a server", timeout=30)
                assert "No server is ready" in text(driver, "#banner")
                driver.save_screenshot(str(tmp_path / "dashboard_server_down.png"))
                print(f"screenshots: {tmp_path / 'dashboard.png'}, {tmp_path / 'dashboard_server_down.png'}")

                # Ctrl-C ends the run; --keep-open keeps the page, which shows the run finished
                process.send_signal(signal.SIGINT)
                wait_until(lambda: get_json(base + "api/cameras")["finished"], "the run to finish", timeout=60)
                wait_until(lambda: text(driver, "#run") == "run finished", "the page to show it")
                assert set(texts(driver, ".camera .state")) == {"stopped"}

            records = read_jsonl(out)
            # frames sent after the server stopped: in the spool for the next run (issue 21), not errors
            assert any(r["status"] == "spooled" for r in records)
            samples = scrape(base)
            assert_metrics_agree_with_jsonl(samples, records, ["cells", "texture"])
            assert dict((labels["url"], value) for labels, value in samples["mrkd_server_up"]) == {server.grpc_url: 0}
            api = get_json(base + "api/cameras")
            for camera in api["cameras"]:
                mine = [r for r in records if r["camera"] == camera["name"]]
                assert camera["answered"] == sum(r["status"] == "ok" for r in mine)
                assert camera["dropped"] == sum(r["status"] == "dropped" for r in mine)
                assert camera["errors"] == sum(r["status"] == "error" for r in mine)
                assert camera["state"] == "stopped"
            process.send_signal(signal.SIGINT)  # closes the page
            assert process.wait(timeout=30) == 130  # the run itself was interrupted
        finally:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------- the run's hook


def test_metrics_count_every_jsonl_line_of_a_dropping_camera(served_model, tmp_path):
    """A live camera much faster than the server: most frames are dropped; the observer sees every line once."""
    source = open_source("synthetic:size=64,count=60", SourceOptions(fps=1000))
    state = LineState([("fast", source.description, source.live)], [served_model.grpc_url])
    out = tmp_path / "results.jsonl"
    with InspectionClient([served_model.grpc_url], served_model.model_name, want_map=True, wait_ready=30) as client, \
            JsonlWriter(out) as writer:
        MultiCameraRunner([("fast", source)], client, writer, RunOptions(max_in_flight=1, queue_size=1),
                          observer=state).run()
    records = read_jsonl(out)
    statuses = Counter(r["status"] for r in records)
    assert len(records) == 60 and statuses["dropped"] > 0 and statuses["ok"] > 0
    exposition = state.metrics.exposition().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    assert_metrics_agree_with_jsonl(samples, records, ["fast"])
    snapshot = state.snapshot()["cameras"][0]
    assert (snapshot["answered"], snapshot["dropped"], snapshot["errors"]) == \
        (statuses["ok"], statuses["dropped"], statuses["error"])
    assert snapshot["state"] == "stopped" and snapshot["sent"] == statuses["ok"] + statuses["error"]


class BrokenObserver(RunObserver):
    def __init__(self):
        self.calls = 0

    def frame_recorded(self, camera, frame, record, result):
        self.calls += 1
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_costs_no_line(served_model, tmp_path, capsys):
    source = SyntheticSource(parse_synthetic("synthetic:size=64,count=6"), SourceOptions())
    observer = BrokenObserver()
    with InspectionClient([served_model.grpc_url], served_model.model_name, wait_ready=30) as client, \
            JsonlWriter(tmp_path / "results.jsonl") as writer:
        MultiCameraRunner([("cam", source)], client, writer, observer=observer).run()
    records = read_jsonl(tmp_path / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 6 and observer.calls == 6
    assert capsys.readouterr().err.count("observer BrokenObserver.frame_recorded failed: RuntimeError") == 1


# ------------------------------------------------------------------------------------------ the server itself


def synthetic_cameras(count: int, size: int = 64) -> list[tuple[str, SyntheticSource]]:
    return [(f"cam{i}", SyntheticSource(parse_synthetic(f"synthetic:size={size},seed={i}"), SourceOptions(fps=30)))
            for i in range(count)]


class Answer:
    """What the runner hands the observer for an answered frame (the result's anomaly map)."""

    def __init__(self, anomaly_map: np.ndarray):
        self.anomaly_map = anomaly_map


def test_pushes_are_throttled_whatever_the_frame_rate(tmp_path):
    """8 cameras' worth of answers as fast as they come: the event stream still carries one snapshot per push
    interval, images are rendered only for the newest frame and a few anomalies, and the counts are exact."""
    cameras = synthetic_cameras(8)
    options = DashboardOptions(push_interval_s=0.25, thumbnails_per_s=2.0)
    dashboard = Dashboard("127.0.0.1", 0, cameras, options=options)
    url = dashboard.start()
    frames = {name: list(SyntheticSource(parse_synthetic(f"synthetic:size=64,count=10,seed={i}"),
                                         SourceOptions()).read(name)) for i, (name, _) in enumerate(cameras)}
    heat = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    fed = Counter()
    messages: list[dict] = []
    stop = threading.Event()

    def listen() -> None:
        with urllib.request.urlopen(url + "api/events", timeout=10) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    messages.append(json.loads(line[6:]))
                if stop.is_set():
                    return

    try:
        for name in frames:
            dashboard.state.camera_state(name, "running")
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            for name, shots in frames.items():
                frame = shots[fed[name] % len(shots)]
                record = {"camera": name, "frame": fed[name], "source": frame.source_name, "status": "ok",
                          "server": "127.0.0.1:1", "latency_ms": 12.5, "score": 0.9, "verdict": "anomalous"}
                dashboard.state.frame_recorded(name, frame, record, Answer(heat))
                fed[name] += 1
        elapsed = time.monotonic() - started
        time.sleep(3 * options.push_interval_s)
        stop.set()
        listener.join(timeout=10)
        # what the dashboard's own threads cost is measured (rendering thumbnails takes some CPU) and reported
        cpu = dashboard.state.metrics.registry.get_sample_value("mrkd_dashboard_cpu_seconds_total")
        assert 0 < cpu < 2 * (time.monotonic() - started)
    finally:
        dashboard.stop()
    assert sum(fed.values()) > 2000  # far more frames than pushes
    pushes_during_feed = elapsed / options.push_interval_s
    assert 2 <= len(messages) <= pushes_during_feed + 6, len(messages)
    last = messages[-1]["cameras"]
    assert {c["name"]: c["answered"] for c in last} == dict(fed)
    for camera in last:
        assert len(camera["anomalies"]) <= options.thumbnails_per_s * elapsed + 2
        assert camera["latest"]["image"].startswith(f"/api/cameras/{camera['name']}/latest.jpg")


def test_http_errors_name_the_problem(tmp_path):
    cameras = synthetic_cameras(1)
    dashboard = Dashboard("127.0.0.1", 0, cameras)
    url = dashboard.start()
    try:
        status, body, _ = get(url + "api/cameras/nope/latest.jpg")
        assert status == 404 and "no camera named 'nope'" in json.loads(body)["error"]
        status, body, _ = get(url + "api/cameras/cam0/latest.jpg")
        assert status == 404 and "no answered frame" in json.loads(body)["error"]
        status, body, _ = get(url + "api/cameras/cam0/anomalies/3.jpg")
        assert status == 404 and "frame 3" in json.loads(body)["error"]
        with pytest.raises(DashboardError, match=f"cannot listen on 127.0.0.1:{dashboard.port}"):
            Dashboard("127.0.0.1", dashboard.port, cameras).start()  # the port is taken
        status, body, _ = get(url)
        assert status == 200 and b"/static/dashboard.js" in body
    finally:
        dashboard.stop()
    with pytest.raises(urllib.error.URLError):  # stopped means stopped
        get(url + "api/cameras", timeout=2)


def test_addresses_and_cli_flags_are_checked(capsys):
    from client.cli import parse_args

    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:9100") == ("localhost", 9100)
    for bad in ("8080", "http://127.0.0.1:8080", "127.0.0.1:99999", "127.0.0.1:"):
        with pytest.raises(ValueError, match="not HOST:PORT"):
            parse_address(bad)
    base = ["--url", "127.0.0.1:8001", "--camera", "a=synthetic:", "--out", "x.jsonl"]
    assert parse_args(base + ["--dashboard", "0.0.0.0:8080"]).dashboard == ("0.0.0.0", 8080)
    assert parse_args(base).dashboard is None
    for extra, message in ((["--keep-open"], "--keep-open needs --dashboard"),
                           (["--dashboard", "8080"], "is not HOST:PORT")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err


def test_error_codes_name_the_grpc_status_or_the_client_reason():
    assert error_code("[StatusCode.UNAVAILABLE] failed to connect to all addresses") == "UNAVAILABLE"
    assert error_code("[StatusCode.INVALID_ARGUMENT] image: not a decodable image (no other ready server to "
                      "retry on)") == "INVALID_ARGUMENT"
    assert error_code("no server is ready for model 'mrkd' (127.0.0.1:8001)") == "NO_SERVER"
    assert error_code("unreadable frame: truncated PNG") == "UNREADABLE_FRAME"
    assert error_code("no answer before shutdown") == "NO_ANSWER"
    assert error_code("ValueError: OpenCV could not encode") == "CLIENT"


def test_a_score_that_is_not_a_number_is_never_a_normal_verdict():
    state = LineState([("cam", "synthetic", True)])
    frame = next(iter(SyntheticSource(parse_synthetic("synthetic:size=32,count=1"), SourceOptions()).read("cam")))
    for score in (float("nan"), float("inf"), None):
        state.frame_recorded("cam", frame, {"status": "ok", "score": score, "verdict": "normal", "latency_ms": 5.0,
                                            "frame": 0}, None)
    camera = state.snapshot()["cameras"][0]
    assert (camera["normal"], camera["invalid"], camera["answered"]) == (0, 3, 3)
    families = {f.name: f for f in text_string_to_metric_families(state.metrics.exposition().decode())}
    values = {s.labels["verdict"]: s.value for s in families["mrkd_frames"].samples if s.name == "mrkd_frames_total"}
    assert values == {"normal": 0.0, "anomalous": 0.0, "invalid": 3.0}
    json.dumps(state.snapshot(), allow_nan=False)  # the page never gets NaN


def test_no_thumbnails_are_made_while_nobody_watches():
    cameras = synthetic_cameras(1)
    dashboard = Dashboard("127.0.0.1", 0, cameras, options=DashboardOptions(push_interval_s=0.1))
    url = dashboard.start()
    frame = next(iter(cameras[0][1].read("cam0")))
    record = {"frame": 0, "status": "ok", "score": 0.9, "verdict": "anomalous", "latency_ms": 3.0}
    try:
        dashboard.state.frame_recorded("cam0", frame, record, Answer(np.ones((8, 8), np.float32)))
        time.sleep(0.5)  # several ticks
        camera = get_json(url + "api/cameras")["cameras"][0]
        assert camera["answered"] == 1 and camera["latest"] is None and camera["anomalies"] == []
        with urllib.request.urlopen(url + "api/events", timeout=10) as stream:  # a page opens
            for line in stream:
                if line.startswith(b"data: ") and json.loads(line[6:])["cameras"][0]["latest"]:
                    break
        camera = get_json(url + "api/cameras")["cameras"][0]
        assert camera["latest"]["frame"] == 0 and [a["frame"] for a in camera["anomalies"]] == [0]
        status, body, content_type = get(url + camera["anomalies"][0]["image"].lstrip("/"))
        assert status == 200 and content_type == "image/jpeg"
        assert Image.open(io.BytesIO(body)).size == (64, 64)
    finally:
        dashboard.stop()
