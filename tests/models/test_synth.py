"""The synthetic generator: reproducible, labels that match the pixels, a usable YOLO layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.datasets.yolo import (
    class_names,
    label_path_for,
    load_data_yaml,
    polygons_to_mask,
    read_label_file,
    split_images,
)
from models.synth import CLASSES, SynthConfig, generate_sample, write_dataset


def test_same_seed_and_index_give_identical_samples() -> None:
    a = generate_sample(11, 5)
    b = generate_sample(11, 5)
    np.testing.assert_array_equal(a.image, b.image)
    assert [i.class_id for i in a.instances] == [i.class_id for i in b.instances]
    for pa, pb in zip(a.instances, b.instances, strict=True):
        np.testing.assert_array_equal(pa.polygon, pb.polygon)


def test_different_index_or_seed_gives_different_images() -> None:
    base = generate_sample(11, 5).image
    assert not np.array_equal(base, generate_sample(11, 6).image)
    assert not np.array_equal(base, generate_sample(12, 5).image)


def test_sample_does_not_depend_on_generation_order() -> None:
    """Each image has its own generator: generating others first changes nothing."""
    later = generate_sample(3, 9).image
    for i in range(4):
        generate_sample(3, i)
    np.testing.assert_array_equal(later, generate_sample(3, 9).image)


@pytest.mark.parametrize("index", range(40))
def test_polygons_reproduce_each_defect_mask(index: int) -> None:
    s = generate_sample(21, index, SynthConfig(defect_fraction=1.0))
    assert s.image.dtype == np.uint8 and s.image.shape == (256, 256)
    assert s.masks, "defect_fraction=1 must give at least one defect"
    assert len(s.instance_mask) == len(s.instances)
    polys_by_mask: list[list[np.ndarray]] = [[] for _ in s.masks]
    for inst, owner in zip(s.instances, s.instance_mask, strict=True):
        assert inst.class_id == s.mask_classes[owner]
        polys_by_mask[owner].append(inst.polygon)
    for mask, polys in zip(s.masks, polys_by_mask, strict=True):
        rast = polygons_to_mask(polys, mask.shape)
        iou = (rast & mask).sum() / (rast | mask).sum()
        assert iou > 0.75, f"label polygon IoU {iou:.2f} with its mask"


@pytest.mark.parametrize("index", range(10))
def test_defects_change_the_pixels_under_their_masks(index: int) -> None:
    """A label must sit on something visible: the defect pixels differ from a defect-free render."""
    cfg = SynthConfig(defect_fraction=1.0)
    s = generate_sample(5, index, cfg)
    union = np.zeros(s.image.shape, bool)
    for m in s.masks:
        union |= m
    ring = cv2.dilate(union.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~union
    inside = s.image[union].astype(float)
    around = s.image[ring].astype(float)
    assert abs(inside.mean() - around.mean()) > 3 or inside.std() > around.std() * 1.3


def test_ok_images_have_no_labels() -> None:
    s = generate_sample(1, 0, SynthConfig(defect_fraction=0.0))
    assert not s.is_defect and s.instances == [] and s.masks == []


def test_write_dataset_layout_split_and_labels(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds", 40, seed=4, cfg=SynthConfig(width=96, height=64))
    doc = load_data_yaml(data)
    assert class_names(doc) == list(CLASSES)
    sizes = {s: len(split_images(doc, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 28, "val": 6, "test": 6}
    n_defect = 0
    for split in sizes:
        for img_path in split_images(doc, split):
            img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
            assert img is not None
            assert img.shape == (64, 96)
            label = label_path_for(img_path)
            assert label.exists()
            inst = read_label_file(label, 96, 64)
            n_defect += bool(inst)
            for i in inst:
                assert 0 <= i.class_id < len(CLASSES)
                assert (i.polygon[:, 0] <= 96).all() and (i.polygon[:, 1] <= 64).all()
                assert len(i.polygon) >= 3
    assert 0 < n_defect < 40
    # Same seed -> same files, byte for byte.
    again = write_dataset(tmp_path / "ds2", 40, seed=4, cfg=SynthConfig(width=96, height=64))
    for split in sizes:
        for p in split_images(doc, split):
            q = again.parent / "images" / split / p.name
            assert q.read_bytes() == p.read_bytes()
            assert label_path_for(q).read_text() == label_path_for(p).read_text()


def test_all_classes_are_generated() -> None:
    seen = set()
    for i in range(60):
        seen.update(generate_sample(8, i, SynthConfig(defect_fraction=1.0)).mask_classes)
    assert seen == set(range(len(CLASSES)))


def test_too_few_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        write_dataset(tmp_path, 2)


def test_pure_holdout_set_and_bad_fractions(tmp_path: Path) -> None:
    data = write_dataset(
        tmp_path / "h", 10, seed=1, cfg=SynthConfig(width=64, height=64), fractions=(0.0, 0.0, 1.0)
    )
    doc = load_data_yaml(data)
    assert len(split_images(doc, "test")) == 10
    with pytest.raises(ValueError, match="sum to 1"):
        write_dataset(tmp_path / "x", 10, fractions=(0.5, 0.5, 0.5))
