"""`edge model quantize`: static INT8 that must decide like FP32 on a hold-out, or is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.package import load_package
from models.quantize import QuantizationRefused, float_tail, quantize_package
from models.training.valstats import STATS_FILE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(calibration image folder, hold-out data.yaml) from the demo model's own generator,
    with other seeds than its training data."""
    from models.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("quant")
    cfg = SynthConfig(width=256, height=256)
    calib = write_dataset(root / "calib", 24, seed=501, cfg=cfg, fractions=(0, 0, 1))
    hold = write_dataset(root / "hold", 60, seed=502, cfg=cfg, fractions=(0, 0, 1))
    return Path(calib).parent / "images" / "test", Path(hold)


def test_quantize_command_writes_an_int8_package_that_decides_like_fp32(
    synth: tuple[Path, Path], tmp_path: Path, demo_package: Path
) -> None:
    calib, hold = synth
    out = tmp_path / "int8"
    r = subprocess.run(
        [sys.executable, "-m", "edge", "model", "quantize", str(demo_package),
         "--calibration", str(calib), "--holdout", str(hold), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pkg = load_package(out)
    fp32 = load_package(demo_package)
    assert pkg.ref == "synth-demo:1.0.0+int8" and pkg.manifest.plc_model_id == 1
    assert pkg.manifest.thresholds == fp32.manifest.thresholds
    q = pkg.manifest.training.model_dump()["quantization"]
    assert q["from"]["digest"] == fp32.digest
    assert q["holdout_images"] == 60 and q["decision_agreement"] >= 0.98
    assert q["int8_session_run_ms_p50"] > 0 and q["fp32_session_run_ms_p50"] > 0
    ops = {n.op_type for n in onnx.load(str(pkg.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    stats = __import__("json").loads(pkg.file(STATS_FILE).read_text())
    assert stats["images"] == 60
    assert "agree with FP32" in r.stderr


def test_unrepresentative_calibration_is_refused_and_writes_nothing(
    synth: tuple[Path, Path], tmp_path: Path, demo_package: Path
) -> None:
    """Calibrated on black frames, the activation ranges are wrong: decisions flip."""
    import cv2

    _, hold = synth
    black = tmp_path / "black"
    black.mkdir()
    for i in range(4):
        cv2.imwrite(str(black / f"{i}.png"), np.zeros((256, 256), np.uint8))
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRefused, match=r"agree with FP32 on .* below the required"):
        quantize_package(demo_package, black, hold, out, min_agreement=0.98)
    assert not out.exists()


def test_head_tail_and_dfl_stay_in_float(demo_package: Path) -> None:
    keep = float_tail(load_package(demo_package).model_path)
    assert any("/dfl/" in n for n in keep)
    assert any(n.endswith("Concat_4") or "Concat" in n for n in keep)
    model = onnx.load(str(load_package(demo_package).model_path))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert len(set(convs) - set(keep)) >= len(convs) - 1  # only the DFL conv is kept


def test_bad_inputs_are_clear_errors(demo_package: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        quantize_package(demo_package, tmp_path / "empty", tmp_path, tmp_path / "o")
    with pytest.raises(ValueError, match="min_agreement"):
        quantize_package(demo_package, tmp_path, tmp_path, tmp_path / "o", min_agreement=1.5)


def test_compare_command_checks_a_candidate_before_deployment(
    synth: tuple[Path, Path], tmp_path: Path, demo_package: Path
) -> None:
    """OpenVINO bf16 (where the CPU has it) against ONNX Runtime f32, same package: the decision
    check that must pass before a line switches precision; JSON on stdout, logs on stderr."""
    import json

    _, hold = synth
    r = subprocess.run(
        [sys.executable, "-m", "edge", "model", "compare", str(demo_package),
         "--holdout", str(hold), "--runtime", "openvino", "--precision", "bf16", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["images"] == 60 and doc["agreement"] >= 0.98
    assert doc["candidate"].endswith("on openvino (bf16)")
    assert doc["reference_infer_ms_p50"] > 0 and doc["candidate_infer_ms_p50"] > 0
    r = subprocess.run(
        [sys.executable, "-m", "edge", "model", "compare", str(demo_package),
         "--holdout", str(hold), "--runtime", "tflite"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "choose onnxruntime or openvino" in r.stderr
