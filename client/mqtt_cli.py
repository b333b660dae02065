"""The MQTT flags of `python -m client` (client/mqtt.py publishes): parsed and checked before anything starts."""
from __future__ import annotations

import argparse
import sys

from mrkd.core.files import user_path

from .mqtt import ENV_PASSWORD, ENV_USERNAME, MqttError, MqttOptions, VerdictPublisher, parse_broker

__all__ = ["MqttError", "add_mqtt_arguments", "mqtt_options", "start_publisher"]


def add_mqtt_arguments(parser: argparse.ArgumentParser) -> None:
    """The --mqtt* flags of `python -m client`."""
    group = parser.add_argument_group(
        "verdicts to the line over MQTT",
        f"each answered frame to PREFIX/PRODUCT/CAMERA/verdict (QoS 1), each camera's state retained on "
        f"PREFIX/PRODUCT/CAMERA/state (last will: offline); credentials from {ENV_USERNAME} and {ENV_PASSWORD}",
    )
    group.add_argument("--mqtt", default=None, metavar="[mqtt[s]://]HOST[:PORT]",
                       help="publish verdicts to this broker (mqtts://: TLS; default port 1883, 8883 with TLS)")
    group.add_argument("--mqtt-prefix", default="mrkd", help="first topic level(s) (default: %(default)s)")
    group.add_argument("--mqtt-queue", type=int, default=10_000, metavar="N",
                       help="verdicts kept per camera while the broker is away; more are dropped and counted "
                            "(default: %(default)s)")
    group.add_argument("--mqtt-ca", type=user_path, default=None, metavar="FILE",
                       help="CA certificate(s) for mqtts:// (default: the system's)")


def mqtt_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MqttOptions | None:
    """The checked options of the MQTT flags (parser.error names the problem), None without --mqtt."""
    if args.mqtt is None:
        if args.mqtt_ca is not None:
            parser.error("--mqtt-ca needs --mqtt")
        return None
    try:
        host, port, tls = parse_broker(args.mqtt)
        if args.mqtt_ca is not None and not tls:
            raise MqttError("--mqtt-ca needs an mqtts:// broker")
        if args.mqtt_ca is not None and not args.mqtt_ca.is_file():
            raise MqttError(f"--mqtt-ca: no such file: {args.mqtt_ca}")
        # credentials: the plant file's [outputs.mqtt] (never a flag: a command line is visible to others), else
        # the environment (MqttOptions)
        return MqttOptions(host=host, port=port, tls=tls, ca_file=args.mqtt_ca, prefix=args.mqtt_prefix,
                           queue_size=args.mqtt_queue, username=getattr(args, "mqtt_username", None),
                           password=getattr(args, "mqtt_password", None))
    except MqttError as exc:
        parser.error(str(exc))


def start_publisher(options: MqttOptions, cameras: dict[str, str]) -> VerdictPublisher:
    """Connects every camera to the broker (MqttError when it cannot) and says where verdicts go."""
    publisher = VerdictPublisher(options, cameras)
    print(f"mqtt: verdicts to {publisher.start()}/<product>/<camera>/verdict", file=sys.stderr, flush=True)
    return publisher
