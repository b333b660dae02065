"""The detector network on torch, ONNX Runtime and OpenVINO: parity with the torch module (in-process and through
the real tritonserver), the export-time check that refuses a network that does not match, and the bf16 gate on
real images."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from mrkd.core.config import ModelConfig
from mrkd.core.preprocess import load_image, normalize, prepare_image
from mrkd.model.network import MRKDModel
from mrkd.runtime.calibration import Calibration
from mrkd.runtime.checkpoint import load_checkpoint, save_checkpoint
from mrkd.runtime.detector import Detector, NonFiniteScoreError
from mrkd.runtime.network_export import MAX_VERDICT_CHANGE, check_images, precision_report, prepare_network
from mrkd.runtime.network_runtime import (
    MANIFEST_FILE,
    ONNX_FILE,
    OPENVINO_FILE,
    NetworkRuntimeError,
    TorchRunner,
    check_choice,
    convert,
    load_runner,
)
from mrkd.triton.repository import ExportError, ExportOptions, existing_versions, export, render_configs

FP32_TOL = 1e-4
FP32_RUNTIMES = ["onnxruntime", "openvino"]


def cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def elpv_cells(label: int, count: int) -> list[np.ndarray]:
    from mrkd.data import open_dataset

    return [r.load_image() for r in open_dataset("elpv:mono").test if r.label == label][:count]


@pytest.fixture(scope="module")
def real_images() -> list[np.ndarray]:
    """Real ELPV cells, normal and defective (odd count: batches of 5 leave a remainder)."""
    return elpv_cells(0, 6) + elpv_cells(1, 5)


@pytest.fixture(scope="module")
def torch_detector(tiny_checkpoint) -> Detector:
    return Detector.load(tiny_checkpoint)


def relative_feature_error(got, want) -> float:
    """max |got - want| / max |want| over every feature map, computed here independently of the package."""
    worst = 0.0
    for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert g.shape == w.shape
        worst = max(worst, float((g.float() - w.float()).abs().max() / w.float().abs().max()))
    return worst


def random_model(backbone: str, image_size: int) -> tuple[MRKDModel, ModelConfig]:
    torch.manual_seed(3)
    config = ModelConfig(backbone=backbone, image_size=image_size)
    model = MRKDModel.from_config(config).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model, config


def noise_batch(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (batch, 3, image_size, image_size), generator=generator,
                                   dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("runtime", FP32_RUNTIMES)
def test_fp32_runtime_scores_match_torch_on_real_images(runtime, tiny_checkpoint, torch_detector, real_images):
    detector = Detector.load(tiny_checkpoint, runtime=runtime, batch_size=5)
    assert (detector.runtime, detector.precision) == (runtime, "fp32")
    want = torch_detector.predict(real_images)
    for images, expected in ((real_images, want), (real_images[:1], torch_detector.predict(real_images[:1]))):
        got = detector.predict(images)
        assert np.max(np.abs(got.scores - expected.scores) / np.abs(expected.scores)) <= FP32_TOL
        assert np.abs(got.maps - expected.maps).max() <= FP32_TOL * np.abs(expected.maps).max()
        assert (got.is_anomalous == expected.is_anomalous).all()
    assert np.ptp(want.scores) > 100 * FP32_TOL * np.abs(want.scores).max()  # the images are not all alike


@pytest.mark.slow  # an ONNX export and two runtimes per backbone
@pytest.mark.parametrize("backbone,image_size", [("mobilenet_v2", 96), ("resnet18", 64),
                                                 ("efficientnet_lite0", 96)])
def test_converted_networks_match_the_torch_module_on_any_batch(backbone, image_size, tmp_path):
    """Generic over the module: every registered small backbone, odd image sizes, batches 1 and 4 (traced at 1)."""
    model, config = random_model(backbone, image_size)
    reference = TorchRunner(model, "cpu", "fp32")
    for runtime in FP32_RUNTIMES:
        manifest = convert(model, config, runtime, "fp32", tmp_path / runtime)
        assert manifest.max_relative_error <= FP32_TOL
        runner = load_runner(model, config, runtime, "fp32", "cpu", 2, tmp_path / runtime)
        for batch in (1, 4):
            x = noise_batch(batch, image_size, seed=batch)
            got, want = runner(x), reference(x)
            assert len(got[0]) == len(want[0]) == 3 and len(got[1]) == 3
            assert relative_feature_error(got, want) <= FP32_TOL, (runtime, batch)


@needs_bf16
@pytest.mark.parametrize("runtime", ["openvino", "torch"])
def test_bf16_runs_in_bf16_and_stays_close(runtime, tiny_checkpoint):
    data = load_checkpoint(tiny_checkpoint)
    config = ModelConfig.from_dict(data["model_config"])
    model = MRKDModel.from_config(config)
    model.load_state_dict(data["state_dict"])
    x = noise_batch(2, config.image_size)
    want = TorchRunner(MRKDModel.from_config(config).eval(), "cpu", "fp32")
    want.model.load_state_dict(data["state_dict"])
    runner = load_runner(model, config, runtime, "bf16", "cpu", 2)
    assert runner.precision == "bf16"
    error = relative_feature_error(runner(x), want(x))
    assert 1e-4 < error < 0.1, error  # really reduced precision (not fp32 in disguise), yet close


@pytest.mark.slow  # converts a network per runtime
@pytest.mark.parametrize("runtime", ["torch", *FP32_RUNTIMES])
def test_every_runtime_refuses_nan_and_inf_input(runtime):
    """OpenVINO's clamps turn NaN input into finite features (seen here): no runtime may be fed one."""
    model, config = random_model("mobilenet_v2", 64)
    runner = load_runner(model, config, runtime, "fp32", "cpu", 2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = noise_batch(2, 64)
        x[1, 2, 7, 9] = bad
        with pytest.raises(NetworkRuntimeError, match="NaN or Inf"):
            runner(x)


def test_nan_scores_are_an_error_never_a_verdict(tiny_checkpoint, tmp_path):
    data = load_checkpoint(tiny_checkpoint)
    config = ModelConfig.from_dict(data["model_config"])
    model = MRKDModel.from_config(config)
    model.load_state_dict(data["state_dict"])
    with torch.no_grad():
        model.generation[0][0].weight[0, 0, 0, 0] = float("nan")  # a corrupted weight
    detector = Detector(model, config, Calibration.from_dict(data["calibration"]))
    with pytest.raises(NonFiniteScoreError, match="NaN/Inf anomaly scores for batch items \\[0, 1\\]"):
        detector.predict(elpv_cells(0, 2))
    with pytest.raises(NetworkRuntimeError, match="max relative error inf"):  # and no conversion accepts it
        convert(model, config, "onnxruntime", "fp32", tmp_path)


def test_choices_that_cannot_work_are_refused_with_the_reason():
    config = ModelConfig(image_size=64)
    with pytest.raises(NetworkRuntimeError, match="fp32 only"):
        check_choice("onnxruntime", "bf16", "cpu", config)
    with pytest.raises(NetworkRuntimeError, match="runs on the CPU"):
        check_choice("openvino", "fp32", "cuda", config)
    with pytest.raises(NetworkRuntimeError, match="inference_mask"):
        check_choice("onnxruntime", "fp32", "cpu", ModelConfig(image_size=64, inference_mask=True))
    with pytest.raises(NetworkRuntimeError, match="runtime must be one of"):
        check_choice("tensorrt", "fp32", "cpu", config)
    with pytest.raises(ExportError, match="on a GPU the detector runs torch"):
        ExportOptions(device="gpu", runtime="onnxruntime").validate()
    assert ExportOptions(device="gpu").detector_runtime == "torch"
    assert ExportOptions(device="gpu").detector_precision == "bf16"  # the GPU path as before
    assert (ExportOptions().detector_runtime, ExportOptions().detector_precision) == ("onnxruntime", "fp32")
    detector_config = render_configs(64, ExportOptions(runtime="openvino"))["mrkd_detector"]
    assert 'key: "runtime" value { string_value: "openvino" }' in detector_config


# ---------------------------------------------------------------------------------------------------- export


class TracedConstantModel(MRKDModel):
    """A network whose Python-side arithmetic the ONNX tracer freezes at the trace input's value: its graph
    computes something else than the module (a real way a conversion goes wrong)."""

    def forward(self, x_input, x_target=None):
        teacher, student = super().forward(x_input, x_target)
        gain = 1.0 + float(x_input.mean())
        return teacher, [s * gain for s in student]


def test_conversion_that_does_not_match_torch_is_refused(tmp_path):
    config = ModelConfig(image_size=64)
    model = TracedConstantModel.from_config(config).eval()
    with pytest.raises(NetworkRuntimeError, match=r"max relative error \S+ > 1e-04"):
        convert(model, config, "onnxruntime", "fp32", tmp_path)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_export_refuses_a_network_that_does_not_match_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import mrkd.runtime.network_export as network_export

    monkeypatch.setattr(network_export, "MRKDModel", TracedConstantModel)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="does not reproduce the torch network: max relative error"):
        export(tiny_checkpoint, repo, ExportOptions(name="bad", runtime="onnxruntime"))
    assert existing_versions(repo, "bad") == []


