"""The network part of an export: convert it for the chosen runtime (checked against torch) and, for bf16, check
its verdicts on real images against fp32 before it may serve.

`prepare_network` writes the converted files (network.onnx, OpenVINO IR for openvino, network.json) into a
temporary folder that the caller copies into the detector's version folder. Reduced precision is opt-in: a bf16
network is scored next to the fp32 torch network on real images (the checkpoint's test split, or the user's
calibration images) and refused when the verdicts under the checkpoint's calibration differ on more than
`MAX_VERDICT_CHANGE` of them, unless `recalibrate` fits a new calibration to the bf16 scores of held-out normal
images (the checkpoint's calibration split, or the user's images).
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..core.config import ModelConfig
from ..core.files import user_path
from ..core.preprocess import InvalidImageError, load_image, prepare_image
from ..data import open_dataset
from ..model.network import MRKDModel
from .calibration import Calibration
from .convert import MANIFEST_FILE, NetworkManifest, convert, file_sha256, load_runner
from .detector import Detector
from .errors import NetworkRuntimeError
from .metrics import image_auroc
from .reference import ScoreReference
from .runners import check_choice
from .whitening import MapWhitening

MAX_VERDICT_CHANGE = 0.005  # largest fraction of images whose verdict may change from fp32 to bf16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class CheckImages:
    """Real images for the precision check: what to compare on, and normal images to recalibrate on."""

    source: str
    check: list[Callable[[], np.ndarray]]
    labels: np.ndarray | None  # 0 normal / 1 anomalous; None for the user's unlabelled images
    calibration: list[Callable[[], np.ndarray]]


def check_images(train_config: dict | None, calibration_images: str | Path | None) -> CheckImages:
    """The user's folder when given (all its images; assumed normal), else the checkpoint's own data: the test
    split to compare on and the calibration split to recalibrate on."""
    if calibration_images is not None:
        folder = user_path(calibration_images)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise NetworkRuntimeError(f"calibration_images {folder}: no {'/'.join(IMAGE_SUFFIXES)} images there",
                                      "calibration_images")
        loaders = [lambda p=p: load_image(p) for p in files]
        return CheckImages(f"{len(files)} images of {folder}", loaders, None, loaders)
    train_config = train_config or {}
    data = train_config.get("data")
    if not data:
        raise NetworkRuntimeError("bf16 is checked on real images, and the checkpoint does not name its data; "
                                  "pass calibration_images DIR (normal images of the product)", "calibration_images")
    try:
        splits = open_dataset(data, train_config.get("category"), seed=int(train_config.get("seed", 111)))
    except (OSError, ValueError) as exc:
        raise NetworkRuntimeError(f"bf16 is checked on real images, and the checkpoint's data {data!r} cannot be "
                                  f"opened here ({exc}); pass calibration_images DIR", "calibration_images") from exc
    if not splits.test:
        raise NetworkRuntimeError(f"{data} has no test images to check bf16 on; pass calibration_images DIR",
                                  "calibration_images")
    calibration = splits.calibration or splits.train  # what training calibrated on
    return CheckImages(f"{data} test split", [r.load_image for r in splits.test],
                       np.array([r.label for r in splits.test]), [r.load_image for r in calibration])


def scores(detectors: Sequence[Detector], images: Sequence[Callable[[], np.ndarray]], desc: str,
           show: bool) -> list[np.ndarray]:
    """Raw scores [N] of the images by each detector, batch by batch (images are loaded once, never all at once)."""
    step, size = detectors[0].batch_size, detectors[0].image_size
    parts: list[list[np.ndarray]] = [[] for _ in detectors]
    for i in tqdm(range(0, len(images), step), desc=desc, disable=not (show and sys.stderr.isatty()), leave=False):
        try:
            batch = torch.stack([prepare_image(load(), size) for load in images[i : i + step]])
        except InvalidImageError as exc:
            raise NetworkRuntimeError(f"an image of the precision check cannot be used: {exc}") from exc
        for part, detector in zip(parts, detectors):
            part.append(detector.predict_prepared(batch).scores)
    return [np.concatenate(part) for part in parts]


@dataclass
class PrecisionReport:
    """bf16 against fp32 on the same real images, under the checkpoint's calibration."""

    precision: str
    source: str
    images: int
    verdict_changes: int  # images whose verdict differs from fp32's
    max_score_change: float  # largest |bf16 score - fp32 score| / calibrated threshold
    auroc_fp32: float | None  # None without labels
    auroc_reduced: float | None
    recalibrated: Calibration | None = None  # fitted to the bf16 scores of normal images (--recalibrate)
    verdict_changes_recalibrated: int | None = None  # against fp32's verdicts, with the new calibration

    @property
    def verdict_change_rate(self) -> float:
        return self.verdict_changes / max(1, self.images)

    @property
    def within_limit(self) -> bool:
        return self.verdict_change_rate <= MAX_VERDICT_CHANGE

    def summary(self) -> str:
        text = (f"{self.precision} vs fp32 on {self.source} ({self.images} images): verdicts differ on "
                f"{self.verdict_changes} ({100 * self.verdict_change_rate:.2f}%, limit "
                f"{100 * MAX_VERDICT_CHANGE:.1f}%), largest score change {100 * self.max_score_change:.2f}% of "
                f"the threshold")
        if self.auroc_fp32 is not None:
            text += f", image AUROC {self.auroc_fp32:.4f} fp32 / {self.auroc_reduced:.4f} {self.precision}"
        if self.recalibrated is not None:
            text += (f"; recalibrated threshold {self.recalibrated.threshold:.5g}: verdicts differ on "
                     f"{self.verdict_changes_recalibrated}")
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["recalibrated"] = self.recalibrated.to_dict() if self.recalibrated is not None else None
        return data


