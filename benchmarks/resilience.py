"""Server failures as a plant sees them, measured end to end with the real tritonserver, `python -m mrkd.serve` and
`python -m client` (all as separate processes). Prints, per scenario, frames answered / errors / lost and the
client's exit status.

  python benchmarks/resilience.py restart          # the only server SIGKILLed 6 s in, restarted on its ports 40 s later
  python benchmarks/resilience.py restart --outage 90   # down 90 s: longer than --retry-timeout, so the spool works
  python benchmarks/resilience.py failing-server   # two servers, one starts failing every inference mid-run
  python benchmarks/resilience.py orphans          # processes left after `python -m mrkd.serve` is SIGKILLed
  python benchmarks/resilience.py all [--checkpoint runs/elpv-mono/checkpoint.pt]

restart: one camera at --fps 1 for --frames 40 (synthetic 256 px frames), `--queue-size 100`, everything else the
client's defaults (--timeout 30, --retry-timeout 60). The tritonserver under `mrkd.serve` is SIGKILLed --kill-after
6 s after the client's run started ("servers ready"); `mrkd.serve` is started again on the same ports
--restart-after 40 s after the kill.
failing-server: two `mrkd.serve` servers of the same checkpoint; B's detector is mrkd's DetectorModel with the test
suite's fault injection (tests/conftest.py FAULTY_DETECTOR): after B has answered a few frames, every forward pass on
B raises (INTERNAL) for --fail-for seconds, then B heals. orphans: a full product served, the launcher SIGKILLed,
its tritonserver and python-backend stubs counted --grace seconds later.

"answered" counts lines with a result (status ok or invalid_score), "late" frames inspected from the spool after
waiting longer than --retry-timeout, "errors" error lines, "spooled" frames still in the spool at the end, "lost"
frames read without any line plus frames dropped; the run passes when answered + late == frames read and
errors == lost == 0.
Without --checkpoint a tiny model is trained first (ELPV cells, 64 px, ~20 s), as the test suite does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import alive, descendants, start_serve, tritonserver_of  # noqa: E402  (tests/helpers.py)

from mrkd.triton.launcher import free_port  # noqa: E402
from mrkd.triton.repository import ExportOptions, export  # noqa: E402


def tiny_checkpoint(work: Path) -> Path:
    """A small real checkpoint to serve (ELPV, 64 px, one epoch on 8 images), trained into `work`/tiny."""
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.training import train

    config = TrainConfig(data="elpv:mono", out=str(work / "tiny"), backbone="mobilenet_v2", pretrained=True, epochs=1,
                         batch_size=4, image_size=64, max_train_images=8, device="cpu", save_every=0)
    return train(config, show_progress=False)


class Serve:
    """`python -m mrkd.serve` on fixed ports, as a separate process."""

    def __init__(self, repo: Path, ports: tuple[int, int, int], log: Path):
        self.repo, self.ports, self.log = repo, ports, log
        self.process: subprocess.Popen | None = None
        self.ready_s = 0.0

    def start(self, timeout: float = 600) -> "Serve":
        started = time.monotonic()
        self.process = start_serve(self.repo, self.ports, self.log, timeout)
        self.ready_s = time.monotonic() - started
        return self

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def tritonserver_pid(self) -> int:
        assert self.process is not None
        return tritonserver_of(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def export_product(checkpoint: Path, repo: Path, encoded_only: bool = False) -> dict[str, str]:
    """Exports the checkpoint into `repo` (only the encoded-image ensemble when `encoded_only`)."""
    result = export(checkpoint, repo, ExportOptions(name="mrkd", device="cpu"))
    if encoded_only:
        for role in ("raw_ensemble", "frame_preprocess"):
            shutil.rmtree(repo / result.models[role])
    return {**result.models, "version": str(result.version)}


def counts(out: Path, read: int) -> dict[str, int]:
    """Frames read, answered, errors and lost, from a client's results file."""
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    frames = [r for r in records if "frame" in r]
    answered = sum(r["status"] in ("ok", "invalid_score") for r in frames)
    errors = sum(r["status"] == "error" for r in frames)
    dropped = sum(r["status"] == "dropped" for r in frames)
    late = sum(r["status"] == "late" for r in frames)
    spooled = sum(r["status"] == "spooled" for r in frames)
    return {"read": read, "answered": answered, "late": late, "errors": errors, "spooled": spooled,
            "lost": read - len(frames) + dropped}


