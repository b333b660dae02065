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

from .triton.launcher import ServerError, TritonServer


# ---------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mrkd.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="exported model repository (python -m mrkd.export)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    p.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 inside a container)")
    p.add_argument("--log-file", help="server log (default: a temporary file, kept if the server fails)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for every model")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    server = TritonServer(args.repo, args.grpc_port, args.http_port, args.metrics_port, host=args.host,
                          log_file=args.log_file, startup_timeout=args.startup_timeout)
    try:
        with server:
            print(f"ready: {', '.join(server.models)}", flush=True)
            print(f"gRPC {server.grpc_url}  HTTP {server.http_url}  log {server.log_file}", flush=True)
            print(f"Triton metrics (Prometheus): http://{server._client_host}:{server.metrics_port}/metrics "
                  f"(what to watch: docs/dashboard.md)", flush=True)
            server.wait()
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
