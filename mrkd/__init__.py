"""MRKD: masked reverse knowledge distillation for industrial visual inspection."""
from __future__ import annotations

from .core.config import MRKD_VERSION as __version__

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import mrkd.core.preprocess` (Triton's preprocess model, the client) does not import the network.
    if name in ("Detector", "Prediction"):
        from .runtime import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'mrkd' has no attribute {name!r}")
