"""Turn an evaluated ONNX file into a model package, refusing models that failed the gate.

The evaluation report is bound to the exact model bytes (sha256): metrics and thresholds of one
model can never be packaged with another. For the same reason, re-packaging a model that already
sits in a verified package (same bytes) under a new name/version inherits that package's operating
point, metrics and gate decision instead of falling back to a default threshold: the new package
then decides exactly like the old one (what a shadow run of the two must show).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.package import MANIFEST_NAME, ModelPackage, load_package, sha256_file, write_package
from models.training.evaluate import EvalReport, onnx_input_hw
from models.training.valstats import STATS_FILE, compute_validation_stats, write_stats
from models.types import ModelPackageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


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
    # Recomputed at the chosen threshold with the report's minimums, and a number the split
    # cannot measure (too few OK or defect images) is left out: the manifest never shows an
    # artefact such as precision 1.0 on a set without OK parts (older reports stored those).
    for prefix, doc in (("", report.test_point), ("val_", report.operating_point)):
        where = str((doc or {}).get("split", ""))
        point = report.image_point(where) if doc and where in report.images else None
        if point is None:
            continue
        for k, measured in (("precision", point.precision), ("recall", point.recall)):
            if measured is not None:
                out[f"{prefix}image_{k}"] = round(measured, 4)
    return out


def package_of(model: Path) -> ModelPackage | None:
    """The verified package ``model`` belongs to (its folder's manifest lists these exact bytes),
    or None when it is a bare file or its folder is not a valid package."""
    folder = model.resolve().parent
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        pkg = load_package(folder, check_model=False)
    except ModelPackageError:
        return None
    return pkg if pkg.model_path == model.resolve() else None


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
    inherit: ModelPackage | None = None,
    stats_images: Sequence[Path] = (),
    stats_source: str = "",
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the package; raises PromotionRefused when the gate did not pass (unless waived).

    ``inherit``: a verified package holding the same model bytes; without a report, its
    thresholds, runtime hints, metrics and gate decision are carried over. ``stats_images``:
    validation images to record the drift baseline from (``validation_stats.json``).
    """
    if report is not None and report.model_sha256 != sha256_file(model):
        raise PromotionRefused(
            f"the evaluation report is for another model (sha256 "
            f"{report.model_sha256[:12]}), not {model}; evaluate this file"
        )
    if inherit is not None and inherit.model_sha256 != sha256_file(model):
        raise PromotionRefused(f"{inherit.ref} holds other model bytes than {model}")
    if report is None and inherit is not None:
        return _package_inherited(
            model,
            out,
            inherit,
            name=name,
            version=version,
            plc_model_id=plc_model_id,
            classes=classes,
            training=training,
            require_gate=require_gate,
            overwrite=overwrite,
            extra_files=extra_files,
            stats_images=stats_images,
            stats_source=stats_source,
            sign_with=sign_with,
            progress=progress,
        )
    gate = report.gate if report else None
    if require_gate:
        _require(gate)
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
    hints: dict[str, Any] = {
        "conf_threshold": report.floor if report else 0.25,
        "iou_threshold": iou_threshold,
        "decision": "image is DEFECT when any "
        "detection has score >= per_class threshold and area_px >= min_area_px",
    }
    return _write(
        model,
        out,
        overwrite=overwrite,
        extra_files=extra_files,
        stats_images=stats_images,
        stats_source=stats_source,
        sign_with=sign_with,
        progress=progress,
        name=name,
        version=version,
        plc_model_id=plc_model_id,
        classes=classes,
        training=train_doc,
        metrics=manifest_metrics(report) if report else {},
        thresholds=thresholds,
        runtime_hints=hints,
    )


def _require(gate: Mapping[str, Any] | None) -> None:
    if gate is None:
        raise PromotionRefused(
            "no gate decision: run `edge model evaluate` (it chooses the "
            "threshold and gates) or pass --no-gate for an experimental package"
        )
    if not gate["passed"]:
        raise PromotionRefused("promotion gate refused the model: " + "; ".join(gate["reasons"]))


def _package_inherited(
    model: Path,
    out: Path,
    src: ModelPackage,
    *,
    classes: list[str],
    training: Mapping[str, Any] | None,
    require_gate: bool,
    **kw: Any,
) -> Path:
    m = src.manifest
    if list(classes) != list(m.classes):
        raise PromotionRefused(
            f"classes {classes} differ from {src.ref}'s {m.classes}; the inherited thresholds "
            "would not fit - evaluate the model with these classes (--eval)"
        )
    old = m.training.model_dump(mode="json")
    gate = old.get("gate")
    if require_gate:
        _require(gate if isinstance(gate, dict) else None)
    train_doc = {**old, **dict(training or {})}
    train_doc["repackaged_from"] = {"ref": src.ref, "digest": src.digest}
    return _write(
        model,
        out,
        classes=classes,
        training=train_doc,
        thresholds=m.thresholds.model_dump(mode="json"),
        runtime_hints=dict(m.runtime_hints),
        metrics=m.metrics.model_dump(mode="json", exclude_none=True),
        **kw,
    )


def _write(
    model: Path,
    out: Path,
    *,
    overwrite: bool,
    extra_files: Mapping[str, Path] | None,
    stats_images: Sequence[Path],
    stats_source: str,
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None,
    progress: Callable[[int], None] | None,
    **fields: Any,
) -> Path:
    h, w = onnx_input_hw(model)
    fields["input_size"] = [h, w]
    extras = dict(extra_files or {})
    with tempfile.TemporaryDirectory(prefix="edge-package-") as tmp:
        if stats_images:
            # The stats come from the package's own runtime, so build it once without them.
            provisional = write_package(Path(tmp) / "pkg", model, extra_files=extras, **fields)
            doc = compute_validation_stats(
                provisional, stats_images, source=stats_source, progress=progress
            )
            extras[STATS_FILE] = write_stats(Path(tmp) / STATS_FILE, doc)
        return write_package(
            out, model, overwrite=overwrite, extra_files=extras, sign_with=sign_with, **fields
        )
