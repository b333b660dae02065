"""The root of mrkd's error family, and how a command turns an anticipated failure into one line and an exit code.

Each package has one base class under `MRKDError` (data: `DataError`, runtime: `RuntimeFailure`, triton:
`DeploymentError`); concrete errors keep the builtin mixin callers catch them by (`ValueError` for bad input or
options, `FileNotFoundError` for missing files, `RuntimeError` for a failure while running). A command catches
`MRKDError` (and the builtin `ValueError` / `OSError` that libraries raise) once and prints `error: <message>`:
exit 2 for a usage error (bad options, files or data: the `ValueError` and `FileNotFoundError` kind), 1 for a
failure at run time.

Library messages name the parameter (`max_batch_size must be at least 1`); `MRKDError.parameters` lists the
parameters a message names, so that a command can say its flag instead (`--max-batch-size must be at least 1`).
"""
from __future__ import annotations

import re
from typing import Mapping

USAGE_EXIT = 2
RUNTIME_EXIT = 1


class MRKDError(Exception):
    """An anticipated failure of mrkd: commands print its message as one line. `parameters`: the names of the
    parameters the message uses (a command says its flags instead, see message_for_cli)."""

    exit_code: int | None = None  # None: decided by the builtin mixin (see exit_status)

    def __init__(self, message: str = "", *parameters: str) -> None:
        super().__init__(message)
        self.parameters = parameters


class OptionError(MRKDError, ValueError):
    """A parameter value that cannot work (a usage error)."""


def exit_status(exc: BaseException) -> int:
    """2 for a usage error (bad options, files or data), 1 for a failure at run time."""
    code = getattr(exc, "exit_code", None)
    if code is not None:
        return code
    return USAGE_EXIT if isinstance(exc, (ValueError, FileNotFoundError)) else RUNTIME_EXIT


def message_for_cli(exc: BaseException, flags: Mapping[str, str]) -> str:
    """The error's message with the parameters it names (OptionError.parameters) spelled as their command-line
    flags (`flags`: parameter name -> flag)."""
    message = str(exc)
    for parameter in getattr(exc, "parameters", ()):
        if parameter in flags:
            message = re.sub(rf"(?<![\w-]){re.escape(parameter)}(?![\w-])", flags[parameter], message)
    return message
