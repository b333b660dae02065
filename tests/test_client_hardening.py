"""Hardening, round two (issue 21): no stream credential written or shown, a dashboard that cannot be starved or
read from another site, one output per client, nothing lost when the servers are away longer than the retry
timeout (the spool)."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest
from helpers import REPO_ROOT
from test_client import MjpegStreamServer, elpv_images
from test_dashboard import get, scrape, synthetic_cameras

from client.dashboard import Dashboard, DashboardError, DashboardOptions, LineState
from client.dashboard.access import Credentials
from client.inspection import InspectionClient
from client.results import JsonlWriter, OutputInUse, read_jsonl
from client.runner import MultiCameraRunner, RunOptions
from client.servers import ServerPool
from client.sources import SourceError, SourceOptions, open_source, parse_camera
from client.spool import Spool
from mrkd.core.preprocess import load_image
from mrkd.triton.launcher import free_port

SECRET = "S3cretPw"


def request(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_get(port: int, path: str, host: str) -> bytes:
    """One GET with a chosen Host header (urllib sets its own)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


# ------------------------------------------------------------------------------------------- 1. stream credentials
def test_a_stream_url_with_credentials_is_redacted_in_errors_and_descriptions():
    port = free_port()  # nothing listens there: OpenCV cannot open it
    with pytest.raises(SourceError) as info:
        open_source(f"http://admin:{SECRET}@127.0.0.1:{port}/stream.mjpg?token=t0ken123")
    assert SECRET not in str(info.value) and "t0ken123" not in str(info.value)
    assert f"http://***@127.0.0.1:{port}/stream.mjpg?token=***" in str(info.value)
    with pytest.raises(SourceError) as info:
        parse_camera(f"rtsp://admin:{SECRET}@10.0.0.20/stream1")  # no NAME=: the error quotes the argument
    assert SECRET not in str(info.value)
    with pytest.raises(SourceError) as info:  # no NAME= either, but an '=' in the query: not a camera name
        parse_camera(f"rtsp://admin:{SECRET}@10.0.0.20/stream1?channel=1")
    assert SECRET not in str(info.value)


@pytest.mark.triton
def test_stream_credentials_never_reach_lines_page_api_events_or_logs(served_model, tmp_path, capfd):
    frames = [load_image(p) for p in elpv_images()[:3]]
    camera = MjpegStreamServer(frames, frames_per_connection=4, connections=1)
    url = camera.url.replace("http://", f"http://admin:{SECRET}@") + f"?password={SECRET}x"
    source = open_source(url)  # the stream opens with its credentials
    dashboard = Dashboard("127.0.0.1", 0, [("ip", source)])
    base = dashboard.start()
    out = tmp_path / "results.jsonl"
    client = InspectionClient([served_model.grpc_url], served_model.model_name, wait_ready=120, want_map=True)
    writer = JsonlWriter(out)
    try:
        events = urllib.request.urlopen(base + "api/events", timeout=10)
        runner = MultiCameraRunner([("ip", source)], client, writer, RunOptions(), observer=dashboard.state)
        summaries = runner.run()
        dashboard.finish()
        seen = [get(base + path)[1] for path in ("", "api/cameras", "metrics")]
        seen.append(events.read1(1 << 20))
        events.close()
    finally:
        writer.close()
        client.close()
        dashboard.stop()
        camera.close()
    records = read_jsonl(out)
    assert summaries[0]["answered"] == 4 and [r["status"] for r in records if "frame" in r] == ["ok"] * 4
    assert all(r["source"].startswith("http://***@127.0.0.1:") for r in records if "frame" in r)
    assert json.loads(seen[1])["cameras"][0]["source"].startswith("stream http://***@127.0.0.1:")
    logs = capfd.readouterr()
    for text in [out.read_text(), *(b.decode() for b in seen), logs.out, logs.err]:
        assert SECRET not in text


