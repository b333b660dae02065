"""The Triton servers a client may use, which of them are ready, and which one gets the next request.

A server is *ready* when its gRPC health check says the server and the model are ready and, when it was not ready
before, a real inference (`probe_request`, one small image through the model) has just succeeded: a server whose
model loads but fails every forward pass is not ready. Requests go to the ready server with the fewest requests in
flight (ties in turn). A server whose request failed on the server's side (anything but a bad input: unreachable,
timed out, INTERNAL, ...) or whose health check fails is marked not ready and gets no requests until a probe,
inference included, passes again. Every server is probed every `probe_interval` seconds by its own thread (ready
ones with the cheap health check only, so a server that is shutting down is noticed before requests fail on it),
so one slow server never delays the others' probes.

A URL may also name replicas through DNS (`dns:///NAME:PORT`, discovery.py): every address behind the name is a
server of its own. The names are resolved again every `resolve_interval` seconds and soon after a request or a probe
fails; a new address joins the pool (ready once its probe, inference included, passes) and an address that is gone
from the answers gets no new requests, while the requests already on it finish (or fail and are sent elsewhere)
before its connection is closed. A failed lookup keeps the last addresses it gave.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import tritonclient.grpc as grpcclient

from .discovery import DnsTarget, ResolveError, is_dns_url, parse_dns_url, resolve

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")

# probe_request(connection, timeout_s): one real inference; raises when it fails.
ProbeRequest = Callable[[grpcclient.InferenceServerClient, float], None]


class NoServerReady(RuntimeError):
    """No server of the pool is ready (all failed, stopped, or do not serve the model)."""


def normalize_url(url: str) -> str:
    """'HOST:PORT' (a grpc:// prefix is accepted and removed). Raises ValueError naming the problem."""
    text = url.strip()
    if text.startswith("grpc://"):
        text = text[len("grpc://") :]
    if "://" in text:
        raise ValueError(f"server URL {url!r}: give HOST:PORT of Triton's gRPC endpoint, without http://")
    match = _HOST_PORT.match(text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"server URL {url!r} is not HOST:PORT (e.g. 127.0.0.1:8001)")
    return text


def canonical_url(url: str) -> str:
    """A --url as the pool keys it: HOST:PORT (normalize_url) or dns://[DNSHOST:PORT]/NAME:PORT."""
    return parse_dns_url(url).url if is_dns_url(url) else normalize_url(url)


# gRPC retries a lost connection with exponential backoff that grows to 120 s by default, so a server that came
# back after a minute away could stay unreachable to this client for another half minute while its frames expire.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 500, "grpc.min_reconnect_backoff_ms": 500,
                        "grpc.max_reconnect_backoff_ms": 2000}
# The least time between two lookups of the dns: URLs (failures ask for one sooner than resolve_interval).
MIN_RESOLVE_GAP_S = 0.5


def connect(url: str) -> grpcclient.InferenceServerClient:
    """A Triton gRPC client that reconnects within about 2 s once the server is back (tritonclient's message size
    limits kept)."""
    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        *RECONNECT_BACKOFF_MS.items()])