def precision_report(fp32: np.ndarray, reduced: np.ndarray, labels: np.ndarray | None, calibration: Calibration,
                     precision: str, source: str) -> PrecisionReport:
    """The comparison of raw scores of the same images at fp32 and at reduced precision."""
    return PrecisionReport(
        precision=precision, source=source, images=len(fp32),
        verdict_changes=int(np.sum((fp32 > calibration.threshold) != (reduced > calibration.threshold))),
        max_score_change=float(np.max(np.abs(reduced - fp32)) / abs(calibration.threshold)),
        auroc_fp32=image_auroc(labels, fp32) if labels is not None else None,
        auroc_reduced=image_auroc(labels, reduced) if labels is not None else None)


def compare_precision(reference: Detector, reduced: Detector, images: CheckImages, recalibrate: bool,
                      show: bool = False) -> PrecisionReport:
    """Scores `images` with both detectors (under the reference's calibration); with `recalibrate`, also fits a
    calibration to the reduced detector's scores of the normal images."""
    fp32, low = scores([reference, reduced], images.check, f"fp32 and {reduced.precision} scores", show)
    report = precision_report(fp32, low, images.labels, reference.calibration, reduced.precision, images.source)
    if recalibrate:
        normal = low if images.calibration is images.check else scores([reduced], images.calibration,
                                                                        "recalibrating", show)[0]
        # the heat map's mapping is kept: reduced precision moves the score threshold, not what the map shows
        fitted = Calibration.fit(normal)
        report.recalibrated = replace(reference.calibration, threshold=fitted.threshold, low=fitted.low)
        report.verdict_changes_recalibrated = int(np.sum(
            (fp32 > reference.calibration.threshold) != (low > report.recalibrated.threshold)))
    return report


@dataclass
class PreparedNetwork:
    """What the export copies into the detector's version folder, and the calibration postprocess serves with."""

    runtime: str
    precision: str
    folder: Path  # holds `files`; removed with this object (or by cleanup())
    files: list[str]
    manifest: NetworkManifest | None
    precision_report: PrecisionReport | None
    calibration: Calibration
    _tmp: tempfile.TemporaryDirectory | None = None

    def paths(self) -> dict[str, Path]:
        return {name: self.folder / name for name in self.files}

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def info(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision,
                "manifest": asdict(self.manifest) if self.manifest else None,
                "precision_check": self.precision_report.to_dict() if self.precision_report else None}


def _model(data: dict, config: ModelConfig) -> MRKDModel:
    model = MRKDModel.from_config(config)
    model.load_state_dict(data["state_dict"])
    return model.eval()


def prepare_network(checkpoint: Path, data: dict, runtime: str, precision: str, device: str = "cpu",
                    calibration_images: str | Path | None = None, recalibrate: bool = False,
                    threads: int | None = None, show: bool = True) -> PreparedNetwork:
    """Converts the network of `data` (the loaded checkpoint file `checkpoint`) for `runtime` and, for bf16 on
    the CPU, checks it on real images.

    Raises NetworkRuntimeError naming the problem: a runtime that cannot run here, an fp32 conversion that does not
    reproduce torch, a bf16 network whose verdicts change too often (without `recalibrate`), no images to check on.
    """
    config = ModelConfig.from_dict(data["model_config"])
    calibration = Calibration.from_dict(data["calibration"])
    torch_device = "cuda" if device == "gpu" else device
    check_choice(runtime, precision, torch_device, config)
    gated = precision == "bf16" and torch_device == "cpu"
    if recalibrate and not gated:
        raise NetworkRuntimeError("recalibrate applies to precision bf16 on the CPU only", "recalibrate", "precision")
    tmp = tempfile.TemporaryDirectory(prefix="mrkd-network-")
    folder = Path(tmp.name)
    try:
        manifest = None
        if runtime != "torch":
            manifest = convert(_model(data, config), config, runtime, precision, folder,
                               checkpoint_sha256=file_sha256(checkpoint), threads=threads)
        report = None
        if gated:
            score_reference = ScoreReference.from_payload(data)
            whitening = MapWhitening.from_payload(data, len(config.map_scales))
            reference = Detector(_model(data, config), config, calibration, "cpu", score_reference=score_reference,
                                 map_whitening=whitening)
            reduced_model = _model(data, config)
            runner = load_runner(reduced_model, config, runtime, precision, "cpu", threads,
                                 folder if runtime != "torch" else None)
            reduced = Detector(reduced_model, config, calibration, "cpu", network=runner,
                               score_reference=score_reference, map_whitening=whitening)
            report = compare_precision(reference, reduced, check_images(data.get("train_config"), calibration_images),
                                       recalibrate, show)
            if report.recalibrated is not None:
                calibration = report.recalibrated
            elif not report.within_limit:
                raise NetworkRuntimeError(
                    f"bf16 refused: {report.summary()}. Serve fp32, or pass recalibrate to fit the threshold to "
                    f"the bf16 scores", "recalibrate")
    except BaseException:
        tmp.cleanup()
        raise
    files = ([*manifest.files, MANIFEST_FILE] if manifest is not None else [])
    return PreparedNetwork(runtime, precision, folder, files, manifest, report, calibration, tmp)

