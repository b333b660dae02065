"""The errors of mrkd.triton: one base, `DeploymentError`, under mrkd's `MRKDError`."""
from __future__ import annotations

from ..core.errors import MRKDError, OptionError


class DeploymentError(MRKDError):
    """Exporting to, or serving from, a Triton model repository failed."""


class ExportError(DeploymentError, OptionError):
    """Export options or a repository state that cannot produce a servable version (a ValueError: exit 2)."""


class ServerError(DeploymentError, RuntimeError):
    """The server could not start, a model failed to load or cannot be served (missing checkpoint, inconsistent
    configuration), or the server died."""