@pytest.mark.parametrize("runtime", FP32_RUNTIMES)
def test_export_writes_the_checked_network_beside_the_checkpoint(runtime, tiny_checkpoint, torch_detector,
                                                                 real_images, tmp_path):
    repo = tmp_path / "repo"
    result = export(tiny_checkpoint, repo, ExportOptions(name="cells", runtime=runtime))
    version_dir = repo / "cells_detector" / "1"
    expected = {ONNX_FILE, MANIFEST_FILE} | ({OPENVINO_FILE, "network.bin"} if runtime == "openvino" else set())
    assert expected <= {p.name for p in version_dir.iterdir()}
    manifest = result.network.manifest
    assert manifest.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert manifest.runtime == runtime and manifest.max_relative_error <= FP32_TOL
    assert 'string_value: "%s"' % runtime in (repo / "cells_detector" / "config.pbtxt").read_text()
    # what the Triton detector loads: the files of the version folder
    served = Detector.load(version_dir / "checkpoint.pt", runtime=runtime, network_dir=version_dir)
    got, want = served.predict(real_images), torch_detector.predict(real_images)
    assert np.max(np.abs(got.scores - want.scores) / np.abs(want.scores)) <= FP32_TOL
    # a network file that was not converted from this checkpoint is refused, not served
    other = tmp_path / "other.pt"
    data = load_checkpoint(tiny_checkpoint)
    data["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in data["state_dict"].items()}
    save_checkpoint(other, data)
    shutil.copyfile(other, version_dir / "checkpoint.pt")
    with pytest.raises(NetworkRuntimeError, match="converted from another checkpoint"):
        Detector.load(version_dir / "checkpoint.pt", runtime=runtime, network_dir=version_dir)
    with pytest.raises(NetworkRuntimeError, match="holds a .* network, not"):
        Detector.load(tiny_checkpoint, runtime="openvino" if runtime == "onnxruntime" else "onnxruntime",
                      network_dir=version_dir)


# ---------------------------------------------------------------------------------------------------- bf16 gate


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory) -> Path:
    """The user's calibration images: 40 real normal ELPV cells as PNG files."""
    folder = tmp_path_factory.mktemp("calibration-images")
    for i, image in enumerate(elpv_cells(0, 40)):
        Image.fromarray(image).save(folder / f"cell{i:03d}.png")
    return folder


