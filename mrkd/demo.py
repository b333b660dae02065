"""python -m mrkd.demo: the whole pipeline on embedded defaults, end to end.

Trains MRKD on the real ELPV solar-cell images with the offline pretrained backbone, evaluates it, exports it to a
Triton model repository under two product names (press_line and weld_cell, as in examples/plant.toml), starts
tritonserver, streams the held-out cells through the multi-camera client as several cameras of both products, from
a plant file derived from examples/plant.toml (watch them live on the client's dashboard, whose address it prints),
prints metrics, per-camera verdicts and throughput, and stops the server. Everything lands under --out.

Examples:
  python -m mrkd.demo                        # defaults: elpv:mono, out runs/demo, 3 cameras, page on 127.0.0.1:8080
  python -m mrkd.demo --cameras 4 --steps 300
  python -m mrkd.demo --retrain              # ignore a finished checkpoint from an earlier run
  python -m mrkd.demo --keep-open            # keep the page (and the server) up after the run, until Ctrl-C
  MRKD_DASHBOARD_TOKEN=... python -m mrkd.demo --dashboard 0.0.0.0:9000   # the page for other machines
  python -m mrkd.demo --steps 30 --no-dashboard   # a short training budget (what CI runs), no page
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core.config import TrainConfig
from .core.errors import MRKDError
from .core.files import user_path
from .core.options import add_options, from_args, option, run_command
from .core.wire import CHECKPOINT_FILE, STATUS_OK
from .data import open_dataset
from .runtime.checkpoint import CheckpointError, load_checkpoint
from .runtime.evaluation import evaluate
from .runtime.training import train
from .runtime.visualize import save_png
from .triton.launcher import ServerError, TritonServer, find_triton, free_port
from .triton.repository import ExportOptions, export

log = logging.getLogger("mrkd.demo")

EXAMPLE_PLANT = Path(__file__).resolve().parent.parent / "examples" / "plant.toml"
PRODUCTS = ("press_line", "weld_cell")  # the example plant's products: the demo's one model serves both


def reusable_checkpoint(cfg: TrainConfig) -> Path | None:
    """A finished checkpoint of exactly this configuration from an earlier run, if there is one."""
    path = Path(cfg.out) / CHECKPOINT_FILE
    try:
        data = load_checkpoint(path)
    except CheckpointError:
        return None
    same = TrainConfig.from_dict(data.get("train_config") or {}).to_dict() == cfg.to_dict()
    finished = data.get("calibration") is not None  # written only by the final save
    return path if same and finished else None


def write_camera_folders(cfg: TrainConfig, folder: Path, cameras: int) -> dict[str, tuple[Path, dict[str, int]]]:
    """The held-out test cells, dealt round-robin to camera folders; remembers each frame's true label."""
    test = open_dataset(cfg.data, cfg.category, seed=cfg.seed).test
    feeds: dict[str, tuple[Path, dict[str, int]]] = {}
    for cam in range(cameras):
        name = f"cam{cam + 1}"
        cam_dir = folder / name
        labels: dict[str, int] = {}
        for i, record in enumerate(test[cam::cameras]):
            file = f"{i:04d}_{Path(record.name).stem}.png"
            if not (cam_dir / file).exists():
                save_png(cam_dir / file, np.asarray(record.load_image()))
            labels[file] = record.label
        feeds[name] = (cam_dir, labels)
    return feeds


def camera_products(cameras: list[str]) -> dict[str, str]:
    """The demo's cameras dealt to the products in turn (cam1 press_line, cam2 weld_cell, cam3 press_line, ...)."""
    return {name: PRODUCTS[i % len(PRODUCTS)] for i, name in enumerate(cameras)}


def plant_file(example: str, url: str, feeds: dict[str, tuple[Path, dict[str, int]]], results: Path,
               heatmaps: Path, dashboard: str | None) -> str:
    """The example plant file with the demo's server, its cameras (folders of held-out cells, products in turn) and
    its outputs filled in (its [servers] options and camera [defaults] kept)."""
    head = example.split("\n[[cameras]]", 1)[0]
    head = re.sub(r"^urls = \[.*$", f"urls = [{json.dumps(url)}]", head, count=1, flags=re.MULTILINE)
    cameras = "".join(f"\n[[cameras]]\nname = {json.dumps(name)}\nproduct = {json.dumps(product)}\n"
                      f"source = {json.dumps(str(feeds[name][0]))}\n"
                      for name, product in camera_products(list(feeds)).items())
    outputs = (f"\n[outputs]\nresults = {json.dumps(str(results))}\noverwrite = true  # a rerun replaces its results\n"
               f"heatmaps = {json.dumps(str(heatmaps))}\n")
    if dashboard is not None:
        outputs += f"dashboard = {json.dumps(dashboard)}\n"
    return f"# written by python -m mrkd.demo from {EXAMPLE_PLANT.name}: its server, cameras and outputs\n" + \
        head + cameras + outputs