# --------------------------------------------------------------------------------------- 2. cannot be starved
def test_silent_and_half_sent_connections_are_closed_and_bounded(tmp_path):
    options = DashboardOptions(max_connections=8, request_timeout_s=4.0, max_event_streams=2, push_interval_s=0.5)
    dashboard = Dashboard("127.0.0.1", 0, synthetic_cameras(1), options=options)
    base = dashboard.start()
    sockets = []
    try:
        opened = time.monotonic()
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /api/cameras HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a request, never finished
            sockets.append(sock)
        closed: set[int] = set()
        while len(closed) < 30 - 8 and time.monotonic() - opened < 3.0:  # before any request deadline
            closed |= {i for i, sock in enumerate(sockets) if i not in closed and _closed_by_server(sock, 0.01)}
        assert len(closed) >= 30 - 8, f"only {len(closed)} of 30 closed at once: the bound is 8 open connections"
        assert all(_closed_by_server(s, 15.0) for s in sockets), "a silent connection outlived request_timeout_s"
        assert time.monotonic() - opened >= 4.0  # the 8 admitted ones got their request_timeout_s
        assert request(base + "api/cameras")[0] == 200  # it still serves

        streams = [urllib.request.urlopen(base + "api/events", timeout=5) for _ in range(2)]
        assert request(base + "api/events")[0] == 503  # a third page is refused, the two open ones keep going
        wakeups = dashboard.stream_wakeups
        time.sleep(3.0)
        # two streams, a snapshot every 0.5 s: about 12 wake-ups in 3 s (polling every 0.1 s made 60)
        assert dashboard.stream_wakeups - wakeups <= 2 * (3.0 / 0.5 + 2)
        for stream in streams:
            stream.close()
    finally:
        for sock in sockets:
            sock.close()
        dashboard.stop()


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


EMFILE_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    from client.dashboard import Dashboard
    from client.sources import SourceOptions, open_source
    source = open_source(sys.argv[1], SourceOptions(loop=True, fps=20))
    dashboard = Dashboard("127.0.0.1", 0, [("cam", source)])
    print(dashboard.start(), flush=True)
    read = errors = 0
    try:
        for frame in source.read("cam"):
            read += 1
            errors += frame.image is None
            if read == 200:
                break
        print(f"read {read} errors {errors}", flush=True)
    except Exception as exc:
        print(f"gave up: {type(exc).__name__}: {exc}", flush=True)
    dashboard.stop()
""")


@pytest.mark.slow
def test_130_silent_connections_with_128_descriptors_never_stop_a_folder_camera(tmp_path):
    """The issue's reproduction: a client process limited to 128 open files, a folder camera reading, 130 silent
    connections to its dashboard from another process."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for path in elpv_images()[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    process = subprocess.Popen([sys.executable, "-c", EMFILE_SCRIPT, str(folder)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets = []
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read()
        port = int(url.rsplit(":", 1)[1].strip("/"))
        for _ in range(130):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        report, _ = process.communicate(timeout=120)
    finally:
        for sock in sockets:
            sock.close()
        if process.poll() is None:
            process.kill()
    assert report.strip().splitlines()[-1] == "read 200 errors 0", report


