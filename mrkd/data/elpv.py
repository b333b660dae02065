"""elpv:mono / elpv:poly: the real electroluminescence solar-cell images of the `elpv-dataset` package.

Normal = defect probability 0, anomalous = 1.0 (1/3 and 2/3 with include_uncertain); a seeded split of the normal
cells into train, calibration and test. Image-level labels only.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from .records import GOOD, DatasetSplits, ImageRecord, read_grayscale

ELPV_TYPES = ("mono", "poly")
ELPV_TEST_FRACTION = 0.2


def open_elpv(cell_type: str, seed: int, include_uncertain: bool, calibration_fraction: float) -> DatasetSplits:
    """The ELPV cells of one type (mono or poly) split into train, calibration and test, seeded."""
    if cell_type not in ELPV_TYPES:
        raise ValueError(f"unknown ELPV cell type '{cell_type}': expected one of elpv:mono, elpv:poly")
    data_dir = _elpv_data_dir()
    normal: list[ImageRecord] = []
    anomalous: list[ImageRecord] = []
    for rel_path, probability, kind in _elpv_labels(data_dir / "labels.csv"):
        if kind != cell_type:
            continue
        path = data_dir / rel_path
        defect = _elpv_defect_name(probability)
        if defect == GOOD:
            normal.append(ImageRecord(rel_path, 0, GOOD, functools.partial(read_grayscale, str(path)), None))
        elif probability == 1.0 or include_uncertain:
            anomalous.append(ImageRecord(rel_path, 1, defect, functools.partial(read_grayscale, str(path)), None))

    order = np.random.default_rng(seed).permutation(len(normal))
    n_test = int(round(ELPV_TEST_FRACTION * len(normal)))
    n_calibration = int(round(calibration_fraction * len(normal)))
    test_idx = set(order[:n_test].tolist())
    calibration_idx = set(order[n_test : n_test + n_calibration].tolist())
    train = [r for i, r in enumerate(normal) if i not in test_idx and i not in calibration_idx]
    calibration = [r for i, r in enumerate(normal) if i in calibration_idx]
    test = [r for i, r in enumerate(normal) if i in test_idx] + anomalous
    name = f"elpv:{cell_type}" + ("+uncertain" if include_uncertain else "")
    return DatasetSplits(name, cell_type, train, calibration, test, has_masks=False)


def _elpv_data_dir() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "elpv:mono / elpv:poly need the elpv-dataset package: pip install elpv-dataset==1.0.0.post1"
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (data_dir / "labels.csv").is_file():
        raise FileNotFoundError(f"the elpv-dataset package has no {data_dir / 'labels.csv'}; reinstall it")
    return data_dir


def _elpv_labels(csv_path: Path) -> list[tuple[str, float, str]]:
    """labels.csv: whitespace-separated `images/cellNNNN.png  <defect probability>  <mono|poly>` lines."""
    rows = []
    for line_no, line in enumerate(csv_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{csv_path}:{line_no}: expected 'path probability type', got {line!r}")
        rows.append((fields[0], float(fields[1]), fields[2]))
    return rows


def _elpv_defect_name(probability: float) -> str:
    # The annotators' confidence that the cell is defective: 0, 1/3, 2/3 or 1.
    if probability == 0.0:
        return GOOD
    if probability == 1.0:
        return "defective"
    return "probably_defective" if probability > 0.5 else "possibly_defective"
