"""Turn an evaluated ONNX file into a model package, refusing models that failed the gate.

The evaluation report is bound to the exact model bytes (sha256): metrics and thresholds of one
model can never be packaged with another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.package import sha256_file, write_package
from models.training.evaluate import EvalReport, onnx_input_hw


class PromotionRefused(Exception):
    """The model did not pass the promotion gate (or was never judged)."""


def manifest_metrics(report: EvalReport, split: str = "test") -> dict[str, float]:
    out: dict[str, float] = {}
    det = report.detection.get(split, {})
    for k in ("box_map50", "box_map50_95", "mask_map50", "mask_map50_95"):
        if k in det:
            out[k] = round(float(det[k]), 4)
    for k, v in det.items():
        if k not in out:
            out[k] = round(float(v), 4)
    if report.test_point:
        out["image_precision"] = round(float(report.test_point["precision"]), 4)
        out["image_recall"] = round(float(report.test_point["recall"]), 4)
    if report.operating_point:
        out["val_image_precision"] = round(float(report.operating_point["precision"]), 4)
        out["val_image_recall"] = round(float(report.operating_point["recall"]), 4)
    return out


def package_model(
    model: Path,
    out: Path,
    *,
    report: EvalReport | None,
    name: str,
    version: str,
    plc_model_id: int,
    classes: list[str],
    training: Mapping[str, Any] | None = None,
    require_gate: bool = True,
    overwrite: bool = False,
    iou_threshold: float = 0.7,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write the package; raises PromotionRefused when the gate did not pass (unless waived)."""
    if report is not None and report.model_sha256 != sha256_file(model):
        raise PromotionRefused(
            f"the evaluation report is for another model (sha256 "
            f"{report.model_sha256[:12]}), not {model}; evaluate this file"
        )
    gate = report.gate if report else None
    if require_gate:
        if gate is None:
            raise PromotionRefused(
                "no gate decision: run `edge model evaluate` (it chooses the "
                "threshold and gates) or pass --no-gate for an experimental package"
            )
        if not gate["passed"]:
            raise PromotionRefused(
                "promotion gate refused the model: " + "; ".join(gate["reasons"])
            )
    thr = float(report.operating_point["threshold"]) if report and report.operating_point else 0.25
    thresholds = {
        "default": round(thr, 4),
        "per_class": {c: round(thr, 4) for c in classes},
        "min_area_px": dict(report.min_area_px) if report else {},
    }
    train_doc: dict[str, Any] = dict(training or {})
    train_doc["gate"] = (
        "skipped"
        if gate is None
        else {"passed": gate["passed"], "reasons": gate["reasons"], "criteria": gate["criteria"]}
    )
    if report and report.operating_point:
        train_doc["operating_point"] = report.operating_point
    h, w = onnx_input_hw(model)
    hints: dict[str, Any] = {
        "conf_threshold": report.floor if report else 0.25,
        "iou_threshold": iou_threshold,
        "decision": "image is DEFECT when any "
        "detection has score >= per_class threshold and area_px >= min_area_px",
    }
    return write_package(
        out,
        model,
        overwrite=overwrite,
        extra_files=dict(extra_files or {}),
        name=name,
        version=version,
        plc_model_id=plc_model_id,
        classes=classes,
        input_size=[h, w],
        training=train_doc,
        metrics=manifest_metrics(report) if report else {},
        thresholds=thresholds,
        runtime_hints=hints,
    )