def summarize_client(results: Path, feeds: dict[str, tuple[Path, dict[str, int]]]) -> dict[str, dict]:
    """Per camera: frames, statuses, anomalous verdicts and how many verdicts match the true labels."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    summary: dict[str, dict] = {}
    for name, (_, labels) in feeds.items():
        mine = [r for r in rows if r.get("camera") == name]
        ok = [r for r in mine if r.get("status") == STATUS_OK]
        verdicts = [(r.get("verdict") == "anomalous", labels.get(Path(str(r.get("source", ""))).name)) for r in ok]
        correct = sum(int(flagged) == label for flagged, label in verdicts)
        summary[name] = {"product": next((r["product"] for r in mine if "product" in r), None),
                         "frames": len(mine), "status": dict(Counter(r.get("status") for r in mine)),
                         "anomalous": sum(flagged for flagged, _ in verdicts),
                         "verdict_accuracy": round(correct / len(ok), 3) if ok else None}
    return summary


DEFAULT_DASHBOARD = "127.0.0.1:8080"


def dashboard_address(requested: str) -> str:
    """HOST:PORT for the client's dashboard; the default port, when taken, gives way to a free one."""
    if requested != DEFAULT_DASHBOARD:
        return requested
    host, _, port = requested.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
            return requested
        except OSError:
            return f"{host}:{free_port(host)}"


class PreflightError(MRKDError, RuntimeError):
    """Something that would make the demo fail after training, found before it (a usage error: exit 2)."""

    exit_code = 2


