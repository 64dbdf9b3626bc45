"""Issue 14's acceptance run: a user's own labelled set, in each export format, taken through the
commands a quality engineer types: import-data -> train (one short epoch) -> export -> evaluate.

Every set is written by the test (tests/models/datasets_fixtures.py: 16 images of 64 px, two
classes, two shots per part); nothing is downloaded. What must hold beyond "it ran": the
evaluation measured exactly the images and instances the import put in each split (two of our
own components, cross-checked), the report names both classes, and numbers a tiny split cannot
support are "not measurable" with the count instead of a made-up value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge.cli import app
from tests.models.datasets_fixtures import (
    CLASSES,
    GROUP_REGEX,
    write_coco_set,
    write_cvat_set,
    write_mask_set,
    write_yolo_set,
)

WRITERS: dict[str, Callable[[Path], Path]] = {
    "coco": write_coco_set,
    "yolo": write_yolo_set,
    "cvat": write_cvat_set,
    "masks": write_mask_set,
}


def _edge(*args: str) -> str:
    r = CliRunner().invoke(app, ["model", *args])
    assert r.exit_code == 0, f"edge model {' '.join(args)} -> {r.exit_code}\n{r.output}"
    return r.output


@pytest.fixture(scope="module")
def yolo_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.training import ultra_env

    cfg = tmp_path_factory.mktemp("yolo-config")
    ultra_env.prepare(cfg)
    return cfg


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_users_export_imports_trains_and_evaluates(
    fmt: str, tmp_path: Path, yolo_config: Path
) -> None:
    src = WRITERS[fmt](tmp_path / "src")
    data = tmp_path / "data"
    # 8 parts: 4 train, 2 val, 2 test groups; --format given so the test also covers auto-detect
    # elsewhere (test_import_data) without depending on it here.
    _edge(
        "import-data", str(src), "--out", str(data), "--format", fmt,
        "--group-regex", GROUP_REGEX, "--fractions", "0.5,0.25,0.25", "--seed", "1",
    )  # fmt: skip
    imported = json.loads((data / "import-report.json").read_text())
    split = json.loads((data / "split.json").read_text())
    groups: dict[str, set[str]] = {}
    for rec in split["images"].values():
        groups.setdefault(rec["group"], set()).add(rec["split"])
    assert all(len(s) == 1 for s in groups.values()), "a part's two shots straddle splits"

    runs = tmp_path / "runs"
    _edge(
        "train", "--data", str(data / "data.yaml"), "--epochs", "1", "--imgsz", "64",
        "--batch", "4", "--close-mosaic", "0", "--warmup-epochs", "0",
        "--project", str(runs), "--name", fmt,
    )  # fmt: skip
    record = json.loads((runs / fmt / "recipe.json").read_text())
    assert record["status"] == "finished" and record["epochs_done"] == 1
    assert record["classes"] == list(CLASSES)
    assert record["data"]["split_json_sha256"], "the split that trained the model is recorded"

    onnx = tmp_path / "model.onnx"
    _edge(
        "export", "--weights", str(runs / fmt / "weights" / "best.pt"), "--out", str(onnx),
        "--imgsz", "64",
    )  # fmt: skip
    report_path = tmp_path / "eval.json"
    # Two parts per held-out split: the split that chooses the threshold may hold no OK part, so
    # the threshold may only be chosen by recall there (the report marks it), never silently.
    _edge(
        "evaluate", "--model", str(onnx), "--data", str(data / "data.yaml"),
        "--out", str(report_path), "--min-ok", "1", "--min-defects", "1",
        "--recall-target", "0.5", "--threads", "1", "--allow-recall-only",
    )  # fmt: skip
    report = json.loads(report_path.read_text())

    for name in ("val", "test"):
        got = report["splits"][name]
        assert got["images"] == imported["images"][name], (name, got)
        assert got["ok_images"] == imported["images_without_defects"][name], (name, got)
        assert got["instances"] == sum(imported["instances"][c][name] for c in CLASSES)
        for c in CLASSES:
            assert got["per_class"][c]["instances"] == imported["instances"][c][name]
    assert set(report["per_class"]["test"]) == set(CLASSES)
    assert report["gate"] is not None and "image_confusion" in report["plots"]
    val_ok = report["splits"]["val"]["ok_images"]
    assert report["operating_point"]["basis"] == ("recall-only" if val_ok == 0 else "precision")
    # Two test parts cannot support the gate's default 20-image minimum: it refuses, with counts.
    n_ok = imported["images_without_defects"]["test"]
    r = CliRunner().invoke(app, ["model", "gate", "--eval", str(report_path)])
    assert r.exit_code == 1, r.output
    assert f"{n_ok} OK images" in r.output and "need >= 20" in r.output, r.output
    plots = [report["plots"]["image_confusion"], *report["plots"]["detection_confusion"].values()]
    for name in plots:
        assert (report_path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
