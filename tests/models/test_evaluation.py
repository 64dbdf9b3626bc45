"""Honest evaluation: numbers a split cannot measure say so (with the count), the threshold search
refuses a split without OK parts, per-class AP and counts, confusion matrix PNGs.

Unit tests run on synthetic score arrays; the end-to-end ones evaluate the committed demo package
on a small generated set whose test split has no OK images and no 'stain' instances (~15 s).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edge.cli.model import app
from models.training.evaluate import EvalReport, ImageScores
from models.training.gate import GateCriteria, judge
from models.training.operating_point import (
    NotMeasurableError,
    choose_threshold,
    confusion_at,
    image_auroc,
)
from models.training.packaging import manifest_metrics
from models.training.report import markdown, metrics_table, per_class_table

runner = CliRunner()
CLASSES = ["scratch", "pit", "crack", "stain"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR), after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def assert_sane_png(path: Path) -> None:
    assert path.is_file(), path
    w, h = png_size(path)
    assert 200 <= w <= 4000 and 200 <= h <= 4000, (w, h)
    assert 5_000 < path.stat().st_size < 2_000_000


# ---- operating point and gate on synthetic scores ----


def test_precision_without_ok_images_is_not_measurable_with_the_count() -> None:
    p = confusion_at(np.array([0.9, 0.8, 0.2]), np.array([True, True, True]), 0.5, split="test")
    assert p.precision is None and p.specificity is None
    assert p.recall == pytest.approx(2 / 3)
    assert p.not_measurable["precision"].startswith("0 OK images in test (need >= 1)")
    # Below a minimum the number is withheld as well, with the count it rests on.
    five_ok = confusion_at(
        np.array([0.9] * 30 + [0.1] * 5), np.array([True] * 30 + [False] * 5), 0.5,
        min_ok_images=20, min_defect_images=20, split="val",
    )  # fmt: skip
    assert five_ok.precision is None and five_ok.recall == 1.0
    assert "5 OK images in val (need >= 20)" in five_ok.not_measurable["precision"]
    no_defects = confusion_at(np.array([0.1, 0.6]), np.array([False, False]), 0.5)
    assert no_defects.recall is None and no_defects.precision == 0.0


def test_threshold_choice_refuses_a_split_without_ok_images() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    labels = np.ones(5, bool)
    with pytest.raises(NotMeasurableError, match=r"on val: 0 OK and 5 defect images") as e:
        choose_threshold(scores, labels, 0.8, floor=0.05, split="val")
    assert "floor (0.05)" in str(e.value) and "--allow-recall-only" in str(e.value)
    with pytest.raises(NotMeasurableError, match="3 OK and 5 defect"):
        choose_threshold(
            np.concatenate([scores, [0.0, 0.0, 0.0]]),
            np.concatenate([labels, [False] * 3]),
            0.8,
            min_ok_images=20,
            split="val",
        )


def test_recall_only_fallback_takes_the_highest_threshold_reaching_the_target() -> None:
    # 4 of 5 defects needed: the 4th highest score is 0.6; midway to the next lower (0.1) = 0.35.
    # The old search, with nothing to penalise it, went to (0.1 + 0.05) / 2, just above the floor.
    op = choose_threshold(
        np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.ones(5, bool), 0.8, floor=0.05,
        allow_recall_only=True, split="val",
    )  # fmt: skip
    assert op.basis == "recall-only" and op.met
    assert op.threshold == pytest.approx(0.35)
    assert op.precision is None and op.recall == pytest.approx(0.8)


def test_image_auroc() -> None:
    s = np.array([0.9, 0.6, 0.5, 0.4, 0.6, 0.1])
    y = np.array([True, True, True, False, False, False])
    # pairs (pos > neg): 0.9 beats 3, 0.6 beats 0.4, 0.1 and ties 0.6 (2.5), 0.5 beats 2 -> 7.5/9
    assert image_auroc(s, y) == pytest.approx(7.5 / 9)
    assert image_auroc(s[:3], y[:3]) is None
    assert image_auroc(s, y, min_ok_images=4) is None


def test_gate_refuses_what_it_cannot_measure() -> None:
    point = confusion_at(
        np.array([0.9] * 30), np.ones(30, bool), 0.5, min_ok_images=20, split="test"
    )
    d = judge(point)
    assert not d.passed
    assert d.measured["image_precision"] is None
    assert any("0 OK images" in r and "precision not measurable" in r for r in d.reasons), d
    # Measured with a stricter minimum than the gate's: still refused, never passed by default.
    strict = confusion_at(
        np.array([0.9] * 30 + [0.1] * 25), np.array([True] * 30 + [False] * 25), 0.5,
        min_ok_images=50, split="test",
    )  # fmt: skip
    d2 = judge(strict, GateCriteria())
    assert not d2.passed and any("precision not measurable" in r for r in d2.reasons)


# ---- the report, its tables and PNG, the CLI on a report without a model ----


def _split(n_def: int, n_ok: int, seed: int, classes: bool = True) -> ImageScores:
    rng = np.random.default_rng(seed)
    pos = np.clip(rng.normal(0.7, 0.12, n_def), 0, 1)
    neg = np.clip(rng.normal(0.3, 0.12, n_ok), 0, 1)
    inst = [[i % 3, 0] for i in range(n_def)] + [[] for _ in range(n_ok)]  # no class 3 (stain)
    return ImageScores(
        [f"{i}.png" for i in range(n_def + n_ok)],
        np.concatenate([pos, neg]),
        np.array([True] * n_def + [False] * n_ok),
        [],
        inst if classes else None,
    )


@pytest.fixture()
def no_ok_report(tmp_path: Path) -> Path:
    """val: 40 defect + 40 OK images; test: 30 defect images and no OK one."""
    r = EvalReport(
        "m.onnx",
        "0" * 64,
        "data.yaml",
        256,
        0.05,
        {},
        {"val": _split(40, 40, 0), "test": _split(30, 0, 1)},
        classes=CLASSES,
    )
    r.choose(0.95)
    path = tmp_path / "eval.json"
    r.save(path)
    return path


def test_report_json_marks_precision_not_measurable_with_the_count(no_ok_report: Path) -> None:
    doc = json.loads(no_ok_report.read_text())
    assert doc["format"] == 2
    tp = doc["test_point"]
    assert tp["split"] == "test" and tp["precision"] is None and tp["recall"] is not None
    assert tp["not_measurable"]["precision"].startswith("0 OK images in test (need >= 20)")
    test = doc["splits"]["test"]
    assert (test["images"], test["defect_images"], test["ok_images"], test["instances"]) == (
        30,
        30,
        0,
        60,
    )
    assert test["per_class"]["stain"] == {"images": 0, "instances": 0}
    assert test["per_class"]["scratch"] == {"images": 30, "instances": 40}  # 0 in every image
    assert test["per_class"]["pit"] == {"images": 10, "instances": 10}
    assert test["auroc"] is None and doc["splits"]["val"]["auroc"] > 0.9
    assert any("image precision on test not measurable: 0 OK images" in w for w in doc["warnings"])
    assert doc["gate"]["passed"] is False
    assert any("precision not measurable" in r for r in doc["gate"]["reasons"])
    # The val choice was measurable: a real precision, chosen the normal way.
    assert doc["operating_point"]["precision"] is not None
    assert doc["operating_point"]["basis"] == "precision"


def test_image_confusion_png_next_to_the_report(no_ok_report: Path) -> None:
    doc = json.loads(no_ok_report.read_text())
    png = no_ok_report.with_name(doc["plots"]["image_confusion"])
    assert png.name == "eval_confusion.png"
    assert_sane_png(png)


def test_markdown_tables_say_not_measurable(no_ok_report: Path) -> None:
    r = EvalReport.load(no_ok_report)
    table = metrics_table(r)
    test_row = next(ln for ln in table.splitlines() if ln.startswith("| test "))
    assert "| 30 (30/0) | 60 |" in test_row
    assert "not measurable (0 OK images, need >= 20)" in test_row
    assert "1.000" not in test_row.split("|")[8]  # the precision cell holds no number
    md = markdown(r)
    assert "warning: image precision on test not measurable: 0 OK images in test" in md


def test_cli_gate_and_choose_threshold_on_a_split_without_ok_images(no_ok_report: Path) -> None:
    before = no_ok_report.read_bytes()
    res = runner.invoke(app, ["choose-threshold", "--eval", str(no_ok_report), "--split", "test"])
    assert res.exit_code == 2, res.output
    assert "cannot choose a threshold on test: 0 OK and 30 defect images" in res.output
    assert no_ok_report.read_bytes() == before  # refused: nothing rewritten
    res = runner.invoke(app, ["gate", "--eval", str(no_ok_report)])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "image precision on test not measurable: 0 OK images in test (need >= 20)" in out
    assert "REFUSED" in out
    # Even a gate that asks for nothing refuses what it cannot measure (min OK images >= 1).
    res = runner.invoke(
        app,
        ["gate", "--eval", str(no_ok_report), "--min-precision", "0", "--min-recall", "0",
         "--min-ok-images", "1", "--min-defect-images", "1"],
    )  # fmt: skip
    assert res.exit_code == 1 and "precision not measurable" in res.output
    res = runner.invoke(
        app,
        ["choose-threshold", "--eval", str(no_ok_report), "--split", "test",
         "--allow-recall-only"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(no_ok_report.read_text())["operating_point"]["basis"] == "recall-only"
    assert "recall-only fallback" in res.output


def test_packaging_leaves_out_what_was_not_measured(no_ok_report: Path) -> None:
    m = manifest_metrics(EvalReport.load(no_ok_report))
    assert "image_precision" not in m and 0 <= m["image_recall"] <= 1
    assert "val_image_precision" in m


def test_report_without_threshold_renders_and_old_reports_still_load(tmp_path: Path) -> None:
    old: dict[str, Any] = {  # format 1: no format key, classes, counts or per-class AP
        "model": "m.onnx",
        "model_sha256": "0" * 64,
        "data": "data.yaml",
        "imgsz": 256,
        "floor": 0.05,
        "detection": {"test": {"box_map50": 0.5, "box_map50_scratch": 0.4}},
        "images": {
            "val": _split(25, 25, 2, classes=False).as_dict(),
            "test": _split(25, 0, 3, classes=False).as_dict(),
        },
        "min_area_px": {},
        "operating_point": {"threshold": 0.5, "precision": 1.0, "recall": 1.0, "split": "val"},
        "test_point": {"threshold": 0.5, "precision": 1.0, "recall": 0.9, "split": "test"},
        "gate": None,
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    r = EvalReport.load(path)
    # The stored precision 1.0 of a split without OK images is not believed.
    assert "not measurable (0 OK images" in metrics_table(r)
    assert "image_precision" not in manifest_metrics(r)
    assert "| scratch | n/a | n/a | 0.400 |" in per_class_table(r, "test", CLASSES)
    r.operating_point = None
    assert "no threshold chosen" in metrics_table(r)
    path.write_text(json.dumps({**old, "format": 99}))
    with pytest.raises(ValueError, match="format 99 is newer"):
        EvalReport.load(path)
    path.write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="not an evaluation report"):
        EvalReport.load(path)


# ---- end to end on the demo package ----


@pytest.fixture(scope="module")
def no_ok_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """val: 24 mixed images; test: 16 defect images, no OK image and no 'stain' instance."""
    from models.datasets.yolo import write_data_yaml
    from models.synth import CLASSES as SYNTH
    from models.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("no-ok")
    write_dataset(root / "mixed", 48, seed=11, fractions=(0, 0.5, 0.5))
    no_stain = SynthConfig(defect_fraction=1.0, class_weights=(1, 1, 1, 0))
    write_dataset(root / "defects", 16, seed=12, cfg=no_stain, fractions=(0, 0, 1))
    extra = {
        "val": str(root / "mixed" / "images" / "val"),
        "test": str(root / "defects" / "images" / "test"),
    }
    write_data_yaml(root, SYNTH, extra)
    # The same val as test as well: a data set whose choice split has no OK images.
    write_data_yaml(root, SYNTH, {"val": extra["test"], "test": extra["test"]}, "val-no-ok.yaml")
    return root


@pytest.fixture(scope="module")
def evaluated(
    no_ok_data: Path, demo_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    args = ["evaluate", "--model", str(demo_package), "--data", str(no_ok_data / "data.yaml")]
    res = runner.invoke(app, [*args, "--out", str(out), "--min-ok", "5", "--min-defects", "5"])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_evaluate_cli_warns_and_reports_counts(evaluated: tuple[Path, str]) -> None:
    path, output = evaluated
    text = " ".join(output.split())
    assert "warning: image precision on test not measurable: 0 OK images in test (need >= 5)" in (
        text
    )
    assert "gate: REFUSED" in text and "not measurable" in text
    doc = json.loads(path.read_text())
    assert doc["test_point"]["precision"] is None
    assert doc["splits"]["test"]["ok_images"] == 0
    assert doc["splits"]["test"]["defect_images"] == doc["splits"]["test"]["images"] == 16
    assert doc["splits"]["val"]["ok_images"] >= 5 and doc["splits"]["val"]["defect_images"] >= 5


def test_per_class_ap_and_no_instances(evaluated: tuple[Path, str]) -> None:
    path, output = evaluated
    doc = json.loads(path.read_text())
    per = doc["per_class"]["test"]
    assert set(per) == set(CLASSES)
    assert per["stain"]["instances"] == 0 and per["stain"]["note"] == "no instances"
    assert per["stain"]["box_ap50"] is None and per["stain"]["mask_ap50_95"] is None
    labelled = doc["splits"]["test"]["per_class"]
    for c in ("scratch", "pit", "crack"):
        # ultralytics' counts agree with the label files the report counted itself.
        assert per[c]["instances"] == labelled[c]["instances"] > 0
        assert per[c]["images"] == labelled[c]["images"] > 0
        for k in ("box_ap50", "box_ap50_95", "mask_ap50", "mask_ap50_95"):
            assert 0.0 <= per[c][k] <= 1.0
        assert per[c]["box_ap50_95"] <= per[c]["box_ap50"]
    assert "no instances in test (AP undefined, not 0): stain" in output
    md = markdown(EvalReport.load(path))
    assert "| stain | 0 | 0 | no instances |" in md


def test_confusion_pngs_are_written_and_listed(evaluated: tuple[Path, str]) -> None:
    path, output = evaluated
    plots = json.loads(path.read_text())["plots"]
    files = [plots["image_confusion"], *plots["detection_confusion"].values()]
    assert sorted(plots["detection_confusion"]) == ["test", "val"]
    for name in files:
        assert_sane_png(path.with_name(name))
        assert f"wrote {path.with_name(name)}" in output
    matrix = json.loads(path.read_text())["detection_confusion"]["test"]
    assert matrix["names"][-1] == "background" and len(matrix["matrix"]) == 5


def test_evaluate_on_a_val_split_without_ok_images_exits_2_and_keeps_the_scores(
    no_ok_data: Path, demo_package: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        ["evaluate", "--model", str(demo_package), "--data", str(no_ok_data / "val-no-ok.yaml"),
         "--out", str(out), "--no-map", "--min-ok", "5", "--min-defects", "5"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "cannot choose a threshold on val: 0 OK and 16 defect images" in text
    doc = json.loads(out.read_text())
    assert doc["operating_point"] is None and doc["gate"] is None
    assert doc["splits"]["val"]["ok_images"] == 0
    assert "image_confusion" not in doc["plots"]
