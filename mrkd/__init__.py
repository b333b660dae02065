"""MRKD: masked reverse knowledge distillation for industrial visual inspection."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import mrkd.preprocess` (Triton's preprocess model, the client) does not build the network code.
    if name in ("Detector", "Prediction"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'mrkd' has no attribute {name!r}")
