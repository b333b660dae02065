"""The live dashboard's cost to the client, and the page at 8 cameras x 30 fps, measured side by side in one run.

  python benchmarks/dashboard.py                                            # a tiny model trained here (~15 s)
  python benchmarks/dashboard.py --checkpoint runs/demo/model/checkpoint.pt --rounds 4 --seconds 30
  python benchmarks/dashboard.py --skip-page                                # only the cost
  python benchmarks/dashboard.py --skip-cost --page-seconds 30              # only the 8 x 30 fps page

Cost: the real client (`python -m client`) against one tritonserver, N closed-loop synthetic cameras (not live: a
camera sends its next frame as soon as one of its requests is answered, so frames/s is what client and server
sustain), run alternately without and with `--dashboard` (the order flips every round, so drift on a shared machine
hits both alike), with a viewer that follows the event stream and fetches every image a page would. Prints each
run's frames/s and the client process's CPU seconds per frame, the medians, and the ratio with/without.

Page: 8 live synthetic cameras at 30 fps each with `--dashboard`, the page open in headless Chromium (Debian's
chromium through chromium-driver) for S seconds. Prints the updates the page applied per second, the largest push,
the page's worst event-loop lag (lateness of a 50 ms timer), its long tasks (> 50 ms) and the round trip of a
script call (what a click waits for), and the frames per second the cameras read and the client recorded. A server
on a small machine answers far fewer than 240 frames/s, so the same page is then also watched with every frame
answered: a dashboard in this process gets 8 x 30 answers/s (real synthetic frames, a heat map each, every 4th
anomalous) through the observer hook, as the runner would deliver them from a server fast enough.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the headless Chromium helper the browser tests use

from client.results import read_jsonl  # noqa: E402
from mrkd.triton.launcher import TritonServer, free_port  # noqa: E402


@dataclass
class Run:
    """The steady part of one client run: from its first answer to the last sample before it stopped."""

    dashboard: bool
    seconds: float
    answered: int
    cpu_s: float  # the client process's user + system CPU time over those seconds
    dashboard_cpu_s: float = 0.0  # of which the dashboard's own threads (mrkd_dashboard_cpu_seconds_total)
    pushes_seen: int = 0
    images_fetched: int = 0

    @property
    def fps(self) -> float:
        return self.answered / self.seconds

    @property
    def cpu_ms_per_frame(self) -> float:
        return 1000.0 * self.cpu_s / max(1, self.answered)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dashboard_cpu(base: str) -> float | None:
    """mrkd_dashboard_cpu_seconds_total from the client's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(base + "metrics", timeout=5).read().decode()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mrkd_dashboard_cpu_seconds_total":
                return sample.value
    return None


def answered_lines(path: Path) -> int:
    """How many frames of a results file were answered (status ok); 0 while it does not exist."""
    try:
        return path.read_bytes().count(b'"status":"ok"')
    except OSError:
        return 0


def tiny_checkpoint(folder: Path) -> Path:
    """A small real checkpoint to serve (ELPV, 64 px, one epoch on 8 images), trained into `folder`."""
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.training import train

    config = TrainConfig(data="elpv:mono", out=str(folder), backbone="mobilenet_v2", pretrained=True, epochs=1,
                         batch_size=4, image_size=64, max_train_images=8, device="cpu", save_every=0)
    return train(config, show_progress=False)


