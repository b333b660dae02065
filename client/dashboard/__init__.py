"""The live plant view of a client run: a browser page of every camera and Prometheus metrics (docs/dashboard.md).

`python -m client ... --dashboard 127.0.0.1:8080` serves it while the client runs.
"""
from __future__ import annotations

from .metrics import ClientMetrics, error_code
from .server import Dashboard, DashboardError, parse_address
from .state import DashboardOptions, LineState

__all__ = ["ClientMetrics", "Dashboard", "DashboardError", "DashboardOptions", "LineState", "error_code",
           "parse_address"]
