"""Checkpoint files: atomic writes, weights_only loading, clear errors."""
import pickle

import pytest
import torch

from mrkd.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def payload():
    return {"model_config": {"backbone": "mobilenet_v2"}, "state_dict": {"w": torch.arange(6.0)},
            "calibration": {"threshold": 0.4, "low": 0.1}, "epoch": 3}


def test_roundtrip(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload())
    data = load_checkpoint(path)
    assert torch.equal(data["state_dict"]["w"], torch.arange(6.0))
    assert data["epoch"] == 3 and data["versions"]["torch"] == torch.__version__
    assert load_checkpoint(tmp_path / "run")["epoch"] == 3  # a run folder works too
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="without checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_empty_and_truncated_files(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", payload())
    full = path.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mrkd-checkpoint", "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(path)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickle.pt")


def test_foreign_and_unfinished_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an MRKD checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    unfinished = payload() | {"calibration": None}
    save_checkpoint(tmp_path / "u.pt", unfinished)
    with pytest.raises(CheckpointError, match="lacks calibration"):
        load_checkpoint(tmp_path / "u.pt")
    assert load_checkpoint(tmp_path / "u.pt", for_inference=False)["epoch"] == 3


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", payload())
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"state_dict": {"bad": lambda: None}, "model_config": {}, "calibration": {}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
