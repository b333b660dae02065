"""The plant file (`python -m client --config plant.toml`) and a product per camera.

Without a server: every kind of wrong file is one line naming the file, line, key and what is allowed (exit 2,
nothing started); flags the user typed override the file, untyped ones never do. With real tritonservers (one
module fixture: server `both` serves press_line and weld_cell, server `press_only` serves press_line): a product
no server knows is refused before streaming; examples/plant.toml runs two products against one server, each
camera's lines, /api/cameras, the page's badges (headless Chromium) and every /metrics series carrying its
product; and failover is per product (weld_cell frames never go to the server without weld_cell).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from chromium import headless_chromium
from conftest import export_encoded_only
from test_dashboard import assert_metrics_agree_with_jsonl, elpv_cells, get_json, scrape, texts, wait_until

from client.cli import main, parse_args
from client.results import read_jsonl
from mrkd.triton.launcher import TritonServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "plant.toml"

PLANT = """\
[servers]
urls = ["127.0.0.1:8001"]

[defaults]
product = "press_line"
max_in_flight = 2
drop_policy = "newest"

[[cameras]]
name = "press1"
source = "synthetic:size=64,count=4"

[[cameras]]
name = "weld1"
product = "weld_cell"
source = "synthetic:size=64,count=4"
fps = 5.0

[outputs]
results = "plant.jsonl"
"""


def write_plant(folder: Path, text: str = PLANT) -> Path:
    path = folder / "plant.toml"
    path.write_text(text)
    return path


def refused(argv: list[str], capsys) -> str:
    """Runs the client, which must refuse with status 2; returns its one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ a wrong file
@pytest.mark.parametrize("change, expected", [
    # (old text, new text) of PLANT -> what the one line says
    (("fps = 5.0", "fps = 5.0.1"), "plant.toml: not valid TOML: "),  # tomllib's own line and column follow
    (("drop_policy", "drop_polcy"), "plant.toml:7: defaults.drop_polcy: unknown key 'drop_polcy' in defaults; "
                                    "allowed: product, fps, loop, max_in_flight, queue_size, drop_policy, reconnect"),
    (("fps = 5.0", "fps = \"fast\""), "plant.toml:17: cameras[1].fps (camera 'weld1'): Input should be a valid "
                                      "number (got 'fast')"),
    (("fps = 5.0", "fps = -5"), "plant.toml:17: cameras[1].fps (camera 'weld1'): Input should be greater than 0 "
                                "(got -5)"),
    (("drop_policy = \"newest\"", "drop_policy = \"all\""), "plant.toml:7: defaults.drop_policy: Input should be "
                                                            "'oldest' or 'newest' (got 'all')"),
    (("max_in_flight = 2", "max_in_flight = true"), "plant.toml:6: defaults.max_in_flight: Input should be a valid "
                                                    "integer (got True)"),
    (("name = \"weld1\"", "name = \"press1\""), "plant.toml:14: cameras[1].name: camera 'press1' is given twice "
                                                "(also cameras[0]); camera names must be unique"),
    (("source = \"synthetic:size=64,count=4\"\nfps", "fps"), "plant.toml:13: cameras[1].source (camera 'weld1'): "
                                                             "missing: this key is required"),
    (("product = \"weld_cell\"", "product = \"weld/cell\""), "plant.toml:15: cameras[1].product (camera 'weld1'): "
                                                             "product 'weld/cell' may only use letters, digits"),
    (("urls = [\"127.0.0.1:8001\"]", "urls = [\"http://127.0.0.1:8000\"]"), "plant.toml:2: servers.urls: server "
                                                                            "URL 'http://127.0.0.1:8000'"),
    (("results = \"plant.jsonl\"", "dashboard = \"localhost\""), "plant.toml:20: outputs.dashboard: "),
    (("[outputs]", "[output]"), "plant.toml:19: output: unknown key 'output'; allowed: servers, defaults, "
                                "cameras, outputs, run"),
])
def test_a_wrong_plant_file_is_one_line_naming_the_line_the_key_and_what_is_allowed(change, expected, tmp_path,
                                                                                   capsys):
    old, new = change
    assert old in PLANT
    path = write_plant(tmp_path, PLANT.replace(old, new, 1))
    message = refused(["--config", str(path)], capsys)
    assert message.startswith(f"error: {tmp_path}/{expected}"), message
    if "not valid TOML" in expected:
        assert "(at line 17, column" in message
    assert not (tmp_path / "plant.jsonl").exists()  # nothing started


