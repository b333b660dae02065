"""Verdicts to the line over MQTT (Eclipse paho-mqtt): a run observer that publishes every answered frame.

Topics, per camera:
  <prefix>/<product>/<camera>/verdict   one JSON message per answered frame (QoS 1, not retained): camera, product,
                                        frame, source, capture_time, score, verdict, status, latency_ms
  <prefix>/<product>/<camera>/state     the camera's live state, retained (QoS 1): {"state": ..., "time": ...};
                                        "offline" is the connection's last will, so a client that dies (SIGKILL,
                                        power loss) is marked offline by the broker; a clean exit leaves "stopped"

Each camera has its own broker connection (so that each camera's state topic has its own last will). A broker that
goes away costs no verdict: paho keeps unacknowledged QoS 1 messages and publishes made while disconnected in its
out-queue and sends them when it has reconnected. The queue is bounded (`queue_size` per camera); a verdict that
does not fit is counted as dropped and reported in the summary and /metrics. Credentials come from the options or
the environment (MRKD_MQTT_USERNAME, MRKD_MQTT_PASSWORD) and are never printed.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .events import RunObserver

if TYPE_CHECKING:
    from .inspection import InspectionResult
    from .sources import Frame

OFFLINE = "offline"
STOPPED = "stopped"
ANSWERED = ("ok", "invalid_score")  # the statuses that carry the server's verdict
ENV_USERNAME = "MRKD_MQTT_USERNAME"
ENV_PASSWORD = "MRKD_MQTT_PASSWORD"
_TOPIC_LEVEL = re.compile(r"^[^#+/\x00]+$")


class MqttError(RuntimeError):
    """The broker cannot be reached, refused the connection, or an option is wrong."""


@dataclass
class MqttOptions:
    host: str
    port: int = 1883
    prefix: str = "mrkd"
    queue_size: int = 10_000  # verdicts waiting per camera while the broker is away
    keepalive: int = 30
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0  # at exit, seconds to wait for the broker to acknowledge what is queued
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prefix or not all(_TOPIC_LEVEL.match(level) for level in self.prefix.split("/")):
            raise MqttError(f"MQTT prefix {self.prefix!r}: topic levels must be non-empty, without '#', '+'")
        if not 1 <= self.port <= 65535:
            raise MqttError(f"MQTT port must be 1-65535, got {self.port}")
        if self.queue_size < 1:
            raise MqttError(f"MQTT queue size must be at least 1, got {self.queue_size}")
        if self.username is None:
            self.username = os.environ.get(ENV_USERNAME) or None
        if self.password is None:
            self.password = os.environ.get(ENV_PASSWORD) or None
        if self.password is not None and self.username is None:
            raise MqttError(f"an MQTT password needs a username (set {ENV_USERNAME})")

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(address: str) -> tuple[str, int, bool]:
    """'HOST[:PORT]', 'mqtt://HOST[:PORT]' or 'mqtts://HOST[:PORT]' -> (host, port, tls); 1883, or 8883 for TLS."""
    match = re.fullmatch(r"(?:(mqtts?)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::(\d+))?", address.strip())
    if not match:
        raise MqttError(f"MQTT broker {address!r}: expected HOST[:PORT], mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = match.group(1) == "mqtts"
    return match.group(2).strip("[]"), int(match.group(3) or (8883 if tls else 1883)), tls


def topic(options: MqttOptions, product: str, camera: str, leaf: str) -> str:
    """The MQTT topic <prefix>/<product>/<camera>/<leaf>."""
    return f"{options.prefix}/{product}/{camera}/{leaf}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def verdict_message(product: str, record: dict[str, Any]) -> dict[str, Any]:
    """A results line -> the verdict message (a score that is not a number is null, its verdict 'anomalous')."""
    score = record.get("score")
    return {
        "camera": record["camera"],
        "product": product,
        "frame": record["frame"],
        "source": record.get("source"),
        "capture_time": record.get("capture_time"),
        "score": score if isinstance(score, (int, float)) and math.isfinite(score) else None,
        "verdict": record.get("verdict"),
        "status": record.get("status"),
        "latency_ms": record.get("latency_ms"),
    }


class CameraLink:
    """One camera's broker connection: its verdicts, its retained state, its last will."""

    def __init__(self, options: MqttOptions, product: str, camera: str):
        import paho.mqtt.client as mqtt

        self.options = options
        self.camera = camera
        self.verdict_topic = topic(options, product, camera, "verdict")
        self.state_topic = topic(options, product, camera, "state")
        self.state = "starting"
        self.dropped = 0  # verdicts that did not fit in the queue
        self._acknowledged = 0  # verdicts the broker acknowledged (PUBACK)
        # Message id -> "verdict" or "state", until its PUBACK. paho calls on_publish holding its own lock, and can
        # do so before publish() has returned the id: such early ids wait in `_early` for publish() to claim them.
        self._unacknowledged: dict[int, str] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mrkd-{camera}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.max_queued_messages_set(options.queue_size)
        self.client.reconnect_delay_set(0.5, 10)
        if options.username is not None:
            self.client.username_pw_set(options.username, options.password)
        if options.tls:
            self.client.tls_set(ca_certs=str(options.ca_file) if options.ca_file else None)
        self.client.will_set(self.state_topic, self._state_payload(OFFLINE), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish

    def _state_payload(self, state: str) -> str:
        return json.dumps({"state": state, "time": _now()})

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._connected.set()
            return
        # A restarted broker may have lost the retained state: say it again.
        self._publish_state(self.state)
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            kind = self._unacknowledged.pop(mid, None)
            if kind is None:
                self._early.add(mid)
            elif kind == "verdict":
                self._acknowledged += 1

    def _track(self, info: Any, kind: str) -> None:
        """Called after publish() returned (never holding paho's lock, see _on_publish)."""
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acknowledged += kind == "verdict"
            else:
                self._unacknowledged[info.mid] = kind

    def _publish_state(self, state: str) -> Any:
        import paho.mqtt.client as mqtt

        info = self.client.publish(self.state_topic, self._state_payload(state), qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
            self._track(info, "state")
        return info

    def connect(self) -> None:
        """Connects (raises MqttError naming the broker when it cannot) and starts paho's network thread."""
        try:
            self.client.connect(self.options.host, self.options.port, keepalive=self.options.keepalive)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot reach the MQTT broker {self.options.address}: {exc}") from exc
        self.client.loop_start()
        if not self._connected.wait(self.options.connect_timeout):
            self.client.loop_stop()
            raise MqttError(f"the MQTT broker {self.options.address} did not answer in "
                            f"{self.options.connect_timeout:g} s")
        if self._refused is not None:
            self.client.loop_stop()
            self.client.disconnect()
            raise MqttError(f"the MQTT broker {self.options.address} refused the connection: {self._refused}")

    def publish_verdict(self, message: dict[str, Any]) -> None:
        import paho.mqtt.client as mqtt

        info = self.client.publish(self.verdict_topic, json.dumps(message, allow_nan=False), qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            with self._lock:
                self.dropped += 1
            return
        self._track(info, "verdict")

    def set_state(self, state: str) -> None:
        self.state = state
        self._publish_state(state)

    @property
    def pending(self) -> int:
        """Verdicts the broker has not acknowledged yet."""
        with self._lock:
            return sum(1 for kind in self._unacknowledged.values() if kind == "verdict")

    @property
    def acknowledged(self) -> int:
        with self._lock:
            return self._acknowledged

    def close(self, deadline: float) -> None:
        """Waits until `deadline` (monotonic) for what is queued, leaves 'stopped' retained, disconnects."""
        self.set_state(STOPPED)
        while self._unacknowledged and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()


class VerdictPublisher(RunObserver):
    """Publishes the verdict of every answered frame and every camera state change (see the module docstring)."""

    def __init__(self, options: MqttOptions, cameras: dict[str, str]):
        """`cameras`: camera name -> its product (the ensemble its frames go to)."""
        for name, product in cameras.items():
            for level in (name, product):
                if not _TOPIC_LEVEL.match(level):
                    raise MqttError(f"{level!r} cannot be an MQTT topic level")
        self.options = options
        self.products = dict(cameras)
        self.links = {name: CameraLink(options, product, name) for name, product in cameras.items()}

    def start(self) -> str:
        """Connects every camera's link; MqttError (the others closed again) when one cannot."""
        started: list[CameraLink] = []
        try:
            for link in self.links.values():
                link.connect()
                started.append(link)
        except MqttError:
            for link in started:
                link.client.disconnect()
                link.client.loop_stop()
            raise
        return f"{self.options.address}/{self.options.prefix}"

    def camera_state(self, camera: str, state: str) -> None:
        self.links[camera].set_state(state)

    def frame_recorded(self, camera: str, frame: "Frame", record: dict[str, Any],
                       result: "InspectionResult | None") -> None:
        if record.get("status") in ANSWERED:
            self.links[camera].publish_verdict(verdict_message(self.products[camera], record))

    def counts(self) -> dict[str, dict[str, int]]:
        """camera -> {published, dropped, pending}: verdicts the broker acknowledged, did not fit, still queued."""
        return {name: {"published": link.acknowledged, "dropped": link.dropped, "pending": link.pending}
                for name, link in self.links.items()}

    def status(self) -> dict[str, Any]:
        """The page's MQTT line (the dashboard snapshot's "mqtt")."""
        counts = self.counts().values()
        return {"broker": self.options.address, **{key: sum(c[key] for c in counts)
                                                   for key in ("published", "dropped", "pending")}}

    def attach(self, line_state: Any) -> None:
        """Shows the counts on the dashboard's page and in its /metrics (client/dashboard/state.py LineState)."""
        line_state.mqtt_status = self.status
        line_state.metrics.registry.register(_MqttCollector(self))

    def close(self) -> None:
        deadline = time.monotonic() + self.options.drain_timeout
        for link in self.links.values():
            link.close(deadline)

    def summary_lines(self) -> Sequence[str]:
        counts = self.counts()
        published = sum(c["published"] for c in counts.values())
        dropped = sum(c["dropped"] for c in counts.values())
        pending = sum(c["pending"] for c in counts.values())
        lines = [f"mqtt: {published} verdicts acknowledged by {self.options.address}"]
        if dropped:
            lines.append(f"mqtt: {dropped} verdicts dropped: the queue of {self.options.queue_size} per camera was "
                         "full while the broker was away")
        if pending:
            lines.append(f"mqtt: {pending} verdicts not acknowledged by the broker at exit")
        return lines


class _MqttCollector:
    """mrkd_mqtt_verdicts_total{camera,product,outcome=published|dropped} and mrkd_mqtt_queued{camera,product}, read
    from the publisher at each scrape."""

    def __init__(self, publisher: VerdictPublisher):
        self.publisher = publisher

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        verdicts = CounterMetricFamily("mrkd_mqtt_verdicts", "Verdicts to the MQTT broker: acknowledged by it "
                                       "(published) or dropped because the queue was full while it was away",
                                       labels=["camera", "product", "outcome"])
        queued = GaugeMetricFamily("mrkd_mqtt_queued", "Verdicts waiting for the MQTT broker's acknowledgement",
                                   labels=["camera", "product"])
        for camera, counts in self.publisher.counts().items():
            product = self.publisher.products[camera]
            verdicts.add_metric([camera, product, "published"], counts["published"])
            verdicts.add_metric([camera, product, "dropped"], counts["dropped"])
            queued.add_metric([camera, product], counts["pending"])
        yield verdicts
        yield queued
