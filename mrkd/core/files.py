"""Durable, atomic file writes and a file lock.

`atomic_path` writes to a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
folder: after a power cut the target is the old file or the new one, never a torn or empty one (a rename alone may
reach the disk before the data does).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def user_path(path: str | os.PathLike) -> Path:
    """A path as a user writes it: `~` expanded; relative paths stay relative to the working directory. Every
    command and library entry point that takes a path passes it through here, so `~`, relative and absolute
    paths behave the same."""
    return Path(path).expanduser()


def fsync_path(path: str | Path) -> None:
    """Flushes a file's data, or a folder's entries (names created, renamed, removed), to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; the data itself was synced
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; if the block succeeds, the file is fsynced and renamed onto
    `path`, and the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Writes `data` as indented, key-sorted JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def file_lock(path: str | Path, shared: bool = False) -> Iterator[bool]:
    """Holds an flock on `path` (created if missing): exclusive, or shared with other shared holders. Yields True,
    or False when the lock file cannot be created (a read-only folder: nobody can write there either).
    Works between threads too: every holder opens the file itself."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield False
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
