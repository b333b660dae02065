"""The Kubernetes manifests under deploy/kubernetes as the tests read them: the Triton container of the base
Deployment, and `python -m mrkd.serve` run exactly as that container runs it (only the repository path and the
listen address changed, so that replicas can run side by side on loopback addresses 127.0.0.x)."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
BASE_DEPLOYMENT = KUBERNETES / "base" / "deployment.yaml"


def triton_container(deployment: dict | None = None) -> dict:
    """The `triton` container of a Deployment (default: the base manifest's)."""
    deployment = deployment or yaml.safe_load(BASE_DEPLOYMENT.read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "triton")


def container_port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def probe_port(container: dict, probe: dict) -> int:
    """The port a probe's httpGet names (by port name or number)."""
    port = probe["httpGet"]["port"]
    return container_port(container, port) if isinstance(port, str) else int(port)


def serve_command(container: dict, repo: Path, host: str) -> list[str]:
    """The container's command and args with --repo and --host replaced; `python` is this interpreter."""
    command, args = list(container["command"]), list(container["args"])
    assert command[:3] == ["python", "-m", "mrkd.serve"], command
    for flag, value in (("--repo", str(repo)), ("--host", host)):
        args[args.index(flag) + 1] = value
    return [sys.executable, *command[1:], *args]


def ports_free(host: str, ports: list[int]) -> str:
    """'' when every port can be bound on host, else which cannot and why."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                return f"{host}:{port} cannot be bound ({exc}); something listens there or on 0.0.0.0:{port}"
    return ""


def launch(command: list[str], log: Path) -> subprocess.Popen:
    """Starts `python -m mrkd.serve ...` (its stdout is read by wait_ready; its stderr goes to `log`)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen([*command, "--log-file", str(log)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_ready(process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Returns once mrkd.serve printed "ready"; raises AssertionError with its output if it exits or times out."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 1.0)
        if readable:
            line = process.stdout.readline()
            seen.append(line)
            if line.startswith("ready"):
                return
        if process.poll() is not None:
            raise AssertionError(f"mrkd.serve exited with {process.returncode}: {''.join(seen)}")
    raise AssertionError(f"mrkd.serve did not become ready in {timeout:g} s: {''.join(seen)}")


def stop(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (what Kubernetes sends a pod after its preStop hook) and wait."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