def scores_of(detector: Detector, files: list[Path]) -> np.ndarray:
    return detector.predict([load_image(p) for p in files]).scores


def with_calibration(checkpoint: Path, calibration: Calibration, path: Path) -> Path:
    data = load_checkpoint(checkpoint)
    data["calibration"] = calibration.to_dict()
    return save_checkpoint(path, {k: v for k, v in data.items() if k not in ("format", "format_version", "versions")})


def flips(fp32: np.ndarray, bf16: np.ndarray, threshold: float) -> int:
    return int(np.sum((fp32 > threshold) != (bf16 > threshold)))


@needs_bf16
def test_bf16_is_refused_when_verdicts_change_unless_recalibrated(tiny_checkpoint, calibration_folder, tmp_path):
    files = sorted(calibration_folder.glob("*.png"))
    fp32 = scores_of(Detector.load(tiny_checkpoint), files)
    bf16 = scores_of(Detector.load(tiny_checkpoint, runtime="openvino", precision="bf16"), files)
    # a threshold between one image's fp32 and bf16 scores flips that image's verdict: 1 of 40 = 2.5% > 0.5%
    k = int(np.argmax(np.abs(fp32 - bf16)))
    threshold = float((fp32[k] + bf16[k]) / 2)
    changed = flips(fp32, bf16, threshold)
    assert changed >= 1 and changed / len(files) > MAX_VERDICT_CHANGE
    close = with_calibration(tiny_checkpoint, Calibration(threshold, float(fp32.min()) - 1.0), tmp_path / "c.pt")
    data = load_checkpoint(close)
    with pytest.raises(NetworkRuntimeError, match=f"bf16 refused: .*verdicts differ on {changed} "):
        prepare_network(close, data, "openvino", "bf16", calibration_images=calibration_folder, show=False)
    prepared = prepare_network(close, data, "openvino", "bf16", calibration_images=calibration_folder,
                               recalibrate=True, show=False)
    expected = Calibration.fit(bf16)  # the user's images are the normal images the threshold is fitted to
    assert prepared.calibration.threshold == pytest.approx(expected.threshold, rel=1e-6)
    assert prepared.calibration.low == pytest.approx(expected.low, rel=1e-6)
    assert prepared.precision_report.verdict_changes == changed
    prepared.cleanup()
    # far from every score, bf16 changes no verdict: accepted as it is
    far = with_calibration(tiny_checkpoint, Calibration(float(max(fp32.max(), bf16.max())) * 2, 0.0),
                           tmp_path / "f.pt")
    prepared = prepare_network(far, load_checkpoint(far), "openvino", "bf16", calibration_images=calibration_folder,
                               show=False)
    assert prepared.precision_report.verdict_changes == 0 and prepared.precision_report.images == len(files)
    assert prepared.calibration == Calibration.from_dict(load_checkpoint(far)["calibration"])
    assert {ONNX_FILE, OPENVINO_FILE, MANIFEST_FILE} <= set(prepared.files)
    prepared.cleanup()


