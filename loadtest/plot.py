"""Plot a locust run: throughput and p50/p95/p99 latency over time, from PREFIX_stats_history.csv.

  python loadtest/plot.py runs/load                 # reads runs/load_stats_history.csv, writes runs/load.png
  python loadtest/plot.py runs/load --out load.png

Run locust with `--csv PREFIX --csv-full-history`. The history's percentiles are locust's *current* ones (a window of
the last ~10 s), so the curves show how latency moves with load; the totals printed at the end come from
PREFIX_stats.csv (the whole run).
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from mrkd.core.files import atomic_path  # noqa: E402

AGGREGATED = "Aggregated"


@dataclass
class History:
    seconds: list[float]  # since the first row
    users: list[int]
    rps: list[float]
    failures_per_s: list[float]
    p50: list[float | None]
    p95: list[float | None]
    p99: list[float | None]


@dataclass
class Totals:
    requests: int
    failures: int
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None
    average: float


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # locust writes "N/A" before the first answer


def read_history(path: str | Path) -> History:
    """The Aggregated rows of a locust stats-history CSV. Raises ValueError naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found (run locust with --csv PREFIX --csv-full-history)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = ("Timestamp", "User Count", "Name", "Requests/s", "Failures/s", "50%", "95%", "99%")
    if not rows or any(key not in rows[0] for key in needed):
        raise ValueError(f"{path} is not a locust stats-history CSV with columns {', '.join(needed)}")
    rows = [r for r in rows if r["Name"] == AGGREGATED]
    if not rows:
        raise ValueError(f"{path} has no '{AGGREGATED}' rows: the run recorded no requests")
    start = float(rows[0]["Timestamp"])
    return History(
        seconds=[float(r["Timestamp"]) - start for r in rows],
        users=[int(float(r["User Count"])) for r in rows],
        rps=[_number(r["Requests/s"]) or 0.0 for r in rows],
        failures_per_s=[_number(r["Failures/s"]) or 0.0 for r in rows],
        p50=[_latency(r["50%"]) for r in rows],
        p95=[_latency(r["95%"]) for r in rows],
        p99=[_latency(r["99%"]) for r in rows],
    )


def _latency(text: str) -> float | None:
    """A percentile of the history window; locust writes 0 (or N/A) for a window in which no request finished."""
    value = _number(text)
    return value if value is not None and value > 0 else None


def read_totals(path: str | Path) -> Totals:
    """The Aggregated row of PREFIX_stats.csv (the whole run)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found (run locust with --csv PREFIX)")
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("Name") == AGGREGATED]
    if not rows:
        raise ValueError(f"{path} has no '{AGGREGATED}' row")
    row = rows[0]
    return Totals(
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        rps=_number(row["Requests/s"]) or 0.0,
        p50=_number(row["50%"]),
        p95=_number(row["95%"]),
        p99=_number(row["99%"]),
        average=_number(row["Average Response Time"]) or 0.0,
    )


def plot_history(history: History, out: str | Path, title: str) -> Path:
    """Draws throughput and users (top) and p50/p95/p99 (bottom) over the run; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    top.plot(history.seconds, history.rps, color="tab:blue", label="requests/s")
    if any(history.failures_per_s):
        top.plot(history.seconds, history.failures_per_s, color="tab:red", label="failures/s")
    top.set_ylabel("throughput (requests/s)")
    users_axis = top.twinx()
    users_axis.step(history.seconds, history.users, where="post", color="tab:gray", alpha=0.6, label="users")
    users_axis.set_ylabel("users")
    lines = top.get_legend_handles_labels()[0] + users_axis.get_legend_handles_labels()[0]
    top.legend(lines, [line.get_label() for line in lines], loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(title)
    for values, label, color in ((history.p50, "p50", "tab:green"), (history.p95, "p95", "tab:orange"),
                                 (history.p99, "p99", "tab:red")):
        bottom.plot(history.seconds, [float("nan") if v is None else v for v in values], label=label, color=color)
    bottom.set_ylabel("latency (ms, last ~10 s)")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    """Plots a locust run's history and prints its totals; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python loadtest/plot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="the --csv PREFIX given to locust")
    parser.add_argument("--out", default=None, help="PNG to write (default: PREFIX.png)")
    parser.add_argument("--title", default=None, help="plot title (default: the prefix's name)")
    args = parser.parse_args(argv)
    try:
        history = read_history(f"{args.prefix}_stats_history.csv")
        totals = read_totals(f"{args.prefix}_stats.csv")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out or f"{args.prefix}.png")
    plot_history(history, out, args.title or Path(args.prefix).name)
    print(f"{totals.requests} requests, {totals.failures} failures, {totals.rps:.1f} requests/s, "
          f"p50 {_ms(totals.p50)}, p95 {_ms(totals.p95)}, p99 {_ms(totals.p99)}, mean {totals.average:.0f} ms")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