class Viewer(threading.Thread):
    """What an open page asks of the client: the event stream, and each new image it names."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base = base
        self.pushes = 0
        self.images = 0
        self.stop = threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.base + "api/events", timeout=5) as stream:
                    for line in stream:
                        if self.stop.is_set():
                            return
                        if not line.startswith(b"data: "):
                            continue
                        self.pushes += 1
                        for camera in json.loads(line[6:])["cameras"]:
                            urls = [a["image"] for a in camera["anomalies"]]
                            if camera["latest"]:
                                urls.append(camera["latest"]["image"])
                            for url in urls:
                                if url not in seen:
                                    seen.add(url)
                                    with urllib.request.urlopen(self.base + url.lstrip("/"), timeout=5) as image:
                                        image.read()
                                    self.images += 1
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.05)  # not up yet, or the run ended


def client_command(url: str, cameras: list[str], out: Path, seconds: float, extra: list[str]) -> list[str]:
    """The `python -m client` command line for synthetic cameras for `seconds`."""
    command = [sys.executable, "-m", "client", "--url", url, "--loop", "--duration", str(seconds), "--out", str(out),
               "--progress", "none", *extra]
    for i, spec in enumerate(cameras):
        command += ["--camera", f"c{i}={spec}"]
    return command


def run_client(url: str, cameras: list[str], seconds: float, dashboard: bool, work: Path) -> Run:
    """Runs the client for `seconds` (plus start-up) and measures it between its first answer and its last
    sample while running (start-up imports and the shutdown are left out: they do not depend on the dashboard)."""
    out = work / f"run-{time.monotonic_ns()}.jsonl"
    extra: list[str] = []
    viewer = None
    base = ""
    if dashboard:
        port = free_port()
        base = f"http://127.0.0.1:{port}/"
        extra = ["--dashboard", f"127.0.0.1:{port}"]
        viewer = Viewer(base)
        viewer.start()
    process = subprocess.Popen(client_command(url, cameras, out, seconds + 5, extra), cwd=ROOT,
                               stderr=subprocess.DEVNULL)
    first = last = None  # (time, cpu seconds, answered lines)
    dashboard_first = dashboard_last = 0.0
    while process.poll() is None:
        time.sleep(0.25)
        sample = (time.monotonic(), cpu_seconds(process.pid), answered_lines(out))
        if sample[1] is None:
            break
        if first is None:
            if sample[2] > 0:
                first = sample
                dashboard_first = (dashboard_cpu(base) or 0.0) if dashboard else 0.0
        else:
            last = sample
            if last[0] - first[0] >= seconds:
                dashboard_last = (dashboard_cpu(base) or 0.0) if dashboard else 0.0
                break
    process.terminate()  # as Ctrl-C
    code = process.wait()
    if viewer is not None:
        viewer.stop.set()
    if code not in (0, 130) or first is None or last is None:
        raise SystemExit(f"the client exited with status {code} before it ran {seconds:g} s")
    read_jsonl(out)  # one line per frame, complete
    return Run(dashboard, last[0] - first[0], last[2] - first[2], last[1] - first[1],
               dashboard_last - dashboard_first, viewer.pushes if viewer else 0, viewer.images if viewer else 0)


def measure_cost(url: str, args: argparse.Namespace, work: Path) -> None:
    """Throughput of the client without and with --dashboard, alternating, and prints the ratio."""
    cameras = [f"synthetic:size={args.frame_size},seed={i}" for i in range(args.cameras)]
    print(f"cost: {args.cameras} closed-loop cameras ({args.frame_size} px synthetic frames), {args.rounds} rounds "
          f"of {args.seconds:g} s without and with --dashboard (order flips every round)", flush=True)
    run_client(url, cameras, min(5.0, args.seconds), False, work)  # warm-up: first requests are slow
    runs: list[Run] = []
    for round_index in range(args.rounds):
        for dashboard in ((False, True) if round_index % 2 == 0 else (True, False)):
            run = run_client(url, cameras, args.seconds, dashboard, work)
            runs.append(run)
            print(f"  round {round_index + 1} {'with   ' if dashboard else 'without'} dashboard: {run.fps:6.2f} "
                  f"frames/s ({run.answered} answered), client CPU {run.cpu_ms_per_frame:5.2f} ms/frame"
                  + (f" (dashboard threads {1000 * run.dashboard_cpu_s / run.seconds:.1f} ms/s), viewer got "
                     f"{run.pushes_seen} pushes and {run.images_fetched} images" if dashboard else ""),
                  flush=True)
    off = [r for r in runs if not r.dashboard]
    on = [r for r in runs if r.dashboard]
    fps_off, fps_on = statistics.median(r.fps for r in off), statistics.median(r.fps for r in on)
    cpu_off = statistics.median(r.cpu_ms_per_frame for r in off)
    cpu_on = statistics.median(r.cpu_ms_per_frame for r in on)
    print(f"median frames/s: without {fps_off:.2f}, with {fps_on:.2f}: ratio with/without {fps_on / fps_off:.3f} "
          f"(cost {100 * (1 - fps_on / fps_off):+.1f}%)")
    print(f"median client CPU per frame: without {cpu_off:.2f} ms, with {cpu_on:.2f} ms "
          f"(ratio {cpu_on / cpu_off:.3f})")
    dashboard_ms = statistics.median(1000 * r.dashboard_cpu_s / r.seconds for r in on)
    print(f"median CPU of the dashboard's own threads: {dashboard_ms:.1f} ms per second "
          f"({dashboard_ms / 10:.1f}% of one core, {dashboard_ms / (10 * (os.cpu_count() or 1)):.1f}% of this "
          f"machine's {os.cpu_count()} cores)", flush=True)


PROBE = """
window.__probe = {lag: 0, longTasks: 0, longest: 0, updates: 0, started: performance.now()};
let expected = performance.now() + 50;
setInterval(() => {
  const now = performance.now();
  window.__probe.lag = Math.max(window.__probe.lag, now - expected);
  expected = now + 50;
}, 50);
try {
  new PerformanceObserver(list => {
    for (const entry of list.getEntries()) {
      window.__probe.longTasks += 1;
      window.__probe.longest = Math.max(window.__probe.longest, entry.duration);
    }
  }).observe({type: "longtask"});
} catch (e) { window.__probe.longTasks = -1; }
new MutationObserver(() => { window.__probe.updates += 1; })
  .observe(document.body, {attributes: true, attributeFilter: ["data-updated"]});