def show(stderr: str) -> None:
    """The client's summary table, or the end of its stderr when it has none."""
    table = stderr.find("camera  read")
    print(stderr[table:] if table >= 0 else "\n".join(stderr.splitlines()[-20:]), flush=True)


def frames_read(stderr: str) -> int:
    """The summary table's 'read' column (sum over cameras)."""
    lines = stderr[stderr.index("camera  read"):].splitlines()[2:] if "camera  read" in stderr else []
    return sum(int(line.split()[1]) for line in lines if len(line.split()) > 2 and line.split()[1].isdigit())


class Client:
    """`python -m client` as a separate process; its stderr is collected by a thread (the run starts when it prints
    "servers ready")."""

    def __init__(self, command: list[str]):
        import threading

        self.process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("servers ready"):
                self.started.set()
        self.started.set()

    def wait_started(self, timeout: float = 300) -> None:
        if not self.started.wait(timeout) or self.process.poll() is not None:
            raise RuntimeError("the client did not start:\n" + "".join(self.lines[-20:]))

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self._reader.join(10)
        return code, "".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def retry_args(args: argparse.Namespace) -> list[str]:
    """The client's --retry-timeout option when one was given."""
    return [] if args.retry_timeout is None else ["--retry-timeout", str(args.retry_timeout)]


def client_command(urls: list[str], out: Path, camera: str, extra: list[str]) -> list[str]:
    """The `python -m client` command line for one camera and the given servers."""
    command = [sys.executable, "-m", "client", "--camera", camera, "--out", str(out), "--progress", "plain",
               "--progress-interval", "5", *extra]
    for url in urls:
        command += ["--url", url]
    return command


def restart(args: argparse.Namespace, checkpoint: Path, work: Path) -> dict:
    """The only server SIGKILLed and restarted on its ports while a camera streams: what the client lost."""
    repo = work / "restart_repo"
    export_product(checkpoint, repo)
    ports = (free_port(), free_port(), free_port())
    first = Serve(repo, ports, work / "restart_server1.log").start()
    print(f"[restart] server ready in {first.ready_s:.1f} s at {first.url}", flush=True)
    out = work / "restart.jsonl"
    client = Client(client_command(
        [first.url], out, f"cam=synthetic:size=256,count={args.frames}",
        ["--fps", str(args.fps), "--max-frames", str(args.frames), "--queue-size", "100", *retry_args(args)]))
    second = None
    try:
        client.wait_started()
        time.sleep(args.kill_after)
        killed = time.monotonic()
        os.kill(first.tritonserver_pid(), signal.SIGKILL)
        code = first.process.wait(timeout=60)
        launcher_exit_s = time.monotonic() - killed
        print(f"[restart] tritonserver SIGKILLed {args.kill_after:g} s in; its mrkd.serve exited {code} after "
              f"{launcher_exit_s:.2f} s", flush=True)
        time.sleep(max(0.0, args.restart_after - (time.monotonic() - killed)))
        second = Serve(repo, ports, work / "restart_server2.log").start()
        back_s = time.monotonic() - killed
        print(f"[restart] restarted on the same ports {args.restart_after:g} s after the kill, ready "
              f"{second.ready_s:.1f} s later ({back_s:.1f} s after the kill)", flush=True)
        client_exit, stderr = client.wait(timeout=args.frames / args.fps + 600)
    finally:
        client.kill()
        for server in (first, second):
            if server is not None:
                server.stop()
    result = {"scenario": "restart", **counts(out, frames_read(stderr)), "client_exit": client_exit,
              "launcher_exit": code, "launcher_exit_s": round(launcher_exit_s, 2),
              "server_back_after_kill_s": round(back_s, 1)}
    show(stderr)
    return result


