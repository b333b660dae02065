"""A soak, not a sprint: many cameras at a fixed frame rate against two tritonservers for a long time, one server
SIGKILLed and restarted at random every few minutes. Everything runs as separate processes (`python -m mrkd.serve`
twice, `python -m client` once), as in benchmarks/resilience.py.

  python benchmarks/soak.py                                   # 8 cameras at 1 fps, 30 min, a kill every ~3 min
  python benchmarks/soak.py --minutes 2 --kill-every 40 --down 10 --rss-at 60   # the test suite's short version
  python benchmarks/soak.py --checkpoint runs/elpv-mono/checkpoint.pt --json soak.json

Reports frames read, lines written, answered / late / dropped / errors / spooled, lost (frames read without a
line: must be 0), the client's RSS at --rss-at seconds (default 5 min) and at the end (growth must stay under
--max-growth, 10 %), p99 latency per phase ("both up": both servers ready, "one down": from a kill until the
restarted server is ready). Exits 1 on a loss or on RSS growth. (An MQTT broker restart is not part of it: the
client does not publish to MQTT.) Without --checkpoint a tiny model is trained first (ELPV cells, 64 px, ~20 s).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resilience import Client, Serve, client_command, export_product, frames_read, tiny_checkpoint  # noqa: E402

from mrkd.triton.launcher import free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def phase_of(when: float, outages: list[list[float]]) -> str:
    """Which phase a time falls in: "one down" during an outage, else "both up"."""
    return "one down" if any(start <= when < end for start, end in outages) else "both up"


def summarize(out: Path, read: int, outages: list[list[float]]) -> dict:
    """The soak's figures from the results file: counts by status, lost frames, p99 latency per phase."""
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    frames = [r for r in records if "frame" in r]
    statuses = {s: sum(r["status"] == s for r in frames) for s in ("ok", "invalid_score", "late", "dropped", "error",
                                                                     "spooled")}
    latencies: dict[str, list[float]] = {"both up": [], "one down": []}
    for r in frames:
        if r["status"] == "ok" and r.get("latency_ms") is not None:
            when = datetime.fromisoformat(r["capture_time"]).timestamp()
            latencies[phase_of(when, outages)].append(r["latency_ms"])
    keys = {(r["camera"], r["frame"]) for r in frames if not r.get("spooled_by_earlier_run")}
    return {
        "frames_read": read, "lines": len(records), "frame_lines": len(frames),
        "answered": statuses["ok"] + statuses["invalid_score"], "late": statuses["late"],
        "dropped": statuses["dropped"], "errors": statuses["error"], "spooled": statuses["spooled"],
        "lost": read - len(keys), "duplicate_lines": len(frames) - len(keys),
        "p99_ms": {phase: round(float(np.percentile(v, 99)), 1) if v else None for phase, v in latencies.items()},
        "answers_per_phase": {phase: len(v) for phase, v in latencies.items()},
    }


