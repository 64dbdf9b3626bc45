"""End to end on a tiny generated set: train one epoch, export, evaluate, gate, package.

A one-epoch model is deliberately weak: the promotion gate must refuse it from its real
evaluation, and packaging must refuse it unless explicitly told to skip the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from models.package import load_package
from models.synth import CLASSES, SynthConfig, write_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.training import ultra_env
    from models.training.recipe import TrainRecipe
    from models.training.train import train

    root = tmp_path_factory.mktemp("smoke")
    ultra_env.prepare(root / "yolo-config")
    data = write_dataset(
        root / "data", 40, seed=3, cfg=SynthConfig(width=64, height=64, defect_fraction=0.5)
    )
    epochs_seen: list[tuple[int, int]] = []
    recipe = TrainRecipe(
        data=data,
        imgsz=64,
        epochs=1,
        batch=8,
        workers=0,
        cache=False,
        project=root / "runs",
        name="smoke",
        close_mosaic=0,
    )
    result = train(recipe, on_epoch=lambda done, planned, m: epochs_seen.append((done, planned)))
    assert epochs_seen == [(1, 1)]
    return {"root": root, "data": data, "best": result.best, "run": result.run_dir}


def test_training_writes_checkpoints_and_recipe(trained: dict[str, Path]) -> None:
    assert trained["best"].stat().st_size > 10_000
    rec = json.loads((trained["run"] / "recipe.json").read_text())
    assert rec["epochs_done"] == 1
    assert rec["recipe"]["lr0"] == pytest.approx(0.00232)
    assert rec["recipe"]["optimizer"] == "AdamW"


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path]) -> Path:
    from models.training.export import export_onnx

    return export_onnx(trained["best"], trained["root"] / "model.onnx", imgsz=64)


def test_export_has_yolov8_seg_outputs(exported: Path) -> None:
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 64, 64]
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert outs["output0"][:2] == [1, 4 + len(CLASSES) + 32]
    assert outs["output1"] == [1, 32, 16, 16]
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})
    assert np.isfinite(y[0]).all()


@pytest.fixture(scope="module")
def report_path(trained: dict[str, Path], exported: Path) -> Path:
    from models.training.evaluate import evaluate
    from models.training.gate import GateCriteria

    report = evaluate(exported, trained["data"], floor=0.001, with_map=True, threads=1)
    # 6 images per split: measurable only with minimums of 1 (the defaults, 20, would refuse to
    # choose a threshold at all), so the gate below refuses for what the model does.
    report.choose(0.95, GateCriteria(min_ok_images=1, min_defect_images=1))
    path = trained["root"] / "eval.json"
    report.save(path)
    return path


def test_evaluation_has_map_and_image_level_scores(report_path: Path) -> None:
    from models.training.evaluate import EvalReport

    r = EvalReport.load(report_path)
    for split in ("val", "test"):
        m = r.detection[split]
        for k in ("box_map50", "box_map50_95", "mask_map50", "mask_map50_95"):
            assert 0.0 <= m[k] <= 1.0
        imgs = r.images[split]
        assert len(imgs.files) == len(imgs.scores) == len(imgs.defect) == 6
        assert imgs.defect.any() and (~imgs.defect).any()
        assert ((imgs.scores >= 0) & (imgs.scores <= 1)).all()
    assert r.operating_point is not None and r.test_point is not None


def test_gate_refuses_the_one_epoch_model(report_path: Path) -> None:
    from models.training.evaluate import EvalReport

    gate = EvalReport.load(report_path).gate
    assert gate is not None and gate["passed"] is False
    # Refused for what it does, not only because the tiny set is too small to measure.
    assert any("image precision" in r or "image recall" in r for r in gate["reasons"]), gate[
        "reasons"
    ]


def test_packaging_refuses_a_gated_out_model_and_marks_a_forced_one(
    trained: dict[str, Path], exported: Path, report_path: Path
) -> None:
    from models.training.evaluate import EvalReport
    from models.training.packaging import PromotionRefused, package_model

    report = EvalReport.load(report_path)
    common = {
        "report": report,
        "name": "smoke",
        "version": "1",
        "plc_model_id": 9,
        "classes": list(CLASSES),
    }
    with pytest.raises(PromotionRefused, match="gate refused"):
        package_model(exported, trained["root"] / "pkg-refused", **common)  # type: ignore[arg-type]
    assert not (trained["root"] / "pkg-refused" / "manifest.json").exists()
    out = package_model(exported, trained["root"] / "pkg", require_gate=False, **common)  # type: ignore[arg-type]
    pkg = load_package(out)
    m = pkg.manifest
    assert m.training.model_dump()["gate"]["passed"] is False
    assert m.thresholds.default == pytest.approx(report.operating_point["threshold"], abs=1e-4)  # type: ignore[index]
    assert m.metrics.image_recall == pytest.approx(report.test_point["recall"], abs=1e-4)  # type: ignore[index]


def test_report_of_another_model_is_refused(
    trained: dict[str, Path], report_path: Path, exported: Path
) -> None:
    from models.training.evaluate import EvalReport
    from models.training.packaging import PromotionRefused, package_model

    other = trained["root"] / "other.onnx"
    other.write_bytes(exported.read_bytes() + b"\0")
    with pytest.raises(PromotionRefused, match="another model"):
        package_model(
            other,
            trained["root"] / "pkg-other",
            report=EvalReport.load(report_path),
            name="x",
            version="1",
            plc_model_id=1,
            classes=list(CLASSES),
            require_gate=False,
        )


def test_cli_gate_exits_nonzero_and_package_refuses(
    trained: dict[str, Path], exported: Path, report_path: Path
) -> None:
    from edge.cli.model import app

    runner = CliRunner()
    res = runner.invoke(app, ["gate", "--eval", str(report_path)])
    assert res.exit_code == 1, res.output
    res = runner.invoke(
        app,
        [
            "gate",
            "--eval",
            str(report_path),
            "--min-precision",
            "0",
            "--min-recall",
            "0",
            "--min-defects",
            "1",
            "--min-ok",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    # The report now holds the permissive decision; re-gate with the defaults before packaging.
    assert runner.invoke(app, ["gate", "--eval", str(report_path)]).exit_code == 1
    res = runner.invoke(
        app,
        [
            "package",
            "--model",
            str(exported),
            "--out",
            str(trained["root"] / "cli-pkg"),
            "--name",
            "smoke",
            "--version",
            "2",
            "--plc-model-id",
            "3",
            "--eval",
            str(report_path),
        ],
    )
    assert res.exit_code == 1
    assert not (trained["root"] / "cli-pkg" / "manifest.json").exists()
