"""What the CLI writes: one JSON line per frame, heat-map overlays, per-camera statistics, progress and summary.

Each JSON line is written and flushed on its own, so a results file can be followed while it grows (`tail -f`)
and a crash loses at most the line being written. (The file is appended to line by line rather than written
atomically as a whole: a multi-hour run must be readable while it runs.) An existing results file is never
replaced unless asked (`overwrite=True`, the CLI's --overwrite).

A camera's live state is `CameraStats.state`, a `CameraState` (running, waiting_for_server, reconnecting,
stopped), also in `snapshot()["state"]`: what a progress display or a dashboard reads. Latencies are kept in
fixed-size histograms (`LatencyHistogram`): memory does not grow with the run.
"""
from __future__ import annotations

import enum
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from mrkd.core.wire import STATUS_INVALID_SCORE, STATUS_OK

STATUS_DROPPED = "dropped"
STATUS_ERROR = "error"
STATUS_LATE = "late"  # answered from the spool once a server was back (capture_time and inspected_time)
STATUS_SPOOLED = "spooled"  # the run ended with the frame in the spool: the next run with that spool inspects it
# Lines that are not frames: a source's gap (it was lost and came back) and a camera that gave up.
EVENT_GAP = "gap"
EVENT_GAVE_UP = "gave_up"


class CameraState(str, enum.Enum):
    """What a camera is doing right now (`CameraStats.state`; a str, so it prints and serialises as its value).

    running             reading frames and sending them
    waiting_for_server  frames are queued or waiting to be resent, and no server is ready
    reconnecting        its stream was lost; the source is reconnecting (--reconnect)
    stopped             done: the source ended, gave up (see `CameraStats.failure`) or the run was stopped
    """

    RUNNING = "running"
    WAITING_FOR_SERVER = "waiting_for_server"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null (the status says why); numpy scalars become Python."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class OutputInUse(FileExistsError):
    """Another client (another process) is writing the same results file or spool."""


def lock_exclusively(fd: int, path: Path, what: str) -> None:
    """A non-blocking exclusive flock on `fd`, held until it is closed; OutputInUse when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputInUse(f"{path} is in use by another client ({what}); give each client its own") from None


class JsonlWriter:
    """Thread-safe JSON-lines writer; every line is flushed when written. Refuses an existing, non-empty file
    unless `overwrite` (a rerun must not wipe the results of the previous run), and a file that another client is
    writing (an exclusive lock is held while it is open: two clients never interleave lines in one file)."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"--out {self.path} is a folder; give a file name such as results.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating, locked, and only then checked and emptied: a second client started on the
        # same file finds it locked and leaves it alone.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        lock_exclusively(fd, self.path, "its --out")
        if not overwrite and os.fstat(fd).st_size > 0:
            os.close(fd)
            raise FileExistsError(
                f"{self.path} already exists; pass --overwrite to replace it, or choose another --out")
        os.ftruncate(fd, 0)
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8")
        self._lock = threading.Lock()
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_json_safe(record), separators=(",", ":"), allow_nan=False, default=str)
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


def earlier_heatmaps(folder: str | Path, cameras: Sequence[str]) -> list[Path]:
    """Heat maps an earlier run left in `folder` for these cameras (what save_heatmap_overlay would replace)."""
    return sorted(p for camera in cameras for p in (Path(folder) / camera).glob(f"{camera}_*.png"))


def save_heatmap_overlay(folder: str | Path, camera: str, index: int, image: np.ndarray, anomaly_map: np.ndarray) -> Path:
    """Writes <folder>/<camera>/<camera>_<index:06d>.png (atomic) and returns its path."""
    from mrkd.runtime.visualize import overlay, save_png

    path = Path(folder) / camera / f"{camera}_{index:06d}.png"
    return save_png(path, overlay(image, anomaly_map))


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