def test_bf16_check_names_unusable_calibration_images(tiny_checkpoint, calibration_folder, tmp_path):
    data = load_checkpoint(tiny_checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NetworkRuntimeError, match="calibration_images .*empty: no .png.* images there"):
        prepare_network(tiny_checkpoint, data, "torch", "bf16", calibration_images=empty, show=False)
    broken = tmp_path / "broken"
    shutil.copytree(calibration_folder, broken)
    (broken / "cell007.png").write_bytes(b"not a png at all")
    with pytest.raises(NetworkRuntimeError, match="precision check cannot be used: .*cell007.png"):
        prepare_network(tiny_checkpoint, data, "torch", "bf16", calibration_images=broken, show=False)
    with pytest.raises(NetworkRuntimeError, match="recalibrate applies to precision bf16"):
        prepare_network(tiny_checkpoint, data, "onnxruntime", "fp32", recalibrate=True, show=False)


@needs_bf16
def test_bf16_limit_on_the_elpv_test_split(tiny_checkpoint):
    """By default the check runs on the checkpoint's own test split: 0.5% of the 431 ELPV cells, so 2 changed
    verdicts pass and 3 do not; AUROC is reported for both precisions."""
    from mrkd.data import open_dataset

    images = check_images(load_checkpoint(tiny_checkpoint)["train_config"], None)
    test = open_dataset("elpv:mono").test
    labels = np.array([r.label for r in test])
    assert len(images.check) == len(test) == 431 and (images.labels == labels).all()
    assert images.source == "elpv:mono test split" and len(images.calibration) > 0
    batch = torch.stack([prepare_image(r.load_image(), 64) for r in test])
    fp32 = Detector.load(tiny_checkpoint, batch_size=64)
    bf16 = Detector.load(tiny_checkpoint, runtime="openvino", precision="bf16", batch_size=64)
    fp32_scores = np.concatenate([fp32.predict_prepared(batch[i:i + 64]).scores for i in range(0, 431, 64)])
    bf16_scores = np.concatenate([bf16.predict_prepared(batch[i:i + 64]).scores for i in range(0, 431, 64)])
    candidates = np.unique(np.concatenate([fp32_scores, bf16_scores]))
    thresholds: dict[int, float] = {}
    for t in (candidates[1:] + candidates[:-1]) / 2:
        thresholds.setdefault(flips(fp32_scores, bf16_scores, t), float(t))
    assert max(thresholds) >= 3, "bf16 changes too few scores on this model to probe the limit"
    for changed, accepted in ((2, True), (3, False)):
        calibration = Calibration(thresholds[changed], float(fp32_scores.min()) - 1.0)
        report = precision_report(fp32_scores, bf16_scores, labels, calibration, "bf16", images.source)
        assert report.verdict_changes == changed and report.within_limit is accepted
        assert report.auroc_fp32 == pytest.approx(roc_auc_score(labels, fp32_scores), abs=1e-9)
        assert report.auroc_reduced == pytest.approx(roc_auc_score(labels, bf16_scores), abs=1e-9)
        assert report.max_score_change == pytest.approx(
            np.max(np.abs(bf16_scores - fp32_scores)) / calibration.threshold)
    with pytest.raises(NetworkRuntimeError, match="pass calibration_images"):
        check_images({"data": "/nowhere/mvtec", "category": "bottle"}, None)


