"""The tritonserver process: find the binary, prepare the python-backend stub, start, wait ready, stop.

Uses `tritonserver` from PATH (the NGC container) or else the one inside the `nvidia-pytriton` wheel, for which it
prepares a private copy of the backends folder holding the python-backend stub built for this Python.
`TritonServer` is a context manager (what `python -m mrkd.serve`, the demo, tests and benchmarks use).

The server never outlives its launcher: it runs in its own process group (so that Ctrl-C in a terminal reaches only
the launcher, which then stops it cleanly) with PR_SET_PDEATHSIG, so the kernel stops it when the launcher dies in
any way (SIGKILL, the OOM killer); its python-backend stubs follow their server. When the server dies, stop() also
kills whatever is left of its process group.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..core.files import user_path
from ..core.wire import CHECKPOINT_FILE
from .configs import config_field, ensemble_steps, served_version
from .errors import ExportError, ServerError
from .publish import prepare_repository, repository_lock

STUB_NAME = "triton_python_backend_stub"
LOG_TAIL_LINES = 40
# What the kernel sends the server when its launcher dies: SIGTERM, so that Triton unloads its models and stops its
# python-backend stubs (and releases their shared memory) before it exits, within its own exit timeout.
PARENT_DEATH_SIGNAL = signal.SIGTERM
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_hook(sig: int):
    """A preexec_fn that makes the child receive `sig` when its parent thread dies (Linux), or None elsewhere.
    The libc function is looked up here, before fork: the child only makes one foreign call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    option, value = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig))
    zero = ctypes.c_ulong(0)

    def hook() -> None:
        prctl(option, value, zero, zero, zero)

    return hook


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the mrkd package


# ---------------------------------------------------------------------------------------------------------- install


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path | None  # backends folder to copy and complete (wheel); None = the server's default (container)
    stub: Path | None  # python-backend stub for this Python (wheel only)
    lib_dir: Path | None  # shared libraries the wheel's binary needs


def find_triton() -> TritonInstall:
    """`tritonserver` on PATH (NGC container) first, else the one in the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), backends=None, stub=None, lib_dir=None)
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError(
            "no tritonserver: none on PATH and the nvidia-pytriton wheel is not installed "
            "(pip install nvidia-pytriton==0.7.0, or run inside nvcr.io/nvidia/tritonserver:<yy.mm>-pyt-python-py3)"
        ) from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB_NAME
    binary = root / "bin" / "tritonserver"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no python-backend stub for Python {version} ({stub})")
    if not binary.is_file():
        raise ServerError(f"the nvidia-pytriton wheel lacks its server binary ({binary})")
    return TritonInstall(binary=binary, backends=root / "backends", stub=stub,
                         lib_dir=root.parent.parent / "nvidia_pytriton.libs")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it); ServerError naming the host when it cannot be used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise ServerError(f"cannot listen on host {host!r}: {exc.strerror or exc}", "host") from exc
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- repository


def check_repository(repo: str | Path) -> list[str]:
    """Model names of `repo`, after completing exports that a crash interrupted; raises ServerError naming what is
    missing (e.g. a repository never exported) or inconsistent (an ensemble pinned to a version not served)."""
    repo = user_path(repo)
    if not repo.is_dir():
        raise ServerError(f"model repository not found: {repo}")
    try:
        prepare_repository(repo)
    except (ExportError, OSError, ValueError) as exc:
        raise ServerError(f"model repository {repo}: an interrupted export cannot be completed: {exc}") from exc
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not models:
        raise ServerError(f"{repo} holds no models (no */config.pbtxt)")
    problems, unexported, served, texts = [], [], {}, {}
    for model in models:
        folder = repo / model
        text = texts[model] = (folder / "config.pbtxt").read_text()
        version = served[model] = served_version(folder, text)
        if version is None:
            unexported.append(f"{model}: no version folder")
        elif not (folder / str(version)).is_dir():
            problems.append(f"{model}: version {version} (named in its config.pbtxt) is missing")
        elif config_field(text, "backend") == "python" and not (folder / str(version) / "model.py").is_file():
            problems.append(f"{model}: no model.py in version {version}")
        elif 'string_value: "detector"' in text and not (folder / str(version) / CHECKPOINT_FILE).is_file():
            problems.append(f"{model}: no {CHECKPOINT_FILE} in version {version}")
    for model, text in texts.items():
        for step, pin in ensemble_steps(text):
            if pin != -1 and step in served and served[step] != pin:
                problems.append(f"{model}: its step {step} is pinned to version {pin}, which is not served "
                                f"(version {served[step]} is)")
    if unexported:
        raise ServerError(
            f"model repository {repo} is not ready to serve ({'; '.join(unexported + problems)}). It has not been "
            f"exported yet: python -m mrkd.export --checkpoint CKPT --repo {repo}"
        )
    if problems:
        raise ServerError(
            f"model repository {repo} is not consistent ({'; '.join(problems)}); export the checkpoint again: "
            f"python -m mrkd.export --checkpoint CKPT --repo {repo}"
        )
    return models


# ---------------------------------------------------------------------------------------------------------- server


def log_excerpt(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The server's error lines (glog 'E' lines) and its last lines, for error messages."""
    try:
        text = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no server log at {log_file})"
    errors = [line for line in text if re.match(r"^E\d{4} ", line) or "Traceback" in line or "Error" in line]
    tail = text[-lines:]
    parts = []
    if errors:
        parts.append("server errors:\n  " + "\n  ".join(errors[-lines:]))
    parts.append(f"last lines of {log_file}:\n  " + "\n  ".join(tail))
    return "\n".join(parts)