def soak(args: argparse.Namespace, work: Path) -> dict:
    """Runs the soak (servers, client, kills and restarts) and returns its figures."""
    rng = random.Random(args.seed)
    checkpoint = args.checkpoint or tiny_checkpoint(work)
    servers = []
    for name in ("a", "b"):
        repo = work / f"repo_{name}"
        export_product(checkpoint, repo, encoded_only=True)
        servers.append(Serve(repo, (free_port(), free_port(), free_port()), work / f"server_{name}.log"))
    with ThreadPoolExecutor(2) as pool:  # both start at once (a start takes minutes on a busy machine)
        list(pool.map(Serve.start, servers))
    print(f"[soak] servers ready: {', '.join(f'{s.url} ({s.ready_s:.0f} s)' for s in servers)}", flush=True)
    out = work / "soak.jsonl"
    cameras = [f"cam{i}=synthetic:size={args.size},seed={i}" for i in range(args.cameras)]
    command = client_command([s.url for s in servers], out, cameras[0],
                             ["--loop", "--fps", str(args.fps), "--duration", str(args.minutes * 60),
                              "--queue-size", "100", "--probe-interval", "1"])
    for camera in cameras[1:]:
        command += ["--camera", camera]
    client = None
    outages: list[list[float]] = []  # epoch seconds: a kill .. the restarted server ready (inf: not yet)
    kills = []
    rss_first = rss_end = None
    try:
        client = Client(command)
        client.wait_started()
        started = time.monotonic()
        end = started + args.minutes * 60
        next_kill = started + rng.uniform(0.5, 1.0) * args.kill_every
        outage: threading.Thread | None = None

        def kill_and_restart(server: Serve) -> None:
            killed_wall, killed = time.time(), time.monotonic()
            outages.append([killed_wall, math.inf])
            os.kill(server.tritonserver_pid(), signal.SIGKILL)
            server.process.wait(timeout=60)
            time.sleep(max(0.0, args.down - (time.monotonic() - killed)))
            server.start()
            outages[-1][1] = time.time()
            kills.append({"server": server.url, "at_s": round(killed - started, 1),
                          "back_after_s": round(time.monotonic() - killed, 1)})
            print(f"[soak] {server.url} SIGKILLed at {killed - started:.0f} s, back after "
                  f"{time.monotonic() - killed:.0f} s", flush=True)

        # The kills run in a thread (a restart takes minutes on a busy machine); this loop keeps measuring.
        while client.process.poll() is None and time.monotonic() < end - 1:
            now = time.monotonic()
            try:
                rss_end = rss_mb(client.process.pid)  # the last reading while it runs: "at the end"
            except (OSError, RuntimeError):  # it just exited
                break
            if rss_first is None and now - started >= args.rss_at:
                rss_first = rss_end
                print(f"[soak] client RSS {rss_first:.1f} MB at {now - started:.0f} s", flush=True)
            restarting = outage is not None and outage.is_alive()
            if not restarting and now >= next_kill and now < end - args.down - 5:
                outage = threading.Thread(target=kill_and_restart, args=(servers[rng.randrange(len(servers))],),
                                          daemon=True)
                outage.start()
                next_kill = math.inf
            elif not restarting and next_kill == math.inf:
                next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every
            time.sleep(0.5)
        code, stderr = client.wait(timeout=args.minutes * 60 + 600)
        if outage is not None:
            outage.join()  # a restart still under way ends before the servers are stopped
    finally:
        if client is not None:
            client.kill()
        for server in servers:
            server.stop()
    result = {"minutes": args.minutes, "cameras": args.cameras, "fps": args.fps, "client_exit": code,
              "kills": kills, **summarize(out, frames_read(stderr), outages),
              "rss_mb_first": round(rss_first, 1) if rss_first else None, "rss_at_s": args.rss_at,
              "rss_mb_end": round(rss_end, 1) if rss_end else None}
    if rss_first and rss_end:
        result["rss_growth"] = round(rss_end / rss_first - 1.0, 4)
    table = stderr.find("camera  read")
    print(stderr[table:] if table >= 0 else "\n".join(stderr.splitlines()[-20:]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: runs the soak, prints its figures, exits non-zero on a loss or on growth."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--fps", type=float, default=1.0, help="per camera")
    p.add_argument("--size", type=int, default=64, help="synthetic frame size, pixels")
    p.add_argument("--kill-every", type=float, default=180.0, help="mean seconds between kills (uniform 0.5-1.5 x)")
    p.add_argument("--down", type=float, default=20.0, help="seconds a killed server stays down before its restart")
    p.add_argument("--rss-at", type=float, default=300.0, help="seconds into the run of the first RSS reading")
    p.add_argument("--max-growth", type=float, default=0.10, help="RSS growth allowed from --rss-at to the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, help="default: train a tiny model first")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--keep", type=Path, help="keep the repositories, logs and results file in this folder")
    args = p.parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) unwinds like Ctrl-C: the servers and the client are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="mrkd-soak-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            work = args.keep
        result = soak(args, work)
    growth = result.get("rss_growth")
    result["passed"] = result["lost"] == 0 and result["duplicate_lines"] == 0 and growth is not None and \
        growth < args.max_growth
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