def test_mqtt_credentials_in_the_file_are_never_echoed(tmp_path, capsys):
    text = PLANT + '\n[outputs.mqtt]\nbroker = "127.0.0.1"\nusername = "line3"\npassword = "S3cret-pw"\nqueue = 0\n'
    message = refused(["--config", str(write_plant(tmp_path, text))], capsys)
    assert "outputs.mqtt.queue" in message and "S3cret-pw" not in message
    good = write_plant(tmp_path, text.replace("queue = 0", "queue = 5"))
    args = parse_args(["--config", str(good)])
    assert (args.mqtt.username, args.mqtt.password, args.mqtt.queue_size) == ("line3", "S3cret-pw", 5)
    assert "S3cret-pw" not in repr(args.mqtt)


def test_a_password_that_is_wrong_is_named_without_its_value(tmp_path, capsys):
    text = PLANT + '\n[outputs.mqtt]\nbroker = "127.0.0.1"\nusername = "line3"\npassword = 12345678\n'
    message = refused(["--config", str(write_plant(tmp_path, text))], capsys)
    assert "outputs.mqtt.password" in message and "12345678" not in message


# ------------------------------------------------------------------------------------------- flags over the file
def test_the_file_gives_every_setting_no_flag_was_typed_for(tmp_path):
    args = parse_args(["--config", str(write_plant(tmp_path))])
    assert args.url == ["127.0.0.1:8001"] and args.out == Path("plant.jsonl")
    cameras = {c.name: c for c in args.camera}
    assert (cameras["press1"].product, cameras["press1"].max_in_flight, cameras["press1"].drop_policy,
            cameras["press1"].fps) == ("press_line", 2, "newest", None)
    assert (cameras["weld1"].product, cameras["weld1"].max_in_flight, cameras["weld1"].fps) == ("weld_cell", 2, 5.0)


def test_a_typed_flag_overrides_the_file_even_at_its_default_value(tmp_path):
    path = write_plant(tmp_path)
    # --max-in-flight 4 is the flag's default: typed, it still wins over the file's 2
    args = parse_args(["--config", str(path), "--max-in-flight", "4", "--fps", "2", "--url", "10.0.0.5:8001",
                       "--out", str(tmp_path / "trial.jsonl")])
    assert args.url == ["10.0.0.5:8001"] and args.out == tmp_path / "trial.jsonl"
    assert {(c.name, c.max_in_flight, c.fps, c.drop_policy, c.product) for c in args.camera} == {
        ("press1", 4, 2.0, "newest", "press_line"), ("weld1", 4, 2.0, "newest", "weld_cell")}
    # --model typed: every camera of the file inspects that product for this run
    assert {c.product for c in parse_args(["--config", str(path), "--model", "candidate"]).camera} == {"candidate"}


def test_camera_flags_replace_the_files_cameras_and_take_its_defaults(tmp_path):
    args = parse_args(["--config", str(write_plant(tmp_path)), "--camera", "w2@weld_cell=synthetic:",
                       "--camera", "p9=synthetic:"])
    assert [(c.name, c.product, c.max_in_flight, c.drop_policy) for c in args.camera] == [
        ("w2", "weld_cell", 2, "newest"), ("p9", "press_line", 2, "newest")]


def test_without_a_file_the_camera_flag_takes_an_optional_product_defaulting_to_model():
    args = parse_args(["--url", "127.0.0.1:8001", "--model", "press_line", "--camera", "p1=synthetic:",
                       "--camera", "w1@weld_cell=synthetic:", "--out", "r.jsonl"])
    assert [(c.name, c.product) for c in args.camera] == [("p1", "press_line"), ("w1", "weld_cell")]


def test_without_a_file_url_camera_and_out_are_still_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--url", "127.0.0.1:8001", "--out", "r.jsonl"])
    assert exit_info.value.code == 2
    assert "--camera is required" in capsys.readouterr().err


def test_raw_model_names_one_product_only(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--url", "127.0.0.1:8001", "--camera", "p1@press_line=synthetic:", "--camera",
                    "w1@weld_cell=synthetic:", "--out", "r.jsonl", "--transport", "raw", "--raw-model", "x_raw"])
    assert "several products" in capsys.readouterr().err


