"""The dashboard's web server: a Starlette app served by uvicorn in a thread of the client.

Routes:
  /                                         the page (static/index.html; plain HTML, JS and CSS, no build step)
  /api/events                               server-sent events: the snapshot, every push interval
  /api/cameras                              the same snapshot as JSON, for integrators
  /api/cameras/{camera}/latest.jpg          the newest answered frame with its heat map (JPEG)
  /api/cameras/{camera}/anomalies/{frame}.jpg   a kept anomalous frame with its heat map (JPEG)
  /metrics                                  Prometheus text format (prometheus-client)

A tick thread (not the inference path) does the periodic work: it reads the server pool's readiness, renders the
frames kept since the last tick into thumbnails and publishes one snapshot that every open page receives. Nobody
watching (no open page, no image asked for in the last IMAGE_INTEREST_S seconds): no thumbnails are made at all.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .state import DashboardOptions, LineState

if TYPE_CHECKING:
    from ..servers import ServerPool
    from ..sources import FrameSource

STATIC = Path(__file__).resolve().parent / "static"
_ADDRESS = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):(\d{1,5})$")
_SSE_POLL_S = 0.1  # how often an open event stream looks for a new snapshot
IMAGE_INTEREST_S = 10.0  # after an image request, thumbnails are made for this long even without an open page


class DashboardError(RuntimeError):
    """The dashboard cannot start (bad address, port in use)."""


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 in brackets; port 0 = any free port) -> (host, port); ValueError naming the problem."""
    match = _ADDRESS.match(text.strip())
    if not match or int(match.group(3)) > 65535:
        raise ValueError(f"--dashboard {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080; port 0 = any free port)")
    return match.group(1) or match.group(2), int(match.group(3))


class Dashboard:
    """The live page and /metrics of one client run.

    dashboard = Dashboard("127.0.0.1", 8080, cameras, pool)
    dashboard.start()                       # listening when it returns; dashboard.url
    runner = MultiCameraRunner(..., observer=dashboard.state)
    ...
    dashboard.finish(); dashboard.stop()
    """

    def __init__(self, host: str, port: int, cameras: Sequence[tuple[str, "FrameSource"]],
                 pool: "ServerPool | None" = None, options: DashboardOptions | None = None):
        self.host, self.port = host, port
        self.pool = pool
        urls = [s.url for s in pool.servers] if pool is not None else []
        self.state = LineState([(name, source.description, source.live) for name, source in cameras], urls, options)
        self.options = self.state.options
        self._published: tuple[int, str] = (0, json.dumps(self.state.snapshot()))
        self._closing = threading.Event()
        self._tick_lock = threading.Lock()  # the tick thread, start() and finish() all tick
        self._watchers = 0  # open event streams (pages)
        self._images_wanted_until = 0.0  # monotonic
        self._loop_cpu = 0.0  # the web server thread's CPU time when last counted
        self._server = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}/"

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> str:
        """Binds, starts serving and ticking; returns the page's URL. Raises DashboardError."""
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise DashboardError(f"dashboard cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ws="none", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._loop_cpu = 0.0  # the web server thread is new: its CPU time starts at 0
        self._tick()  # the first snapshot knows the servers already
        self._threads = [
            threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="dashboard-http", daemon=True),
            threading.Thread(target=self._tick_loop, name="dashboard-tick", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._threads[0].is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DashboardError(f"dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self.url

    def finish(self) -> None:
        """The run ended: the page shows every camera stopped (the page stays up until stop())."""
        self.state.finish()
        self._tick()

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    # -- tick thread -----------------------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        counted = time.thread_time()
        while not self._closing.wait(self.options.push_interval_s):
            try:
                self._tick()
            except Exception as exc:  # the page shows old figures for a tick; the run is not affected
                print(f"dashboard: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            now = time.thread_time()
            self.state.metrics.dashboard_cpu.inc(now - counted)
            counted = now

    def _count_loop_cpu(self) -> None:
        """Adds the web server thread's CPU time since the last call (every handler runs on that one thread)."""
        now = time.thread_time()
        self.state.metrics.dashboard_cpu.inc(max(0.0, now - self._loop_cpu))
        self._loop_cpu = now

    def _tick(self) -> None:
        with self._tick_lock:
            if self.pool is not None:
                for server in self.pool.servers:
                    self.state.server_state(server.url, server.ready, "" if server.ready else server.last_error)
                    self.state.update_server(server.url, requests=server.requests, in_flight=server.in_flight,
                                             failures=server.failures)
            if self._watchers > 0 or time.monotonic() < self._images_wanted_until:
                self.state.render_pending()
            version = self._published[0] + 1
            self._published = (version, json.dumps(self.state.snapshot(), allow_nan=False))

    # -- the app ---------------------------------------------------------------------------------------------------
    def app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        no_store = {"Cache-Control": "no-store"}

        def camera_or_404(request: Request) -> str:
            camera = request.path_params["camera"]
            if camera not in self.state.cameras:
                raise _NotFound(f"no camera named {camera!r}")
            return camera

        def jpeg(data: bytes | None, what: str) -> Response:
            self._images_wanted_until = time.monotonic() + IMAGE_INTEREST_S
            if data is None:
                return JSONResponse({"error": f"no {what} yet"}, status_code=404, headers=no_store)
            return Response(data, media_type="image/jpeg", headers=no_store)

        # Every handler is short and runs on the server's event-loop thread (none blocks), so that thread's CPU
        # time is the web server's whole cost.
        async def page(request: Request) -> Response:
            self._count_loop_cpu()
            return FileResponse(STATIC / "index.html", headers=no_store)

        async def cameras(request: Request) -> Response:
            self._count_loop_cpu()
            return JSONResponse(self.state.snapshot(), headers=no_store)

        async def latest(request: Request) -> Response:
            self._count_loop_cpu()
            camera = camera_or_404(request)
            return jpeg(self.state.latest_jpeg(camera), f"answered frame of camera {camera!r}")

        async def anomaly(request: Request) -> Response:
            self._count_loop_cpu()
            camera = camera_or_404(request)
            frame = request.path_params["frame"]
            return jpeg(self.state.anomaly_jpeg(camera, frame), f"thumbnail of frame {frame} of camera {camera!r}")

        async def metrics(request: Request) -> Response:
            from .metrics import CONTENT_TYPE

            self._count_loop_cpu()
            return Response(self.state.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE, **no_store})

        async def events(request: Request) -> Response:
            async def stream():
                self._watchers += 1  # only the event loop's thread changes it
                try:
                    yield "retry: 1000\n\n"
                    seen = -1
                    while not self._closing.is_set():
                        version, payload = self._published
                        if version != seen:
                            seen = version
                            self._count_loop_cpu()
                            yield f"id: {version}\ndata: {payload}\n\n"
                        await asyncio.sleep(_SSE_POLL_S)
                finally:
                    self._watchers -= 1

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={**no_store, "X-Accel-Buffering": "no"})

        async def not_found(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": str(exc)}, status_code=404, headers=no_store)

        routes = [
            Route("/", page),
            Route("/api/events", events),
            Route("/api/cameras", cameras),
            Route("/api/cameras/{camera}/latest.jpg", latest),
            Route("/api/cameras/{camera}/anomalies/{frame:int}.jpg", anomaly),
            Route("/metrics", metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return Starlette(routes=routes, exception_handlers={_NotFound: not_found})


class _NotFound(LookupError):
    pass
