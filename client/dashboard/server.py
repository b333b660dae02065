"""The dashboard's web server: a Starlette app served by uvicorn in a thread of the client.

Routes:
  /                                         the page (static/index.html; plain HTML, JS and CSS, no build step)
  /api/events                               server-sent events: the snapshot, every push interval
  /api/cameras                              the same snapshot as JSON, for integrators
  /api/cameras/{camera}/latest.jpg          the newest answered frame with its heat map (JPEG)
  /api/cameras/{camera}/anomalies/{frame}.jpg   a kept anomalous frame with its heat map (JPEG)
  /metrics                                  Prometheus text format (prometheus-client)

Access (access.py): the Host header must be an allowed name (no DNS rebinding); bound anywhere but loopback, every
request needs the credentials from the environment. Limits (connections.py, DashboardOptions): at most
`max_connections` open connections, each must deliver a whole request within `request_timeout_s`, at most
`max_event_streams` open pages; an event stream wakes only when a new snapshot is published.

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
from typing import TYPE_CHECKING, Mapping, Sequence

from .access import AccessError, Credentials, allowed_hosts, is_loopback
from .state import DashboardOptions, LineState

if TYPE_CHECKING:
    from ..servers import ServerPool
    from ..sources import FrameSource

STATIC = Path(__file__).resolve().parent / "static"
_ADDRESS = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):(\d{1,5})$")
_SSE_KEEPALIVE_S = 15.0  # an event stream without a new snapshot for this long sends a comment (finds dead peers)
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
                 pool: "ServerPool | None" = None, options: DashboardOptions | None = None,
                 credentials: Credentials | None = None, spool=None,
                 pools: "Mapping[str, ServerPool] | None" = None, products: Mapping[str, str] | None = None):
        """credentials: None reads them from the environment (access.py); required unless `host` is loopback.
        spool: the run's client.spool.Spool, whose depth the page and /metrics show. With a product per camera:
        `products` (camera -> product) and `pools` (product -> its ServerPool) instead of `pool`."""
        self.host, self.port = host, port
        try:
            self.credentials = credentials if credentials is not None else Credentials.from_env()
        except AccessError as exc:
            raise DashboardError(str(exc)) from exc
        if not is_loopback(host) and not self.credentials.required:
            raise DashboardError(
                f"--dashboard {host}:{port} can be reached from other machines: set MRKD_DASHBOARD_TOKEN, or "
                "MRKD_DASHBOARD_USER and MRKD_DASHBOARD_PASSWORD (see docs/dashboard.md), or bind to 127.0.0.1")
        self.allowed_hosts = allowed_hosts(host)
        self.spool = spool
        products = products or {}
        self.pools: "dict[str, ServerPool]" = dict(pools or ({"": pool} if pool is not None else {}))
        urls = [(s.url, product) for product, p in self.pools.items() for s in p.servers]
        self.state = LineState([(name, source.description, source.live, products.get(name, ""))
                                for name, source in cameras], urls, options)
        self.options = self.state.options
        self._published: tuple[int, str] = (0, json.dumps(self.state.snapshot()))
        self._closing = threading.Event()
        self._tick_lock = threading.Lock()  # the tick thread, start() and finish() all tick
        self._watchers = 0  # open event streams (pages)
        self._images_wanted_until = 0.0  # monotonic
        self._loop_cpu = 0.0  # the web server thread's CPU time when last counted
        self._server = None
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the web server's, once it runs
        self._new_snapshot: asyncio.Event | None = None  # set (and replaced) on the loop when one is published
        self.stream_wakeups = 0  # times an event stream woke up (a snapshot, a keep-alive or closing)

    @property
    def url(self) -> str:
        """The address it listens on, as bound (http://0.0.0.0:PORT/ listens on every interface)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def local_url(self) -> str:
        """An address of the page on this machine (loopback when bound to every interface)."""
        if self.host in ("0.0.0.0", "::"):
            return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else '[::1]'}:{self.port}/"
        return self.url

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
        if not is_loopback(self.host):
            print(f"dashboard: WARNING: {self.url} is reachable from other machines; every request needs the "
                  "credentials (MRKD_DASHBOARD_TOKEN or MRKD_DASHBOARD_USER/PASSWORD)", file=sys.stderr, flush=True)
        from .connections import guarded_protocol

        opts = self.options
        config = uvicorn.Config(self.app(), log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ws="none", timeout_graceful_shutdown=2, http=guarded_protocol(
                                    opts.max_connections, opts.request_timeout_s),
                                limit_concurrency=opts.max_connections + 1,  # 503 beyond (the guard closes first)
                                timeout_keep_alive=opts.keep_alive_s,
                                backlog=opts.listen_backlog,  # also bounds a burst of accepts (asyncio)
                                h11_max_incomplete_event_size=16 * 1024)
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
        self._announce()
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
            for product, pool in self.pools.items():
                for server in pool.servers:
                    self.state.server_state(server.url, server.ready, "" if server.ready else server.last_error,
                                            product)
                    self.state.update_server(server.url, product, requests=server.requests,
                                             in_flight=server.in_flight, failures=server.failures)
            if self._watchers > 0 or time.monotonic() < self._images_wanted_until:
                self.state.render_pending()
            if self.spool is not None:
                self.state.spool_state(**self.spool.figures(), products=self.spool.product_figures())
            version = self._published[0] + 1
            self._published = (version, json.dumps(self.state.snapshot(), allow_nan=False))
        self._announce()

    def _announce(self) -> None:
        """Wakes the open event streams (from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake_streams)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _wake_streams(self) -> None:  # on the loop
        if self._new_snapshot is not None:
            self._new_snapshot.set()
            self._new_snapshot = asyncio.Event()

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
            text = request.path_params["frame"]
            if not (text.isascii() and text.isdigit() and len(text) <= 18):  # int() of 5000 digits raises
                raise _NotFound(f"no frame {text[:20]}{'...' if len(text) > 20 else ''} (a frame number is digits)")
            frame = int(text)
            return jpeg(self.state.anomaly_jpeg(camera, frame), f"thumbnail of frame {frame} of camera {camera!r}")

        async def metrics(request: Request) -> Response:
            from .metrics import CONTENT_TYPE

            self._count_loop_cpu()
            return Response(self.state.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE, **no_store})

        async def events(request: Request) -> Response:
            if self._watchers >= self.options.max_event_streams:
                return JSONResponse({"error": f"too many open pages (at most {self.options.max_event_streams}); "
                                              "close one, or read /api/cameras"}, status_code=503,
                                    headers={**no_store, "Retry-After": "10"})
            if self._new_snapshot is None:
                self._loop = asyncio.get_running_loop()
                self._new_snapshot = asyncio.Event()

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
                        woken = self._new_snapshot
                        try:  # sleeps until the tick thread publishes (no polling)
                            await asyncio.wait_for(woken.wait(), _SSE_KEEPALIVE_S)
                        except asyncio.TimeoutError:
                            yield ": keep-alive\n\n"
                        self.stream_wakeups += 1
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
            Route("/api/cameras/{camera}/anomalies/{frame}.jpg", anomaly),
            Route("/metrics", metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        from .access import RequireCredentials

        middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=self.allowed_hosts, www_redirect=False)]
        if self.credentials.required:
            middleware.append(Middleware(RequireCredentials, credentials=self.credentials))
        return Starlette(routes=routes, middleware=middleware, exception_handlers={_NotFound: not_found})


class _NotFound(LookupError):
    pass