class TritonServer:
    """A tritonserver process on a model repository (loopback by default).

    with TritonServer("model_repository", grpc_port=0) as server:   # starts, waits until every model is ready
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    """

    def __init__(
        self,
        repo: str | Path,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        log_file: str | Path | None = None,
        startup_timeout: float = 300.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repo_arg = Path(repo)  # as given, for messages
        self.repo = user_path(repo).resolve()
        self.host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.log_file = user_path(log_file).resolve() if log_file else None
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.models: list[str] = []
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_handle = None
        self._spawner: threading.Thread | None = None
        self._released = threading.Event()
        self._repo_lock = ExitStack()  # shared export lock, held from the start until the server has read the repo

    # ports and addresses
    @property
    def grpc_port(self) -> int:
        return self.ports["grpc"]

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def metrics_port(self) -> int:
        return self.ports["metrics"]

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self._process is not None:
            raise ServerError("server already started")
        self.models = check_repository(self.repo_arg)
        install = find_triton()
        # An export publishing a new version waits until this server has loaded what it read (and vice versa).
        self._repo_lock.enter_context(repository_lock(self.repo, shared=True))
        try:
            self._start(install)
        except BaseException:
            self._repo_lock.close()
            raise

    def _start(self, install: TritonInstall) -> None:
        self.ports = {k: (free_port(self.host) if v == 0 else v) for k, v in self.ports.items()}
        self._workdir = Path(tempfile.mkdtemp(prefix="mrkd-triton-"))
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(install.binary), f"--model-repository={self.repo}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0", *self.extra_args,
        ]
        if install.backends is not None:
            command.append(f"--backend-directory={self._prepare_backends(install)}")
        self._log_handle = self.log_file.open("wb")
        self._spawn(command, self._environment(install))

    def _spawn(self, command: list[str], env: dict[str, str]) -> None:
        """Starts the server from a thread that lives until stop(): PR_SET_PDEATHSIG fires when the thread that
        forked the child ends, so it must not be a caller's short-lived thread; it also fires when this whole
        process dies (SIGKILL, OOM killer), which is the point."""
        started = threading.Event()
        failure: list[BaseException] = []
        self._released.clear()

        def spawn() -> None:
            try:
                self._process = subprocess.Popen(
                    command, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    cwd=PACKAGE_ROOT,  # the python-backend stub ignores PYTHONPATH but imports from its folder
                    start_new_session=True,  # Ctrl-C reaches only the launcher, which then stops the server
                    preexec_fn=_parent_death_hook(PARENT_DEATH_SIGNAL),
                )
            except BaseException as exc:  # reported by start()
                failure.append(exc)
                return
            finally:
                started.set()
            self._released.wait()

        self._spawner = threading.Thread(target=spawn, name="tritonserver-parent", daemon=True)
        self._spawner.start()
        started.wait()
        if failure:
            self._spawner = None
            raise ServerError(f"cannot start {command[0]}: {failure[0]}") from failure[0]

    def _prepare_backends(self, install: TritonInstall) -> Path:
        """A writable copy of the wheel's backends with the stub for this Python in the python backend folder."""
        assert self._workdir is not None and install.backends is not None and install.stub is not None
        backends = self._workdir / "backends"
        shutil.copytree(install.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(install.stub, backends / "python" / STUB_NAME)
        return backends

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # The python-backend stub runs the `python` it finds first on PATH: make that this interpreter's env.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.lib_dir),
                                                                   env.get("LD_LIBRARY_PATH")]))
        # The model.py files import mrkd: make this checkout importable even when it is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        return env

    def _http(self, method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.http_url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def model_states(self) -> list[dict]:
        """The repository index: [{name, version, state, reason}]."""
        status, body = self._http("POST", "/v2/repository/index")
        if status != 200:
            raise ServerError(f"repository index failed: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def _failure(self, what: str) -> ServerError:
        excerpt = log_excerpt(self.log_file) if self.log_file else ""
        return ServerError(f"{what}\n{excerpt}")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until the server and every model are ready; raises ServerError (with the log) otherwise."""
        if self._process is None:
            raise ServerError("server not started")
        try:
            self._wait_ready(timeout)
        finally:
            self._repo_lock.close()  # the server has read the repository (or failed): exports may publish again

    def _wait_ready(self, timeout: float | None) -> None:
        assert self._process is not None
        deadline = time.monotonic() + (timeout if timeout is not None else self.startup_timeout)
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise self._failure(f"tritonserver exited with code {code} while loading {self.repo}")
            try:
                status, _ = self._http("GET", "/v2/health/ready", timeout=1.0)
                if status == 200:
                    states = self.model_states()
                    failed = [s for s in states if s.get("state") == "UNAVAILABLE"]
                    if failed:
                        reasons = "; ".join(f"{s['name']}: {s.get('reason', '')}" for s in failed)
                        raise self._failure(f"models failed to load: {reasons}")
                    if states and all(s.get("state") == "READY" for s in states):
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
                pass
            time.sleep(0.25)
        raise self._failure(f"tritonserver not ready after {timeout or self.startup_timeout:.0f} s")

    def wait(self) -> int:
        """Blocks while the server runs; raises ServerError if it exits on its own."""
        if self._process is None:
            raise ServerError("server not started")
        code = self._process.wait()
        raise self._failure(f"tritonserver exited unexpectedly with code {code}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests and unloads models), then SIGKILL after `timeout`; then
        whatever is left of the server's process group (stubs of a server that died) is killed."""
        code = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            code = self._process.returncode
            self._kill_group(self._process.pid)
            self._process = None
        self._released.set()
        if self._spawner is not None:
            self._spawner.join()
            self._spawner = None
        self._repo_lock.close()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:
            keep_log = self.log_file is not None and self.log_file.parent == self._workdir and code not in (0, None)
            if keep_log:
                shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """SIGKILL to what is left of the server's process group (it is its own group: start_new_session)."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
