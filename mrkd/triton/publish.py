"""Publishing a product's new version into a Triton model repository, all or nothing, and the repository's lock.

- everything is written first, under temporary names that Triton ignores, and fsynced; then a journal lists the
  renames that publish it (version folders, which the old pinned configs do not serve, then the configs), and the
  renames are made. A crash before the journal leaves the old version served (the temporary files are removed by
  the next export); a crash after it is completed by the next export or `mrkd.serve` (`finish_interrupted_exports`);
- an exclusive lock on the repository (`EXPORT_LOCK` at its root) serialises exports, so two exports at the same
  time get two different versions; `mrkd.serve` holds it shared while tritonserver reads the configs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..core.files import atomic_path, file_lock, fsync_path, user_path
from ..core.wire import model_names
from .errors import ExportError

EXPORT_LOCK = ".mrkd-export.lock"  # a file at the repository root (Triton only looks at folders)
JOURNAL_SUFFIX = ".export-journal.json"  # ".NAME.export-journal.json" at the root while an export is published
STAGING_SUFFIX = ".tmp"  # temporary names: ".V.<random>.tmp" version folders, ".config.pbtxt.<random>.tmp" configs


def existing_versions(repo: Path, name: str) -> list[int]:
    """Version numbers present in any model of the product."""
    found: set[int] = set()
    for model in model_names(name).values():
        folder = repo / model
        if folder.is_dir():
            found.update(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    return sorted(found)



def _discard(paths: list[Path]) -> None:
    """Removes staged (temporary) folders and files."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_durable(path: Path, content: str | Path) -> None:
    """Writes text, or copies a file, and fsyncs it."""
    if isinstance(content, Path):
        shutil.copyfile(content, path)
    else:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
    fsync_path(path)


def stage(repo: Path, version: int, versions: dict[str, dict[str, str | Path]],
           configs: dict[str, str]) -> list[tuple[Path, Path]]:
    """Writes every version folder and config under temporary names (fsynced); returns the (temporary, final)
    renames that publish them: the version folders first, then the configs in the order given."""
    folders, config_files = [], []
    try:
        for model, files in versions.items():
            model_dir = repo / model
            model_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=STAGING_SUFFIX, dir=model_dir))
            folders.append((tmp, model_dir / str(version)))
            for filename, content in files.items():
                _write_durable(tmp / filename, content)
            tmp.chmod(0o755)
            fsync_path(tmp)
        for model, text in configs.items():
            fd, name = tempfile.mkstemp(prefix=".config.pbtxt.", suffix=STAGING_SUFFIX, dir=repo / model)
            os.close(fd)
            tmp = Path(name)
            config_files.append((tmp, repo / model / "config.pbtxt"))
            tmp.chmod(0o644)
            _write_durable(tmp, text)
    except BaseException:
        _discard([tmp for tmp, _ in folders + config_files])
        raise
    return folders + config_files


def _journal_path(repo: Path, name: str) -> Path:
    return repo / f".{name}{JOURNAL_SUFFIX}"


def publish(repo: Path, name: str, version: int, renames: list[tuple[Path, Path]]) -> None:
    """Records the renames in the product's journal (durably), makes them, syncs the folders, drops the journal."""
    journal = _journal_path(repo, name)
    entries = [[str(src.relative_to(repo)), str(dst.relative_to(repo))] for src, dst in renames]
    try:
        with atomic_path(journal) as tmp:
            tmp.write_text(json.dumps({"product": name, "version": version, "renames": entries}, indent=2) + "\n")
    except BaseException:
        _discard([src for src, _ in renames])  # nothing is visible yet: take the staged files away again
        raise
    _apply_journal(repo, journal)


def _apply_journal(repo: Path, journal: Path) -> None:
    """Makes (or finishes) the renames a journal lists; every step can be repeated after a crash."""
    data = json.loads(journal.read_text())
    folders = set()
    for src_name, dst_name in data["renames"]:
        src, dst = repo / src_name, repo / dst_name
        if src.exists():
            os.replace(src, dst)
        elif not dst.exists():
            raise ExportError(f"{journal}: {src_name} is gone before it was published as {dst_name}; export the "
                              f"checkpoint again")
        folders.add(dst.parent)
    for folder in sorted(folders):
        fsync_path(folder)
    journal.unlink()
    fsync_path(repo)


def finish_interrupted_exports(repo: str | Path) -> list[str]:
    """Completes every export whose publication a crash interrupted (its journal is still there), and removes the
    temporary files of exports that died before publishing. Returns the products completed. The caller holds the
    repository lock, or calls `prepare_repository`."""
    repo = user_path(repo).resolve()
    done = []
    for journal in sorted(repo.glob(f".*{JOURNAL_SUFFIX}")):
        _apply_journal(repo, journal)
        done.append(journal.name[1:-len(JOURNAL_SUFFIX)])
    _discard(list(repo.glob(f"*/.*{STAGING_SUFFIX}")))
    return done


def repository_lock(repo: str | Path, shared: bool = False):
    """The repository's export lock (see the module docstring); a context manager."""
    return file_lock(user_path(repo) / EXPORT_LOCK, shared=shared)


def prepare_repository(repo: str | Path) -> list[str]:
    """Under the exclusive lock: completes interrupted exports (what `mrkd.serve` runs before it starts the
    server). A read-only repository is left as it is."""
    repo = user_path(repo).resolve()
    if not repo.is_dir():
        return []
    with repository_lock(repo) as locked:
        if not locked:
            return []
        return finish_interrupted_exports(repo)
