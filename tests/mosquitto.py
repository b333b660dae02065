"""A real MQTT broker for tests: Debian's mosquitto on a free loopback port, with persistence (so that a QoS 1
subscriber's session and the retained messages survive a restart, as a plant's broker is set up), stopped and
started again on the same port by the test. Subscriber: a paho client that keeps every message it receives."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from mrkd.triton.launcher import free_port


class Broker:
    def __init__(self, folder: Path, password_file: Path | None = None):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto; scripts/setup_env.sh does)")
        self.folder = folder
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        auth = f"allow_anonymous false\npassword_file {password_file}\n" if password_file else "allow_anonymous true\n"
        # As root mosquitto would drop to the user "mosquitto", which cannot read the test's files: stay who we are.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n{user}{auth}persistence true\npersistence_location {folder}/\n"
            f"log_dest file {folder}/mosquitto.log\n"
        )
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout} s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and retained messages, then exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Subscriber:
    """A QoS 1 subscriber with a persistent session (clean_session=False): what the broker queued for it while it
    was away (the broker restarting) reaches it when it is back."""

    def __init__(self, broker: Broker, topic: str):
        self.messages: list[tuple[str, dict, bool]] = []  # (topic, JSON payload, retained)
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))

    def received(self, suffix: str = "") -> list[tuple[str, dict, bool]]:
        with self._lock:
            return [m for m in self.messages if m[0].endswith(suffix)]

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
