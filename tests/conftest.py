"""Shared pytest fixtures.

`tiny_checkpoint` (session): a real, tiny MRKD checkpoint trained through the public API `mrkd.train.train`
    (ELPV mono cells, mobilenet_v2 with its packaged ImageNet weights, 64 px, 1 epoch on 8 images, calibrated on the
    held-out normal cells). Returns the checkpoint Path. About 15 s on 2 cores.

`served_model` (session): that checkpoint exported with `mrkd.export` (product "mrkd", map 32 px fp16) into a
    temporary model repository and served by the real tritonserver through `mrkd.serve.TritonServer` on free
    loopback ports. Yields a `ServedModel`:
        grpc_url      "127.0.0.1:<port>" for tritonclient.grpc.InferenceServerClient
        model_name    "mrkd"  (ensemble: IMAGE bytes -> SCORE, RAW_SCORE, IS_ANOMALOUS, ANOMALY_MAP)
        raw_model_name "mrkd_raw" (ensemble: FRAME uint8 H x W x 3 -> the same outputs)
        detector_model "mrkd_detector" (for statistics and direct PREPARED -> RAW_SCORE/RAW_MAP calls)
        checkpoint    the checkpoint Path (load it with mrkd.Detector for in-process references)
        repo, http_url, image_size, map_size, map_dtype, log_file
    Starting the server (one stub process per model, each importing torch) takes ~30-60 s on a busy 2-core
    machine, once per session; the server is stopped when the session ends.

`faulty_served_model` (session): a second real tritonserver serving the same checkpoint under the same product
    name "mrkd" (encoded-image ensemble and its three steps only), whose detector is mrkd's DetectorModel with
    test-only fault injection (`FAULTY_DETECTOR`): `set_fault("fail")` makes every forward pass raise (a server-side
    failure), `set_fault("nan")` makes every score and map NaN, `set_fault(None)` heals it. Yields a `FaultyServer`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# Test-only model.py for a detector version folder: the real DetectorModel, with faults switched on by a file
# beside it. (Fault injection through a real tritonserver: what a server-side failure looks like to clients.)
FAULTY_DETECTOR = """\
# test-only fault injection (tests/conftest.py): mrkd's detector, failing or answering NaN when told to
from pathlib import Path

import numpy as np

from mrkd.triton.models import DetectorModel

FAULT_FILE = Path(__file__).with_name("FAULT")


class TritonPythonModel(DetectorModel):
    def infer(self, batch):
        fault = FAULT_FILE.read_text().strip() if FAULT_FILE.exists() else ""
        if fault == "fail":
            raise RuntimeError("injected fault: the forward pass failed")
        scores, maps = super().infer(batch)
        if fault == "nan":
            scores[:] = np.nan
            maps[:] = np.nan
        return scores, maps
"""

SERVED_MAP_SIZE = 32
SERVED_MAP_DTYPE = "fp16"


@dataclass(frozen=True)
class ServedModel:
    grpc_url: str
    http_url: str
    model_name: str
    raw_model_name: str
    detector_model: str
    checkpoint: Path
    repo: Path
    image_size: int
    map_size: int
    map_dtype: str
    log_file: Path


@dataclass(frozen=True)
class FaultyServer:
    grpc_url: str
    model_name: str
    repo: Path
    version_dir: Path  # the detector's version folder, where the FAULT file goes
    log_file: Path

    def set_fault(self, fault: str | None) -> None:
        """"fail": every forward pass raises; "nan": every score and map is NaN; None: healthy."""
        path = self.version_dir / "FAULT"
        if fault is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(fault)


def export_encoded_only(checkpoint: Path, repo: Path, **options) -> dict[str, str]:
    """Exports `checkpoint` and keeps only the encoded-image ensemble and its steps (fewer processes to start)."""
    from mrkd.triton.repository import ExportOptions, export

    result = export(checkpoint, repo, ExportOptions(device="cpu", map_size=SERVED_MAP_SIZE,
                                                    map_dtype=SERVED_MAP_DTYPE, **options))
    for role in ("raw_ensemble", "frame_preprocess"):
        shutil.rmtree(repo / result.models[role])
    return {**result.models, "version": str(result.version)}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mrkd.core.config import TrainConfig
    from mrkd.runtime.training import train

    out = tmp_path_factory.mktemp("tiny-run")
    config = TrainConfig(data="elpv:mono", out=str(out), backbone="mobilenet_v2", pretrained=True, epochs=1,
                         batch_size=4, image_size=64, max_train_images=8, device="cpu", save_every=0)
    return train(config, show_progress=False)


@pytest.fixture(scope="session")
def served_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    from mrkd.runtime.checkpoint import load_checkpoint
    from mrkd.triton.launcher import TritonServer
    from mrkd.triton.repository import ExportOptions, export

    work = tmp_path_factory.mktemp("served")
    repo = work / "model_repository"
    opts = ExportOptions(name="mrkd", device="cpu", map_size=SERVED_MAP_SIZE, map_dtype=SERVED_MAP_DTYPE,
                         max_queue_delay_us=5000)
    result = export(tiny_checkpoint, repo, opts)
    image_size = int(load_checkpoint(tiny_checkpoint)["model_config"]["image_size"])
    log_file = work / "tritonserver.log"
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_file=log_file) as server:
        yield ServedModel(
            grpc_url=server.grpc_url, http_url=server.http_url, model_name=result.models["ensemble"],
            raw_model_name=result.models["raw_ensemble"], detector_model=result.models["detector"],
            checkpoint=tiny_checkpoint, repo=repo, image_size=image_size, map_size=SERVED_MAP_SIZE,
            map_dtype=SERVED_MAP_DTYPE, log_file=log_file,
        )
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="session")
def faulty_served_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyServer]:
    from mrkd.triton.launcher import TritonServer

    work = tmp_path_factory.mktemp("faulty")
    repo = work / "model_repository"
    models = export_encoded_only(tiny_checkpoint, repo, name="mrkd", max_queue_delay_us=5000)
    version_dir = repo / models["detector"] / models["version"]
    (version_dir / "model.py").write_text(FAULTY_DETECTOR)
    log_file = work / "tritonserver.log"
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_file=log_file) as server:
        faulty = FaultyServer(grpc_url=server.grpc_url, model_name=models["ensemble"], repo=repo,
                              version_dir=version_dir, log_file=log_file)
        yield faulty
        faulty.set_fault(None)
    shutil.rmtree(repo, ignore_errors=True)


# Tests that start a tritonserver through these fixtures are marked `triton` here, and tests that need a model
# trained first (tiny_checkpoint, test_train's `trained`: ~15 s) `slow`; tests that start a server or take long
# themselves carry the mark in their own file. pytest.ini registers the markers.
TRITON_FIXTURES = {"served_model", "faulty_served_model", "runtime_server"}
SLOW_FIXTURES = {"tiny_checkpoint", "trained"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that use those fixtures (directly or through another fixture)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if TRITON_FIXTURES & used:
            item.add_marker(pytest.mark.triton)
        if SLOW_FIXTURES & used:
            item.add_marker(pytest.mark.slow)
