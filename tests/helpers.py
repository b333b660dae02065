"""Helpers shared by the tests and benchmarks/resilience.py: `python -m mrkd.serve` as a separate process, the
processes under it, and a recorder of fsyncs and renames."""
from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> types.ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ is not a package), registered in sys.modules: dataclasses
    look their module up by name."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def start_serve(repo: Path, ports: tuple[int, int, int] = (0, 0, 0), log: Path | None = None,
                timeout: float = 240.0, cwd: Path = REPO_ROOT) -> subprocess.Popen:
    """Starts `python -m mrkd.serve` on `repo` (ports 0: any free ones; a relative `repo` is relative to `cwd`)
    and returns it once it printed "ready"; raises AssertionError with its stderr if it exits or does not become
    ready in time."""
    grpc, http, metrics = ports
    command = [sys.executable, "-m", "mrkd.serve", "--repo", str(repo), "--grpc-port", str(grpc),
               "--http-port", str(http), "--metrics-port", str(metrics)]
    if log is not None:
        command += ["--log-file", str(log)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready and process.stdout.readline().startswith("ready"):
            return process
        if process.poll() is not None:
            raise AssertionError(f"mrkd.serve exited with {process.returncode}: {process.stderr.read()}")
    process.kill()
    process.wait()
    raise AssertionError(f"mrkd.serve did not become ready in {timeout:g} s")


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command name) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        table[int(stat.parent.name)] = (int(fields[1]), fields[0], name)
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (parent, _, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies do not count)."""
    table = process_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """Waits until none of `pids` runs; returns those still running after `timeout` s."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def tritonserver_of(launcher_pid: int) -> int:
    """The tritonserver process that `python -m mrkd.serve` (launcher_pid) started."""
    table = process_table()
    for pid in descendants(launcher_pid):
        if pid in table and table[pid][2].startswith("tritonserver"):
            return pid
    raise AssertionError(f"no tritonserver under process {launcher_pid}")


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """Records ("fsync", path) and ("rename", "src -> dst") in the order they happen (os.fsync, os.replace,
    os.rename patched for the test)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", f"{src} -> {dst}"))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events
