"""Datasets behind one interface: `open_dataset(spec) -> DatasetSplits` of `ImageRecord`s.

Specs:
  a folder in the MVTec AD layout (MVTec AD itself, or VisA / BTAD / MPDD converted to it): the dataset root with
      `category=`, or the category folder itself;
  `elpv:mono`, `elpv:poly`: the real electroluminescence solar-cell images of the `elpv-dataset` package
      (image-level labels only);
  `textures:brick`, `textures:grass`, `textures:gravel`: crops of scikit-image's real texture photos, with test
      defects (scratches, stains, holes, foreign texture) drawn on crops from a region no training crop touches,
      each with the exact mask of the pixels it changed.

Records load lazily through picklable callables (functools.partial of module-level functions), so they cross
DataLoader worker processes; image files are decoded by `mrkd.preprocess.load_image`, the project's one decoder.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from .preprocess import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
ELPV_TYPES = ("mono", "poly")
TEXTURE_NAMES = ("brick", "grass", "gravel")
TEXTURE_DEFECT_KINDS = ("scratch", "stain", "hole", "foreign_texture")
ELPV_TEST_FRACTION = 0.2

# Sizes of the texture datasets: small, so that a CPU training run stays quick.
TEXTURE_TRAIN_CROPS = 40
TEXTURE_CALIBRATION_CROPS = 8
TEXTURE_TEST_GOOD_CROPS = 20
TEXTURE_TEST_DEFECT_CROPS = 40
DEFAULT_CROP_SIZE = 128
MIN_CROP_SIZE = 32
# A defect pixel is one whose value moved by at least this much (of 255) in some channel.
DEFECT_MIN_CHANGE = 16
MIN_DEFECT_PIXELS = 12


class DatasetLayoutError(ValueError):
    """A dataset folder that does not follow the expected layout; the message says what was expected and found."""


@dataclass(frozen=True)
class ImageRecord:
    """One image. `load_image()` -> uint8 H x W or H x W x 3; `load_mask()` -> bool H x W, or None (no masks)."""

    name: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type
    load_image: Callable[[], np.ndarray]
    load_mask: Callable[[], np.ndarray] | None


@dataclass(frozen=True)
class DatasetSplits:
    """train: normal images for training; calibration: held-out normal images for the threshold; test: both."""

    name: str
    category: str
    train: list[ImageRecord]
    calibration: list[ImageRecord]
    test: list[ImageRecord]
    has_masks: bool

    def describe(self) -> str:
        n_anomalous = sum(r.label for r in self.test)
        defects = sorted({r.defect for r in self.test if r.label == 1})
        return (
            f"{self.name} [{self.category}]: {len(self.train)} train, {len(self.calibration)} calibration, "
            f"{len(self.test)} test ({len(self.test) - n_anomalous} good, {n_anomalous} anomalous: "
            f"{', '.join(defects) or 'none'}), pixel masks: {'yes' if self.has_masks else 'no'}"
        )

    def __str__(self) -> str:
        return self.describe()


def open_dataset(
    spec: str | Path,
    category: str | None = None,
    *,
    seed: int = 111,
    include_uncertain: bool = False,
    calibration_fraction: float = 0.1,
    crop_size: int = DEFAULT_CROP_SIZE,
) -> DatasetSplits:
    """Opens a dataset by spec (see the module docstring). Same arguments, same splits."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    text = str(spec)
    if text.startswith("elpv:"):
        return _open_elpv(text.split(":", 1)[1], seed, include_uncertain, calibration_fraction)
    if text.startswith("textures:"):
        return _open_textures(text.split(":", 1)[1], seed, crop_size)
    return _open_mvtec_folder(Path(spec), category, seed, calibration_fraction)


# ------------------------------------------------------------------------------------------------ MVTec layout

