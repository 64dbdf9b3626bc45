"""`edge model` package/sign/verify/import/list, run as a user runs them (a subprocess of the
real CLI), including the issue-12 acceptance packaging command, offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.config import ModelSettings
from models.loader import load_detector
from models.package import SEAL_NAME, load_package
from models.training.valstats import STATS_FILE

REPO = Path(__file__).resolve().parents[2]
EDGE = [sys.executable, "-m", "edge"]
SAMPLES = REPO / "models" / "demo" / "samples"


def edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def data_yaml(tmp_path: Path) -> Path:
    """A YOLO data.yaml with the 4 demo classes and the demo samples as validation images."""
    root = tmp_path / "data"
    (root / "images" / "val").mkdir(parents=True)
    for p in sorted(SAMPLES.glob("*.png")):
        shutil.copyfile(p, root / "images" / "val" / p.name)
    y = root / "data.yaml"
    y.write_text(
        "path: .\ntrain: images/train\nval: images/val\n"
        "names:\n  0: scratch\n  1: pit\n  2: crack\n  3: stain\n"
    )
    return y


def test_issue12_acceptance_package_command(
    data_yaml: Path, tmp_path: Path, demo_package: Path
) -> None:
    out = tmp_path / "synth-demo-1.0.1"
    r = edge(
        "model", "package",
        "--model", "models/demo/package/model.onnx",
        "--name", "synth-demo", "--version", "1.0.1", "--plc-model-id", "2",
        "--data", str(data_yaml), "--no-gate", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pkg = load_package(out)
    demo = load_package(demo_package)
    assert pkg.ref == "synth-demo:1.0.1" and pkg.manifest.plc_model_id == 2
    assert pkg.model_sha256 == demo.model_sha256 and pkg.digest != demo.digest
    # Same bytes as 1.0.0: same operating point, so both versions decide every part alike.
    assert pkg.manifest.thresholds == demo.manifest.thresholds
    assert pkg.manifest.training.model_dump()["repackaged_from"]["digest"] == demo.digest
    assert pkg.digest in r.stderr
    assert set(pkg.manifest.files) == {"model.onnx", STATS_FILE}

    stats = json.loads(pkg.file(STATS_FILE).read_text())
    images = sorted(SAMPLES.glob("*.png"))
    assert stats["images"] == len(images)
    # The recorded defect rate is what the package's own runtime decides on those images.
    det = load_detector(ModelSettings(package=out, warmup_runs=0, conf_threshold=0.05))
    thr = pkg.info("onnxruntime").thresholds
    decided = []
    for p in images:
        dets = det.detect(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), masks=False)  # type: ignore[attr-defined]
        decided.append(any(d.score >= thr[d.class_name] for d in dets))
    det.close()
    assert stats["defect_images"] == sum(decided)
    assert stats["detections_per_image"]["n"] == len(images)
    for cls, h in stats["score_histograms"].items():
        assert cls in pkg.manifest.classes and len(h["counts"]) == len(h["edges"]) - 1
    assert sum(h["n"] for h in stats["score_histograms"].values()) == round(
        stats["detections_per_image"]["mean"] * len(images)
    )
    # Mean brightness agrees with a full-resolution mean (an area downscale keeps the mean).
    full = np.mean([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).mean() for p in images])
    assert abs(stats["image_stats"]["brightness"]["mean"] - full) < 1.0
    for h in stats["image_stats"].values():
        assert h["n"] == len(images)


def test_package_with_a_names_only_data_yaml_records_no_baseline(tmp_path: Path) -> None:
    y = tmp_path / "names.yaml"
    y.write_text("names: [scratch, pit, crack, stain]\n")
    out = tmp_path / "pkg"
    r = edge(
        "model", "package", "--model", "models/demo/package/model.onnx", "--name", "x",
        "--version", "1", "--plc-model-id", "3", "--data", str(y), "--no-gate", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no drift baseline" in r.stderr
    assert set(load_package(out).manifest.files) == {"model.onnx"}


def test_package_refuses_a_bare_model_without_gate_and_wrong_classes(
    tmp_path: Path, data_yaml: Path
) -> None:
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(REPO / "models/demo/package/model.onnx", bare)
    r = edge(
        "model", "package", "--model", str(bare), "--name", "x", "--version", "1",
        "--plc-model-id", "3", "--data", str(data_yaml), "--out", str(tmp_path / "p"),
    )  # fmt: skip
    assert r.returncode == 1 and "no gate decision" in r.stderr
    y = tmp_path / "five.yaml"
    y.write_text("names: [a, b, c, d, e]\n")
    r = edge(
        "model", "package", "--model", str(bare), "--name", "x", "--version", "1",
        "--plc-model-id", "3", "--data", str(y), "--no-gate", "--out", str(tmp_path / "q"),
    )  # fmt: skip
    assert r.returncode == 2 and "predicts 4" in r.stderr
    assert not (tmp_path / "q" / SEAL_NAME).exists()


def test_keygen_sign_verify_import_list(tmp_path: Path, data_yaml: Path) -> None:
    keys = tmp_path / "keys"
    r = edge("model", "keygen", "--out", str(keys), "--name", "release")
    assert r.returncode == 0, r.stderr
    priv, pub = keys / "release.key", keys / "release.pub"
    out = tmp_path / "pkg"
    r = edge(
        "model", "package", "--model", "models/demo/package/model.onnx", "--name", "synth-demo",
        "--version", "1.0.1", "--plc-model-id", "2", "--data", str(data_yaml), "--no-gate",
        "--out", str(out), "--sign", str(priv), "--stats-max", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    v = edge("model", "verify", str(out), "--trusted-key", str(pub), "--json")
    assert v.returncode == 0, v.stderr
    doc = json.loads(v.stdout)
    assert doc["ok"] and doc["ref"] == "synth-demo:1.0.1" and doc["signature_required"]
    assert doc["signed_by"] == list(load_package(out).signed_by)

    # A line config that trusts the key: unsigned packages are refused on import.
    config = tmp_path / "line.yaml"
    text = (REPO / "configs" / "demo.yaml").read_text()
    text = text.replace("../models/demo/samples", str(SAMPLES))
    text = text.replace("../models/demo/package", str(REPO / "models/demo/package"))
    text = text.replace("../var/demo/uplink", str(tmp_path / "var" / "uplink"))
    text = text.replace("  warmup_runs: 3\n", f"  warmup_runs: 3\n  trusted_keys: [{pub}]\n", 1)
    config.write_text(text)
    r = edge("model", "import", "models/demo/package", "--config", str(config))
    assert r.returncode == 2 and "refused" in r.stderr and "not signed" in r.stderr
    r = edge("model", "import", str(out), "--config", str(config))
    assert r.returncode == 0, r.stderr
    store = tmp_path / "var" / "models"  # the default: next to the spool
    assert (store / "synth-demo" / "1.0.1" / SEAL_NAME).is_file()
    (store / "state.json").write_text(json.dumps({"active": "synth-demo:1.0.1"}))
    lst = edge("model", "list", "--config", str(config), "--json")
    assert lst.returncode == 0, lst.stderr
    listed = json.loads(lst.stdout)
    assert listed["state"]["active"] == "synth-demo:1.0.1"
    [entry] = listed["packages"]
    assert entry["ref"] == "synth-demo:1.0.1" and entry["roles"] == ["active"]
    assert entry["digest"] == load_package(out).digest
    table = edge("model", "list", "--store", str(store))
    assert "synth-demo:1.0.1" in table.stdout and "active" in table.stdout


def test_verify_and_import_name_the_problem(package_copy: Path, tmp_path: Path) -> None:
    doc = json.loads((package_copy / "manifest.json").read_text())
    doc["thresholds"]["default"] = 0.99
    (package_copy / "manifest.json").write_text(json.dumps(doc))
    v = edge("model", "verify", str(package_copy))
    assert v.returncode == 2 and "changed after the package was sealed" in v.stderr
    r = edge("model", "import", str(package_copy), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "refused" in r.stderr
    assert "neither" not in r.stderr and not (tmp_path / "s" / "synth-demo").exists()
    r = edge("model", "list")
    assert r.returncode == 2 and "--store" in r.stderr


def test_repackage_command_seals_an_old_package(package_copy: Path) -> None:
    digest = load_package(package_copy).digest
    (package_copy / SEAL_NAME).unlink()
    r = edge("model", "verify", str(package_copy))
    assert r.returncode == 2 and "edge model repackage" in r.stderr
    r = edge("model", "repackage", str(package_copy))
    assert r.returncode == 0, r.stderr
    assert load_package(package_copy).digest == digest