"""


def measure_page(url: str, args: argparse.Namespace, work: Path) -> None:
    """Eight live cameras with the page open in headless Chromium: what the page shows and costs."""
    cameras = [f"synthetic:size={args.frame_size},seed={i}" for i in range(8)]
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    out = work / "page.jsonl"
    total = args.page_seconds + 30
    print(f"page: 8 live cameras x 30 fps ({args.frame_size} px synthetic frames) with --dashboard, the page in "
          f"headless Chromium for {args.page_seconds:g} s", flush=True)
    process = subprocess.Popen(client_command(url, cameras, out, total, ["--fps", "30", "--dashboard",
                                                                          f"127.0.0.1:{port}"]),
                               cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "api/cameras", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the client's dashboard did not come up")
                time.sleep(0.2)
        first = json.loads(urllib.request.urlopen(base + "api/cameras", timeout=5).read())
        watch_page(base, args.page_seconds, work / "page_8x30.png")
        last = json.loads(urllib.request.urlopen(base + "api/cameras", timeout=5).read())
    finally:
        process.terminate()
        process.wait(timeout=60)

    def recorded(snapshot: dict) -> int:
        return sum(c["answered"] + c["dropped"] + c["errors"] for c in snapshot["cameras"])

    seconds = last["time"] - first["time"]
    answered = sum(c["answered"] for c in last["cameras"]) - sum(c["answered"] for c in first["cameras"])
    print(f"  frames recorded by the client: {(recorded(last) - recorded(first)) / seconds:.0f}/s of the 240/s the "
          f"cameras offer ({answered / seconds:.1f}/s answered, the rest dropped by the live cameras' queues)",
          flush=True)


def watch_page(base: str, seconds: float, screenshot: Path) -> None:
    """Opens the page in headless Chromium, probes it for `seconds` and prints what a person would feel."""
    from chromium import headless_chromium

    with headless_chromium() as driver:
        driver.get(base)
        while len(driver.find_elements("css selector", ".camera")) < 8:
            time.sleep(0.2)
        time.sleep(2)  # first images
        driver.execute_script(PROBE)
        started = time.monotonic()
        round_trips = []
        while time.monotonic() - started < seconds:
            t = time.perf_counter()
            driver.execute_script("return document.querySelectorAll('.camera').length")
            round_trips.append(1000 * (time.perf_counter() - t))
            time.sleep(0.25)
        probe = driver.execute_script("return window.__probe")
        elapsed = time.monotonic() - started
        push_bytes = len(urllib.request.urlopen(base + "api/cameras", timeout=5).read())
        images = driver.execute_script("return [...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0)"
                                       ".length")
        driver.save_screenshot(str(screenshot))
    print(f"  page updates applied: {probe['updates'] / elapsed:.2f}/s; snapshot ~{push_bytes / 1024:.0f} KiB; "
          f"{images} images shown")
    print(f"  page event-loop lag (50 ms timer, worst): {probe['lag']:.0f} ms; long tasks: {probe['longTasks']} "
          f"(longest {probe['longest']:.0f} ms); script round trip p50 {statistics.median(round_trips):.0f} ms, "
          f"max {max(round_trips):.0f} ms; screenshot {screenshot}", flush=True)


def measure_page_all_answered(args: argparse.Namespace, work: Path) -> None:
    """The page's cost when every frame is answered at once (no server): the dashboard alone."""
    import numpy as np

    from client.dashboard import Dashboard
    from client.sources import SourceOptions, SyntheticSource, parse_synthetic

    cameras = [(f"c{i}", SyntheticSource(parse_synthetic(f"synthetic:size={args.frame_size},seed={i}"),
                                         SourceOptions(fps=30))) for i in range(8)]
    frames = {name: list(SyntheticSource(parse_synthetic(f"synthetic:size={args.frame_size},count=30,seed={i}"),
                                         SourceOptions()).read(name)) for i, (name, _) in enumerate(cameras)}
    heat = np.outer(np.hanning(64), np.hanning(64)).astype(np.float32)  # one smooth blob

    class Answer:
        anomaly_map = heat

    dashboard = Dashboard("127.0.0.1", 0, cameras)
    base = dashboard.start()
    stop = threading.Event()
    fed = [0]

    def feed() -> None:  # 8 cameras x 30 answers/s, paced
        next_due = time.monotonic()
        index = 0
        while not stop.is_set():
            for name, shots in frames.items():
                anomalous = index % 4 == 3
                record = {"camera": name, "frame": index, "source": shots[index % 30].source_name, "status": "ok",
                          "server": "fast-server:8001", "latency_ms": 20.0 + index % 7,
                          "score": 0.8 if anomalous else 0.2, "verdict": "anomalous" if anomalous else "normal"}
                dashboard.state.frame_recorded(name, shots[index % 30], record, Answer)
                fed[0] += 1
            index += 1
            next_due += 1 / 30
            stop.wait(max(0.0, next_due - time.monotonic()))

    print(f"page, every frame answered: 8 cameras x 30 answers/s into the dashboard, the page in headless Chromium "
          f"for {args.page_seconds:g} s", flush=True)
    for name, _ in cameras:
        dashboard.state.camera_state(name, "running")
    feeder = threading.Thread(target=feed, daemon=True)
    started = time.monotonic()
    feeder.start()
    try:
        watch_page(base, args.page_seconds, work / "page_8x30_all_answered.png")
    finally:
        stop.set()
        feeder.join()
        dashboard.stop()
    print(f"  answers delivered: {fed[0] / (time.monotonic() - started):.0f}/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the measurements the options ask for; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: train a tiny model here (~15 s)")
    p.add_argument("--cameras", type=int, default=4, help="closed-loop cameras for the cost runs")
    p.add_argument("--frame-size", type=int, default=256, help="synthetic frame size in pixels")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs without and with the dashboard")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per cost run")
    p.add_argument("--page-seconds", type=float, default=20.0, help="seconds the page is watched at 8 x 30 fps")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-page", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="keep the runs' files here (default: a temporary folder)")
    args = p.parse_args(argv)
    from mrkd.triton.repository import ExportOptions, export

    with tempfile.TemporaryDirectory(prefix="mrkd-dashboard-bench-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or tiny_checkpoint(work / "model")
        repo = export(checkpoint, work / "repo", ExportOptions(name="mrkd", device="cpu")).repo
        with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_file=work / "triton.log") as server:
            print(f"tritonserver ready at {server.grpc_url} ({checkpoint})", flush=True)
            if not args.skip_cost:
                measure_cost(server.grpc_url, args, work)
            if not args.skip_page:
                measure_page(server.grpc_url, args, work)
        if not args.skip_page:
            measure_page_all_answered(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
