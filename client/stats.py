"""Per-camera statistics: counts, latencies and the live state of each camera.

A camera's live state is `CameraStats.state`, a `CameraState` (running, waiting_for_server, reconnecting,
stopped), also in `snapshot()["state"]`: what a progress display or a dashboard reads. Latencies are kept in
fixed-size histograms (`LatencyHistogram`): memory does not grow with the run.
"""
from __future__ import annotations

import enum
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .results import STATUS_DROPPED, STATUS_INVALID_SCORE, STATUS_LATE, STATUS_OK, STATUS_SPOOLED


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of `values`; None when there are none."""
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
    product: str = ""  # the Triton ensemble its frames go to
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

    def _counts(self) -> dict[str, Any]:
        """What snapshot and summary both report: the counts and why the camera gave up (the caller holds the lock)."""
        return {"read": self.read, "answered": self.answered, "anomalous": self.anomalous, "invalid": self.invalid,
                "dropped": self.dropped, "errors": self.errors, "late": self.late, "spooled": self.spooled,
                "gaps": self.gaps, "failure": self.failure}

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
                "product": self.product,
                "state": self.state.value,
                "fps": recent.count / span if span > 0 else 0.0,
                "p50_ms": latencies.percentile(50),
                "p99_ms": latencies.percentile(99),
                **self._counts(),
            }

    def summary(self) -> dict[str, Any]:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            elapsed = max(end - self.started, 1e-9)
            return {
                "camera": self.camera,
                "product": self.product,
                "state": self.state.value,
                **self._counts(),
                "seconds": elapsed,
                "fps": self.answered / elapsed,
                "p50_ms": self.latencies.percentile(50),
                "p95_ms": self.latencies.percentile(95),
                "p99_ms": self.latencies.percentile(99),
            }