def test_the_example_plant_file_is_valid_and_has_two_products():
    args = parse_args(["--config", str(EXAMPLE)])
    assert {c.product for c in args.camera} == {"press_line", "weld_cell"}


def test_the_spool_counts_frames_per_product_across_runs_and_evictions(tmp_path):
    from client.dashboard import LineState
    from client.spool import Spool

    image = np.zeros((32, 32, 3), np.uint8)
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    for frame, (camera, product) in enumerate([("p1", "press_line"), ("w1", "weld_cell"), ("p1", "press_line")]):
        spool.put(image, camera, frame, f"f{frame}", 1000.0, "no server", product=product)
    spool.put(image, "old", 9, "f9", 1000.0, "no server")  # as an older client wrote it: no product
    total = spool.figures()["bytes"]
    spool.close()
    spool = Spool(tmp_path / "spool", max_bytes=total + total // 8)  # the next run: one frame too many
    spool.put(image, "w1", 10, "f10", 1001.0, "no server", product="weld_cell")  # evicts the oldest (press_line)
    figures = spool.product_figures()
    assert {p: (f["frames"], f["evicted"]) for p, f in figures.items()} == {
        "press_line": (1, 1), "weld_cell": (2, 0), "": (1, 0)}
    assert spool.take().product == "weld_cell"  # the oldest left: frame 1, and its product from its file
    state = LineState([("p1", "a", True, "press_line"), ("w1", "b", True, "weld_cell")])
    state.spool_state(**spool.figures(), products=figures)
    exposition = state.metrics.exposition().decode()
    assert 'mrkd_spool_frames{product="weld_cell"} 2.0' in exposition
    assert 'mrkd_spool_evicted_frames_total{product="press_line"} 1.0' in exposition
    spool.close()


# ------------------------------------------------------------------------------------ against real tritonservers
@dataclass(frozen=True)
class Plant:
    both: str  # gRPC URL of the server serving press_line and weld_cell
    press_only: str  # gRPC URL of the server serving press_line only


@pytest.fixture(scope="module")
def plant_servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    work = tmp_path_factory.mktemp("plant")
    repos = {"both": ("press_line", "weld_cell"), "press_only": ("press_line",)}
    with ExitStack() as stack:
        urls = {}
        for key, names in repos.items():
            for name in names:
                export_encoded_only(tiny_checkpoint, work / key, name=name, max_queue_delay_us=5000)
            server = stack.enter_context(TritonServer(work / key, grpc_port=0, http_port=0, metrics_port=0,
                                                      log_file=work / f"{key}.log"))
            urls[key] = server.grpc_url
        yield Plant(**urls)


@pytest.mark.triton
def test_a_product_no_server_serves_is_refused_before_streaming(plant_servers, tmp_path, capsys):
    text = PLANT.replace("127.0.0.1:8001", plant_servers.both).replace('"weld_cell"', '"paint_shop"')
    path = write_plant(tmp_path, text)
    out = tmp_path / "refused.jsonl"
    assert main(["--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"error: camera weld1: product 'paint_shop' is not served by {plant_servers.both}; they serve: "
            "press_line, weld_cell") in err
    assert not out.exists()
    # the flag form too, against both servers: only press_line is on both, weld_cell on one, paint_shop on none
    assert main(["--url", plant_servers.press_only, "--url", plant_servers.both, "--camera",
                 "x@paint_shop=synthetic:", "--out", str(out)]) == 2
    assert "camera x: product 'paint_shop' is not served" in capsys.readouterr().err


@pytest.mark.triton
def test_failover_is_per_product_a_server_without_the_product_never_gets_its_frames(plant_servers, tmp_path):
    out = tmp_path / "failover.jsonl"
    frames = "synthetic:size=64,count=16"
    status = main(["--url", plant_servers.press_only, "--url", plant_servers.both, "--max-in-flight", "2",
                   "--camera", f"press1@press_line={frames}", "--camera", f"press2@press_line={frames}",
                   "--camera", f"weld1@weld_cell={frames},seed=2", "--out", str(out), "--progress", "none",
                   "--probe-interval", "0.5"])
    assert status == 0
    records = read_jsonl(out)
    assert Counter(r["camera"] for r in records) == {"press1": 16, "press2": 16, "weld1": 16}
    assert {r["status"] for r in records} == {"ok"}
    assert {r["product"] for r in records if r["camera"] == "weld1"} == {"weld_cell"}
    assert {r["server"] for r in records if r["camera"] == "weld1"} == {plant_servers.both}
    press = Counter(r["server"] for r in records if r["product"] == "press_line")
    assert set(press) == {plant_servers.press_only, plant_servers.both}  # spread over both
    assert min(press.values()) >= 4, press


def _cells(folder: Path) -> None:
    """images/press1, images/press2, images/weld1 of examples/plant.toml: real ELPV cells."""
    for offset, name in enumerate(("press1", "press2", "weld1")):
        elpv_cells(folder / "images" / name, 4, offset=4 * offset)


@pytest.mark.triton
@pytest.mark.browser
def test_example_plant_two_products_on_one_server_lines_page_api_and_metrics(plant_servers, tmp_path):
    _cells(tmp_path)
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}/"
    out = tmp_path / "results.jsonl"
    # examples/plant.toml as it is, run where its relative sources are; flags override its servers, page and pace
    process = subprocess.Popen(
        [sys.executable, "-m", "client", "--config", str(EXAMPLE), "--url", plant_servers.both, "--loop",
         "--fps", "4", "--dashboard", f"127.0.0.1:{port}", "--keep-open", "--progress", "none"],
        cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    expected = {"press1": "press_line", "press2": "press_line", "weld1": "weld_cell"}
    try:
        wait_until(lambda: process.poll() is not None or f"dashboard: {base}" in "".join(stderr),
                   "the client to print the dashboard's address", timeout=90)
        assert process.poll() is None, "".join(stderr)
        api = get_json(base + "api/cameras")
        assert {c["name"]: c["product"] for c in api["cameras"]} == expected
        with headless_chromium() as driver:
            driver.get(base)
            wait_until(lambda: (lambda counts: len(counts) == 3 and all(v.isdigit() and int(v) >= 3 for v in counts))(
                texts(driver, ".camera .answered")), "every camera to answer a few frames", timeout=90)
            badges = driver.execute_script(
                "return Array.from(document.querySelectorAll('.camera'), c => [c.dataset.camera, "
                "c.querySelector('.product').innerText.trim(), c.querySelector('.product').offsetWidth > 0]);")
            assert {name: product for name, product, _ in badges} == expected
            assert all(visible for _, _, visible in badges)
            shot = tmp_path / "plant_dashboard.png"
            driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
        process.send_signal(signal.SIGINT)
        wait_until(lambda: get_json(base + "api/cameras")["finished"], "the run to finish", timeout=60)
        records = read_jsonl(out)
        samples = scrape(base)
        process.send_signal(signal.SIGINT)  # closes the page
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    frames = [r for r in records if "frame" in r]
    assert {r["camera"]: r["product"] for r in frames} == expected
    assert {r["server"] for r in frames if r["status"] == "ok"} == {plant_servers.both}
    counts = Counter((r["camera"], r["status"]) for r in frames)
    assert all(counts[(camera, "ok")] >= 3 for camera in expected), counts
    print("lines:", dict(counts))
    # every series the client exports carries the product, but the dashboard's own CPU time (one page for all)
    labelled = [(name, labels) for name, pairs in samples.items() for labels, _ in pairs]
    assert {name for name, labels in labelled if "product" not in labels} == {
        "mrkd_dashboard_cpu_seconds_total", "mrkd_dashboard_cpu_seconds_created"}
    assert all(labels["product"] == expected[labels["camera"]] for _, labels in labelled if "camera" in labels)
    assert {labels["product"] for name, labels in labelled if name == "mrkd_spool_frames"} == set(expected.values())
    up = {(labels["url"], labels["product"]) for labels, _ in samples["mrkd_server_up"]}
    assert up == {(plant_servers.both, "press_line"), (plant_servers.both, "weld_cell")}
    assert_metrics_agree_with_jsonl(samples, records, list(expected))
    answered = Counter()
    for labels, value in samples["mrkd_frames_total"]:
        answered[labels["product"]] += value
    assert answered == Counter(r["product"] for r in frames)