DASHBOARD_CREDENTIALS = ("MRKD_DASHBOARD_TOKEN", "MRKD_DASHBOARD_USER")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def preflight(out: Path, dashboard: str | None) -> str | None:
    """Checks what can fail after the long training step, before it: the output folder is writable, tritonserver
    is installed, the dashboard's address is free. Returns the dashboard's HOST:PORT (None: no dashboard)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check."):
            pass
    except OSError as exc:
        raise PreflightError(f"the output folder {out} is not writable ({exc.strerror or exc}); "
                             f"pick another with --out") from exc
    try:
        find_triton()
    except ServerError as exc:
        raise PreflightError(str(exc)) from exc
    if not EXAMPLE_PLANT.is_file():
        raise PreflightError(f"the example plant file {EXAMPLE_PLANT} is missing: run the demo from a checkout")
    if dashboard is None:
        return None
    address = dashboard_address(dashboard)
    host, _, port = address.rpartition(":")
    if not _is_loopback(host) and not any(os.environ.get(name) for name in DASHBOARD_CREDENTIALS):
        # the client refuses a page reachable from other machines without credentials (client/dashboard/access.py)
        raise PreflightError(f"the dashboard at {address} would be reachable from other machines: set "
                             f"MRKD_DASHBOARD_TOKEN (or MRKD_DASHBOARD_USER and MRKD_DASHBOARD_PASSWORD) first "
                             f"(docs/dashboard.md), or use a loopback --dashboard address")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except (OSError, ValueError) as exc:
            raise PreflightError(f"the dashboard address {address} cannot be used ({exc}); pick another with "
                                 f"--dashboard HOST:PORT, or --no-dashboard") from exc
    return address


def run(args: DemoOptions) -> int:
    """The whole demo: preflight checks, training (or reuse), then serve_and_stream; returns the exit status."""
    out = user_path(args.out)
    budget = {"steps": args.steps} if args.steps else {}
    cfg = TrainConfig(out=str(out / "model"), **budget)
    start = time.perf_counter()
    address = preflight(out, None if args.no_dashboard else args.dashboard)

    checkpoint = None if args.retrain else reusable_checkpoint(cfg)
    if checkpoint:
        log.info("[1/5] reusing the trained model %s (--retrain to train again)", checkpoint)
    else:
        log.info("[1/5] training MRKD (%s, %s, %d steps, %d px) on %s", cfg.backbone,
                 "pretrained" if cfg.pretrained else "random", cfg.steps, cfg.image_size, cfg.data)
        checkpoint = train(cfg)
    try:
        return serve_and_stream(args, cfg, out, checkpoint, address, start)
    except (MRKDError, ValueError, OSError) as exc:  # after training: a run-time failure (1), the model is kept
        log.error("error: %s", exc)
        log.error("the trained model %s is kept: run the demo again to reuse it", checkpoint)
        return 1


def serve_and_stream(args: DemoOptions, cfg: TrainConfig, out: Path, checkpoint: Path, address: str | None,
                     start: float) -> int:
    """Steps 2-5 on a trained checkpoint: evaluate, export, serve, stream the held-out cells, report."""
    log.info("[2/5] evaluating on the held-out cells")
    metrics = evaluate(checkpoint, cfg.data, out / "eval")
    log.info("      image AUROC %.3f on %d normal / %d defective cells (%.1f ms/image in process)",
             metrics["image_auroc"], metrics["n_normal"], metrics["n_anomalous"], metrics["ms_per_image"])

    log.info("[3/5] exporting to the Triton model repository %s as %s", out / "model_repository",
             " and ".join(PRODUCTS))
    for product in PRODUCTS:  # one model, two product names: each an ensemble of its own on the same server
        result = export(checkpoint, out / "model_repository", ExportOptions(name=product))

    feeds = write_camera_folders(cfg, out / "cameras", args.cameras)
    results = out / "client_results.jsonl"
    server = TritonServer(result.repo, grpc_port=0, http_port=0, metrics_port=0, log_file=out / "tritonserver.log")
    with server:
        log.info("[4/5] tritonserver ready at %s (models: %s)", server.grpc_url, ", ".join(server.models))
        plant = out / "plant.toml"
        plant.write_text(plant_file(EXAMPLE_PLANT.read_text(), server.grpc_url, feeds, results, out / "heatmaps",
                                    address))
        log.info("[5/5] streaming %d held-out cells through %d cameras (%s), plant file %s",
                 sum(len(l) for _, l in feeds.values()), len(feeds),
                 ", ".join(f"{c} {p}" for c, p in camera_products(list(feeds)).items()), plant)
        command = [sys.executable, "-m", "client", "--config", str(plant)]
        if address is not None:
            command += ["--keep-open"] if args.keep_open else []
            log.info("      live dashboard: http://%s/  (client metrics: /metrics; Triton's: "
                     "http://127.0.0.1:%d/metrics)", address.replace("0.0.0.0", "127.0.0.1"), server.metrics_port)
        client = subprocess.Popen(command)
        try:
            client_rc = client.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the client too: it records what is left (or closes the page)
            client_rc = client.wait()
    if client_rc != 0:
        log.error("the client exited with status %d", client_rc)
        return client_rc

    cameras = summarize_client(results, feeds)
    report = {"metrics": {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "n_normal", "n_anomalous",
                                                  "ms_per_image")},
              "cameras": cameras, "checkpoint": str(checkpoint), "seconds": round(time.perf_counter() - start, 1)}
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nimage AUROC {metrics['image_auroc']:.3f}  ({metrics['n_normal']} normal, "
          f"{metrics['n_anomalous']} defective held-out cells)")
    for name, info in cameras.items():
        print(f"{name} ({info['product']}): {info['frames']} frames {info['status']}  anomalous {info['anomalous']}  "
              f"verdicts correct {info['verdict_accuracy']}")
    print(f"outputs: {out} (eval/metrics.json, eval/roc.png, eval/worst/, heatmaps/, client_results.jsonl, "
          f"model/loss_curve.png)")
    return 0


@dataclass
class DemoOptions:
    """The command's options."""

    out: str = option("runs/demo", help="folder for everything the demo writes")
    cameras: int = option(3, type=int, help="how many cameras share the held-out cells (2-4)")
    steps: int | None = option(None, type=int, help="training steps (default: mrkd.train's)")
    retrain: bool = option(False, action="store_true", help="train again even if a finished checkpoint exists")
    dashboard: str = option(DEFAULT_DASHBOARD, metavar="HOST:PORT",
                            help="where the client serves its live page (default: %(default)s, or a free port if "
                                 "taken)")
    no_dashboard: bool = option(False, action="store_true", help="run the client without its live page")
    keep_open: bool = option(False, action="store_true",
                             help="after the run, keep the page and the server up until Ctrl-C")


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv); returns its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m mrkd.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, DemoOptions)
    args = from_args(DemoOptions, p.parse_args(argv))
    return run_command(lambda: run(args), DemoOptions, log=log)


if __name__ == "__main__":
    sys.exit(main())