class LatencyHistogram:
    """Latencies (ms) in log-spaced buckets (1 % wide, 0.01 ms to ~2.8 h): fixed memory (~17 KB) however long the
    run, percentiles within about 0.5 % of the exact ones (numpy's linear interpolation between the ranks)."""

    LOW_MS = 0.01
    HIGH_MS = 1e7
    GROWTH = 1.01
    _LOG_GROWTH = math.log(GROWTH)
    BUCKETS = int(math.ceil(math.log(HIGH_MS / LOW_MS) / _LOG_GROWTH)) + 2  # [0]: below LOW_MS, [-1]: HIGH_MS up

    def __init__(self) -> None:
        self.counts = np.zeros(self.BUCKETS, np.int64)
        self.count = 0
        self.low = math.inf
        self.high = -math.inf

    def add(self, value_ms: float) -> None:
        if not math.isfinite(value_ms):
            return
        if value_ms < self.LOW_MS:
            index = 0
        elif value_ms >= self.HIGH_MS:
            index = self.BUCKETS - 1
        else:
            index = 1 + min(int(math.log(value_ms / self.LOW_MS) / self._LOG_GROWTH), self.BUCKETS - 3)
        self.counts[index] += 1
        self.count += 1
        self.low = min(self.low, value_ms)
        self.high = max(self.high, value_ms)

    def merge(self, other: "LatencyHistogram") -> None:
        self.counts += other.counts
        self.count += other.count
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    def clear(self) -> None:
        self.counts[:] = 0
        self.count = 0
        self.low, self.high = math.inf, -math.inf

    def _value(self, index: int) -> float:
        """A bucket's representative value (its geometric middle), within what was seen."""
        if index == 0:
            return self.low
        if index == self.BUCKETS - 1:
            return self.high
        middle = self.LOW_MS * self.GROWTH ** (index - 1 + 0.5)
        return min(max(middle, self.low), self.high)

    def percentile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        cumulative = np.cumsum(self.counts)
        rank = q / 100.0 * (self.count - 1)
        below, above = math.floor(rank), math.ceil(rank)
        value_below = self._value(int(np.searchsorted(cumulative, below, side="right")))
        value_above = self._value(int(np.searchsorted(cumulative, above, side="right")))
        return value_below + (rank - below) * (value_above - value_below)


class _RecentLatencies:
    """Answers of the last seconds in one histogram per whole second (a fixed ring of them, `max_window_s` long)."""

    def __init__(self, max_window_s: float = 10.0) -> None:
        self.max_window_s = max_window_s
        size = int(math.ceil(max_window_s)) + 2
        self._seconds: list[int | None] = [None] * size
        self._slots = [LatencyHistogram() for _ in range(size)]

    def add(self, now: float, value_ms: float) -> None:
        second = int(math.floor(now))
        index = second % len(self._slots)
        if self._seconds[index] != second:
            self._slots[index].clear()
            self._seconds[index] = second
        self._slots[index].add(value_ms)

    def collect(self, now: float, window_s: float) -> tuple[LatencyHistogram, float | None]:
        """(the answers of the whole seconds that overlap the last window_s, the first of those seconds)."""
        first = math.floor(now - min(window_s, self.max_window_s))
        merged, oldest = LatencyHistogram(), None
        for second, slot in zip(self._seconds, self._slots):
            if second is not None and first <= second <= now:
                merged.merge(slot)
                oldest = second if oldest is None else min(oldest, second)
        return merged, oldest


