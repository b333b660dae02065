"""Atomic writes (mrkd.core.files): durable before they become visible."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import record_fsyncs_and_renames

from mrkd.core.files import atomic_path, write_json


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power cut must leave the old file or the new one: the data reaches the disk before the rename, and the
    rename itself (the folder's entry) right after."""
    events = record_fsyncs_and_renames(monkeypatch)
    target = tmp_path / "metrics.json"
    write_json(target, {"auroc": 0.9})
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) == 1 and events[renames[0]][1].endswith(f" -> {target}")
    before, after = events[: renames[0]], events[renames[0] + 1:]
    assert any(kind == "fsync" and Path(p).parent == tmp_path and p != str(tmp_path) for kind, p in before), events
    assert ("fsync", str(tmp_path)) in after, events
    assert target.read_text().strip().startswith("{")


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_file_lock_excludes_other_holders_even_in_the_same_process(tmp_path):
    from mrkd.core.files import file_lock

    lock = tmp_path / ".lock"
    order: list[str] = []

    def second() -> None:
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
