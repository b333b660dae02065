"""The spool: frames that could not be inspected in time wait on disk for a server, instead of becoming errors.

A frame that waited --retry-timeout seconds for a ready server (or whose sends all failed on the servers' side) is
written to the spool folder, one file per frame (`<sequence>-<camera>@<product>-<frame>.npz`, older clients'
`<sequence>-<camera>-<frame>.npz`: the decoded image and the frame's camera, product, number, source name and
capture time), atomically. When a server is ready again the runner
inspects spooled frames, oldest first, and records each with status "late" (capture time and inspection time).

Bounded: when the spool holds more than `max_bytes`, the oldest frames are evicted (each one counted, and recorded
as dropped). It survives the client: a frame is deleted only after its line was written, and the next run given
the same folder inspects what is left. One client at a time: the folder is locked while a Spool is open.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrkd.core.files import atomic_path

from .results import lock_exclusively

_NAME = re.compile(r"^(\d{12})-.*\.npz$")
_PRODUCT = re.compile(r"@(.+)-\d+\.npz$")  # the product in a file's name (camera names have no '@')
DEFAULT_SPOOL_MB = 1024.0


@dataclass
class SpooledFrame:
    """A frame in the spool: where it is, what it was, and (once taken) its image."""

    name: str
    size: int
    camera: str = ""
    frame: int = -1
    source: str = ""
    capture_time: float = 0.0  # epoch seconds
    spooled_time: float = 0.0
    reason: str = ""
    tries: int = 0  # times it was sent from the spool and failed on the servers' side
    run: str = ""  # the run that spooled it
    product: str = ""  # its camera's product ("" in spools of older clients)
    image: np.ndarray | None = None

    def meta(self) -> dict[str, Any]:
        return {"camera": self.camera, "frame": self.frame, "source": self.source, "capture_time": self.capture_time,
                "spooled_time": self.spooled_time, "reason": self.reason, "tries": self.tries, "run": self.run,
                "product": self.product}


class Spool:
    def __init__(self, folder: str | Path, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the spool size must be positive, got {max_bytes} bytes")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--spool {self.folder} is a file; give a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        lock_exclusively(self._lock_fd, self.folder, "its spool")
        self.max_bytes = int(max_bytes)
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.evicted = 0
        self._evicted_by: Counter[str] = Counter()  # product -> frames evicted
        self._lock = threading.Lock()
        self._entries: deque[SpooledFrame] = deque()  # oldest first, not taken
        self._taken: dict[str, SpooledFrame] = {}
        self._bytes = 0
        for stale in self.folder.glob(".*.tmp"):  # a write cut short by a crash: never a whole frame
            stale.unlink(missing_ok=True)
        names = sorted(p.name for p in self.folder.iterdir() if _NAME.match(p.name))
        for name in names:
            size = (self.folder / name).stat().st_size
            product = _PRODUCT.search(name)
            self._entries.append(SpooledFrame(name, size, product=product.group(1) if product else ""))
            self._bytes += size
        self._sequence = int(_NAME.match(names[-1]).group(1)) + 1 if names else 0
        self.resumed = len(names)  # frames left by an earlier run

    # -- figures ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) + len(self._taken)

    def figures(self) -> dict[str, int]:
        with self._lock:
            return {"frames": len(self._entries) + len(self._taken), "bytes": self._bytes, "evicted": self.evicted}

    def product_figures(self) -> dict[str, dict[str, int]]:
        """figures() per product (frames of older clients' spools: product "")."""
        with self._lock:
            entries = list(self._entries) + list(self._taken.values())
            evicted = dict(self._evicted_by)
        out: dict[str, dict[str, int]] = {}
        for product in {e.product for e in entries} | set(evicted):
            mine = [e for e in entries if e.product == product]
            out[product] = {"frames": len(mine), "bytes": sum(e.size for e in mine), "evicted": evicted.get(product, 0)}
        return out

    # -- frames in and out -----------------------------------------------------------------------------------------
    def put(self, image: np.ndarray, camera: str, frame: int, source: str, capture_time: float, reason: str,
            tries: int = 0, product: str = "") -> list[SpooledFrame]:
        """Writes a frame; returns the frames evicted to stay within max_bytes (oldest first), to be recorded."""
        with self._lock:
            sequence, self._sequence = self._sequence, self._sequence + 1
        label = f"{camera}@{product}" if product else camera
        entry = SpooledFrame(f"{sequence:012d}-{label}-{frame}.npz", 0, camera, frame, source, capture_time,
                             time.time(), reason, tries, self.run, product)
        path = self.folder / entry.name
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, image=np.ascontiguousarray(image), meta=np.array(json.dumps(entry.meta())))
        entry.size = path.stat().st_size
        evicted = []
        with self._lock:
            self._entries.append(entry)
            self._bytes += entry.size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                evicted.append(self._entries.popleft())
                self._bytes -= evicted[-1].size
                self.evicted += 1
                self._evicted_by[evicted[-1].product] += 1
        for old in evicted:
            self._load(old, image=False)
            (self.folder / old.name).unlink(missing_ok=True)
        return evicted

    def take(self) -> SpooledFrame | None:
        """The oldest frame with its image (it stays on disk until done() or give_back()); None when empty."""
        while True:
            with self._lock:
                if not self._entries:
                    return None
                entry = self._entries.popleft()
                self._taken[entry.name] = entry
            try:
                return self._load(entry, image=True)
            except (OSError, ValueError, KeyError) as exc:  # a damaged file: set aside, never retried forever
                print(f"spool: cannot read {entry.name} ({type(exc).__name__}: {exc}); moved to damaged/",
                      flush=True)
                (self.folder / "damaged").mkdir(exist_ok=True)
                os.replace(self.folder / entry.name, self.folder / "damaged" / entry.name)
                with self._lock:
                    self._taken.pop(entry.name, None)
                    self._bytes -= entry.size

    def done(self, entry: SpooledFrame) -> None:
        """Its line was written: the frame leaves the spool."""
        with self._lock:
            self._taken.pop(entry.name, None)
        self._delete(entry)

    def give_back(self, entry: SpooledFrame, reason: str) -> list[SpooledFrame]:
        """It failed again on the servers' side: back in at the end (tries + 1); returns frames evicted."""
        assert entry.image is not None
        evicted = self.put(entry.image, entry.camera, entry.frame, entry.source, entry.capture_time, reason,
                           entry.tries + 1, entry.product)
        self.done(entry)
        return evicted

    def left(self) -> list[SpooledFrame]:
        """What is still in the spool (metadata only), oldest first."""
        with self._lock:
            entries = list(self._taken.values()) + list(self._entries)
        return [self._load(e, image=False) for e in entries]

    def close(self) -> None:
        """Releases the folder; an empty spool leaves nothing behind (its folder is removed)."""
        if self._lock_fd < 0:
            return
        if len(self) == 0 and not any(p.name != ".lock" for p in self.folder.iterdir()):
            (self.folder / ".lock").unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something else appeared in it: left as it is
        os.close(self._lock_fd)
        self._lock_fd = -1

    # -- files ---------------------------------------------------------------------------------------------------
    def _load(self, entry: SpooledFrame, image: bool) -> SpooledFrame:
        with np.load(self.folder / entry.name, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if image:
                entry.image = np.array(data["image"])
        for key, value in meta.items():
            setattr(entry, key, value)
        return entry

    def _delete(self, entry: SpooledFrame) -> None:
        (self.folder / entry.name).unlink(missing_ok=True)
        with self._lock:
            self._bytes -= entry.size