@dataclass
class CameraStats:
    """Counts, latencies and live state of one camera; thread-safe (results arrive on gRPC threads)."""

    camera: str
    read: int = 0
    answered: int = 0  # "ok" and "invalid_score" lines
    anomalous: int = 0
    invalid: int = 0  # answers whose score was not a number ("invalid_score", counted as anomalous too)
    dropped: int = 0
    errors: int = 0
    late: int = 0  # answered from the spool ("late" lines)
    spooled: int = 0  # left in the spool at the end ("spooled" lines)
    gaps: int = 0  # times its source was lost and came back
    failure: str = ""  # why the camera gave up before its source ended, if it did
    state: CameraState = CameraState.RUNNING
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    latencies: LatencyHistogram = field(default_factory=LatencyHistogram)
    _recent: _RecentLatencies = field(default_factory=_RecentLatencies)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def frame_read(self) -> None:
        with self._lock:
            self.read += 1

    def set_state(self, state: CameraState) -> bool:
        """Sets the live state; True when it changed."""
        with self._lock:
            changed, self.state = self.state != state, state
            return changed

    def gap(self) -> None:
        with self._lock:
            self.gaps += 1

    def gave_up(self, reason: str) -> None:
        with self._lock:
            self.failure = reason

    def add(self, status: str, latency_ms: float | None = None, anomalous: bool = False) -> None:
        with self._lock:
            if status in (STATUS_OK, STATUS_INVALID_SCORE):
                self.answered += 1
                self.anomalous += int(anomalous or status == STATUS_INVALID_SCORE)
                self.invalid += int(status == STATUS_INVALID_SCORE)
                assert latency_ms is not None
                self.latencies.add(latency_ms)
                self._recent.add(time.monotonic(), latency_ms)
            elif status == STATUS_DROPPED:
                self.dropped += 1
            elif status == STATUS_LATE:
                self.late += 1
                self.anomalous += int(anomalous)
            elif status == STATUS_SPOOLED:
                self.spooled += 1
            else:
                self.errors += 1

    @property
    def recorded(self) -> int:
        with self._lock:
            return self.answered + self.dropped + self.errors + self.late + self.spooled

    def snapshot(self, window_s: float = 5.0) -> dict[str, Any]:
        """Figures for the progress line: answers/s and latency percentiles over the last `window_s` seconds (at
        most 10), counts, state."""
        now = time.monotonic()
        with self._lock:
            recent, oldest = self._recent.collect(now, window_s)
            span = now - max(self.started, oldest if oldest is not None else now)
            latencies = recent if recent.count else self.latencies
            return {
                "camera": self.camera,
                "state": self.state.value,
                "fps": recent.count / span if span > 0 else 0.0,
                "p50_ms": latencies.percentile(50),
                "p99_ms": latencies.percentile(99),
                "read": self.read,
                "answered": self.answered,
                "anomalous": self.anomalous,
                "invalid": self.invalid,
                "dropped": self.dropped,
                "errors": self.errors,
                "late": self.late,
                "spooled": self.spooled,
                "gaps": self.gaps,
                "failure": self.failure,
            }

    def summary(self) -> dict[str, Any]:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            elapsed = max(end - self.started, 1e-9)
            return {
                "camera": self.camera,
                "state": self.state.value,
                "read": self.read,
                "answered": self.answered,
                "anomalous": self.anomalous,
                "invalid": self.invalid,
                "dropped": self.dropped,
                "errors": self.errors,
                "late": self.late,
                "spooled": self.spooled,
                "gaps": self.gaps,
                "failure": self.failure,
                "seconds": elapsed,
                "fps": self.answered / elapsed,
                "p50_ms": self.latencies.percentile(50),
                "p95_ms": self.latencies.percentile(95),
                "p99_ms": self.latencies.percentile(99),
            }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def progress_line(snapshot: dict[str, Any]) -> str:
    s = snapshot
    invalid = f", {s['invalid']} invalid scores" if s.get("invalid") else ""
    return (
        f"{s['camera']} [{s['state']}]: {s['fps']:.1f} fps, p50 {_ms(s['p50_ms'])} ms, p99 {_ms(s['p99_ms'])} ms, "
        f"{s['answered']}/{s['read']} answered, {s['anomalous']} anomalous{invalid}, {s['dropped']} dropped, "
        f"{s['errors']} errors"
    )


SUMMARY_COLUMNS = ("camera", "read", "answered", "anomalous", "dropped", "errors", "fps", "p50_ms", "p95_ms", "p99_ms",
                   "invalid", "gaps", "late", "spooled", "state")


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
                str(s.get("invalid", 0)),
                str(s.get("gaps", 0)),
                str(s.get("late", 0)),
                str(s.get("spooled", 0)),
                "gave up" if s.get("failure") else str(s.get("state", "")),
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
