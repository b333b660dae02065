"""Triton system shared memory for raw frames (the client's `shm` transport): one region per request in flight,
reused, and registered with each server that receives it."""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .servers import Server


@dataclass
class Region:
    name: str
    handle: object
    size: int


class SharedMemoryRegions:
    """Triton system shared-memory regions for frames: one per request in flight, reused, registered per server."""

    _ids = itertools.count()

    def __init__(self):
        from tritonclient.utils import shared_memory

        self._shm = shared_memory
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._registered: dict[str, set[str]] = {}  # server url -> region names registered there
        self._lock = threading.Lock()

    def acquire(self, frame: np.ndarray, server: Server) -> Region:
        with self._lock:
            fitting = [r for r in self._free if r.size >= frame.nbytes]
            region = min(fitting, key=lambda r: r.size) if fitting else None
            if region is not None:
                self._free.remove(region)
        if region is None:
            name = f"mrkd_client_{os.getpid()}_{next(self._ids)}"
            handle = self._shm.create_shared_memory_region(name, "/" + name, frame.nbytes, create_only=True)
            region = Region(name, handle, frame.nbytes)
            with self._lock:
                self._all.append(region)
        try:
            self._shm.set_shared_memory_region(region.handle, [frame])
            with self._lock:
                known = region.name in self._registered.setdefault(server.url, set())
            if not known:
                server.connection.register_system_shared_memory(region.name, "/" + region.name, region.size)
                with self._lock:
                    self._registered[server.url].add(region.name)
        except Exception:
            self.release(region)
            raise
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            if region not in self._free:
                self._free.append(region)

    def forget(self, server: Server) -> None:
        with self._lock:
            self._registered.pop(server.url, None)

    def close(self, servers: Sequence[Server]) -> None:
        for server in servers:
            with self._lock:
                names = self._registered.pop(server.url, set())
            for name in names:
                try:
                    server.connection.unregister_system_shared_memory(name)
                except Exception:
                    pass  # the server may be gone; its registrations went with it
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            try:
                self._shm.destroy_shared_memory_region(region.handle)
            except Exception:
                pass
