"""The plant file: `python -m client --config plant.toml` describes a whole line in one reviewed, versioned file.

TOML (tomllib), checked with pydantic models that forbid unknown keys. Tables (examples/plant.toml explains each):

  [servers]    urls, timeout, retry_timeout, wait_ready, transport
  [defaults]   what every camera gets unless it says otherwise: product, fps, loop, max_in_flight, queue_size,
               drop_policy, reconnect
  [[cameras]]  name, source, and any of the [defaults] keys
  [outputs]    results, overwrite, heatmaps, dashboard, spool; [outputs.mqtt]: broker, prefix, queue, ca, username,
               password (or MRKD_MQTT_USERNAME / MRKD_MQTT_PASSWORD in the environment)
  [run]        duration, max_frames

A file that is wrong is one `PlantError` naming the file, the line (found for the key, or given by tomllib), the
key, what is wrong and what is allowed; nothing has started then. Credentials are never part of a message.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from mrkd.core.errors import OptionError

from .redact import redact
from .servers import canonical_url
from .sources import SourceError, check_name


def _name(what: str):
    def check(value: str) -> str:
        try:
            check_name(value, what)
        except SourceError as exc:
            raise ValueError(str(exc)) from None
        return value
    return AfterValidator(check)


CameraName = Annotated[str, _name("camera name")]
ProductName = Annotated[str, _name("product")]


class PlantError(OptionError):
    """The plant file cannot be used: one line naming the file, line, key and problem (exit status 2)."""


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Servers(_Table):
    urls: list[str] = Field(min_length=1)  # HOST:PORT or dns:///NAME:PORT, as --url
    timeout: float | None = Field(None, gt=0)
    retry_timeout: float | None = Field(None, ge=0)
    wait_ready: float | None = Field(None, gt=0)
    transport: Literal["bytes", "raw", "shm"] | None = None

    @field_validator("urls")
    @classmethod
    def _canonical(cls, urls: list[str]) -> list[str]:
        canonical = [canonical_url(url) for url in urls]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"the same server is given twice: {', '.join(canonical)}")
        return canonical


class CameraSettings(_Table):
    """What [defaults] gives every camera and a [[cameras]] entry may set for itself (None: not given)."""

    product: ProductName | None = None  # the Triton ensemble this camera's frames go to
    fps: float | None = Field(None, gt=0)
    loop: bool | None = None
    max_in_flight: int | None = Field(None, ge=1)
    queue_size: int | None = Field(None, ge=1)
    drop_policy: Literal["oldest", "newest"] | None = None
    reconnect: int | None = Field(None, ge=0)


class Camera(CameraSettings):
    name: CameraName
    source: str = Field(min_length=1)


class Mqtt(_Table):
    broker: str = Field(min_length=1)  # [mqtt[s]://]HOST[:PORT]
    prefix: str | None = None
    queue: int | None = Field(None, ge=1)
    ca: str | None = None
    username: str | None = None
    password: SecretStr | None = None

    @field_validator("broker")
    @classmethod
    def _broker(cls, broker: str) -> str:
        from .mqtt import MqttError, parse_broker

        try:
            parse_broker(broker)
        except MqttError as exc:
            raise ValueError(str(exc)) from None
        return broker


class Outputs(_Table):
    results: str | None = None
    overwrite: bool | None = None
    heatmaps: str | None = None
    dashboard: str | None = None
    spool: str | None = None
    mqtt: Mqtt | None = None

    @field_validator("dashboard")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        from .dashboard import parse_address

        if address is not None:
            parse_address(address)  # ValueError naming the problem
        return address


class Run(_Table):
    duration: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, ge=1)


class Plant(_Table):
    servers: Servers
    defaults: CameraSettings = CameraSettings()
    cameras: list[Camera] = Field(min_length=1)
    outputs: Outputs = Outputs()
    run: Run = Run()

    def flag_values(self) -> dict[str, Any]:
        """The file's values under the argparse names of the flags they stand for (those given only)."""
        out, mqtt = self.outputs, self.outputs.mqtt
        values = {
            "url": self.servers.urls, "timeout": self.servers.timeout, "retry_timeout": self.servers.retry_timeout,
            "wait_ready": self.servers.wait_ready, "transport": self.servers.transport,
            "out": out.results, "overwrite": out.overwrite, "save_heatmaps": out.heatmaps,
            "dashboard": out.dashboard, "spool": out.spool,
            "duration": self.run.duration, "max_frames": self.run.max_frames,
        }
        if mqtt is not None:
            values.update(mqtt=mqtt.broker, mqtt_prefix=mqtt.prefix, mqtt_queue=mqtt.queue, mqtt_ca=mqtt.ca,
                          mqtt_username=mqtt.username,
                          mqtt_password=mqtt.password.get_secret_value() if mqtt.password else None)
        return {name: value for name, value in values.items() if value is not None}


