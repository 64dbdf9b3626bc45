"""`edge model` commands that need no training: synth, choose-threshold, build-engine errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge.cli.model import app
from models.datasets.yolo import load_data_yaml, split_images
from models.tensorrt_runtime import tensorrt_available
from models.training.evaluate import EvalReport, ImageScores

runner = CliRunner()


def test_synth_command_writes_a_dataset(tmp_path: Path) -> None:
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--n", "20", "--size", "64"])
    assert res.exit_code == 0, res.output
    doc = load_data_yaml(tmp_path / "d")
    assert sum(len(split_images(doc, s)) for s in ("train", "val", "test")) == 20


def _report(path: Path) -> Path:
    rng = np.random.default_rng(0)

    # 40 defects scored high-ish, 40 OK parts scored low-ish, overlapping.
    def split() -> ImageScores:
        pos = np.clip(rng.normal(0.6, 0.15, 40), 0, 1)
        neg = np.clip(rng.normal(0.4, 0.15, 40), 0, 1)
        return ImageScores(
            [f"{i}.png" for i in range(80)],
            np.concatenate([pos, neg]),
            np.array([True] * 40 + [False] * 40),
            [],
        )

    r = EvalReport(
        "m.onnx", "0" * 64, "data.yaml", 256, 0.05, {}, {"val": split(), "test": split()}
    )
    r.choose(0.95)
    r.save(path)
    return path


def test_choose_threshold_rewrites_the_operating_point(tmp_path: Path) -> None:
    path = _report(tmp_path / "eval.json")
    before = json.loads(path.read_text())["operating_point"]
    res = runner.invoke(app, ["choose-threshold", "--eval", str(path), "--recall-target", "0.5"])
    assert res.exit_code == 0, res.output
    after = json.loads(path.read_text())["operating_point"]
    assert after["recall_target"] == 0.5 and before["recall_target"] == 0.95
    # Less recall needed -> a stricter threshold with better precision (the classes overlap).
    assert after["threshold"] > before["threshold"]
    assert after["precision"] > before["precision"]
    assert after["recall"] >= 0.5


def test_gate_without_operating_point_is_a_clear_error(tmp_path: Path) -> None:
    r = EvalReport("m.onnx", "0" * 64, "data.yaml", 256, 0.05, {}, {})
    r.save(tmp_path / "e.json")
    res = runner.invoke(app, ["gate", "--eval", str(tmp_path / "e.json")])
    assert res.exit_code == 2
    assert "choose-threshold" in res.output


def test_missing_report_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["gate", "--eval", str(tmp_path / "none.json")])
    assert res.exit_code != 0
    assert isinstance(res.exception, FileNotFoundError) or "edge model evaluate" in res.output


@pytest.mark.skipif(
    tensorrt_available(), reason="checks the error path on machines without TensorRT"
)
def test_build_engine_without_tensorrt_explains_itself(demo_package: Path, tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["build-engine", "--package", str(demo_package), "--out", str(tmp_path / "x.engine")]
    )
    assert res.exit_code == 2
    assert "tensorrt" in res.output.lower()
    assert not (tmp_path / "x.engine").exists()
