"""What the CLI shows on the terminal: a live per-camera progress display and the summary table at the end."""
from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

from .stats import CameraStats


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def progress_line(snapshot: dict[str, Any]) -> str:
    """One camera's plain progress line from its stats snapshot."""
    s = snapshot
    invalid = f", {s['invalid']} invalid scores" if s.get("invalid") else ""
    return (
        f"{s['camera']} [{s['state']}]: {s['fps']:.1f} fps, p50 {_ms(s['p50_ms'])} ms, p99 {_ms(s['p99_ms'])} ms, "
        f"{s['answered']}/{s['read']} answered, {s['anomalous']} anomalous{invalid}, {s['dropped']} dropped, "
        f"{s['errors']} errors"
    )


SUMMARY_COLUMNS = ("camera", "read", "answered", "anomalous", "dropped", "errors", "fps", "p50_ms", "p95_ms", "p99_ms",
                   "invalid", "gaps", "late", "spooled", "state", "product")


def summary_rows(summaries: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The summary table's cells, one row per camera (SUMMARY_COLUMNS)."""
    rows = []
    for s in summaries:
        rows.append(
            [
                str(s["camera"]),
                *(str(s[k]) for k in ("read", "answered", "anomalous", "dropped", "errors")),
                f"{s['fps']:.2f}",
                _ms(s["p50_ms"]),
                _ms(s["p95_ms"]),
                _ms(s["p99_ms"]),
                str(s.get("invalid", 0)),
                str(s.get("gaps", 0)),
                str(s.get("late", 0)),
                str(s.get("spooled", 0)),
                "gave up" if s.get("failure") else str(s.get("state", "")),
                str(s.get("product", "")),
            ]
        )
    return rows


def format_summary(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (fixed-width columns)."""
    header = list(SUMMARY_COLUMNS)
    rows = summary_rows(summaries)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rich_available() -> bool:
    """Whether the rich package can be imported (the live display uses it when it can)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A live per-camera progress display on stderr: rich when installed and stderr is a terminal, else a plain
    line per camera every `interval` seconds ('plain'), or nothing ('none'). Without an interval: 1 s on a terminal,
    10 s in a log (the lines are kept, so fewer of them)."""

    def __init__(self, stats: Sequence[CameraStats], mode: str = "auto", interval: float | None = None,
                 stream=None):
        self.stats = list(stats)
        self.stream = stream or sys.stderr
        terminal = self.stream.isatty()
        if mode == "auto":
            mode = "rich" if rich_available() and terminal else "plain"
        if interval is None:
            interval = 1.0 if terminal else 10.0
        if mode == "rich" and not rich_available():
            raise ValueError("--progress rich needs the 'rich' package, which is not installed")
        if mode not in ("rich", "plain", "none"):
            raise ValueError(f"--progress must be auto, rich, plain or none, got {mode!r}")
        self.mode = mode
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None

    def start(self) -> None:
        if self.mode == "none":
            return
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._rich_table(), console=Console(file=self.stream), refresh_per_second=4)
            self._live.start()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._show()

    def _show(self) -> None:
        if self._live is not None:
            self._live.update(self._rich_table())
        else:
            for stat in self.stats:
                print(progress_line(stat.snapshot()), file=self.stream, flush=True)

    def _rich_table(self):
        from rich.table import Table

        table = Table(title="cameras (last 5 s)")
        for column in ("camera", "state", "fps", "p50 ms", "p99 ms", "answered/read", "anomalies", "drops", "errors"):
            table.add_column(column, justify="left" if column in ("camera", "state") else "right")
        for stat in self.stats:
            s = stat.snapshot()
            table.add_row(
                s["camera"], s["state"], f"{s['fps']:.1f}", _ms(s["p50_ms"]), _ms(s["p99_ms"]),
                f"{s['answered']}/{s['read']}", str(s["anomalous"]), str(s["dropped"]), str(s["errors"]),
            )
        return table

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._live is not None:
            self._live.update(self._rich_table())
            self._live.stop()
            self._live = None


def print_summary(summaries: Sequence[dict[str, Any]], stream=None, use_rich: bool | None = None) -> None:
    """Prints the end-of-run table of every camera (rich on a terminal when available, else plain text)."""
    stream = stream or sys.stderr
    if use_rich is None:
        use_rich = rich_available() and stream.isatty()
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="summary")
        for column in SUMMARY_COLUMNS:
            table.add_column(column, justify="left" if column == "camera" else "right")
        for row in summary_rows(summaries):
            table.add_row(*row)
        Console(file=stream).print(table)
    else:
        print(format_summary(summaries), file=stream, flush=True)
