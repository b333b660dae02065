"""Locust load test of the MRKD Triton ensemble over gRPC, through client.InspectionClient.

  locust -f loadtest/locustfile.py --headless --host 127.0.0.1:8001 -u 8 -r 2 -t 60s --csv runs/load \\
      --csv-full-history [--model mrkd] [--images DIR]
  python loadtest/plot.py runs/load            # runs/load_stats_history.csv -> runs/load.png

Each simulated user is one closed-loop camera: it sends the next image as soon as the previous answer came back
(no think time), cycling through the images of --images in name order (default: the real ELPV solar-cell images
bundled in loadtest/images/). The images' file bytes are sent as they are (no re-encoding), so the server does the
same work for every user. --host may list several servers separated by commas; requests are then spread over the
ready ones, as in the CLI. Every request is reported to locust: name "<model> <transport>", the response time in
ms, the response size in bytes, and the exception for a failed one. The web UI works too (omit --headless).
"""
from __future__ import annotations

# gRPC must cooperate with gevent before any channel exists: this runs first, before the client is imported.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import gc  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

# The client package lives beside this folder; locust does not put the repository root on sys.path.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from client.inspection import InspectionClient, InspectionError  # noqa: E402
from client.sources import SourceError, image_files  # noqa: E402

BUNDLED_IMAGES = Path(__file__).resolve().parent / "images"
_OPEN_CLIENTS: set[InspectionClient] = set()  # users' clients not closed yet (a killed user skips on_stop)


@events.quit.add_listener
def _release_grpc_channels(**_kwargs) -> None:
    """Closes what the users left open and collects the closed clients while the interpreter still runs. Left to
    the collection at exit, tritonclient's __del__ closes each channel again, and locust sometimes hung there after
    "Shutting down (exit code 0)": tests/test_loadtest.py's thread dump showed the main thread inside gRPC's gevent
    channel count, called from that __del__ while the interpreter was shutting down."""
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()
    gc.collect()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--model", type=str, default="mrkd", help="Triton ensemble name (default: mrkd)")
    parser.add_argument("--images", type=str, default=str(BUNDLED_IMAGES),
                        help="folder of JPEG/PNG images to send (default: the bundled loadtest/images)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (default: 30)")


def load_image_bytes(folder: str | Path) -> list[tuple[str, bytes]]:
    """(file name, file bytes) of the images in `folder`, in name order."""
    try:
        return [(path.name, path.read_bytes()) for path in image_files(folder)]
    except SourceError as exc:
        raise StopUser(f"--images: {exc}") from exc


class InspectionUser(User):
    """One closed-loop camera: infer, report, repeat."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        if not self.host:
            raise StopUser("give the Triton gRPC endpoint with --host HOST:PORT")
        self.model = options.model
        self.images = itertools.cycle(load_image_bytes(options.images))
        # No background probe thread per user: a pool without one re-probes lazily when no server is ready.
        self.client = InspectionClient(
            [u for u in self.host.split(",") if u.strip()], self.model,
            timeout=options.request_timeout, probe_interval=0,
        )
        self.request_name = f"{self.model} bytes"
        _OPEN_CLIENTS.add(self.client)

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            _OPEN_CLIENTS.discard(client)
            self.client = None

    @task
    def inspect(self) -> None:
        name, data = next(self.images)
        started = time.perf_counter()
        response_length = 0
        exception: Exception | None = None
        try:
            result = self.client.infer(data)
            response_length = result.response_bytes
        except InspectionError as exc:
            exception = exc
        events.request.fire(
            request_type="grpc",
            name=self.request_name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=response_length,
            exception=exception,
            context={"image": name},
        )