def load_plant(path: Path) -> Plant:
    """Reads and checks a plant file; raises PlantError (one line) when it cannot be used."""
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise PlantError("--config needs Python 3.11 or newer (tomllib)") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlantError(f"{path}: cannot read the plant file ({exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise PlantError(f"{path}: not valid TOML: {exc}") from exc
    lines = key_lines(text)
    try:
        plant = Plant.model_validate(data)
    except ValidationError as exc:
        raise PlantError(_describe(path, exc, data, lines)) from exc
    seen: dict[str, int] = {}
    for index, camera in enumerate(plant.cameras):
        if camera.name in seen:
            where = _where(path, lines, ("cameras", index, "name"))
            raise PlantError(f"{where}cameras[{index}].name: camera {camera.name!r} is given twice (also "
                             f"cameras[{seen[camera.name]}]); camera names must be unique")
        seen[camera.name] = index
    return plant


# -- error messages ---------------------------------------------------------------------------------------------
_TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def key_lines(text: str) -> dict[tuple, int]:
    """Where each table and each bare `key =` is, as (table..., [index,] key) -> line number (1-based); the
    pydantic error's location is looked up here, tomllib keeps no positions."""
    lines: dict[tuple, int] = {}
    table: tuple = ()
    counts: dict[tuple, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            path = tuple(header.group(2).split("."))
            if header.group(1) == "[[":
                counts[path] = counts.get(path, -1) + 1
                path = path + (counts[path],)
            table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault(table + (key.group(1),), number)
    return lines


def _where(path: Path, lines: dict[tuple, int], location: tuple) -> str:
    """'FILE:LINE: ' for the nearest located part of `location` ('FILE: ' when none is found)."""
    for end in range(len(location), 0, -1):
        if location[:end] in lines:
            return f"{path}:{lines[location[:end]]}: "
    return f"{path}: "


def _key(location: tuple) -> str:
    """('cameras', 1, 'fps') -> 'cameras[1].fps'."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _table_model(table: tuple) -> type[BaseModel]:
    """The model of the table an unknown key was found in."""
    models = {(): Plant, ("servers",): Servers, ("defaults",): CameraSettings, ("cameras",): Camera,
              ("outputs",): Outputs, ("outputs", "mqtt"): Mqtt, ("run",): Run}
    return models.get(tuple(part for part in table if not isinstance(part, int)), Plant)


def _describe(path: Path, exc: ValidationError, data: dict[str, Any], lines: dict[tuple, int]) -> str:
    """The first problem of a ValidationError as one line (how many more there are, if any)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    location = tuple(first["loc"])
    key = _key(location)
    camera = _camera_name(data, location)
    what = first["msg"]
    kind = first["type"]
    if kind == "extra_forbidden":
        table = location[:-1]
        what = (f"unknown key {location[-1]!r}" + (f" in {_key(table)}" if table else "") +
                f"; allowed: {_allowed(_table_model(table))}")
    elif kind == "missing":
        what = "missing: this key is required"
    elif kind == "value_error":
        what = what.removeprefix("Value error, ")
    if kind not in ("extra_forbidden", "missing") and "password" not in location:
        given = first.get("input")
        if not isinstance(given, (dict, list)):
            what += f" (got {redact(repr(given))})"
    more = len(errors) - 1
    more_text = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{_where(path, lines, location)}{key}{camera}: {what}{more_text}"


def _camera_name(data: dict[str, Any], location: tuple) -> str:
    if len(location) >= 2 and location[0] == "cameras" and isinstance(location[1], int):
        cameras = data.get("cameras")
        if isinstance(cameras, list) and location[1] < len(cameras) and isinstance(cameras[location[1]], dict):
            name = cameras[location[1]].get("name")
            if isinstance(name, str):
                return f" (camera {name!r})"
    return ""