def failing_server(args: argparse.Namespace, checkpoint: Path, work: Path) -> dict:
    """Two servers, one failing every forward pass: the frames retried on the other and what was lost."""
    from conftest import FAULTY_DETECTOR  # the test suite's fault injection (a real DetectorModel that can fail)

    repo_a, repo_b = work / "repo_a", work / "repo_b"
    export_product(checkpoint, repo_a, encoded_only=True)
    models = export_product(checkpoint, repo_b, encoded_only=True)
    version_dir = repo_b / models["detector"] / models["version"]
    (version_dir / "model.py").write_text(FAULTY_DETECTOR)
    fault = version_dir / "FAULT"
    a = Serve(repo_a, (free_port(), free_port(), free_port()), work / "server_a.log").start()
    b = Serve(repo_b, (free_port(), free_port(), free_port()), work / "server_b.log").start()
    print(f"[failing-server] A {a.url} ready in {a.ready_s:.1f} s, B {b.url} in {b.ready_s:.1f} s", flush=True)
    out = work / "failing.jsonl"
    client = Client(client_command(
        [a.url, b.url], out, f"cam=synthetic:size=256,count={args.frames}",
        ["--fps", str(args.failing_fps), "--max-frames", str(args.frames), "--queue-size", "100",
         "--probe-interval", "1", *retry_args(args)]))
    try:
        client.wait_started()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            records = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
            if sum(r.get("server") == b.url for r in records) >= 3:
                break
            time.sleep(0.2)
        fault.write_text("fail")
        failing_from = len(records)
        print(f"[failing-server] B fails every forward pass from now on ({failing_from} lines so far), for "
              f"{args.fail_for:g} s", flush=True)
        time.sleep(args.fail_for)
        fault.unlink()
        healed_at = len([x for x in out.read_text().splitlines() if x.strip()])
        print("[failing-server] B healed", flush=True)
        client_exit, stderr = client.wait(timeout=args.frames / args.failing_fps + 600)
    finally:
        fault.unlink(missing_ok=True)
        client.kill()
        a.stop()
        b.stop()
    records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    during = records[failing_from:healed_at]
    result = {"scenario": "failing-server", **counts(out, frames_read(stderr)), "client_exit": client_exit,
              "answered_by_b_while_failing": sum(r.get("server") == b.url for r in during),
              "retried_while_failing": sum(r.get("attempts", 1) > 1 for r in during),
              "answered_by_b_after_healing": sum(r.get("server") == b.url for r in records[healed_at:])}
    show(stderr)
    return result


def orphans(args: argparse.Namespace, checkpoint: Path, work: Path) -> dict:
    """SIGKILLs mrkd.serve and counts the processes it leaves behind (there should be none)."""
    repo = work / "orphans_repo"
    export_product(checkpoint, repo)
    server = Serve(repo, (free_port(), free_port(), free_port()), work / "orphans_server.log").start()
    family = descendants(server.process.pid)
    killed = time.monotonic()
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    deadline = killed + args.grace
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(family)
    gone_after = time.monotonic() - killed
    for pid in left:  # do not leak them from the measurement itself
        os.kill(pid, signal.SIGKILL)
    return {"scenario": "orphans", "processes_under_serve": len(family), "left_after_sigkill": len(left),
            "all_gone_after_s": None if left else round(gone_after, 1), "grace_s": args.grace}


def main(argv: list[str] | None = None) -> int:
    """Runs the scenarios the options name and prints their figures; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["restart", "failing-server", "orphans", "all"])
    p.add_argument("--checkpoint", type=Path, help="default: train a tiny model first")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--fps", type=float, default=1.0, help="restart: the camera's frame rate")
    p.add_argument("--kill-after", type=float, default=6.0)
    p.add_argument("--restart-after", "--outage", type=float, default=40.0,
                   help="restart: seconds from the kill to the restart (the outage, plus the server's start-up)")
    p.add_argument("--failing-fps", type=float, default=2.0, help="failing-server: the camera's frame rate")
    p.add_argument("--fail-for", type=float, default=10.0)
    p.add_argument("--grace", type=float, default=15.0, help="orphans: seconds allowed for the server to stop")
    p.add_argument("--retry-timeout", type=float, help="the client's --retry-timeout (default: the client's, 60 s)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="keep the repositories, logs and results files in this folder")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mrkd-resilience-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            work = args.keep
        checkpoint = args.checkpoint or tiny_checkpoint(work)
        scenarios = ["restart", "failing-server", "orphans"] if args.scenario == "all" else [args.scenario]
        results = []
        for name in scenarios:
            result = {"restart": restart, "failing-server": failing_server, "orphans": orphans}[name](
                args, checkpoint, work)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
