"""The errors of mrkd.runtime: one base, `RuntimeFailure`, under mrkd's `MRKDError`; each keeps the builtin
mixin its callers catch it by."""
from __future__ import annotations

from ..core.errors import MRKDError, OptionError


class RuntimeFailure(MRKDError):
    """Weights, checkpoints, the network's runtimes or inference failed."""


class CheckpointError(RuntimeFailure, ValueError):
    """A checkpoint that cannot be used: missing, truncated, wrong format, or without calibration."""


class MissingWeightsError(RuntimeFailure, FileNotFoundError):
    """Pretrained weights that are not on this machine; the message says which file and where to put it."""


class NetworkRuntimeError(RuntimeFailure, OptionError):
    """A runtime/precision that cannot run here, or a conversion that does not reproduce the torch network."""


class NonFiniteScoreError(RuntimeFailure, RuntimeError):
    """The network produced NaN or Inf anomaly scores: never reported as a (normal) verdict."""
