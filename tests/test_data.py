"""Datasets: an MVTec-layout folder built from real images, every wrong layout, ELPV splits, texture defects."""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mrkd.data import (
    TEXTURE_DEFECT_KINDS,
    DatasetLayoutError,
    ImageRecord,
    open_dataset,
)
from mrkd.data import textures as data_module

SIZE = 48  # side of the real-image crops written into the MVTec-layout fixtures


# ---------------------------------------------------------------- MVTec layout fixture from real photos

def real_crops(count: int, offset: int = 0) -> list[np.ndarray]:
    """Crops of scikit-image's real brick and gravel photos (grayscale uint8)."""
    photos = [skdata.brick(), skdata.gravel()]
    crops = []
    for i in range(offset, offset + count):
        photo = photos[i % 2]
        y, x = (i * 37) % (512 - SIZE), (i * 91) % (512 - SIZE)
        crops.append(np.ascontiguousarray(photo[y : y + SIZE, x : x + SIZE]))
    return crops


def blob_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cy, cx = rng.integers(10, SIZE - 10, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 / 36 + (xx - cx) ** 2 / 16 <= 1


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def mvtec_root(tmp_path: Path) -> Path:
    """<root>/cells/{train/good, test/good, test/crack, test/stain, ground_truth/...}: 20 train, 2 good, 2 + 2 defects.

    test/crack uses MVTec names (000.png + 000_mask.png); test/stain uses BTAD habits (JPEG images with an
    upper-case .JPG extension; .bmp masks named like the image, with values 0/1 instead of 0/255).
    """
    root = tmp_path / "dataset"
    cat = root / "cells"
    for i, crop in enumerate(real_crops(20)):
        write_image(cat / "train" / "good" / f"{i:03d}.png", crop)
    for i, crop in enumerate(real_crops(2, offset=20)):
        write_image(cat / "test" / "good" / f"{i:03d}.png", crop)
    for i, crop in enumerate(real_crops(2, offset=30)):
        mask = blob_mask(i)
        damaged = crop.copy()
        damaged[mask] = 10
        write_image(cat / "test" / "crack" / f"{i:03d}.png", damaged)
        write_image(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    for i, crop in enumerate(real_crops(2, offset=40)):
        mask = blob_mask(10 + i)
        damaged = crop.copy()
        damaged[mask] = 240
        path = cat / "test" / "stain" / f"{i:03d}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(damaged).save(path, format="JPEG", quality=95)
        write_image(cat / "ground_truth" / "stain" / f"{i:03d}.bmp", mask.astype(np.uint8))  # 0/1 mask
    (cat / "train" / "good" / "notes.txt").write_text("not an image; ignored")
    (cat / "test" / ".ipynb_checkpoints").mkdir()  # hidden folders are not defect types
    return root


def test_mvtec_folder_loads_labels_masks_and_splits(mvtec_root: Path):
    splits = open_dataset(mvtec_root, "cells", seed=3)
    assert splits.category == "cells" and splits.has_masks
    assert len(splits.train) == 18 and len(splits.calibration) == 2  # 10% of 20 held out
    train_names = {r.name for r in splits.train}
    calibration_names = {r.name for r in splits.calibration}
    assert not train_names & calibration_names
    assert train_names | calibration_names == {f"train/good/{i:03d}.png" for i in range(20)}
    assert all(r.label == 0 and r.defect == "good" for r in splits.train + splits.calibration)

    by_name = {r.name: r for r in splits.test}
    assert sorted(by_name) == [
        "test/crack/000.png", "test/crack/001.png", "test/good/000.png", "test/good/001.png",
        "test/stain/000.JPG", "test/stain/001.JPG",
    ]
    for name, record in by_name.items():
        defect = name.split("/")[1]
        assert record.defect == defect and record.label == (0 if defect == "good" else 1)
        image = record.load_image()
        mask = record.load_mask()
        assert image.dtype == np.uint8 and image.shape[:2] == (SIZE, SIZE)
        assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
        if defect == "good":
            assert not mask.any()
    assert np.array_equal(by_name["test/crack/001.png"].load_mask(), blob_mask(1))
    assert np.array_equal(by_name["test/stain/000.JPG"].load_mask(), blob_mask(10))  # 0/1 BMP mask
    # The image is the real crop that was written.
    assert np.array_equal(splits.train[0].load_image()[:, :, 0], real_crops(20)[int(splits.train[0].name[11:14])])


def test_mvtec_split_is_deterministic_and_seeded(mvtec_root: Path):
    names = lambda s: ([r.name for r in s.train], [r.name for r in s.calibration], [r.name for r in s.test])
    assert names(open_dataset(mvtec_root, "cells", seed=5)) == names(open_dataset(mvtec_root, "cells", seed=5))
    held_out = {tuple(r.name for r in open_dataset(mvtec_root, "cells", seed=s).calibration) for s in range(6)}
    assert len(held_out) > 1
    assert len(open_dataset(mvtec_root, "cells", calibration_fraction=0.25).calibration) == 5


def test_category_folder_itself_is_accepted(mvtec_root: Path):
    via_root = open_dataset(mvtec_root, "cells")
    via_folder = open_dataset(mvtec_root / "cells")
    assert via_folder.category == "cells"
    assert [r.name for r in via_folder.test] == [r.name for r in via_root.test]
    assert [r.name for r in via_folder.calibration] == [r.name for r in via_root.calibration]


def test_records_pickle_for_dataloader_workers(mvtec_root: Path):
    record = next(r for r in open_dataset(mvtec_root, "cells").test if r.label == 1)
    clone = pickle.loads(pickle.dumps(record))
    assert isinstance(clone, ImageRecord)
    assert np.array_equal(clone.load_image(), record.load_image())
    assert np.array_equal(clone.load_mask(), record.load_mask())


def test_describe_gives_counts(mvtec_root: Path):
    text = str(open_dataset(mvtec_root, "cells"))
    assert "18 train, 2 calibration, 6 test (2 good, 4 anomalous: crack, stain)" in text


# ---------------------------------------------------------------- wrong layouts

def expect_layout_error(spec, category=None, *fragments: str) -> str:
    with pytest.raises(DatasetLayoutError) as info:
        open_dataset(spec, category)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_root(tmp_path: Path):
    expect_layout_error(tmp_path / "nowhere", "cells", "expected a dataset folder", "does not exist")


def test_root_without_category_lists_categories(mvtec_root: Path):
    shutil.copytree(mvtec_root / "cells", mvtec_root / "modules")
    expect_layout_error(mvtec_root, None, "pass a category", "['cells', 'modules']")
    expect_layout_error(mvtec_root, "screws", "expected a category folder", "screws", "['cells', 'modules']")


def test_folder_with_no_dataset_inside(tmp_path: Path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday").mkdir()
    expect_layout_error(tmp_path / "photos", None, "expected", "train/good", "directories: ['holiday']")


def test_missing_train_good(mvtec_root: Path):
    shutil.move(mvtec_root / "cells" / "train" / "good", mvtec_root / "cells" / "train" / "ok")
    expect_layout_error(mvtec_root, "cells", "train/good", "found directories: ['ok']")


def test_empty_train_good(mvtec_root: Path):
    for path in (mvtec_root / "cells" / "train" / "good").glob("*.png"):
        path.unlink()
    expect_layout_error(mvtec_root, "cells", "expected images", "train/good", "files: ['notes.txt']")


def test_missing_test(mvtec_root: Path):
    shutil.rmtree(mvtec_root / "cells" / "test")
    expect_layout_error(mvtec_root, "cells", "expected", "test", "directories: ['ground_truth', 'train']")


def test_missing_ground_truth_for_a_defect(mvtec_root: Path):
    shutil.rmtree(mvtec_root / "cells" / "ground_truth" / "stain")
    expect_layout_error(mvtec_root, "cells", "'stain'", "ground_truth/stain", "directories: ['crack']")


def test_missing_mask_file_is_named(mvtec_root: Path):
    (mvtec_root / "cells" / "ground_truth" / "crack" / "001_mask.png").unlink()
    expect_layout_error(mvtec_root, "cells", "test/crack/001.png", "001_mask.png")


def test_empty_defect_folder(mvtec_root: Path):
    (mvtec_root / "cells" / "test" / "scratch").mkdir()
    expect_layout_error(mvtec_root, "cells", "expected images", "test/scratch")


def test_layout_error_is_a_value_error():
    assert issubclass(DatasetLayoutError, ValueError)


def test_bad_arguments(mvtec_root: Path):
    with pytest.raises(ValueError, match="calibration_fraction"):
        open_dataset(mvtec_root, "cells", calibration_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        open_dataset(mvtec_root, "cells", seed=-1)
    with pytest.raises(ValueError, match="elpv:mono, elpv:poly"):
        open_dataset("elpv:thin-film")
    with pytest.raises(ValueError, match="textures:brick"):
        open_dataset("textures:marble")
    with pytest.raises(ValueError, match="crop_size"):
        open_dataset("textures:brick", crop_size=300)


# ---------------------------------------------------------------- ELPV

def test_elpv_mono_counts_and_split():
    splits = open_dataset("elpv:mono")
    normals = splits.train + splits.calibration + [r for r in splits.test if r.label == 0]
    anomalous = [r for r in splits.test if r.label == 1]
    assert len(normals) == 588 and len(anomalous) == 313
    assert len(splits.train) == 411 and len(splits.calibration) == 59 and len(normals) - 470 == 118
    assert {r.defect for r in anomalous} == {"defective"}
    assert not splits.has_masks and all(r.load_mask is None for r in splits.test)
    names = [[r.name for r in part] for part in (splits.train, splits.calibration, splits.test)]
    assert sum(len(n) for n in names) == len(set().union(*map(set, names)))  # disjoint


def test_elpv_uncertain_and_poly_counts():
    uncertain = open_dataset("elpv:mono", include_uncertain=True)
    assert sum(r.label for r in uncertain.test) == 313 + 117 + 56
    assert {r.defect for r in uncertain.test if r.label} == {"defective", "probably_defective", "possibly_defective"}
    poly = open_dataset("elpv:poly")
    assert len(poly.train) + len(poly.calibration) + sum(1 - r.label for r in poly.test) == 920
    assert sum(r.label for r in poly.test) == 402


def test_elpv_split_is_deterministic_and_seeded():
    names = lambda s: [[r.name for r in part] for part in (s.train, s.calibration, s.test)]
    assert names(open_dataset("elpv:mono", seed=111)) == names(open_dataset("elpv:mono", seed=111))
    assert names(open_dataset("elpv:mono", seed=112))[0] != names(open_dataset("elpv:mono", seed=111))[0]


def test_elpv_images_are_300px_grayscale_cells():
    splits = open_dataset("elpv:mono")
    for record in (splits.train[0], splits.test[-1]):
        image = pickle.loads(pickle.dumps(record)).load_image()
        assert image.shape == (300, 300) and image.dtype == np.uint8
        assert image.std() > 5  # a real photo, not a blank


# ---------------------------------------------------------------- textures

BOX = re.compile(r"_y(\d+)_x(\d+)$")


def crop_origin(record: ImageRecord) -> tuple[int, int]:
    y, x = BOX.search(record.name).groups()
    return int(y), int(x)


def test_texture_splits_sizes_and_kinds():
    splits = open_dataset("textures:brick")
    assert len(splits.train) >= 200 and len(splits.calibration) >= 10
    assert sum(1 - r.label for r in splits.test) >= 100 and sum(r.label for r in splits.test) >= 100
    kinds = [r.defect for r in splits.test if r.label]
    assert set(kinds) == set(TEXTURE_DEFECT_KINDS) and min(kinds.count(k) for k in TEXTURE_DEFECT_KINDS) >= 25
    image = splits.train[0].load_image()
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("texture", ["brick", "grass", "gravel"])
def test_texture_train_and_held_out_crops_are_disjoint_and_from_the_same_rows(texture: str):
    """Checkerboard quadrants: no held-out crop holds a training pixel, and both sides cover the top and the bottom
    of the photo (a top/bottom split tested brick at another perspective than it trained on)."""
    photo = getattr(skdata, texture)()
    crop, half = 96, 256
    splits = open_dataset(f"textures:{texture}", crop_size=crop)
    train_pixels = np.zeros(photo.shape[:2], bool)
    for record in splits.train:
        y, x = crop_origin(record)
        train_pixels[y : y + crop, x : x + crop] = True
    held_out = splits.calibration + splits.test
    for record in held_out:
        y, x = crop_origin(record)
        assert not train_pixels[y : y + crop, x : x + crop].any(), record.name
        if record.label == 0:
            assert np.array_equal(record.load_image()[:, :, 0], photo[y : y + crop, x : x + crop])
    for records in (splits.train, held_out, [r for r in splits.test if r.label]):
        tops = [crop_origin(r)[0] < half for r in records]
        assert 0.4 < np.mean(tops) < 0.6  # as many crops from the top half as from the bottom half


@pytest.mark.parametrize("texture", ["brick", "gravel"])
def test_texture_masks_are_exactly_the_changed_pixels(texture: str):
    photo = getattr(skdata, texture)()
    splits = open_dataset(f"textures:{texture}", crop_size=64)
    for record in (r for r in splits.test if r.label):
        y, x = crop_origin(record)
        clean = photo[y : y + 64, x : x + 64].astype(int)
        image = record.load_image().astype(int)
        mask = record.load_mask()
        changed = np.abs(image - clean[..., None]).max(axis=2)
        assert mask.sum() >= 12, record.name
        assert np.array_equal(mask, changed > 0), record.name
        assert changed[mask].min() >= 16, record.name  # every defect pixel visibly changed
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum() < box, record.name  # not a rectangular cut-and-paste patch


def test_texture_generation_is_deterministic_and_seeded():
    def snapshot(seed: int):
        data_module._texture_defect.cache_clear()  # regenerate, do not read back the cache
        splits = open_dataset("textures:grass", seed=seed, crop_size=64)
        records = splits.train[:3] + splits.test[-8:]
        return [r.name for r in splits.train + splits.test], [r.load_image() for r in records], [
            r.load_mask() for r in records
        ]

    names_a, images_a, masks_a = snapshot(7)
    names_b, images_b, masks_b = snapshot(7)
    assert names_a == names_b
    assert all(np.array_equal(a, b) for a, b in zip(images_a, images_b))
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b))
    names_c, images_c, _ = snapshot(8)
    assert names_c != names_a
    assert not np.array_equal(images_c[-1], images_a[-1])


def test_texture_records_pickle():
    record = open_dataset("textures:gravel", crop_size=64).test[-1]
    clone = pickle.loads(pickle.dumps(record))
    assert np.array_equal(clone.load_image(), record.load_image())
    assert np.array_equal(clone.load_mask(), record.load_mask())
