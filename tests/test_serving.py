"""Serving end to end: mrkd.export -> mrkd.serve (real tritonserver) -> gRPC (tritonclient) vs in-process Detector."""
from __future__ import annotations

import functools
import io
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import alive, descendants, record_fsyncs_and_renames, start_serve, tritonserver_of, wait_gone
from PIL import Image

from mrkd.core.config import ModelConfig
from mrkd.core.preprocess import decode_image, prepare_image
from mrkd.runtime.detector import Detector, Prediction
from mrkd.triton.launcher import check_repository
from mrkd.triton.models import decode_map, encode_map, resize_maps, split_counts, torch_threads_for
from mrkd.triton.repository import ExportError, ExportOptions, existing_versions, export, model_names, render_configs

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAW_SCORE_TOL = 1e-4


# ---------------------------------------------------------------------------------------------------- images


def elpv_cells(count: int, label: int) -> list[np.ndarray]:
    from mrkd.data import open_dataset

    records = [r for r in open_dataset("elpv:mono").test if r.label == label][:count]
    return [r.load_image() for r in records]


def skimage_photo(name: str) -> np.ndarray:
    import skimage

    return np.asarray(Image.open(Path(skimage.__file__).parent / "data" / f"{name}.png").convert("RGB"))


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header declaring width x height 8-bit grayscale pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Encoded real images: ELPV cells (normal and defective) as PNG and JPEG, a skimage texture photo."""
    normal, defective = elpv_cells(2, 0), elpv_cells(2, 1)
    return {
        "normal0.png": encode(normal[0], "PNG"), "normal1.jpg": encode(normal[1], "JPEG"),
        "defect0.png": encode(defective[0], "PNG"), "defect1.jpg": encode(defective[1], "JPEG"),
        "brick.jpg": encode(skimage_photo("brick"), "JPEG"), "brick.bmp": encode(skimage_photo("brick")[:100], "BMP"),
    }


@pytest.fixture(scope="module")
def detector(served_model) -> Detector:
    return Detector.load(served_model.checkpoint)


@pytest.fixture(scope="module")
def client(served_model):
    with grpcclient.InferenceServerClient(served_model.grpc_url) as c:
        yield c


def reference(detector: Detector, encoded: list[bytes]) -> Prediction:
    return detector.predict([decode_image(b) for b in encoded])


def expected_map(detector: Detector, prediction: Prediction, map_size: int, map_dtype: str) -> np.ndarray:
    resized = resize_maps(torch.from_numpy(prediction.maps), map_size).numpy()
    return decode_map(encode_map(np.asarray(detector.calibration.normalize_map(resized)), map_dtype))


def image_inputs(encoded: list[bytes]) -> list:
    data = np.array([[b] for b in encoded], dtype=object)
    tensor = grpcclient.InferInput("IMAGE", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def infer_images(client, model: str, encoded: list[bytes]) -> dict[str, np.ndarray]:
    result = client.infer(model, image_inputs(encoded))
    return {k: result.as_numpy(k) for k in ("SCORE", "RAW_SCORE", "IS_ANOMALOUS", "ANOMALY_MAP")}


def assert_matches(out: dict[str, np.ndarray], pred: Prediction, detector: Detector, served) -> None:
    n = len(pred)
    assert out["RAW_SCORE"].shape == (n, 1) and out["SCORE"].shape == (n, 1) and out["IS_ANOMALOUS"].shape == (n, 1)
    assert out["ANOMALY_MAP"].shape == (n, served.map_size, served.map_size)
    assert out["ANOMALY_MAP"].dtype == np.float16
    assert np.abs(out["RAW_SCORE"][:, 0] - pred.scores).max() <= RAW_SCORE_TOL
    np.testing.assert_allclose(out["SCORE"][:, 0], pred.normalized_scores, atol=1e-3)
    assert (out["IS_ANOMALOUS"][:, 0] == pred.is_anomalous).all()
    served_map = decode_map(out["ANOMALY_MAP"])
    np.testing.assert_allclose(served_map, expected_map(detector, pred, served.map_size, served.map_dtype), atol=2e-3)
    assert served_map.min() >= 0.0 and served_map.max() <= 1.0


# ---------------------------------------------------------------------------------------------------- no server


def test_committed_repository_is_the_default_export_template():
    """model_repository/ holds exactly what `python -m mrkd.export --configs-only --device cpu` writes."""
    rendered = render_configs(ModelConfig().image_size, ExportOptions())
    committed = {p.parent.name: p.read_text() for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    assert committed == rendered
    assert set(committed) == {"mrkd", "mrkd_raw", "mrkd_preprocess", "mrkd_frame_preprocess", "mrkd_detector",
                              "mrkd_postprocess"}


def test_product_names_prefix_every_model_and_configs_follow_options():
    assert model_names("bottle") == {
        "ensemble": "bottle", "raw_ensemble": "bottle_raw", "preprocess": "bottle_preprocess",
        "frame_preprocess": "bottle_frame_preprocess", "detector": "bottle_detector",
        "postprocess": "bottle_postprocess"}
    configs = render_configs(128, ExportOptions(name="bottle", device="gpu", max_batch_size=8, map_size=48,
                                                map_dtype="uint8", instances=2))
    assert 'model_name: "bottle_detector"' in configs["bottle"]
    assert "count: 2 kind: KIND_GPU" in configs["bottle_detector"]
    assert "dims: [ 3, 128, 128 ]" in configs["bottle_detector"]
    assert 'name: "ANOMALY_MAP" data_type: TYPE_UINT8 dims: [ 48, 48 ]' in configs["bottle"]
    assert all("max_batch_size: 8\n" in text for text in configs.values())
    with pytest.raises(ExportError, match="name must match"):
        render_configs(64, ExportOptions(name="bad name"))
    with pytest.raises(ExportError, match="map_dtype must be one of"):
        render_configs(64, ExportOptions(map_dtype="fp64"))


def test_map_encoding_and_batch_helpers():
    normalized = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
    assert encode_map(normalized, "uint8").tolist() == [[0, 128, 255, 51]]
    assert np.abs(decode_map(encode_map(normalized, "fp16")) - normalized).max() < 1e-3
    maps = torch.rand(2, 64, 64)
    assert torch.equal(resize_maps(maps, 64), maps)
    small = resize_maps(maps, 16)
    assert small.shape == (2, 16, 16)
    # antialiased: pixel noise is averaged away instead of sampled, and a constant map stays constant
    assert small.std() < maps.std() / 2
    assert torch.allclose(resize_maps(torch.full((1, 64, 64), 0.3), 16), torch.full((1, 16, 16), 0.3))
    assert [s.indices(10)[:2] for s in split_counts([2, 1, 3])] == [(0, 2), (2, 3), (3, 6)]
    assert torch_threads_for(0, instances=2, cpu_count=8) == 4 and torch_threads_for(3, instances=2) == 3
    assert torch_threads_for(0, instances=4, cpu_count=2) == 1


def test_export_writes_numbered_versions_and_refuses_bad_input(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    opts = ExportOptions(name="cells", map_dtype="uint8")
    assert export(tiny_checkpoint, repo, opts).version == 1
    assert export(tiny_checkpoint, repo, opts).version == 2
    assert existing_versions(repo, "cells") == [1, 2]
    assert (repo / "cells_detector" / "2" / "checkpoint.pt").read_bytes() == tiny_checkpoint.read_bytes()
    assert not list(repo.glob("*/.*.tmp")), "temporary version folders left behind"
    assert "from mrkd.triton.models import DetectorModel as TritonPythonModel" in (
        repo / "cells_detector" / "2" / "model.py").read_text()
    assert check_repository(repo) == sorted(model_names("cells").values())
    with pytest.raises(ExportError, match="version 2 of product 'cells' already exists"):
        export(tiny_checkpoint, repo, opts, version=2)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(ExportError, match="truncated or corrupt"):
        export(broken, repo, opts)
    assert existing_versions(repo, "cells") == [1, 2]


def test_serving_an_unexported_repository_fails_with_the_export_command(tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo)
    run = subprocess.run([sys.executable, "-m", "mrkd.serve", "--repo", str(repo), "--grpc-port", "0",
                          "--http-port", "0", "--metrics-port", "0"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode != 0
    assert "has not been exported yet" in run.stderr and "python -m mrkd.export --checkpoint" in run.stderr
    assert "mrkd_detector: no version folder" in run.stderr


# ---------------------------------------------------------------------------------------------------- real server


@pytest.mark.triton
def test_model_that_fails_to_load_makes_serve_exit_nonzero_with_the_server_error(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    names = export(tiny_checkpoint, repo, ExportOptions(name="broken")).models
    for role, model in names.items():  # only the detector: one stub process keeps this test short
        if role != "detector":
            shutil.rmtree(repo / model)
    ckpt = repo / names["detector"] / "1" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:4096])
    run = subprocess.run([sys.executable, "-m", "mrkd.serve", "--repo", str(repo), "--grpc-port", "0",
                          "--http-port", "0", "--metrics-port", "0", "--log-file", str(tmp_path / "server.log")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "broken_detector" in run.stderr and "truncated or corrupt" in run.stderr


def test_served_results_match_in_process_detector(served_model, client, detector, images):
    encoded = list(images.values())
    pred = reference(detector, encoded)
    # one image per request, then all images in one request
    for i, blob in enumerate(encoded):
        single = Prediction(*(getattr(pred, f)[i : i + 1] for f in Prediction.__dataclass_fields__))
        assert_matches(infer_images(client, served_model.model_name, [blob]), single, detector, served_model)
    assert_matches(infer_images(client, served_model.model_name, encoded), pred, detector, served_model)
    # the test images are not all alike: the scores differ from each other
    assert np.ptp(pred.scores) > 10 * RAW_SCORE_TOL


def test_detector_model_returns_raw_maps_of_the_in_process_detector(served_model, client, detector, images):
    frames = [decode_image(b) for b in list(images.values())[:3]]
    prepared = torch.stack([prepare_image(f, served_model.image_size) for f in frames]).numpy()
    tensor = grpcclient.InferInput("PREPARED", list(prepared.shape), "UINT8")
    tensor.set_data_from_numpy(prepared)
    result = client.infer(served_model.detector_model, [tensor])
    pred = detector.predict(frames)
    expected = resize_maps(torch.from_numpy(pred.maps), served_model.map_size).numpy()
    assert np.abs(result.as_numpy("RAW_MAP") - expected).max() <= RAW_SCORE_TOL
    assert np.abs(result.as_numpy("RAW_SCORE")[:, 0] - pred.scores).max() <= RAW_SCORE_TOL


def test_raw_frame_ensemble_matches_in_process_detector(served_model, client, detector):
    frame = skimage_photo("gravel")[:200, :300]
    data = frame[None]
    tensor = grpcclient.InferInput("FRAME", list(data.shape), "UINT8")
    tensor.set_data_from_numpy(data)
    result = client.infer(served_model.raw_model_name, [tensor])
    out = {k: result.as_numpy(k) for k in ("SCORE", "RAW_SCORE", "IS_ANOMALOUS", "ANOMALY_MAP")}
    assert_matches(out, detector.predict([frame]), detector, served_model)


def model_counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def infer_concurrently(client, model: str, requests: list[list[bytes]]) -> list:
    """Sends every request at once with async_infer; returns results or InferenceServerExceptions in order."""
    results: list = [None] * len(requests)
    done = threading.Semaphore(0)

    def on_done(index: int, result, error) -> None:
        results[index] = error if error is not None else result
        done.release()

    for i, encoded in enumerate(requests):
        client.async_infer(model, image_inputs(encoded), callback=functools.partial(on_done, i))
    for _ in requests:
        assert done.acquire(timeout=120), "a request got no answer"
    return results


def test_concurrent_requests_are_batched_and_answered_correctly(served_model, client, detector, images):
    encoded = list(images.values())
    pred = reference(detector, encoded)
    requests = [[encoded[i % len(encoded)]] for i in range(64)]
    before = model_counts(client, served_model.detector_model)
    results = infer_concurrently(client, served_model.model_name, requests)
    after = model_counts(client, served_model.detector_model)
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), result
        assert abs(result.as_numpy("RAW_SCORE")[0, 0] - pred.scores[i % len(encoded)]) <= RAW_SCORE_TOL
        assert result.as_numpy("IS_ANOMALOUS")[0, 0] == pred.is_anomalous[i % len(encoded)]
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 64
    assert inferences / executions >= 4, f"{inferences} images in {executions} detector executions"


def bad_inputs(images: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    png = images["normal0.png"]
    return {
        "corrupt": (b"this is not an image" * 10, "not a decodable image"),
        "empty": (b"", "empty image bytes"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "decompression bomb": (png_bomb(), "too large|more than the limit"),
    }


@pytest.mark.parametrize("case", ["corrupt", "empty", "truncated png", "decompression bomb"])
def test_bad_image_gets_a_clear_error_and_the_next_request_is_fine(case, served_model, client, detector, images):
    blob, message = bad_inputs(images)[case]
    with pytest.raises(InferenceServerException, match=f"invalid IMAGE: .*({message})"):
        client.infer(served_model.model_name, image_inputs([blob]))
    good = images["defect0.png"]
    assert_matches(infer_images(client, served_model.model_name, [good]), reference(detector, [good]), detector,
                   served_model)


def test_wrong_dtype_and_shape_are_refused_with_a_clear_error(served_model, client, detector, images):
    as_float = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    as_float.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(InferenceServerException, match="data-type is 'FP32'.*expects 'BYTES'"):
        client.infer(served_model.model_name, [as_float])
    two_per_item = np.array([[images["normal0.png"], images["normal0.png"]]], dtype=object)
    wrong_shape = grpcclient.InferInput("IMAGE", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(two_per_item)
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer(served_model.model_name, [wrong_shape])
    four_channels = grpcclient.InferInput("FRAME", [1, 32, 32, 4], "UINT8")
    four_channels.set_data_from_numpy(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer(served_model.raw_model_name, [four_channels])
    good = images["normal1.jpg"]
    assert_matches(infer_images(client, served_model.model_name, [good]), reference(detector, [good]), detector,
                   served_model)


def test_a_bad_request_in_a_dynamic_batch_fails_alone(served_model, client, detector, images):
    bad = bad_inputs(images)
    good = [images["normal0.png"], images["defect1.jpg"]]
    pred = reference(detector, good)
    kinds = ["good", "corrupt", "good", "empty", "good", "truncated png", "good", "decompression bomb"] * 4
    requests = [[good[i % 2]] if kind == "good" else [bad[kind][0]] for i, kind in enumerate(kinds)]
    before = model_counts(client, model_names(served_model.model_name)["preprocess"])
    results = infer_concurrently(client, served_model.model_name, requests)
    after = model_counts(client, model_names(served_model.model_name)["preprocess"])
    for i, (kind, result) in enumerate(zip(kinds, results)):
        if kind == "good":
            assert not isinstance(result, Exception), f"good request {i} failed: {result}"
            assert abs(result.as_numpy("RAW_SCORE")[0, 0] - pred.scores[i % 2]) <= RAW_SCORE_TOL
        else:
            assert isinstance(result, InferenceServerException), f"bad request {i} ({kind}) was answered"
            assert re.search(bad[kind][1], result.message()), result.message()
    # the requests really did share preprocess executions with each other
    assert after[1] - before[1] < len(requests)


# ---------------------------------------------------------------------------------------------------- exports: all or n


def served_versions(repo: Path, name: str) -> dict[str, int | None]:
    """What a tritonserver starting now would serve for product `name`: {model: version}, following Triton's rules
    (a `specific` version policy, else the latest numeric version folder; an ensemble step's `model_version`, -1 =
    the version the step serves). An ensemble whose pinned step version is not served maps to None (it would not
    load)."""
    names = model_names(name)
    served: dict[str, int | None] = {}
    for role, model in names.items():
        config = (repo / model / "config.pbtxt").read_text()
        folders = sorted(int(p.name) for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit())
        pinned = re.search(r"version_policy\s*:\s*{\s*specific\s*:\s*{\s*versions\s*:\s*\[?\s*(\d+)", config)
        version = int(pinned.group(1)) if pinned else (folders[-1] if folders else None)
        served[model] = version if version in folders else None
    for role in ("ensemble", "raw_ensemble"):
        model = names[role]
        config = (repo / model / "config.pbtxt").read_text()
        for step, pin in re.findall(r'model_name: "([^"]+)"\s*model_version: (-?\d+)', config):
            if int(pin) != -1 and served.get(step) != int(pin):
                served[model] = None
    return served


def assert_one_complete_version(repo: Path, name: str, tiny_checkpoint: Path) -> int:
    served = served_versions(repo, name)
    versions = set(served.values())
    assert len(versions) == 1 and None not in versions, f"a mixed or broken product would be served: {served}"
    version = versions.pop()
    names = model_names(name)
    assert (repo / names["detector"] / str(version) / "checkpoint.pt").read_bytes() == tiny_checkpoint.read_bytes()
    assert (repo / names["postprocess"] / str(version) / "calibration.json").is_file()
    for role in ("preprocess", "frame_preprocess", "detector", "postprocess"):
        assert (repo / names[role] / str(version) / "model.py").is_file()
    return version


def test_export_pins_every_model_of_the_product_to_its_version(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    names = model_names("cells")
    for role in ("ensemble", "raw_ensemble"):
        pins = re.findall(r"model_version: (-?\d+)", (repo / names[role] / "config.pbtxt").read_text())
        assert pins == ["2", "2", "2"], (role, pins)
    for role in ("preprocess", "frame_preprocess", "detector", "postprocess"):
        assert re.search(r"version_policy: { specific: { versions: \[ 2 \] } }",
                         (repo / names[role] / "config.pbtxt").read_text()), role
    assert assert_one_complete_version(repo, "cells", tiny_checkpoint) == 2


def _failing_open(monkeypatch, fragment: str) -> None:
    """Makes every open() for writing of a path containing `fragment` fail, as a full disk would."""
    import builtins
    import io

    real_open = io.open

    def failing_open(file, mode="r", *args, **kwargs):
        if fragment in str(file) and any(m in mode for m in "wax+"):
            raise OSError(28, "No space left on device (injected)", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)


def test_an_export_failing_half_way_changes_nothing_that_is_served(tiny_checkpoint, tmp_path, monkeypatch):
    """The calibration (the last model written) cannot be written: version 1 stays what is served, whole, and no
    part of version 2 (a new detector with an old calibration) becomes visible."""
    repo = tmp_path / "repo"
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    configs = {p: p.read_text() for p in repo.glob("*/config.pbtxt")}
    with monkeypatch.context() as patch:
        _failing_open(patch, "calibration.json")
        with pytest.raises(OSError, match="injected"):
            export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    assert assert_one_complete_version(repo, "cells", tiny_checkpoint) == 1
    assert {p: p.read_text() for p in repo.glob("*/config.pbtxt")} == configs
    assert not [p for p in repo.glob("*/*") if p.name not in ("config.pbtxt", "1")], "left-overs of version 2"
    assert export(tiny_checkpoint, repo, ExportOptions(name="cells")).version == 2  # the next export is whole
    assert assert_one_complete_version(repo, "cells", tiny_checkpoint) == 2


@pytest.mark.parametrize("crash_at", [1, 3, 6, 9, 12])
def test_an_export_interrupted_at_any_rename_serves_one_whole_version(crash_at, tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    """The process dies at the crash_at-th rename of an export (power cut, SIGKILL): what `mrkd.serve` then
    serves (check_repository runs first) is one complete version, never a mix of two."""
    repo = tmp_path / "repo"
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    calls = {"n": 0}

    class Crash(BaseException):
        pass

    def crashing(real):
        def rename(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
            return real(*args, **kwargs)
        return rename

    import os

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", crashing(os.rename))
        patch.setattr(os, "replace", crashing(os.replace))
        with pytest.raises(Crash):
            export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    check_repository(repo)
    assert assert_one_complete_version(repo, "cells", tiny_checkpoint) in (1, 2)


def test_concurrent_exports_get_distinct_whole_versions(tiny_checkpoint, tmp_path, monkeypatch):
    """Two exports of one product at the same time (a slow look at the repository, so both look for a free version
    number before either has written one): each gets its own version, both complete, the later one served."""
    import mrkd.triton.repository as repository

    repo = tmp_path / "repo"
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    real_existing_versions = repository.existing_versions

    def slow_existing_versions(*args, **kwargs):
        import time

        found = real_existing_versions(*args, **kwargs)
        time.sleep(1.0)  # a busy disk: the other export looks at the repository meanwhile
        return found

    monkeypatch.setattr(repository, "existing_versions", slow_existing_versions)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(export(tiny_checkpoint, repo, ExportOptions(name="cells")).version)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(results) == [2, 3]
    assert existing_versions(repo, "cells") == [1, 2, 3]
    assert assert_one_complete_version(repo, "cells", tiny_checkpoint) == 3
    for version in (2, 3):
        assert (repo / "cells_detector" / str(version) / "checkpoint.pt").read_bytes() == tiny_checkpoint.read_bytes()


def test_export_makes_every_file_durable_before_it_becomes_visible(tiny_checkpoint, tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    repo = tmp_path / "repo"
    export(tiny_checkpoint, repo, ExportOptions(name="cells"))
    # the first rename into the repository (the network is converted and checked in a temporary folder before)
    first_rename = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.startswith(str(repo)))
    synced = {path for kind, path in events[:first_rename] if kind == "fsync"}
    version_files = [p for p in repo.glob("*/1/*") if p.is_file()]
    assert version_files
    for path in version_files:  # synced under its temporary name, before any rename made it visible
        assert any(Path(s).name == path.name and Path(s).parent.parent == path.parent.parent for s in synced), path


def test_product_names_must_match_entirely():
    for bad in ("mrkd\n", "bottle\n", ".", "..", "a/b"):
        with pytest.raises(ExportError, match="name must match"):
            ExportOptions(name=bad).validate()


# ---------------------------------------------------------------------------------------------------- error codes and l


def test_a_server_side_failure_is_internal_and_a_bad_input_is_invalid_argument(faulty_served_model, images):
    good = images["normal0.png"]
    with grpcclient.InferenceServerClient(faulty_served_model.grpc_url) as c:
        c.infer(faulty_served_model.model_name, image_inputs([good]))
        faulty_served_model.set_fault("fail")
        try:
            with pytest.raises(InferenceServerException) as failed:
                c.infer(faulty_served_model.model_name, image_inputs([good]))
            assert failed.value.status() == "StatusCode.INTERNAL", failed.value
            assert "injected fault" in failed.value.message()
            with pytest.raises(InferenceServerException) as bad:  # a bad input is still the request's fault
                c.infer(faulty_served_model.model_name, image_inputs([b"these bytes are no image"]))
            assert bad.value.status() == "StatusCode.INVALID_ARGUMENT", bad.value
        finally:
            faulty_served_model.set_fault(None)
        c.infer(faulty_served_model.model_name, image_inputs([good]))


def test_a_requests_total_decoded_pixels_are_bounded(served_model, client, detector, images):
    """Each image within the per-image limit, together more than a request may hold: refused before decoding."""
    from mrkd.core.preprocess import MAX_PIXELS
    from mrkd.triton.models import MAX_REQUEST_PIXELS

    side = int(MAX_PIXELS ** 0.5)
    count = MAX_REQUEST_PIXELS // (side * side) + 1
    with pytest.raises(InferenceServerException) as info:
        client.infer(served_model.model_name, image_inputs([png_bomb(side, side)] * count))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(rf"{count * side * side} pixels in total, more than the limit of {MAX_REQUEST_PIXELS} per "
                     "request", info.value.message()), info.value.message()
    good = images["normal0.png"]
    assert_matches(infer_images(client, served_model.model_name, [good]), reference(detector, [good]), detector,
                   served_model)


def test_request_pixel_bound_counts_every_item():
    from mrkd.core.preprocess import InvalidImageError
    from mrkd.triton.models import MAX_REQUEST_PIXELS, check_request_pixels

    check_request_pixels([MAX_REQUEST_PIXELS // 2, MAX_REQUEST_PIXELS // 2])
    with pytest.raises(InvalidImageError, match="per request"):
        check_request_pixels([MAX_REQUEST_PIXELS // 2, MAX_REQUEST_PIXELS // 2 + 1])


# ---------------------------------------------------------------------------------------------------- the server's life


def _start_serve(tiny_checkpoint: Path, tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    """`python -m mrkd.serve` on a detector-only repository; returns it once ready, with its processes."""
    repo = tmp_path / "repo"
    names = export(tiny_checkpoint, repo, ExportOptions(name="solo")).models
    for role, model in names.items():  # only the detector: one stub process keeps the start short
        if role != "detector":
            shutil.rmtree(repo / model)
    process = start_serve(repo)
    family = descendants(process.pid)
    assert len(family) >= 2, f"expected tritonserver and its python stub, found {family}"
    return process, family


@pytest.mark.triton
def test_a_sigkilled_serve_leaves_no_process_behind(tiny_checkpoint, tmp_path):
    import os
    import signal

    process, family = _start_serve(tiny_checkpoint, tmp_path)
    try:
        os.kill(process.pid, signal.SIGKILL)  # the launcher dies without any chance to clean up (OOM killer)
        process.wait(timeout=30)
        left = wait_gone(family)
        assert not left, f"{len(left)} processes outlived their launcher: {left}"
    finally:
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.triton
def test_serve_exits_nonzero_at_once_when_its_tritonserver_dies(tiny_checkpoint, tmp_path):
    import os
    import signal
    import time

    process, family = _start_serve(tiny_checkpoint, tmp_path)
    try:
        killed = time.monotonic()
        os.kill(tritonserver_of(process.pid), signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        assert time.monotonic() - killed < 10
        assert "exited unexpectedly" in process.stderr.read()
        left = wait_gone(family)
        assert not left, f"{len(left)} processes outlived their server: {left}"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)
