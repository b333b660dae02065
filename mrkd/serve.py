"""python -m mrkd.serve: run Triton Inference Server on an exported model repository.

  python -m mrkd.serve --repo model_repository                      # gRPC 8001, HTTP 8000, metrics 8002
  python -m mrkd.serve --repo model_repository --grpc-port 0        # 0 = any free port (printed)

Uses `tritonserver` from PATH (the NGC container) or else the one inside the `nvidia-pytriton` wheel, for which it
prepares a private copy of the backends folder holding the python-backend stub built for this Python. Starts the
server, waits until every model is ready and prints the gRPC address; Ctrl-C / SIGTERM stop it cleanly. A model
that fails to load makes it exit non-zero with the server's error. Python API: `TritonServer` (a context manager).
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import asdict, dataclass

from .core.options import add_options, from_args, option, run_command
from .triton.launcher import TritonServer


@dataclass(kw_only=True)
class ServeOptions:
    """The command's options: the keyword arguments of TritonServer."""

    repo: str = option(required=True, help="exported model repository (python -m mrkd.export)")
    grpc_port: int = option(8001, type=int, help="0 = any free port")
    http_port: int = option(8000, type=int, help="0 = any free port")
    metrics_port: int = option(8002, type=int, help="0 = any free port")
    host: str = option("127.0.0.1", help="listen address (0.0.0.0 inside a container)")
    log_file: str | None = option(None, help="server log (default: a temporary file, kept if the server fails)")
    startup_timeout: float = option(300.0, type=float, help="seconds to wait for every model")


def parse_args(argv: list[str] | None = None) -> ServeOptions:
    """The command's options from its arguments."""
    p = argparse.ArgumentParser(prog="python -m mrkd.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ServeOptions)
    return from_args(ServeOptions, p.parse_args(argv))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv); returns its exit status."""
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)

    def body() -> int:
        server = TritonServer(**asdict(opts))
        with server:
            print(f"ready: {', '.join(server.models)}", flush=True)
            print(f"gRPC {server.grpc_url}  HTTP {server.http_url}  log {server.log_file}", flush=True)
            print(f"Triton metrics (Prometheus): http://{server._client_host}:{server.metrics_port}/metrics "
                  f"(what to watch: docs/dashboard.md)", flush=True)
            server.wait()
        return 0

    try:
        return run_command(body, ServeOptions)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
