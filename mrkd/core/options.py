"""Command options declared once, as dataclass fields: `option(...)` holds the help text and argparse's settings,
`add_options` builds the parser's arguments from them and `from_args` the dataclass from the parsed arguments, so a
new option is one field. `run_command` is the one place a command turns an anticipated failure into one line."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Iterable, TypeVar

from .errors import MRKDError, exit_status, message_for_cli

T = TypeVar("T")
CLI_KEY = "cli"


def option(default: Any = dataclasses.MISSING, *, flags: tuple[str, ...] | None = None,
           default_factory: Any = dataclasses.MISSING, cli_default: Any = dataclasses.MISSING,
           **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option. `flags` default to `--field-name`; `argparse_kwargs`
    go to `add_argument` (help, type, choices, metavar, action, required); `cli_default` replaces the field's
    default on the command line only."""
    if cli_default is not dataclasses.MISSING:
        argparse_kwargs["default"] = cli_default
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={CLI_KEY: {"flags": flags, "kwargs": argparse_kwargs}})


def cli_fields(*classes: type, first: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The option fields of `classes` in declaration order; the ones named in `first` before all others."""
    found = [f for cls in classes for f in dataclasses.fields(cls) if CLI_KEY in f.metadata]
    order = {name: index for index, name in enumerate(first)}
    return sorted(found, key=lambda f: order.get(f.name, len(order)))


def flag_names(*classes: type) -> dict[str, str]:
    """Field name -> its (first) command-line flag: how a command names a parameter in its error messages."""
    return {f.name: _flags(f)[0] for f in cli_fields(*classes)}


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata[CLI_KEY]["flags"] or ("--" + f.name.replace("_", "-"),)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, *classes: type, first: Iterable[str] = ()) -> None:
    """One argument per option field of `classes` (see cli_fields for the order)."""
    for f in cli_fields(*classes, first=first):
        flags = _flags(f)
        kwargs = dict(f.metadata[CLI_KEY]["kwargs"])
        if flags[0].lstrip("-").replace("-", "_") != f.name:
            kwargs.setdefault("dest", f.name)
        if kwargs.get("action") not in ("store_true", "store_false") and not kwargs.get("required"):
            kwargs.setdefault("default", _default(f))
        parser.add_argument(*flags, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of `cls` from parsed arguments: its option fields from `args`, the rest their defaults."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def int_list(text: str) -> list[int]:
    """argparse type: "4,8,16" -> [4, 8, 16]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def on_off(value: str) -> bool:
    """argparse type: "on" / "off" -> True / False."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected 'on' or 'off'")
    return value == "on"


def run_command(body: Callable[[], int], *classes: type, log: logging.Logger | None = None) -> int:
    """Runs a command's body; an anticipated failure (an MRKDError, or a ValueError / OSError from below) becomes
    one line `error: <message>` (flags named as the command's, see message_for_cli) and its exit status (2 usage,
    1 run time). `log`: the command's logger (else stderr)."""
    try:
        return body()
    except (MRKDError, ValueError, OSError) as exc:
        line = "error: " + message_for_cli(exc, flag_names(*classes))
        if log is not None:
            log.error("%s", line)
        else:
            print(line, file=sys.stderr)
        return exit_status(exc)
