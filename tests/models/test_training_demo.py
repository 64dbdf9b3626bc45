"""The committed demo model and sample images: what the newcomer's first `edge run` relies on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from models.config import ModelSettings
from models.loader import load_detector
from models.package import load_package
from models.synth import CLASSES
from models.synth.samples import write_samples
from models.training.evaluate import image_score

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "models" / "demo" / "samples"


def test_demo_package_is_small_complete_and_gated(demo_package: Path) -> None:
    pkg = load_package(demo_package)
    m = pkg.manifest
    assert m.plc_model_id == 1
    assert tuple(m.classes) == CLASSES
    assert tuple(m.input_size) == (256, 256)
    assert pkg.model_path.stat().st_size < 5_000_000, (
        "the demo model must stay small enough to commit"
    )
    training = m.training.model_dump()
    assert training["recipe"] == "scripts/make_demo_model.sh"
    gate = training["gate"]
    assert gate["passed"] is True, gate
    crit = gate["criteria"]
    assert m.metrics.image_precision is not None and m.metrics.image_recall is not None
    assert m.metrics.image_precision >= crit["min_precision"]
    assert m.metrics.image_recall >= crit["min_recall"]
    for key in ("box_map50", "box_map50_95", "mask_map50", "mask_map50_95"):
        assert 0.0 < getattr(m.metrics, key) <= 1.0
    thr = m.thresholds
    assert set(thr.per_class) == set(CLASSES)
    assert m.runtime_hints["conf_threshold"] <= min(thr.per_class.values())


def test_samples_are_small_and_reproducible(tmp_path: Path) -> None:
    pngs = sorted(SAMPLES.glob("*.png"))
    assert len(pngs) >= 10
    assert sum(p.stat().st_size for p in pngs) < 1_500_000
    regenerated = write_samples(tmp_path, n=len(pngs))
    for ours, fresh in zip(pngs, regenerated, strict=True):
        assert ours.name == fresh.name
        a, b = (
            cv2.imread(str(ours), cv2.IMREAD_UNCHANGED),
            cv2.imread(str(fresh), cv2.IMREAD_UNCHANGED),
        )
        assert a is not None and b is not None and (a == b).all()


def test_demo_model_judges_the_bundled_samples(demo_package: Path) -> None:
    """Held-out parts (a seed never trained on) through the daemon's own runtime and thresholds."""
    pkg = load_package(demo_package)
    truth = json.loads((SAMPLES / "samples.json").read_text())["defects"]
    thr = pkg.manifest.thresholds
    det = load_detector(
        ModelSettings(
            package=demo_package,
            conf_threshold=pkg.manifest.runtime_hints["conf_threshold"],
            intra_op_threads=1,
        )
    )
    correct = 0
    try:
        for name, classes in truth.items():
            img = cv2.imread(str(SAMPLES / name), cv2.IMREAD_UNCHANGED)
            assert img is not None, name
            prep = det.preprocess(img)
            dets = det.postprocess(det.infer(prep.tensor), [prep], masks=False)[0]
            flagged = any(
                d.score >= thr.per_class.get(d.class_name, thr.default)
                and d.area_px >= thr.min_area_px.get(d.class_name, 0)
                for d in dets
            )
            score, _ = image_score(dets, thr.min_area_px)
            assert 0.0 <= score <= 1.0
            correct += flagged == bool(classes)
    finally:
        det.close()
    assert correct >= len(truth) - 1, f"{correct}/{len(truth)} samples judged right"
