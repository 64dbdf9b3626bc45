"""`edge model import-data`: COCO, YOLO, CVAT XML and mask folders into one YOLO-seg set.

The sets are drawn here (datasets_fixtures.py), so every label can be checked against the mask
that was drawn: rasterised the way ultralytics does (fillPoly), each class's labels must cover the
drawn blobs (IoU). Then what the split promises: groups never straddle splits, classes reach
train, the same seed gives the same split.json; and what the report promises: every skipped file
has a reason, and the rest is still imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from datasets_fixtures import (
    CLASSES,
    GROUP_REGEX,
    SIZE,
    truth,
    write_coco_set,
    write_cvat_set,
    write_mask_set,
    write_yolo_set,
)
from typer.testing import CliRunner

from models.datasets.grouping import GroupRule, cluster_numbers, split_groups, strata_of
from models.datasets.importer import Imported, ImportOptions, import_data, report_text
from models.datasets.sources.cvat import rle_to_mask
from models.datasets.sources.detect import detect
from models.datasets.yolo import (
    class_names,
    label_path_for,
    load_data_yaml,
    polygons_to_mask,
    read_label_file,
    split_images,
)

REPO = Path(__file__).resolve().parents[2]
BY_PART = ImportOptions(group=GroupRule(regex=GROUP_REGEX))


def _stem(name: str) -> str:
    m = re.search(r"p\d+_s\d+", name)
    assert m, name
    return m.group(0)


def _labels(out: Path) -> dict[str, tuple[str, list[tuple[str, np.ndarray]]]]:
    """Output image stem -> (split, [(class, rasterised polygon)])."""
    doc = load_data_yaml(out)
    names = class_names(doc)
    got: dict[str, tuple[str, list[tuple[str, np.ndarray]]]] = {}
    for split in ("train", "val", "test"):
        for img in split_images(doc, split):
            inst = read_label_file(label_path_for(img), SIZE, SIZE)
            rast = [(names[i.class_id], polygons_to_mask([i.polygon], (SIZE, SIZE))) for i in inst]
            got[img.stem] = (split, rast)
    return got


def _check_labels(
    out: Path, *, boxes: bool = False, box_stems: frozenset[str] = frozenset(), min_iou: float = 0.8
) -> None:
    """Per image and class, the union of imported polygons matches the union of drawn blobs
    (their bounding boxes where the source had only boxes: ``boxes``, or the images in
    ``box_stems``)."""
    got = _labels(out)
    assert len(got) == 16
    for name, (_, rast) in got.items():
        drawn = truth(_stem(name))
        assert len(rast) == len(drawn), name
        for cls in CLASSES:
            want = np.zeros((SIZE, SIZE), bool)
            for c, m in drawn:
                if c == cls:
                    if boxes or _stem(name) in box_stems:
                        ys, xs = np.nonzero(m)
                        m = np.zeros_like(m)
                        m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
                    want |= m
            have = np.zeros((SIZE, SIZE), bool)
            for c, r in rast:
                if c == cls:
                    have |= r
            if not want.any():
                assert not have.any(), (name, cls)
                continue
            iou = (want & have).sum() / (want | have).sum()
            assert iou > min_iou, (name, cls, iou)


def _no_straddle(done: Imported) -> None:
    split_of_part: dict[str, str] = {}
    for name, d in done.split["images"].items():
        part = _stem(name).split("_")[0]
        assert split_of_part.setdefault(part, d["split"]) == d["split"], name


def test_coco_polygons_and_both_rle_kinds_follow_the_masks(tmp_path: Path) -> None:
    done = import_data(write_coco_set(tmp_path), tmp_path / "out", BY_PART)
    assert class_names(load_data_yaml(tmp_path / "out")) == list(CLASSES)
    _check_labels(tmp_path / "out")
    _no_straddle(done)
    r = done.report
    assert r["images"]["total"] == 16 and r["images_without_defects"]["total"] == 4
    assert {c: d["total"] for c, d in r["instances"].items()} == {"dent": 8, "stain": 6}
    assert r["skipped"]["total"] == 0 and r["warnings"] == {}
    # Image bytes are copied, not re-encoded.
    some = next((tmp_path / "out" / "images" / "train").iterdir())
    src_img = tmp_path / "coco" / "images" / some.name
    assert some.read_bytes() == src_img.read_bytes()


def test_coco_boxes_only_become_box_polygons_with_one_warning(tmp_path: Path) -> None:
    done = import_data(write_coco_set(tmp_path, boxes_only=True), tmp_path / "out", BY_PART)
    _check_labels(tmp_path / "out", boxes=True, min_iou=0.75)
    assert done.report["warnings"] == {
        "box-only annotations turned into box polygons (no segmentation given)": 14
    }
    assert "box polygons (no segmentation given): 14" in report_text(done.report)


def test_coco_class_order_follows_category_ids_and_classes_picks_a_subset(
    tmp_path: Path,
) -> None:
    src = write_coco_set(tmp_path)
    ann = src / "annotations" / "instances_default.json"
    doc = json.loads(ann.read_text())
    for c in doc["categories"]:  # dent 1 -> 9: stain now comes first
        c["id"] = 9 if c["name"] == "dent" else c["id"]
    for a in doc["annotations"]:
        a["category_id"] = 9 if a["category_id"] == 1 else a["category_id"]
    doc["annotations"][0]["iscrowd"] = 1
    ann.write_text(json.dumps(doc))
    a = import_data(src, tmp_path / "a", BY_PART)
    assert class_names(load_data_yaml(tmp_path / "a")) == ["stain", "dent"]
    crowd = "iscrowd regions imported as ordinary instances (one per connected piece)"
    assert a.report["warnings"] == {crowd: 1}

    only = ImportOptions(classes=("dent",), group=BY_PART.group)
    done = import_data(src, tmp_path / "b", only)
    assert class_names(load_data_yaml(tmp_path / "b")) == ["dent"]
    assert done.report["warnings"]["annotations of classes left out by --classes dropped"] == 6
    # Stain images are not defect-free: they are left out, not imported as OK.
    assert done.report["skipped"]["by_reason"]["only classes left out by --classes"]["count"] == 6
    with pytest.raises(ValueError, match="scratch not among"):
        import_data(src, tmp_path / "c", ImportOptions(classes=("dent", "scratch")))


def test_yolo_seg_folder_already_split_is_regrouped(tmp_path: Path) -> None:
    done = import_data(write_yolo_set(tmp_path), tmp_path / "out", BY_PART)
    _check_labels(tmp_path / "out")
    _no_straddle(done)
    assert any("split redone by group" in n for n in done.report["notes"])
    assert done.report["warnings"] == {"images without a label file taken as defect-free": 1}


def test_yolo_detection_lines_and_names_from_classes(tmp_path: Path) -> None:
    src = write_yolo_set(tmp_path, detection=True)
    (src / "data.yaml").unlink()
    with pytest.raises(ValueError, match="give --classes"):
        import_data(src, tmp_path / "out", BY_PART)
    opts = ImportOptions(classes=CLASSES, group=BY_PART.group)
    done = import_data(src, tmp_path / "out", opts)
    _check_labels(tmp_path / "out", boxes=True, min_iou=0.75)
    assert (
        done.report["warnings"]["detection lines (class cx cy w h) turned into box polygons"] == 14
    )


def test_cvat_xml_polygons_masks_boxes_and_unsupported_shapes(tmp_path: Path) -> None:
    done = import_data(write_cvat_set(tmp_path), tmp_path / "out", BY_PART)
    _check_labels(tmp_path / "out", box_stems=frozenset({"p5_s1"}), min_iou=0.75)
    assert done.report["warnings"] == {
        "box shapes turned into box polygons": 1,
        "unsupported CVAT shapes skipped: polyline": 1,
    }


def test_cvat_mask_rle_is_row_major_and_starts_with_background() -> None:
    m = rle_to_mask("1, 2, 3, 1, 2", 3, 3)
    assert m.astype(int).tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="covers 8 pixels"):
        rle_to_mask("1,2,5", 3, 3)


def test_mask_folders_with_an_ok_folder_and_an_empty_mask(tmp_path: Path) -> None:
    src = write_mask_set(tmp_path)
    # A defect-folder image whose mask is empty: the truth is unknown, it is left out.
    cv2.imwrite(str(src / "dent" / "p9_s0.jpg"), np.full((SIZE, SIZE, 3), 128, np.uint8))
    cv2.imwrite(str(src / "dent" / "p9_s0.png"), np.zeros((SIZE, SIZE), np.uint8))
    # A JPEG cut short (OpenCV would still decode it, grey at the bottom): unreadable.
    whole = (src / "stain" / "p3_s0.jpg").read_bytes()
    (src / "stain" / "p9_s1.jpg").write_bytes(whole[: len(whole) // 2])
    shutil.copy(src / "stain" / "p3_s0.png", src / "stain" / "p9_s1.png")
    done = import_data(src, tmp_path / "out", BY_PART)
    _check_labels(tmp_path / "out")
    assert class_names(load_data_yaml(tmp_path / "out")) == ["dent", "stain"]  # good/ is OK
    assert done.report["images_without_defects"]["total"] == 4
    sk = done.report["skipped"]["by_reason"]
    assert sk == {
        "empty mask in a defect folder (truth unknown)": {
            "count": 1,
            "examples": ["dent/p9_s0.jpg"],
        },
        "image unreadable": {"count": 1, "examples": ["stain/p9_s1.jpg (truncated JPEG)"]},
    }
    assert sorted(done.split["images"])[0] == "dent_p0_s0.jpg"  # folder prefix keeps names apart


def test_masks_in_a_subfolder_with_a_suffix_and_a_format_to_re_encode(tmp_path: Path) -> None:
    """<class>/imgs/<stem>.jpg + <class>/masks/<stem>_mask.png; a .pgm image becomes a PNG."""
    flat = write_mask_set(tmp_path)
    src = tmp_path / "nested"
    for folder in flat.iterdir():
        (src / folder.name / "imgs").mkdir(parents=True)
        (src / folder.name / "masks").mkdir()
        for f in folder.iterdir():
            if f.suffix == ".png":
                f.rename(src / folder.name / "masks" / f"{f.stem}_mask.png")
            else:
                f.rename(src / folder.name / "imgs" / f.name)
    ok = src / "good" / "imgs"
    img = cv2.imread(str(ok / "p6_s0.jpg"), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    (ok / "p6_s0.jpg").unlink()
    assert cv2.imwrite(str(ok / "p6_s0.pgm"), img)
    opts = ImportOptions(
        format="masks",
        images_subdir="imgs",
        masks_subdir="masks",
        mask_suffix="_mask",
        group=BY_PART.group,
    )
    done = import_data(src, tmp_path / "out", opts)
    _check_labels(tmp_path / "out")
    assert "good_p6_s0.png" in done.split["images"]
    assert done.report["skipped"]["total"] == 0


def test_groups_never_straddle_and_every_class_reaches_train(tmp_path: Path) -> None:
    src = write_mask_set(tmp_path)
    for seed in range(6):
        opts = ImportOptions(group=BY_PART.group, seed=seed)
        done = import_data(src, tmp_path / f"s{seed}", opts)
        _no_straddle(done)
        assert all(done.report["instances"][c]["train"] > 0 for c in CLASSES), seed
        assert done.report["images"]["val"] > 0 and done.report["images"]["test"] > 0


def test_same_seed_same_split_json(tmp_path: Path) -> None:
    src = write_cvat_set(tmp_path)
    a = import_data(src, tmp_path / "a", BY_PART)
    b = import_data(src, tmp_path / "b", BY_PART)
    assert (tmp_path / "a" / "split.json").read_bytes() == (
        tmp_path / "b" / "split.json"
    ).read_bytes()
    assert a.split["split_of_group"] == b.split["split_of_group"]
    c = import_data(src, tmp_path / "c", ImportOptions(group=BY_PART.group, seed=1))
    assert c.split["seed"] == 1 and c.split["group_rule"]["regex"] == GROUP_REGEX


def test_group_regex_misses_gap_clusters_and_csv(tmp_path: Path) -> None:
    src = write_mask_set(tmp_path)
    done = import_data(src, tmp_path / "a", ImportOptions(group=GroupRule(regex=r"p([0-5])_")))
    assert done.report["groups"]["own_group"] == {"group regex did not match": 4}
    assert done.report["warnings"]["own group: group regex did not match"] == 4
    # Part numbers 0..7 are consecutive: gap 1 clusters them into one group (too few to fill
    # three splits: it goes to train), gap 0 keeps them apart.
    one = import_data(src, tmp_path / "b", ImportOptions(group=GroupRule(regex=GROUP_REGEX, gap=1)))
    assert one.split["split_of_group"] == {"0..7": "train"}
    done = import_data(
        src, tmp_path / "b", ImportOptions(group=GroupRule(regex=GROUP_REGEX, gap=0))
    )
    assert done.split["groups"] == 8
    assert cluster_numbers([1000, 5, 1, 1101, 3, 1100, 2000], 100) == [1, 0, 0, 1, 0, 1, 2]
    rows = ["file,part"] + [f"{p.name},{p.stem[:2]}" for p in sorted(src.rglob("*.jpg"))]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    rule = GroupRule(csv=tmp_path / "groups.csv", column="part")
    done = import_data(src, tmp_path / "c", ImportOptions(group=rule))
    _no_straddle(done)
    assert done.split["groups"] == 8 and done.report["groups"]["own_group"] == {}


def test_strata_put_rarest_class_first_and_small_strata_in_train() -> None:
    groups = {"a": {0}, "b": {0, 1}, "c": {1}, "d": {1}, "e": set(), "f": {1}}
    strata = strata_of(groups, ["dent", "stain"], "class")
    # dent is in 2 groups, stain in 4: the mixed group b counts as dent (the rarer class).
    assert strata == {"dent": ["a", "b"], "stain": ["c", "d", "f"], "ok": ["e"]}
    split = split_groups(strata, (0.7, 0.15, 0.15), 0)
    assert split["e"] == "train"
    assert sorted(split[k] for k in ("a", "b")) == ["test", "train"]
    assert sorted(split[k] for k in ("c", "d", "f")) == ["test", "train", "val"]


def test_auto_detection_and_its_ambiguity(tmp_path: Path) -> None:
    assert detect(write_coco_set(tmp_path)) == "coco"
    assert detect(tmp_path / "coco" / "annotations" / "instances_default.json") == "coco"
    assert detect(write_yolo_set(tmp_path)) == "yolo"
    assert detect(write_cvat_set(tmp_path)) == "cvat"
    assert detect(write_mask_set(tmp_path)) == "masks"
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "cvat", both)
    shutil.copy(tmp_path / "coco" / "annotations" / "instances_default.json", both)
    with pytest.raises(ValueError, match="looks like coco and cvat; give --format"):
        detect(both)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell its format; give --format"):
        detect(tmp_path / "empty")
    done = import_data(both, tmp_path / "out", ImportOptions(format="cvat"))
    assert done.report["format"] == "cvat"


def test_bad_input_is_skipped_with_a_reason_and_the_rest_imported(tmp_path: Path) -> None:
    src = write_coco_set(tmp_path)
    (src / "images" / "p0_s0.png").write_bytes(b"not a png")  # corrupt
    (src / "images" / "p1_s0.png").unlink()  # missing
    ann = src / "annotations" / "instances_default.json"
    doc: dict[str, Any] = json.loads(ann.read_text())
    p3 = next(im["id"] for im in doc["images"] if im["file_name"] == "p3_s0.png")
    next(a for a in doc["annotations"] if a["image_id"] == p3)["category_id"] = 99
    doc["annotations"].append(
        {"id": 999, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 2, 2]}
    )
    ann.write_text(json.dumps(doc))
    done = import_data(src, tmp_path / "out", BY_PART)
    sk = done.report["skipped"]["by_reason"]
    assert {r: d["count"] for r, d in sk.items()} == {
        "image unreadable": 1,
        "image file missing": 1,
        "unknown class": 1,
        "label for a missing image": 1,
    }
    assert sk["unknown class"]["examples"] == ["p3_s0.png (category_id 99)"]
    assert done.report["images"]["total"] == 13
    text = report_text(done.report)
    assert "skipped: 4" in text and "image unreadable: 1" in text


def test_out_must_be_new_or_an_earlier_import(tmp_path: Path) -> None:
    src = write_mask_set(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and not an earlier import"):
        import_data(src, tmp_path / "mine", BY_PART)
    with pytest.raises(ValueError, match="outside SRC"):
        import_data(src, src / "out", BY_PART)
    import_data(src, tmp_path / "out", BY_PART)
    import_data(src, tmp_path / "out", BY_PART)  # re-import over its own output is fine


def test_cli_runs_and_bad_input_exits_2(tmp_path: Path) -> None:
    from edge.cli.model import app

    runner = CliRunner()
    src = write_mask_set(tmp_path)
    ok = runner.invoke(
        app, ["import-data", str(src), "--out", str(tmp_path / "out"), "--group-regex", GROUP_REGEX]
    )
    assert ok.exit_code == 0, ok.output
    assert "imported 16 images (masks)" in ok.output
    assert (tmp_path / "out" / "import-report.json").exists()
    cases = [
        (["import-data", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "does not exist"),
        (
            ["import-data", str(src), "--out", str(tmp_path / "o2"), "--stratify", "odd"],
            "--stratify",
        ),
        (
            ["import-data", str(src), "--out", str(tmp_path / "o3"), "--fractions", "1,2"],
            "three numbers",
        ),
        (
            ["import-data", str(src), "--out", str(tmp_path / "o4"), "--format", "coco"],
            "no COCO JSON",
        ),
        (
            ["import-data", str(src), "--out", str(tmp_path / "o5"), "--class-map", "dent"],
            "FOLDER=CLASS",
        ),
        (
            ["import-data", str(src), "--out", str(tmp_path / "o6"), "--group-regex", "("],
            "--group-regex",
        ),
        (["import-data", str(src), "--out", str(tmp_path / "o7"), "--preset", "nope"], "--preset"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (args, r.output)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_the_cli_module_leaves_the_importer_unloaded() -> None:
    """`edge --help` and the daemon never load dataset tooling (the command imports it)."""
    code = (
        "import sys, edge.cli, edge.cli.model\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('models.datasets', 'pycocotools')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the real magnetic-tile data: the importer reproduces the original converter's split ----

MT_SPLIT_SHA256 = "5bb9e58f0ac6cfcae77a7349d083581fe80fe85a59c1de36e2abf168b28f5728"
"""sha256 of the sorted lines "<image file name> <split>\\n" of `edge model convert-magnetic-tile
--seed 0` before it became a preset of import-data (measured on the full 1344-image set)."""
MT_COUNTS = {"train": 943, "val": 194, "test": 201}
MT_SKIPPED = 6  # four MT_Uneven tiles' empty masks: 6 images


def _magnetic_tile() -> Path | None:
    env = os.environ.get("EDGE_MAGNETIC_TILE")
    for p in (
        env,
        REPO.parent / "shared" / "data" / "magnetic-tile",
        "/work/shared/data/magnetic-tile",
    ):
        if p and (Path(p) / "MT_Blowhole").is_dir():
            return Path(p)
    return None


def test_magnetic_tile_preset_reproduces_the_original_split(tmp_path: Path) -> None:
    src = _magnetic_tile()
    if src is None:
        pytest.skip("magnetic-tile data absent (EDGE_MAGNETIC_TILE, ../shared/data/magnetic-tile)")
    from models.datasets.importer import options_from_args

    done = import_data(src, tmp_path / "mt", options_from_args("magnetic-tile"))
    lines = sorted(f"{name} {d['split']}" for name, d in done.split["images"].items())
    assert {s: done.report["images"][s] for s in MT_COUNTS} == MT_COUNTS
    assert done.report["skipped"]["total"] == MT_SKIPPED
    assert (
        hashlib.sha256("".join(f"{ln}\n" for ln in lines).encode()).hexdigest() == MT_SPLIT_SHA256
    )
    assert done.split["groups"] == 224