# ---------------------------------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def runtime_server(tiny_checkpoint, calibration_folder, tmp_path_factory):
    """One tritonserver with the detector of the tiny model on each runtime (only the detector models: one stub
    process each), plus openvino bf16 (recalibrated on the calibration images)."""
    pytest.importorskip("tritonclient.grpc")
    from mrkd.triton.launcher import TritonServer

    work = tmp_path_factory.mktemp("runtimes-served")
    repo = work / "repo"
    products = {"rt_torch": ExportOptions(name="rt_torch", runtime="torch"),
                "rt_onnxruntime": ExportOptions(name="rt_onnxruntime", runtime="onnxruntime"),
                "rt_openvino": ExportOptions(name="rt_openvino", runtime="openvino")}
    if cpu_has_bf16():
        products["rt_openvino_bf16"] = ExportOptions(
            name="rt_openvino_bf16", runtime="openvino", precision="bf16",
            calibration_images=str(calibration_folder), recalibrate=True)
    for name, opts in products.items():
        opts.map_size = 32
        models = export(tiny_checkpoint, repo, opts).models
        for role, model in models.items():
            if role != "detector":
                shutil.rmtree(repo / model)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_file=work / "server.log") as server:
        yield server, products


def infer_prepared(url: str, model: str, prepared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("PREPARED", list(prepared.shape), "UINT8")
        tensor.set_data_from_numpy(prepared)
        result = client.infer(model, [tensor])
        return result.as_numpy("RAW_SCORE")[:, 0], result.as_numpy("RAW_MAP")


def test_every_runtime_served_by_triton_matches_the_torch_module(runtime_server, torch_detector, real_images):
    from mrkd.triton.models import resize_maps

    server, products = runtime_server
    prepared = torch.stack([prepare_image(i, torch_detector.image_size) for i in real_images]).numpy()
    want = torch_detector.predict(real_images)
    want_maps = resize_maps(torch.from_numpy(want.maps), 32).numpy()
    for name in ("rt_torch", "rt_onnxruntime", "rt_openvino"):
        scores, maps = infer_prepared(server.grpc_url, f"{name}_detector", prepared)
        assert np.max(np.abs(scores - want.scores) / np.abs(want.scores)) <= FP32_TOL, name
        assert np.abs(maps - want_maps).max() <= FP32_TOL * np.abs(want_maps).max(), name
        one, _ = infer_prepared(server.grpc_url, f"{name}_detector", prepared[3:4])  # batch 1
        assert abs(one[0] - want.scores[3]) <= FP32_TOL * abs(want.scores[3]), name


@needs_bf16
def test_triton_runs_the_runtime_and_precision_of_the_export(runtime_server, tiny_checkpoint, torch_detector,
                                                            real_images):
    """The bf16 OpenVINO product answers what in-process OpenVINO bf16 computes, which is not what fp32 does."""
    server, _ = runtime_server
    prepared = torch.stack([prepare_image(i, torch_detector.image_size) for i in real_images]).numpy()
    scores, _ = infer_prepared(server.grpc_url, "rt_openvino_bf16_detector", prepared)
    bf16 = Detector.load(tiny_checkpoint, runtime="openvino", precision="bf16").predict(real_images).scores
    fp32 = torch_detector.predict(real_images).scores
    assert np.max(np.abs(scores - bf16) / np.abs(bf16)) <= FP32_TOL
    assert np.max(np.abs(scores - fp32) / np.abs(fp32)) > 10 * FP32_TOL
