"""The magnetic-tile converter on a tree laid out like the real data set (built here, in tmp).

The real data cannot ship with the project, so the test builds the same layout (MT_* folders,
exp<k>_num_<n>.jpg + .png mask) with known tiles and checks what matters: polygons follow the
masks, every tile group lands in exactly one split, and ambiguous empty masks are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.datasets.magnetic_tile import CLASSES, FOLDERS, convert, tile_groups
from models.datasets.yolo import (
    class_names,
    label_path_for,
    load_data_yaml,
    polygons_to_mask,
    read_label_file,
    split_images,
)


def test_tile_groups_break_on_gaps_above_the_limit() -> None:
    nums = [1000, 5, 1, 1101, 3, 1100, 2000]
    # sorted: 1 3 5 | 1000 1100 1101 | 2000  (gap 995 and 899 > 100; 100 is not > 100)
    g = tile_groups(nums, 100)
    assert g == [1, 0, 0, 1, 0, 1, 2]


def _write(folder: Path, name: str, img: np.ndarray, mask: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / f"{name}.jpg"), img)
    assert cv2.imwrite(str(folder / f"{name}.png"), mask)


@pytest.fixture()
def fake_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """40 tiles x 3 exposures; every 3rd tile defective (a blob), one with an empty mask."""
    rng = np.random.default_rng(0)
    src = tmp_path / "mt"
    masks: dict[str, np.ndarray] = {}
    defect_folders = [f for f, c in FOLDERS.items() if c is not None]
    for tile in range(40):
        base_num = 1000 + tile * 1000
        folder = defect_folders[tile % len(defect_folders)] if tile % 3 == 0 else "MT_Free"
        h, w = int(rng.integers(200, 300)), int(rng.integers(100, 400))
        for exp in range(3):
            img = rng.integers(60, 200, (h, w), dtype=np.uint8)
            mask: np.ndarray = np.zeros((h, w), np.uint8)
            if folder != "MT_Free" and tile != 3:  # tile 3: defective folder, empty mask
                cv2.circle(mask, (w // 2, h // 2), 12 + exp, 255, -1)
                mask = cv2.GaussianBlur(mask, (5, 5), 1.5)  # soft edges like the real masks
            name = f"exp{exp + 1}_num_{base_num + exp}"
            _write(src / folder / "Imgs", name, img, mask)
            masks[f"{folder}_{name}"] = mask > 127
    for folder in FOLDERS:
        (src / folder / "Imgs").mkdir(parents=True, exist_ok=True)
    return src, masks


def test_convert_splits_by_tile_and_labels_follow_masks(
    fake_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, masks = fake_tree
    out = tmp_path / "yolo"
    summary = convert(src, out, seed=1)
    doc = load_data_yaml(out)
    assert class_names(doc) == list(CLASSES)
    assert summary["groups"] == 40
    # Tile 3 is in a defect folder with an empty mask: all its 3 images are left out.
    assert len(summary["skipped_empty_masks"]) == 3
    split_of_tile: dict[int, str] = {}
    n_defect = {"train": 0, "val": 0, "test": 0}
    for split in ("train", "val", "test"):
        for img_path in split_images(doc, split):
            num = int(img_path.stem.rsplit("_", 1)[1])
            tile = (num - 1000) // 1000
            # Every exposure of one tile is in the same split: no leakage across splits.
            assert split_of_tile.setdefault(tile, split) == split
            img = cv2.imread(str(img_path), cv2.IMREAD_GRAYSCALE)
            assert img is not None
            h, w = img.shape
            inst = read_label_file(label_path_for(img_path), w, h)
            truth = masks[img_path.stem]
            if truth.any():
                n_defect[split] += 1
                assert len(inst) == 1
                rast = polygons_to_mask([inst[0].polygon], (h, w))
                iou = (rast & truth).sum() / (rast | truth).sum()
                assert iou > 0.85
                expected_cls = CLASSES.index(FOLDERS[img_path.stem.split("_exp")[0]] or "")
                assert inst[0].class_id == expected_cls
            else:
                assert inst == []
    assert len(split_of_tile) == 39
    # Defective tiles are split on their own, so every split holds some.
    assert all(n > 0 for n in n_defect.values()), n_defect
    saved = json.loads((out / "split.json").read_text())
    assert (
        saved["seed"] == 1 and saved["groups_per_split"]["train"] > saved["groups_per_split"]["val"]
    )


def test_convert_is_deterministic(
    fake_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, _ = fake_tree
    a = convert(src, tmp_path / "a", seed=5)
    b = convert(src, tmp_path / "b", seed=5)
    assert a["split_of_group"] == b["split_of_group"]


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="magnetic-tile"):
        convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "partial" / "MT_Blowhole" / "Imgs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="MT_Break"):
        convert(tmp_path / "partial", tmp_path / "out")
