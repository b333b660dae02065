"""MRKD inspection client: InspectionClient (Python API) and `python -m client` (multi-camera CLI)."""
from __future__ import annotations

from .frame_queue import DROP_POLICIES, FrameQueue
from .inspection import InspectionClient, InspectionError, InspectionResult, encode_image
from .servers import NoServerReady, Server, ServerPool

__all__ = [
    "DROP_POLICIES",
    "FrameQueue",
    "InspectionClient",
    "InspectionError",
    "InspectionResult",
    "NoServerReady",
    "Server",
    "ServerPool",
    "encode_image",
]
