"""A run's settings from the flags and the plant file (`--config`): a flag the user typed overrides the file.

Precedence, for each setting: a flag typed on the command line, then the plant file (for a camera: its own
[[cameras]] entry, then [defaults]), then the flag's default. List flags replace the file's list: `--url` its
servers, `--camera` its cameras (those then take [defaults] from the file). Per-camera flags (--model, --fps,
--loop, --max-in-flight, --queue-size, --drop-policy, --reconnect) apply to every camera.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from mrkd.core.files import user_path

from .plant import Camera, CameraSettings, Plant
from .sources import CameraFlag

DEFAULT_PRODUCT = "mrkd"  # --model's default: the product of a camera that names none

# Per-camera settings: plant key -> the flag's argparse name.
CAMERA_FLAGS = {"product": "model", "fps": "fps", "loop": "loop", "max_in_flight": "max_in_flight",
                "queue_size": "queue_size", "drop_policy": "drop_policy", "reconnect": "reconnect"}
PATH_FLAGS = ("out", "save_heatmaps", "spool", "mqtt_ca")  # file values that are paths (user_path, as the flags)


@dataclass(frozen=True)
class CameraSpec:
    """One camera of the run, everything settled."""

    name: str
    source: str
    product: str  # the Triton ensemble its frames go to
    fps: float | None = None
    loop: bool = False
    max_in_flight: int = 4
    queue_size: int | None = None  # None: max_in_flight
    drop_policy: str = "oldest"
    reconnect: int = 0


def typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The argparse names of the flags actually on the command line (a flag at its default value included)."""
    defaults = {}
    for action in parser._actions:
        defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    try:
        typed, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
    return set(vars(typed))


def apply_plant(args: argparse.Namespace, plant: Plant, typed: set[str]) -> None:
    """Sets every setting the file gives and the command line does not (`typed`) on `args`."""
    for name, value in plant.flag_values().items():
        if name not in typed:
            setattr(args, name, user_path(value) if name in PATH_FLAGS else value)


def camera_specs(args: argparse.Namespace, typed: set[str], plant: Plant | None) -> list[CameraSpec]:
    """The run's cameras: the --camera flags if typed (or without a file), else the file's [[cameras]]."""
    defaults = plant.defaults if plant is not None else CameraSettings()
    entries: list[CameraFlag | Camera]
    if plant is not None and "camera" not in typed:
        entries = list(plant.cameras)
    else:
        entries = list(args.camera or [])
    return [_spec(entry, defaults, args, typed) for entry in entries]


def _spec(entry: CameraFlag | Camera, defaults: CameraSettings, args: argparse.Namespace,
          typed: set[str]) -> CameraSpec:
    values = {}
    for key, flag in CAMERA_FLAGS.items():
        own = getattr(entry, key, None)
        if isinstance(entry, CameraFlag) and own is not None:  # --camera NAME@PRODUCT=...: more specific than --model
            values[key] = own
        elif flag in typed:
            values[key] = getattr(args, flag)
        elif own is not None:
            values[key] = own
        elif getattr(defaults, key) is not None:
            values[key] = getattr(defaults, key)
        else:
            values[key] = getattr(args, flag)
    return CameraSpec(name=entry.name, source=entry.source, **values)


def products(cameras: Sequence[CameraSpec]) -> list[str]:
    """The products of these cameras, in the cameras' order, each once."""
    return list(dict.fromkeys(camera.product for camera in cameras))