def _open_mvtec_folder(root: Path, category: str | None, seed: int, calibration_fraction: float) -> DatasetSplits:
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
            test.append(ImageRecord(record_name, int(defect != GOOD), defect, _image_loader(path), mask_loader))

    train_records = [
        ImageRecord(f"train/good/{p.name}", 0, GOOD, _image_loader(p), functools.partial(_empty_mask, str(p)))
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


def _image_loader(path: Path) -> Callable[[], np.ndarray]:
    return functools.partial(load_image, str(path))


def _read_mask(path: str) -> np.ndarray:
    """A mask file -> bool H x W. 0/255 masks (any antialiasing) split at 128; 0/1 masks at 1."""
    gray = load_image(path).max(axis=2)
    return gray >= 128 if gray.max() > 1 else gray >= 1


def _empty_mask(image_path: str) -> np.ndarray:
    with Image.open(image_path) as image:  # header only: the size, without decoding the pixels
        width, height = image.size
    return np.zeros((height, width), dtype=bool)


# ------------------------------------------------------------------------------------------------ ELPV

def _open_elpv(cell_type: str, seed: int, include_uncertain: bool, calibration_fraction: float) -> DatasetSplits:
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
            normal.append(ImageRecord(rel_path, 0, GOOD, functools.partial(_read_grayscale, str(path)), None))
        elif probability == 1.0 or include_uncertain:
            anomalous.append(ImageRecord(rel_path, 1, defect, functools.partial(_read_grayscale, str(path)), None))

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


def _read_grayscale(path: str) -> np.ndarray:
    """A grayscale image file -> uint8 H x W (the decoder returns it with the gray value repeated in 3 channels)."""
    return np.ascontiguousarray(load_image(path)[:, :, 0])


# ------------------------------------------------------------------------------------------------ textures

def _open_textures(texture: str, seed: int, crop_size: int) -> DatasetSplits:
    if texture not in TEXTURE_NAMES:
        expected = ", ".join(f"textures:{t}" for t in TEXTURE_NAMES)
        raise ValueError(f"unknown texture '{texture}': expected one of {expected}")
    height, width = _texture_photo(texture).shape[:2]
    if not MIN_CROP_SIZE <= crop_size <= height // 2:
        raise ValueError(
            f"crop_size must be between {MIN_CROP_SIZE} and {height // 2} for a {height}-pixel photo, got {crop_size}"
        )
    regions = _texture_regions(height, width, crop_size)

    def normal_records(split: str, count: int) -> list[ImageRecord]:
        records = []
        for i in range(count):
            y, x = _crop_origin(regions[split], crop_size, [seed, _texture_id(texture), _stream_id(split), i])
            loader = functools.partial(_texture_crop, texture, y, x, crop_size)
            mask = functools.partial(_all_false, crop_size)
            records.append(ImageRecord(f"{split}/good/{i:03d}_y{y}_x{x}", 0, GOOD, loader, mask))
        return records

    train = normal_records("train", TEXTURE_TRAIN_CROPS)
    calibration = normal_records("calibration", TEXTURE_CALIBRATION_CROPS)
    test = normal_records("test", TEXTURE_TEST_GOOD_CROPS)
    for i in range(TEXTURE_TEST_DEFECT_CROPS):
        kind = TEXTURE_DEFECT_KINDS[i % len(TEXTURE_DEFECT_KINDS)]
        y, x = _crop_origin(regions["test"], crop_size, [seed, _texture_id(texture), _stream_id("defect"), i])
        args = (texture, y, x, crop_size, kind, seed, i)
        test.append(ImageRecord(
            f"test/{kind}/{i:03d}_y{y}_x{x}", 1, kind,
            functools.partial(_texture_defect_image, *args), functools.partial(_texture_defect_mask, *args),
        ))
    return DatasetSplits(f"textures:{texture}", texture, train, calibration, test, has_masks=True)


def _texture_regions(height: int, width: int, crop_size: int) -> dict[str, tuple[int, int, int, int]]:
    """(top, left, bottom, right) of disjoint photo regions: train = top half; test and calibration share the
    bottom half, calibration a strip one crop wide at the right. Test crops never contain a training pixel."""
    middle = height // 2
    return {
        "train": (0, 0, middle, width),
        "test": (middle, 0, height, width - crop_size),
        "calibration": (middle, width - crop_size, height, width),
    }


def _crop_origin(region: tuple[int, int, int, int], crop_size: int, entropy: list[int]) -> tuple[int, int]:
    top, left, bottom, right = region
    rng = np.random.default_rng(entropy)
    return int(rng.integers(top, bottom - crop_size + 1)), int(rng.integers(left, right - crop_size + 1))


def _stream_id(stream: str) -> int:
    return {"train": 1, "calibration": 2, "test": 3, "defect": 4}[stream]


def _texture_id(texture: str) -> int:
    return TEXTURE_NAMES.index(texture)


@functools.lru_cache(maxsize=len(TEXTURE_NAMES))
def _texture_photo(texture: str) -> np.ndarray:
    """scikit-image's texture photo as uint8 H x W x 3 (read-only; the photos are grayscale)."""
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("textures:* need scikit-image (pip install scikit-image)")
    photo = load_image(Path(spec.origin).parent / f"{texture}.png")
    photo.setflags(write=False)
    return photo


def _texture_crop(texture: str, y: int, x: int, crop_size: int) -> np.ndarray:
    return _texture_photo(texture)[y : y + crop_size, x : x + crop_size].copy()


def _all_false(size: int) -> np.ndarray:
    return np.zeros((size, size), dtype=bool)


def _texture_defect_image(*args) -> np.ndarray:
    return _texture_defect(*args)[0].copy()


def _texture_defect_mask(*args) -> np.ndarray:
    return _texture_defect(*args)[1].copy()


@functools.lru_cache(maxsize=256)
def _texture_defect(
    texture: str, y: int, x: int, crop_size: int, kind: str, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(defective image uint8 H x W x 3, bool mask of exactly the pixels that differ from the clean crop)."""
    clean = _texture_crop(texture, y, x, crop_size)
    rng = np.random.default_rng(
        [seed, _texture_id(texture), _stream_id("defect"), index, TEXTURE_DEFECT_KINDS.index(kind), 1]
    )
    painter = _DEFECT_PAINTERS[kind]
    for _ in range(20):
        alpha, colour = painter(rng, clean, texture)
        image, mask = _composite(clean, alpha, colour)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            break
    else:  # pragma: no cover - every painter draws dozens of pixels at full strength
        raise RuntimeError(f"could not draw a visible {kind} on {texture} crop {index}")
    image.setflags(write=False)
    mask.setflags(write=False)
    return image, mask


def _composite(clean: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blends `colour` over `clean` with `alpha`, then makes the mask exact: a pixel is defective iff its value
    moved by >= DEFECT_MIN_CHANGE in some channel; every other pixel is restored to the clean value. Inside the
    defect's core (alpha >= 0.5) pixels that the blend happened to leave close to their clean value (a dark stain on
    a dark pebble) are pushed to DEFECT_MIN_CHANGE away, so the ground truth has no pinholes."""
    base = clean.astype(np.float32)
    blended = base * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    blended = np.clip(np.rint(blended), 0, 255)
    change = np.abs(blended - base).max(axis=2)
    weak_core = (alpha >= 0.5) & (change < DEFECT_MIN_CHANGE)
    if weak_core.any():
        direction = np.sign(colour.mean(axis=2) - base.mean(axis=2))[weak_core]
        direction[direction == 0] = 1.0
        values = base[weak_core]
        # Step away from the clean value towards the defect colour, or the other way when that leaves [0, 255].
        up_fits = values.max(axis=1) + DEFECT_MIN_CHANGE <= 255
        down_fits = values.min(axis=1) - DEFECT_MIN_CHANGE >= 0
        direction = np.where(direction > 0, np.where(up_fits, 1.0, -1.0), np.where(down_fits, -1.0, 1.0))
        blended[weak_core] = np.clip(values + direction[:, None] * DEFECT_MIN_CHANGE, 0, 255)
        change = np.abs(blended - base).max(axis=2)
    mask = change >= DEFECT_MIN_CHANGE
    image = np.where(mask[..., None], blended, base).astype(np.uint8)
    return image, mask


def _paint_scratch(rng: np.random.Generator, clean: np.ndarray, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline: a random walk of 2-5 straight strokes, 1-3 px wide, antialiased."""
    size = clean.shape[0]
    canvas = np.zeros((size, size), np.float32)
    point = rng.uniform(0.15 * size, 0.85 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 6))):
        angle += rng.normal(0, 0.6)
        length = rng.uniform(0.1, 0.3) * size
        end = np.clip(point + length * np.array([np.sin(angle), np.cos(angle)]), 1, size - 2)
        rr, cc, val = draw.line_aa(int(point[0]), int(point[1]), int(end[0]), int(end[1]))
        keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        np.maximum.at(canvas, (rr[keep], cc[keep]), val[keep].astype(np.float32))
        point = end
    width = int(rng.integers(1, 4))
    if width > 1:
        canvas = ndimage.grey_dilation(canvas, size=(width, width))
    bright = rng.random() < 0.5
    value = rng.uniform(225, 255) if bright else rng.uniform(0, 30)
    return np.clip(canvas * rng.uniform(0.85, 1.0), 0, 1), np.full((size, size, 3), value, np.float32)


def _paint_stain(rng: np.random.Generator, clean: np.ndarray, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """A blurred, irregular blob, dark or rust/oil-coloured, semi-transparent."""
    size = clean.shape[0]
    blob = _irregular_blob(rng, size, radius=rng.uniform(0.08, 0.2) * size)
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), sigma=rng.uniform(2.0, 4.0))
    alpha = alpha / max(alpha.max(), 1e-6) * rng.uniform(0.55, 0.85)
    colours = np.array([[40, 35, 30], [150, 80, 30], [90, 60, 20], [30, 40, 70]], np.float32)
    colour = colours[rng.integers(len(colours))]
    return alpha, np.broadcast_to(colour, (size, size, 3)).astype(np.float32)


def _paint_hole(rng: np.random.Generator, clean: np.ndarray, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """A dark rotated ellipse with a soft edge, darker towards its centre."""
    size = clean.shape[0]
    ry, rx = rng.uniform(0.04, 0.12, 2) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=(size, size), rotation=rng.uniform(0, np.pi))
    hole = np.zeros((size, size), np.float32)
    hole[rr, cc] = 1.0
    alpha = ndimage.gaussian_filter(hole, sigma=1.2)
    depth = ndimage.distance_transform_edt(hole)
    shade = 25.0 * (1.0 - depth / max(depth.max(), 1.0))  # 0 at the centre, ~25 at the rim
    return np.clip(alpha * 1.1, 0, 1), np.repeat(shade[..., None], 3, axis=2).astype(np.float32)


def _paint_foreign_texture(rng: np.random.Generator, clean: np.ndarray, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """A patch of a DIFFERENT texture photo pasted through an irregular mask with a 1-px soft edge."""
    size = clean.shape[0]
    others = [t for t in TEXTURE_NAMES if t != texture]
    photo = _texture_photo(others[int(rng.integers(len(others)))])
    y = int(rng.integers(0, photo.shape[0] - size + 1))
    x = int(rng.integers(0, photo.shape[1] - size + 1))
    patch = photo[y : y + size, x : x + size].astype(np.float32)
    # Shift the foreign patch's brightness so it also differs in tone, as foreign material usually does.
    patch = np.clip(patch + rng.choice([-1.0, 1.0]) * rng.uniform(20, 50), 0, 255)
    blob = _irregular_blob(rng, size, radius=rng.uniform(0.1, 0.22) * size)
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), sigma=0.8)
    return alpha, patch


def _irregular_blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """A star-shaped region: a disc whose radius varies smoothly with the angle (low-frequency harmonics)."""
    cy, cx = rng.uniform(radius + 2, size - radius - 2, 2)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(theta, radius)
    for k in range(2, 6):
        r += radius * rng.uniform(0, 0.25 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= r


_DEFECT_PAINTERS = {
    "scratch": _paint_scratch,
    "stain": _paint_stain,
    "hole": _paint_hole,
    "foreign_texture": _paint_foreign_texture,
}
