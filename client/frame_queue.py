"""A bounded, thread-safe frame queue that drops by a stated policy and hands every dropped frame back.

The reader thread of a camera puts frames, the dispatcher takes them when a request slot is free. When the queue
is full, a live camera's new frame either pushes out the oldest queued frame (`oldest`, the default: the server
always gets the freshest frames) or is refused itself (`newest`: frames are answered in an unbroken run, the gap
comes later). Either way `put` returns the frame that was dropped, so that the caller records it: nothing is
dropped silently. `put(block=True)` waits for room instead (sources that are not live) and never drops.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

DROP_POLICIES = ("oldest", "newest")


class QueueClosed(RuntimeError):
    """put() on a queue that was closed."""


class FrameQueue(Generic[T]):
    def __init__(self, capacity: int, drop_policy: str = "oldest"):
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop policy must be one of {', '.join(DROP_POLICIES)}, got {drop_policy!r}")
        self.capacity = capacity
        self.drop_policy = drop_policy
        self._items: deque[T] = deque()
        self._closed = False
        self._dropped = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)

    def put(self, item: T, block: bool = False, timeout: float | None = None) -> T | None:
        """Adds `item`; returns the frame dropped to make room (policy 'oldest'), `item` itself if it was refused
        (policy 'newest'), or None. With block=True waits for room (None if it came, `item` on timeout)."""
        with self._lock:
            if self._closed:
                raise QueueClosed("put() on a closed frame queue")
            if block:
                if not self._not_full.wait_for(lambda: len(self._items) < self.capacity or self._closed, timeout):
                    return item
                if self._closed:
                    raise QueueClosed("frame queue closed while waiting for room")
            dropped: T | None = None
            if len(self._items) >= self.capacity:
                if self.drop_policy == "oldest":
                    dropped = self._items.popleft()
                else:
                    self._dropped += 1
                    return item
                self._dropped += 1
            self._items.append(item)
            self._not_empty.notify()
            return dropped

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest queued frame; None when closed and empty, or on timeout."""
        with self._lock:
            if not self._not_empty.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def get_if(self, predicate) -> T | None:
        """Removes and returns the oldest queued frame if `predicate(frame)` is true, else None (no waiting)."""
        with self._lock:
            if self._items and predicate(self._items[0]):
                item = self._items.popleft()
                self._not_full.notify()
                return item
            return None

    def close(self) -> None:
        """No more puts; get() returns what is queued, then None."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def drain(self) -> list[T]:
        """Removes and returns everything queued (used at shutdown, so the frames can be recorded)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._not_full.notify_all()
            return items

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
