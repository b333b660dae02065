"""Verdicts to the line over MQTT (client/mqtt.py) against a real mosquitto broker that the tests start, restart
and stop (tests/mosquitto.py): QoS 1 verdicts, retained camera states, the last will, a bounded queue while the
broker is away, and clear errors for a broker that cannot be used."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mosquitto import Broker, Subscriber

from client.cli import EXIT_FAILED, main
from client.mqtt import MqttError, MqttOptions, VerdictPublisher, parse_broker

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path: Path):
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def answered(camera: str, frame: int) -> dict:
    """A results line of status ok, as the runner writes it."""
    return {"camera": camera, "frame": frame, "source": f"f{frame:03d}.png", "capture_time": "2026-01-01T00:00:00Z",
            "status": "ok", "server": "127.0.0.1:8001", "latency_ms": 12.5, "score": 0.25 + frame / 1000,
            "raw_score": 1.0, "verdict": "normal"}


def camera_folder(tmp_path: Path) -> Path:
    """A folder with one real ELPV cell."""
    import shutil

    import elpv_dataset

    folder = tmp_path / "cam"
    folder.mkdir()
    shutil.copy(sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))[0], folder)
    return folder


def options(broker: Broker, **extra) -> MqttOptions:
    return MqttOptions(host="127.0.0.1", port=broker.port, prefix="plant", drain_timeout=20.0, **extra)


def test_verdicts_queued_while_the_broker_restarts_are_delivered_and_overflow_is_counted(broker: Broker):
    subscriber = Subscriber(broker, "plant/#")
    from client.dashboard import LineState

    publisher = VerdictPublisher(options(broker, queue_size=20), {"cam1": "press_line"})
    page = LineState([("cam1", "a folder", True)])
    publisher.attach(page)
    publisher.start()
    try:
        publisher.camera_state("cam1", "streaming")
        for frame in range(5):
            publisher.frame_recorded("cam1", None, answered("cam1", frame), None)
        publisher.frame_recorded("cam1", None, {**answered("cam1", 99), "status": "dropped"}, None)  # no verdict
        subscriber.wait_for(lambda: len(subscriber.received("/verdict")) >= 5, "the first verdicts")

        broker.stop()
        for frame in range(5, 30):  # 25 while the broker is away: 20 fit in the queue, 5 are dropped
            publisher.frame_recorded("cam1", None, answered("cam1", frame), None)
        assert publisher.counts()["cam1"]["dropped"] == 5
        broker.start()

        subscriber.wait_for(lambda: len({m[1]["frame"] for m in subscriber.received("/verdict")}) >= 25,
                            "the queued verdicts after the restart")
        publisher.close()
    finally:
        subscriber.close()
    verdicts = subscriber.received("/verdict")
    assert {m[0] for m in verdicts} == {"plant/press_line/cam1/verdict"}
    assert sorted({m[1]["frame"] for m in verdicts}) == list(range(25))
    first = next(m[1] for m in verdicts if m[1]["frame"] == 3)
    assert first == {"camera": "cam1", "product": "press_line", "frame": 3, "source": "f003.png",
                     "capture_time": "2026-01-01T00:00:00Z", "score": 0.253, "verdict": "normal", "status": "ok",
                     "latency_ms": 12.5}
    counts = publisher.counts()["cam1"]
    assert counts == {"published": 25, "dropped": 5, "pending": 0}
    assert any("5 verdicts dropped" in line for line in publisher.summary_lines())
    assert page.snapshot()["mqtt"] == {"broker": f"mqtt://{broker.address}", "published": 25, "dropped": 5,
                                       "pending": 0}
    metrics = page.metrics.exposition().decode()
    assert 'mrkd_mqtt_verdicts_total{camera="cam1",outcome="dropped",product="press_line"} 5.0' in metrics
    assert 'mrkd_mqtt_verdicts_total{camera="cam1",outcome="published",product="press_line"} 25.0' in metrics
    states = [m[1]["state"] for m in subscriber.received("/state")]
    assert "streaming" in states and states[-1] == "stopped"


def test_a_killed_publisher_is_marked_offline_by_its_last_will(broker: Broker):
    code = (
        "import sys, time\n"
        "from client.mqtt import MqttOptions, VerdictPublisher\n"
        f"p = VerdictPublisher(MqttOptions(host='127.0.0.1', port={broker.port}, prefix='plant', keepalive=2),"
        " {'cam1': 'weld_cell', 'cam2': 'weld_cell'})\n"
        "p.start(); p.camera_state('cam1', 'streaming'); p.camera_state('cam2', 'streaming')\n"
        "print('up', flush=True); time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "up"
        watcher = Subscriber(broker, "plant/weld_cell/+/state")
        watcher.wait_for(lambda: {m[0]: m[1]["state"] for m in watcher.received()} == {
            "plant/weld_cell/cam1/state": "streaming", "plant/weld_cell/cam2/state": "streaming"}, "both streaming")
        watcher.close()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        time.sleep(0.5)
        late = Subscriber(broker, "plant/weld_cell/+/state")  # a subscriber that comes later sees the retained will
        late.wait_for(lambda: {(m[0], m[1]["state"]) for m in late.received() if m[2]} == {
            ("plant/weld_cell/cam1/state", "offline"), ("plant/weld_cell/cam2/state", "offline")},
            "the last will on both cameras", timeout=30)
        late.close()
    finally:
        if process.poll() is None:
            process.kill()


def test_broker_addresses_are_parsed_and_bad_ones_named():
    assert parse_broker("broker.plant") == ("broker.plant", 1883, False)
    assert parse_broker("mqtts://10.0.0.2") == ("10.0.0.2", 8883, True)
    assert parse_broker("mqtt://[::1]:1884") == ("::1", 1884, False)
    for bad in ("http://x", "host:port", ""):
        with pytest.raises(MqttError, match="MQTT broker"):
            parse_broker(bad)


def test_an_unreachable_broker_is_one_clear_error_before_anything_starts(tmp_path: Path, capsys):
    from mrkd.triton.launcher import free_port

    folder = camera_folder(tmp_path)
    port = free_port()  # nothing listens there; no Triton server either: the broker is checked first
    code = main(["--url", "127.0.0.1:1", "--camera", f"a={folder}", "--out", str(tmp_path / "r.jsonl"),
                 "--mqtt", f"127.0.0.1:{port}"])
    assert code == EXIT_FAILED
    assert f"cannot reach the MQTT broker mqtt://127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_broker_that_refuses_the_credentials_is_named_and_the_password_never_shown(tmp_path: Path, capsys,
                                                                                   monkeypatch):
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "line", "right-secret"], check=True)
    passwords.chmod(0o600)
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", password_file=passwords)
    broker.start()
    try:
        folder = camera_folder(tmp_path)
        monkeypatch.setenv("MRKD_MQTT_USERNAME", "line")
        monkeypatch.setenv("MRKD_MQTT_PASSWORD", "wrong-secret")
        code = main(["--url", "127.0.0.1:1", "--camera", f"a={folder}", "--out", str(tmp_path / "r.jsonl"),
                     "--mqtt", broker.address])
        err = capsys.readouterr().err
        assert code == EXIT_FAILED
        assert f"the MQTT broker mqtt://{broker.address} refused the connection: Not authorized" in err
        assert "secret" not in err
        assert "wrong-secret" not in repr(options(broker, username="line", password="wrong-secret"))

        monkeypatch.setenv("MRKD_MQTT_PASSWORD", "right-secret")  # the same broker takes the right password
        publisher = VerdictPublisher(options(broker), {"a": "press_line"})
        publisher.start()
        publisher.close()
    finally:
        broker.stop()


# The whole client against the real tritonserver of the session fixture `served_model` (tests/conftest.py).


def start_client(served_model, tmp_path: Path, broker: Broker, *extra: str) -> tuple[subprocess.Popen, Path]:
    import shutil

    import elpv_dataset

    cells = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))
    cameras = []
    for k, name in enumerate(("cam1", "cam2")):
        folder = tmp_path / name
        folder.mkdir()
        for cell in cells[k * 4:(k + 1) * 4]:
            shutil.copy(cell, folder)
        cameras += ["--camera", f"{name}={folder}"]
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "client", "--url", served_model.grpc_url, "--model", served_model.model_name,
               *cameras, "--out", str(out), "--loop", "--fps", "5", "--progress", "none",
               "--mqtt", broker.address, "--mqtt-prefix", "plant", *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True), out


@pytest.mark.triton
@pytest.mark.slow
def test_every_answered_frame_reaches_a_subscriber_through_a_broker_restart(served_model, broker: Broker,
                                                                             tmp_path: Path):
    from client.results import read_jsonl

    subscriber = Subscriber(broker, "plant/#")
    client, out = start_client(served_model, tmp_path, broker, "--max-frames", "40")
    try:
        subscriber.wait_for(lambda: len(subscriber.received("/verdict")) >= 10, "the first verdicts", timeout=120)
        broker.stop()
        time.sleep(2.0)  # frames answered meanwhile wait in the client's queue
        broker.start()
        _, err = client.communicate(timeout=240)
        assert client.returncode == 0, err[-3000:]
        answered = {(r["camera"], r["frame"]): r for r in read_jsonl(out) if r.get("status") in ("ok", "invalid_score")}
        subscriber.wait_for(lambda: len({(m[1]["camera"], m[1]["frame"]) for m in subscriber.received("/verdict")})
                            >= len(answered), "every answered frame", timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        subscriber.close()
    verdicts = subscriber.received("/verdict")
    received = {(m[1]["camera"], m[1]["frame"]): m for m in verdicts}
    assert len(answered) == 80 and set(received) == set(answered)
    for key, (topic, message, _) in received.items():
        assert topic == f"plant/mrkd/{key[0]}/verdict"
        assert (message["score"], message["verdict"], message["source"]) == \
            (answered[key]["score"], answered[key]["verdict"], answered[key]["source"])
    assert f"mqtt: {len(answered)} verdicts acknowledged by mqtt://{broker.address}" in err
    print(f"{len(answered)} answered frames, {len(received)} received by the subscriber "
          f"({len(verdicts) - len(received)} QoS 1 duplicates) through a broker restart")
    latest = {m[0]: m[1]["state"] for m in subscriber.received("/state")}
    assert latest == {"plant/mrkd/cam1/state": "stopped", "plant/mrkd/cam2/state": "stopped"}


@pytest.mark.triton
def test_a_sigkilled_client_is_marked_offline_by_its_last_will(served_model, broker: Broker, tmp_path: Path):
    watcher = Subscriber(broker, "plant/+/+/state")
    client, _ = start_client(served_model, tmp_path, broker, "--max-frames", "10000")
    try:
        watcher.wait_for(lambda: {m[0]: m[1]["state"] for m in watcher.received()} == {
            "plant/mrkd/cam1/state": "running", "plant/mrkd/cam2/state": "running"}, "both cameras running",
            timeout=120)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
        watcher.wait_for(lambda: {m[0]: m[1]["state"] for m in watcher.received()} == {
            "plant/mrkd/cam1/state": "offline", "plant/mrkd/cam2/state": "offline"}, "the last will", timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        watcher.close()