@dataclass
class Server:
    url: str
    connection: grpcclient.InferenceServerClient
    ready: bool = False
    in_flight: int = 0
    requests: int = 0
    failures: int = 0  # requests that failed on the server's side (each marked it not ready)
    last_error: str = ""
    last_probe: float = 0.0
    extra: dict = field(default_factory=dict)  # per-server state of transports (registered shared memory)
    source: str = ""  # the dns: URL that found this server ("" for a server given as HOST:PORT)
    retired: bool = False  # gone from its DNS answers: no new requests; closed once none is in flight
    probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ServerPool:
    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        probe_request: ProbeRequest | None = None,
        probe_request_timeout: float = 30.0,
        resolve_interval: float = 5.0,
        resolve_timeout: float = 2.0,
        on_change: Callable[[str], None] | None = None,
    ):
        """urls: HOST:PORT or dns: URLs (discovery.py). probe_request: the real inference a server must pass to
        become ready (InspectionClient sets one on the pool it uses when none is given); probe_request_timeout: its
        time limit. resolve_interval: seconds between lookups of the dns: URLs (sooner after a failure, never more
        often than MIN_RESOLVE_GAP_S); on_change(message) hears of every server added or dropped."""
        if not urls:
            raise ValueError("at least one server URL is needed")
        canonical = [canonical_url(u) for u in urls]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"the same server is given twice: {', '.join(canonical)}")
        if resolve_interval <= 0:
            raise ValueError(f"resolve interval must be positive, got {resolve_interval}")
        self.model = model
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.probe_request = probe_request
        self.probe_request_timeout = probe_request_timeout
        self.resolve_interval = resolve_interval
        self.resolve_timeout = resolve_timeout
        self.on_change = on_change
        self.targets: list[DnsTarget] = [parse_dns_url(u) for u in canonical if is_dns_url(u)]
        self._resolved: dict[str, list[str]] = {}  # dns: URL -> the addresses of its last good answer
        self.resolve_errors: dict[str, str] = {}  # dns: URL -> why its last lookup failed
        self._last_resolve = float("-inf")
        self._resolve_now = threading.Event()
        self._resolve_lock = threading.Lock()
        self.servers: list[Server] = [Server(url, connect(url)) for url in canonical if not is_dns_url(url)]
        self._retiring: list[Server] = []  # dropped servers with requests still in flight
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._turn = 0
        self._stop = threading.Event()
        self._started = False
        self._threads: list[threading.Thread] = []
        if self.targets:
            self.resolve()

    # -- health ------------------------------------------------------------------------------------------------
    def probe(self, server: Server) -> bool:
        """One health check; updates and returns the server's readiness. The gRPC server-ready and model-ready
        checks always; for a server that is not ready, also a real inference (`probe_request`)."""
        with server.probe_lock:
            with self._lock:
                was_ready = server.ready
            try:
                ready = bool(
                    server.connection.is_server_ready(client_timeout=self.probe_timeout)
                    and server.connection.is_model_ready(self.model, client_timeout=self.probe_timeout)
                )
                error = "" if ready else f"model {self.model!r} not ready"
                if ready and not was_ready and self.probe_request is not None:
                    try:
                        self.probe_request(server.connection, self.probe_request_timeout)
                    except Exception as exc:  # the model is loaded but cannot answer: not ready
                        ready, error = False, f"probe inference failed: {_one_line(exc)}"
            except Exception as exc:  # any transport or server error means: not ready now
                ready, error = False, _one_line(exc)
            with self._lock:
                # A request that failed while this probe ran has the last word: it marked the server not ready.
                failed_meanwhile = was_ready and not server.ready
                server.ready = ready and not failed_meanwhile and not server.retired
                server.last_probe = time.monotonic()
                if error:
                    server.last_error = error
                self._changed.notify_all()
            if was_ready and not server.ready:
                self._resolve_now.set()  # a replica that went away: see soon whether DNS still names it
            return server.ready

    def probe_all(self) -> list[Server]:
        """Probes every server (one after the other); returns the ready ones."""
        return [s for s in self.servers if self.probe(s)]

    def start(self) -> None:
        """Probes once now, then every probe_interval seconds, one daemon thread per server (and one that resolves
        the dns: URLs every resolve_interval seconds)."""
        self.probe_all()
        if self._started:
            return
        self._started = True
        if self.probe_interval > 0:
            for server in self.servers:
                self._start_probe_thread(server)
        if self.targets:
            thread = threading.Thread(target=self._resolve_loop, name="resolve", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _start_probe_thread(self, server: Server) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]  # those of dropped servers have ended
        thread = threading.Thread(target=self._probe_loop, args=(server,), name=f"probe-{server.url}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _probe_loop(self, server: Server) -> None:
        while not self._stop.wait(self.probe_interval) and not server.retired:
            self.probe(server)

    # -- discovery -----------------------------------------------------------------------------------------------
    def _resolve_loop(self) -> None:
        while not self._stop.is_set():
            self._resolve_now.wait(self.resolve_interval)
            if self._stop.is_set():
                return
            # After a failure, wait out the minimum gap: a burst of failed requests makes one lookup, not many.
            self._stop.wait(max(0.0, self._last_resolve + MIN_RESOLVE_GAP_S - time.monotonic()))
            self._resolve_now.clear()
            self.resolve()

    def resolve(self) -> tuple[list[str], list[str]]:
        """Looks every dns: URL up now and adds and drops servers to match; returns (added, dropped) URLs. A lookup
        that fails keeps the servers its last good answer gave (a DNS hiccup must not empty the pool)."""
        with self._resolve_lock:
            self._last_resolve = time.monotonic()
            for target in self.targets:
                try:
                    self._resolved[target.url] = resolve(target, self.resolve_timeout)
                    self.resolve_errors.pop(target.url, None)
                except ResolveError as exc:
                    self.resolve_errors[target.url] = str(exc)
            wanted: dict[str, str] = {}  # url -> source
            for target in self.targets:
                for url in self._resolved.get(target.url, []):
                    wanted.setdefault(url, target.url)
            return self._apply(wanted)

    def _apply(self, wanted: dict[str, str]) -> tuple[list[str], list[str]]:
        with self._lock:
            given = {s.url for s in self.servers if not s.source}
            found = {s.url for s in self.servers if s.source}
            added = [Server(url, connect(url), source=wanted[url]) for url in sorted(wanted) if
                     url not in given and url not in found]
            dropped = [s for s in self.servers if s.source and s.url not in wanted]
            for server in dropped:
                server.retired = True
                server.ready = False
            self.servers = [s for s in self.servers if not s.retired] + added
            self._retiring += [s for s in dropped if s.in_flight > 0]
            idle = [s for s in dropped if s.in_flight == 0]
            self._changed.notify_all()
        for server in idle:
            _close(server)
        if self._started and self.probe_interval > 0:
            for server in added:
                self._start_probe_thread(server)
        for server in added:
            self._tell(f"{server.source}: added {server.url}")
        for server in dropped:
            self._tell(f"{server.source}: dropped {server.url}"
                       + (f" ({server.in_flight} requests still in flight there)" if server.in_flight else ""))
        return [s.url for s in added], [s.url for s in dropped]

    def _resolve_if_due(self) -> None:
        """Without the resolve thread (the load test's pools): a lookup when the last is resolve_interval old."""
        if self.targets and time.monotonic() - self._last_resolve >= self.resolve_interval:
            self.resolve()

    def _tell(self, message: str) -> None:
        if self.on_change is not None:
            self.on_change(message)

    def wait_until_ready(self, timeout: float) -> list[Server]:
        """Waits until at least one server is ready; raises NoServerReady naming each server's last error."""
        deadline = time.monotonic() + timeout
        while True:
            self._resolve_if_due()
            ready = self.probe_all()
            if ready:
                return ready
            if time.monotonic() >= deadline:
                details = "; ".join([f"{s.url}: {s.last_error or 'not ready'}" for s in self.servers]
                                    + [f"{url}: {error}" for url, error in self.resolve_errors.items()])
                raise NoServerReady(f"no server is ready to serve model {self.model!r} after {timeout:g} s ({details})")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def wait_for_ready(self, timeout: float) -> bool:
        """Blocks up to `timeout` s until some server is ready (the probe threads or a finished request change
        that); returns whether one is."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(s.ready for s in self.servers):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._changed.wait(remaining)
            return True

    def has_ready(self) -> bool:
        with self._lock:
            return any(s.ready for s in self.servers)

    # -- choosing ------------------------------------------------------------------------------------------------
    def acquire(self, exclude: Sequence[Server] = ()) -> Server | None:
        """The ready server (not in `exclude`) with the fewest requests in flight; counts the request on it.
        When none is ready, servers not probed for `probe_interval` seconds (1 s without the probe threads) are
        probed now, so a pool without the threads (the load test) also finds a server back."""
        server = self._pick(exclude)
        if server is None and not self._started:
            self._resolve_if_due()
        if server is None:
            stale_after = self.probe_interval if self.probe_interval > 0 else 1.0
            now = time.monotonic()
            stale = [s for s in self.servers if s not in exclude and now - s.last_probe >= stale_after
                     and not s.probe_lock.locked()]
            if any([self.probe(s) for s in stale]):
                server = self._pick(exclude)
        return server

    def _pick(self, exclude: Sequence[Server]) -> Server | None:
        with self._lock:
            candidates = [s for s in self.servers if s.ready and not s.retired and s not in exclude]
            if not candidates:
                return None
            fewest = min(s.in_flight for s in candidates)
            tied = [s for s in candidates if s.in_flight == fewest]
            # Round robin over the pool's order: the first tied server at or after the one after the last pick. (An
            # index into `tied` taken from a shared counter favours some servers when ties of different sizes
            # alternate, as when several cameras send at once.)
            count = len(self.servers)
            order = [self.servers[(self._turn + k) % count] for k in range(count)]
            server = next(s for s in order if s in tied)
            self._turn = (self.servers.index(server) + 1) % count
            server.in_flight += 1
            server.requests += 1
            return server

    def release(self, server: Server, failed: bool = False, error: str = "") -> None:
        """Ends a request on `server`. failed=True marks it not ready until a probe (a real inference included)
        passes again."""
        with self._lock:
            server.in_flight -= 1
            if failed:
                server.ready = False
                server.failures += 1
                server.last_error = error
            drained = server.retired and server.in_flight == 0 and server in self._retiring
            if drained:
                self._retiring.remove(server)
            self._changed.notify_all()
        if failed:
            self._resolve_now.set()  # the replica may be gone: look the names up again soon
        if drained:
            _close(server)

    def ready_servers(self) -> list[Server]:
        with self._lock:
            return [s for s in self.servers if s.ready]

    def last_errors(self) -> str:
        """'url: last error; ...' of the servers that are not ready and of failed lookups (for error messages)."""
        with self._lock:
            return "; ".join([f"{s.url}: {s.last_error or 'not ready'}" for s in self.servers if not s.ready]
                             + [f"{url}: {error}" for url, error in self.resolve_errors.items()])

    def close(self) -> None:
        self._stop.set()
        self._resolve_now.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=self.probe_timeout * 2 + self.probe_interval + self.resolve_timeout * 2 + 1)
        self._threads = []
        with self._lock:
            servers, self._retiring = self.servers + self._retiring, []
        for server in servers:
            _close(server)

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(server: Server) -> None:
    try:
        server.connection.close()
    except Exception:
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
