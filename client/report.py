"""What the CLI writes: one JSON line per frame, heat-map overlays, per-camera statistics, progress and summary.

Each JSON line is written and flushed on its own, so a results file can be followed while it grows (`tail -f`)
and a crash loses at most the line being written. (The file is appended to line by line rather than written
atomically as a whole: a multi-hour run must be readable while it runs.)
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

STATUS_OK = "ok"
STATUS_DROPPED = "dropped"
STATUS_ERROR = "error"


class JsonlWriter:
    """Thread-safe JSON-lines writer; every line is flushed when written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"--out {self.path} is a folder; give a file name such as results.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        with self._lock:
            if self._file is None:
                raise ValueError(f"{self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (a last, partly written line is reported, not skipped)."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc
    return records


def save_heatmap_overlay(folder: str | Path, camera: str, index: int, image: np.ndarray, anomaly_map: np.ndarray) -> Path:
    """Writes <folder>/<camera>/<camera>_<index:06d>.png (atomic) and returns its path."""
    from mrkd.runtime.visualize import overlay, save_png

    path = Path(folder) / camera / f"{camera}_{index:06d}.png"
    return save_png(path, overlay(image, anomaly_map))


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


@dataclass
class CameraStats:
    """Counts and latencies of one camera; thread-safe (results arrive on gRPC threads)."""

    camera: str
    read: int = 0
    answered: int = 0
    anomalous: int = 0
    dropped: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _recent: deque = field(default_factory=lambda: deque(maxlen=512))  # (monotonic time, latency) of answers
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def frame_read(self) -> None:
        with self._lock:
            self.read += 1

    def add(self, status: str, latency_ms: float | None = None, anomalous: bool = False) -> None:
        with self._lock:
            if status == STATUS_OK:
                self.answered += 1
                self.anomalous += int(anomalous)
                assert latency_ms is not None
                self.latencies_ms.append(latency_ms)
                self._recent.append((time.monotonic(), latency_ms))
            elif status == STATUS_DROPPED:
                self.dropped += 1
            else:
                self.errors += 1

    @property
    def recorded(self) -> int:
        with self._lock:
            return self.answered + self.dropped + self.errors

    def snapshot(self, window_s: float = 5.0) -> dict[str, Any]:
        """Figures for the progress line: answers/s over the last `window_s` and latency percentiles."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, lat) for t, lat in self._recent if now - t <= window_s]
            span = min(window_s, now - self.started)
            latencies = [lat for _, lat in recent] or self.latencies_ms[-512:]
            return {
                "camera": self.camera,
                "fps": len(recent) / span if span > 0 else 0.0,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "read": self.read,
                "answered": self.answered,
                "anomalous": self.anomalous,
                "dropped": self.dropped,
                "errors": self.errors,
            }

    def summary(self) -> dict[str, Any]:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            elapsed = max(end - self.started, 1e-9)
            return {
                "camera": self.camera,
                "read": self.read,
                "answered": self.answered,
                "anomalous": self.anomalous,
                "dropped": self.dropped,
                "errors": self.errors,
                "seconds": elapsed,
                "fps": self.answered / elapsed,
                "p50_ms": percentile(self.latencies_ms, 50),
                "p95_ms": percentile(self.latencies_ms, 95),
                "p99_ms": percentile(self.latencies_ms, 99),
            }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def progress_line(snapshot: dict[str, Any]) -> str:
    s = snapshot
    return (
        f"{s['camera']}: {s['fps']:.1f} fps, p50 {_ms(s['p50_ms'])} ms, p99 {_ms(s['p99_ms'])} ms, "
        f"{s['answered']}/{s['read']} answered, {s['anomalous']} anomalous, {s['dropped']} dropped, "
        f"{s['errors']} errors"
    )


SUMMARY_COLUMNS = ("camera", "read", "answered", "anomalous", "dropped", "errors", "fps", "p50_ms", "p95_ms", "p99_ms")


def summary_rows(summaries: Sequence[dict[str, Any]]) -> list[list[str]]:
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
            ]
        )
    return rows


def format_summary(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (fixed-width columns)."""
    header = list(SUMMARY_COLUMNS)
    rows = summary_rows(summaries)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A live per-camera progress display on stderr: rich when installed and stderr is a terminal, else a plain
    line per camera every `interval` seconds ('plain'), or nothing ('none')."""

    def __init__(self, stats: Sequence[CameraStats], mode: str = "auto", interval: float = 1.0, stream=None):
        self.stats = list(stats)
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "rich" if rich_available() and self.stream.isatty() else "plain"
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
        for column in ("camera", "fps", "p50 ms", "p99 ms", "answered/read", "anomalies", "drops", "errors"):
            table.add_column(column, justify="left" if column == "camera" else "right")
        for stat in self.stats:
            s = stat.snapshot()
            table.add_row(
                s["camera"], f"{s['fps']:.1f}", _ms(s["p50_ms"]), _ms(s["p99_ms"]), f"{s['answered']}/{s['read']}",
                str(s["anomalous"]), str(s["dropped"]), str(s["errors"]),
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
