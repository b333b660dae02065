"""MRKD against its RD4AD baseline (ILM and FLM off) with the same backbone, budget and seed, side by side.

Trains and evaluates each (dataset, mode) pair with the public CLIs and writes docs/results.md with the figures
and the exact command of every row. Runs that already finished (metrics.json present) are reused, so an
interrupted run continues where it stopped.

  python benchmarks/accuracy.py                                   # elpv:mono + the three texture sets
  python benchmarks/accuracy.py --datasets textures:brick --epochs 5 --out runs/accuracy
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODES = {"MRKD": ["--ilm", "on", "--flm", "on"], "RD4AD": ["--ilm", "off", "--flm", "off"]}
NOTES_MARKER = "<!-- notes: kept when this file is regenerated -->"
DEFAULT_DATASETS = ["elpv:mono", "textures:brick", "textures:grass", "textures:gravel"]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_row(dataset: str, mode: str, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / f"{dataset.replace(':', '-')}-{mode.lower()}"
    common = ["--data", dataset, "--seed", str(args.seed)]
    train_args = common + MODES[mode] + ["--out", str(run_dir)]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    if args.image_size:
        train_args += ["--image-size", str(args.image_size)]
    eval_args = ["--checkpoint", str(run_dir / "checkpoint.pt"), "--data", dataset, "--out", str(run_dir / "eval")]
    metrics_file = run_dir / "eval" / "metrics.json"
    seconds = None
    if not metrics_file.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mrkd.train", *train_args, "--resume"], check=True)
        seconds = time.perf_counter() - start
        subprocess.run([sys.executable, "-m", "mrkd.evaluate", *eval_args], check=True)
    metrics = json.loads(metrics_file.read_text())
    return {"dataset": dataset, "mode": mode, "metrics": metrics, "train_seconds": seconds,
            "command": "python -m mrkd.train " + shlex.join(train_args) + " && python -m mrkd.evaluate "
            + shlex.join(eval_args)}


def write_markdown(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    lines = [
        "# Results: MRKD vs RD4AD (same backbone, budget and seed)",
        "",
        f"Produced by `python benchmarks/accuracy.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on a "
        "2-core CPU machine. RD4AD is the same code with ILM and FLM switched off. AU-PRO is the standard protocol "
        "(FPR over all normal pixels, integrated to 0.3); AU-PRO (per image) is the protocol of the RD4AD/MRKD "
        "papers. ELPV has image labels only, so its pixel metrics are empty.",
        "",
        "| data | method | image AUROC | pixel AUROC | AU-PRO | AU-PRO (per image) | normal / anomalous | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {r['dataset']} | {r['mode']} | {fmt(m['image_auroc'])} | {fmt(m['pixel_auroc'])} | "
                     f"{fmt(m['aupro'])} | {fmt(m['aupro_per_image'])} | {m['n_normal']} / {m['n_anomalous']} | "
                     f"{secs} |")
    lines += ["", "Commands, one per row:", ""]
    lines += [f"- {r['dataset']} {r['mode']}: `{r['command']}`" for r in rows]
    if path.exists() and NOTES_MARKER in path.read_text():  # hand-written analysis below the marker is kept
        lines += ["", path.read_text()[path.read_text().index(NOTES_MARKER):].rstrip("\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--epochs", type=int, default=None, help="default: mrkd.train's")
    p.add_argument("--image-size", type=int, default=None, help="default: mrkd.train's")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--markdown", default="docs/results.md")
    args = p.parse_args(argv)
    rows = [run_row(d, mode, args) for d in args.datasets.split(",") for mode in MODES]
    write_markdown(rows, Path(args.markdown), args)
    for r in rows:
        m = r["metrics"]
        print(f"{r['dataset']:16s} {r['mode']:6s} image AUROC {fmt(m['image_auroc'])}  pixel AUROC "
              f"{fmt(m['pixel_auroc'])}  AU-PRO {fmt(m['aupro'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
