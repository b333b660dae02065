"""Folders in the MVTec AD layout (MVTec AD itself, or VisA / BTAD / MPDD converted to it).

  <root>/<category>/train/good/*, <root>/<category>/test/<good|defect>/*,
  <root>/<category>/ground_truth/<defect>/<name>_mask.png (BTAD-style <name>.png masks are accepted).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.preprocess import load_image
from .records import GOOD, IMAGE_EXTENSIONS, DatasetLayoutError, DatasetSplits, ImageRecord, image_loader


def open_mvtec_folder(root: Path, category: str | None, seed: int, calibration_fraction: float) -> DatasetSplits:
    """A folder in the MVTec AD layout (the root with `category`, or the category folder) as splits."""
    category_dir = _find_category_dir(root, category)
    name = category_dir.name
    train_good_dir = category_dir / "train" / GOOD
    if not train_good_dir.is_dir():
        raise DatasetLayoutError(
            f"expected {train_good_dir} (<root>/<category>/train/good with images); "
            f"found {_listing(category_dir / 'train' if (category_dir / 'train').is_dir() else category_dir)}"
        )
    train_files = _image_files(train_good_dir)
    if not train_files:
        raise DatasetLayoutError(
            f"expected images ({', '.join(IMAGE_EXTENSIONS)}) in {train_good_dir}; found {_listing(train_good_dir)}"
        )
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetLayoutError(
            f"expected {test_dir} (<root>/<category>/test/<good or defect>/ with images); "
            f"found {_listing(category_dir)}"
        )
    defect_dirs = _subdirs(test_dir)
    if not defect_dirs:
        raise DatasetLayoutError(
            f"expected folders test/good and test/<defect type> in {test_dir}; found {_listing(test_dir)}"
        )

    test: list[ImageRecord] = []
    for defect_dir in defect_dirs:
        files = _image_files(defect_dir)
        if not files:
            raise DatasetLayoutError(f"expected images in {defect_dir}; found {_listing(defect_dir)}")
        defect = defect_dir.name
        mask_files = _mask_files(category_dir, defect) if defect != GOOD else {}
        for path in files:
            record_name = f"test/{defect}/{path.name}"
            if defect == GOOD:
                mask_loader = functools.partial(_empty_mask, str(path))
            else:
                mask_loader = functools.partial(_read_mask, str(_find_mask(mask_files, path)))
            test.append(ImageRecord(record_name, int(defect != GOOD), defect, image_loader(path), mask_loader))

    train_records = [
        ImageRecord(f"train/good/{p.name}", 0, GOOD, image_loader(p), functools.partial(_empty_mask, str(p)))
        for p in train_files
    ]
    train, calibration = _hold_out(train_records, calibration_fraction, seed)
    return DatasetSplits(str(root), name, train, calibration, test, has_masks=True)


def _find_category_dir(root: Path, category: str | None) -> Path:
    if not root.exists():
        raise DatasetLayoutError(f"expected a dataset folder at {root}; found nothing there (it does not exist)")
    if not root.is_dir():
        raise DatasetLayoutError(f"expected a dataset folder at {root}; found a file")
    looks_like_category = (root / "train").is_dir() or (root / "test").is_dir()
    if category is None:
        if looks_like_category:
            return root
        found = _categories_in(root)
        if found:
            raise DatasetLayoutError(
                f"{root} is a dataset root: pass a category (expected <root>/<category>/train/good); "
                f"found categories: {found}"
            )
        raise DatasetLayoutError(
            f"expected {root}/<category>/train/good or {root}/train/good; found {_listing(root)}"
        )
    if (root / category).is_dir():
        return root / category
    if looks_like_category and root.name == category:
        return root
    raise DatasetLayoutError(
        f"expected a category folder {root / category}; found categories: {_categories_in(root)} "
        f"(folders: {_listing(root)})"
    )


def _categories_in(root: Path) -> list[str]:
    return sorted(p.name for p in _subdirs(root) if (p / "train").is_dir() or (p / "test").is_dir())


def _subdirs(folder: Path) -> list[Path]:
    """Sub-folders, without hidden ones (.ipynb_checkpoints, .DS_Store folders, ...)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _listing(folder: Path, limit: int = 20) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist"
    entries = sorted(folder.iterdir())
    dirs = [p.name for p in entries if p.is_dir()]
    files = [p.name for p in entries if not p.is_dir()]
    more = lambda items: items[:limit] + ([f"... {len(items) - limit} more"] if len(items) > limit else [])
    return f"directories: {more(dirs)}, files: {more(files)}"


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _mask_files(category_dir: Path, defect: str) -> dict[str, Path]:
    """Mask files of one defect type by lower-case stem. MVTec AD / MPDD / VisA name them <image stem>_mask.png,
    BTAD <image stem>.png or .bmp; any image extension, any case is accepted."""
    mask_dir = category_dir / "ground_truth" / defect
    if not mask_dir.is_dir():
        raise DatasetLayoutError(
            f"expected masks of the '{defect}' test images in {mask_dir}; "
            f"found in ground_truth: {_listing(category_dir / 'ground_truth')}"
        )
    files: dict[str, Path] = {}
    for path in _image_files(mask_dir):
        files.setdefault(path.stem.lower(), path)
    return files


def _find_mask(mask_files: dict[str, Path], image_path: Path) -> Path:
    stem = image_path.stem.lower()
    found = mask_files.get(f"{stem}_mask") or mask_files.get(stem)  # prefer <name>_mask.*
    if found is None:
        mask_dir = image_path.parent.parent.parent / "ground_truth" / image_path.parent.name
        raise DatasetLayoutError(
            f"expected a mask for test image {image_path}: {mask_dir / (image_path.stem + '_mask.png')} "
            f"(or {image_path.stem}.<png|bmp|...>); found no such file in {mask_dir}"
        )
    return found


def _hold_out(records: list[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Deterministic seeded split of normal images into (train, calibration); >= 1 calibration image when n >= 2."""
    n = len(records)
    n_calibration = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_calibration = min(max(n_calibration, 1), n - 1)
    held_out = set(np.random.default_rng(seed).permutation(n)[:n_calibration].tolist())
    train = [r for i, r in enumerate(records) if i not in held_out]
    calibration = [r for i, r in enumerate(records) if i in held_out]
    return train, calibration




def _read_mask(path: str) -> np.ndarray:
    """A mask file -> bool H x W. 0/255 masks (any antialiasing) split at 128; 0/1 masks at 1."""
    gray = load_image(path).max(axis=2)
    return gray >= 128 if gray.max() > 1 else gray >= 1


def _empty_mask(image_path: str) -> np.ndarray:
    with Image.open(image_path) as image:  # header only: the size, without decoding the pixels
        width, height = image.size
    return np.zeros((height, width), dtype=bool)