def test_unreadable_frames_are_error_frames_and_too_many_in_a_row_is_a_clear_give_up(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png")
    source = open_source(str(folder), SourceOptions(loop=True, max_read_errors=5))
    frames = []
    with pytest.raises(SourceError, match=r"gave up after 5 unreadable frames in a row \(last: .*2\.png"):
        for frame in source.read("cam"):
            frames.append(frame)
    assert len(frames) == 5 and all(f.image is None and f.read_error for f in frames)


# ------------------------------------------------------------------------------------------- 3. binding
def test_bound_beyond_loopback_it_needs_credentials_prints_the_real_address_and_checks_host(capfd):
    cameras = synthetic_cameras(1)
    with pytest.raises(DashboardError, match="MRKD_DASHBOARD_TOKEN"):
        Dashboard("0.0.0.0", 0, cameras, credentials=Credentials())
    dashboard = Dashboard("0.0.0.0", 0, cameras, credentials=Credentials(token="tok-123"))
    url = dashboard.start()
    try:
        assert url == f"http://0.0.0.0:{dashboard.port}/"
        assert "WARNING" in capfd.readouterr().err
        local = dashboard.local_url
        status, body = request(local + "api/cameras")
        assert status == 401 and b"tok-123" not in body
        assert request(local + "api/cameras", {"Authorization": "Bearer wrong"})[0] == 401
        assert request(local + "api/cameras", {"Authorization": "Bearer tok-123"})[0] == 200
        basic = base64.b64encode(b"anyone:tok-123").decode()
        assert request(local + "metrics", {"Authorization": f"Basic {basic}"})[0] == 200
    finally:
        dashboard.stop()
    with_user = Dashboard("127.0.0.1", 0, cameras, credentials=Credentials(user="line3", password="pw"))
    base = with_user.start()
    try:
        assert request(base)[0] == 401
        good = base64.b64encode(b"line3:pw").decode()
        assert request(base, {"Authorization": f"Basic {good}"})[0] == 200
    finally:
        with_user.stop()


def test_a_foreign_host_header_is_refused(monkeypatch):
    monkeypatch.delenv("MRKD_DASHBOARD_TOKEN", raising=False)
    dashboard = Dashboard("127.0.0.1", 0, synthetic_cameras(1))
    dashboard.start()
    try:
        assert raw_get(dashboard.port, "/api/cameras", "attacker.example").startswith(b"HTTP/1.1 400")
        assert raw_get(dashboard.port, "/api/cameras", f"127.0.0.1:{dashboard.port}").startswith(b"HTTP/1.1 200")
        assert raw_get(dashboard.port, "/api/cameras", f"localhost:{dashboard.port}").startswith(b"HTTP/1.1 200")
    finally:
        dashboard.stop()


# ------------------------------------------------------------------------------------------- 4. small ones
def test_a_huge_frame_number_is_a_404_not_a_500():
    dashboard = Dashboard("127.0.0.1", 0, synthetic_cameras(1))
    base = dashboard.start()
    try:
        status, body, _ = get(base + "api/cameras/cam0/anomalies/" + "9" * 5000 + ".jpg")
        assert status == 404 and "frame number" in json.loads(body)["error"]
        assert get(base + "api/cameras/cam0/anomalies/x1.jpg")[0] == 404
    finally:
        dashboard.stop()


def test_two_clients_cannot_write_one_results_file(tmp_path):
    out = tmp_path / "results.jsonl"
    first = JsonlWriter(out)
    try:
        with pytest.raises(OutputInUse, match="in use by another client"):
            JsonlWriter(out, overwrite=True)  # not even with --overwrite
        first.write({"camera": "a", "frame": 0})
    finally:
        first.close()
    assert read_jsonl(out) == [{"camera": "a", "frame": 0}]
    with pytest.raises(FileExistsError, match="already exists"):
        JsonlWriter(out)


def test_earlier_heat_maps_are_protected_like_out(tmp_path, capsys):
    from client.cli import main

    heatmaps = tmp_path / "heatmaps"
    (heatmaps / "cam").mkdir(parents=True)
    earlier = heatmaps / "cam" / "cam_000003.png"
    earlier.write_bytes(b"an earlier run's heat map")
    args = ["--url", f"127.0.0.1:{free_port()}", "--camera", "cam=synthetic:size=32,count=2",
            "--save-heatmaps", str(heatmaps), "--wait-ready", "0.5", "--progress", "none"]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 1
    assert "already holds 1 heat maps" in capsys.readouterr().err and earlier.read_bytes().startswith(b"an earlier")
    main([*args, "--out", str(tmp_path / "b.jsonl"), "--overwrite"])
    assert not earlier.exists()  # --overwrite: this run's heat maps only


def test_the_outage_error_is_counted_as_no_server(tmp_path):
    """No server at all, no spool: each frame's error line is the runner's own outage message, and
    mrkd_request_errors_total labels it NO_SERVER (not CLIENT)."""
    pool = ServerPool([f"127.0.0.1:{free_port()}"], "mrkd", probe_interval=0.2, probe_timeout=0.2)
    client = InspectionClient(pool, "mrkd", retry_timeout=0.5)
    state = LineState([("cam", "synthetic", True)])
    source = open_source("synthetic:size=32,count=3", SourceOptions(fps=10))
    writer = JsonlWriter(tmp_path / "results.jsonl")
    runner = MultiCameraRunner([("cam", source)], client, writer, RunOptions(queue_size=10, retry_timeout=0.5),
                               observer=state)
    try:
        runner.run()
    finally:
        writer.close()
        client.close()
        pool.close()
    records = read_jsonl(tmp_path / "results.jsonl")
    assert [r["status"] for r in records] == ["error"] * 3 and "no server ready within" in records[0]["error"]
    exposition = state.metrics.exposition().decode()
    assert 'mrkd_request_errors_total{camera="cam",code="NO_SERVER",product=""} 3.0' in exposition
    assert 'code="CLIENT"' not in exposition


# ------------------------------------------------------------------------------------------- the spool
def test_the_spool_is_bounded_evicts_oldest_first_survives_reopening_and_is_one_clients(tmp_path):
    frames = [np.full((32, 32, 3), i, np.uint8) for i in range(6)]
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    for i, image in enumerate(frames[:3]):
        assert spool.put(image, "cam", i, f"f{i}", 1000.0 + i, "no server") == []
    one = (tmp_path / "spool").stat().st_size and max(p.stat().st_size for p in (tmp_path / "spool").glob("*.npz"))
    with pytest.raises(OutputInUse, match="in use by another client"):
        Spool(tmp_path / "spool", max_bytes=10**9)
    spool.close()
    spool = Spool(tmp_path / "spool", max_bytes=3 * one + one // 2)  # room for three frames
    assert spool.resumed == 3 and len(spool) == 3
    evicted = spool.put(frames[3], "cam", 3, "f3", 1003.0, "no server")
    assert [(e.camera, e.frame, e.capture_time) for e in evicted] == [("cam", 0, 1000.0)]
    assert spool.figures()["evicted"] == 1 and len(spool) == 3
    taken = spool.take()
    assert (taken.frame, taken.source) == (1, "f1") and np.array_equal(taken.image, frames[1])
    spool.done(taken)
    spool.close()
    assert sorted(e.frame for e in Spool(tmp_path / "spool", max_bytes=10**9).left()) == [2, 3]


@pytest.mark.triton
@pytest.mark.slow
def test_frames_past_the_retry_timeout_are_spooled_and_inspected_late_by_the_next_run(served_model, tmp_path):
    """Run 1 has no server: every frame waits --retry-timeout, goes to the spool (no error line) and, the run
    ending with no server back, gets a "spooled" line. Run 2 (same spool, a real server) inspects them first:
    status "late", the capture time of run 1 and an inspection time, the spool empty afterwards; the page's
    /metrics showed the spool's depth meanwhile."""
    spool_dir = tmp_path / "spool"
    pool = ServerPool([f"127.0.0.1:{free_port()}"], "mrkd", probe_interval=0.2, probe_timeout=0.2)
    client = InspectionClient(pool, "mrkd", retry_timeout=0.5)
    spool = Spool(spool_dir, 10**9)
    state = LineState([("cam", "synthetic", True)])
    source = open_source("synthetic:size=64,count=4", SourceOptions(fps=10))
    writer = JsonlWriter(tmp_path / "run1.jsonl")
    options = RunOptions(queue_size=10, retry_timeout=0.5, spool=spool, spool_wait=0.5)
    try:
        summaries = MultiCameraRunner([("cam", source)], client, writer, options, observer=state).run()
    finally:
        writer.close()
        client.close()
        pool.close()
        spool.close()
    first = read_jsonl(tmp_path / "run1.jsonl")
    assert [r["status"] for r in first] == ["spooled"] * 4 and summaries[0]["spooled"] == 4
    assert all("no server ready within 0.5 s" in r["spool_reason"] for r in first)

    spool = Spool(spool_dir, 10**9)
    dashboard = Dashboard("127.0.0.1", 0, [("cam", open_source("synthetic:size=64,count=2"))], spool=spool)
    base = dashboard.start()
    depth = sum(value for _, value in scrape(base)["mrkd_spool_frames"])
    client = InspectionClient([served_model.grpc_url], served_model.model_name, wait_ready=120)
    writer = JsonlWriter(tmp_path / "run2.jsonl")
    try:
        MultiCameraRunner([("cam", open_source("synthetic:size=64,count=2"))], client, writer,
                          RunOptions(spool=spool), observer=dashboard.state).run()
        dashboard.finish()  # publishes a last snapshot (and the metrics) at once
        depth_after = sum(value for _, value in scrape(base)["mrkd_spool_frames"])
    finally:
        writer.close()
        client.close()
        dashboard.stop()
        spool.close()
    second = read_jsonl(tmp_path / "run2.jsonl")
    late = [r for r in second if r["status"] == "late"]
    assert (depth, depth_after) == (4, 0)
    assert sorted(r["frame"] for r in late) == [0, 1, 2, 3] and len(second) == 6
    by_frame = {r["frame"]: r for r in first}
    for r in late:
        assert r["capture_time"] == by_frame[r["frame"]]["capture_time"] and r["spooled_by_earlier_run"] is True
        assert r["inspected_time"] > r["capture_time"] and r["verdict"] in ("normal", "anomalous")
        assert isinstance(r["score"], float)
    assert not spool_dir.exists()  # emptied, and an empty spool leaves nothing behind


def test_a_full_spool_evicts_the_oldest_each_a_dropped_line_and_every_frame_keeps_one_line(tmp_path):
    """No server: 6 frames go to a spool with room for about two; the four oldest are evicted (a "dropped" line
    each, counted), the two newest are left for the next run ("spooled" lines): one line per frame read."""
    probe = Spool(tmp_path / "probe", 10**9)
    probe.put(next(iter(open_source("synthetic:size=64,count=1").read("x"))).image, "x", 0, "x", 0.0, "")
    one = max(p.stat().st_size for p in (tmp_path / "probe").glob("*.npz"))
    probe.close()
    pool = ServerPool([f"127.0.0.1:{free_port()}"], "mrkd", probe_interval=0.2, probe_timeout=0.2)
    client = InspectionClient(pool, "mrkd", retry_timeout=0.3)
    spool = Spool(tmp_path / "spool", max_bytes=int(2.5 * one))
    writer = JsonlWriter(tmp_path / "results.jsonl")
    options = RunOptions(queue_size=10, retry_timeout=0.3, spool=spool, spool_wait=0.3)
    try:
        summary = MultiCameraRunner([("cam", open_source("synthetic:size=64,count=6", SourceOptions(fps=10)))],
                                    client, writer, options).run()[0]
    finally:
        writer.close()
        client.close()
        pool.close()
        spool.close()
    records = read_jsonl(tmp_path / "results.jsonl")
    assert sorted(r["frame"] for r in records) == list(range(6))
    by_status = {s: sorted(r["frame"] for r in records if r["status"] == s) for s in ("dropped", "spooled")}
    assert by_status == {"dropped": [0, 1, 2, 3], "spooled": [4, 5]}, records
    assert all("evicted from the full spool" in r["drop_reason"] for r in records if r["status"] == "dropped")
    assert spool.evicted == 4 and (summary["dropped"], summary["spooled"], summary["errors"]) == (4, 2, 0)
