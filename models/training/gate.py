"""The promotion gate: a model reaches the line only if it is good enough on held-out parts.

The gate judges image-level precision and recall on the TEST split at the threshold chosen on
VALIDATION, so the operating point is not tuned on the data that judges it. Detection metrics
(mAP) may be required too, but the line only cares about OK/DEFECT. A number that is not
measurable on the test split (too few OK or defect images) refuses, never passes by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from models.training.operating_point import MIN_DEFECT_IMAGES, MIN_OK_IMAGES, OperatingPoint


class GateCriteria(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_precision: float = Field(default=0.97, ge=0, le=1)
    min_recall: float = Field(default=0.95, ge=0, le=1)
    min_defect_images: int = Field(default=MIN_DEFECT_IMAGES, ge=1)
    """Fewer held-out defects than this and a 95 % recall is not measurable: refuse. Also the
    count below which evaluation reports recall as not measurable on any split."""
    min_ok_images: int = Field(default=MIN_OK_IMAGES, ge=1)
    """Likewise for OK images and precision (and the threshold choice refuses such a split)."""
    min_box_map50: float | None = Field(default=None, ge=0, le=1)
    min_mask_map50: float | None = Field(default=None, ge=0, le=1)


@dataclass(frozen=True, slots=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    """Why it was refused (empty when it passed)."""
    measured: dict[str, float | None] = field(default_factory=dict)
    """None: not measurable on the judged split (the reasons say why)."""
    criteria: dict[str, float | int | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def judge(
    test_point: OperatingPoint,
    criteria: GateCriteria | None = None,
    detection_metrics: dict[str, float] | None = None,
) -> GateDecision:
    """Pass or refuse, listing every failed criterion (not just the first)."""
    c = criteria or GateCriteria()
    reasons: list[str] = []
    n_def = test_point.tp + test_point.fn
    n_ok = test_point.tn + test_point.fp
    measured: dict[str, float | None] = {
        "image_precision": test_point.precision,
        "image_recall": test_point.recall,
        "threshold": test_point.threshold,
        "defect_images": float(n_def),
        "ok_images": float(n_ok),
    }
    if n_def < c.min_defect_images:
        reasons.append(
            f"only {n_def} defect images held out (need >= {c.min_defect_images}): "
            "image recall not measurable"
        )
    if n_ok < c.min_ok_images:
        reasons.append(
            f"only {n_ok} OK images held out (need >= {c.min_ok_images}): "
            "image precision not measurable"
        )
    if test_point.precision is None:
        if n_ok >= c.min_ok_images:  # measured with a stricter minimum than the gate's
            why = test_point.not_measurable.get("precision", "")
            reasons.append(f"image precision not measurable ({why})")
    elif test_point.precision < c.min_precision:
        reasons.append(
            f"image precision {test_point.precision:.4f} < {c.min_precision:.4f} "
            f"({test_point.fp} OK parts rejected)"
        )
    if test_point.recall is None:
        if n_def >= c.min_defect_images:
            why = test_point.not_measurable.get("recall", "")
            reasons.append(f"image recall not measurable ({why})")
    elif test_point.recall < c.min_recall:
        reasons.append(
            f"image recall {test_point.recall:.4f} < {c.min_recall:.4f} "
            f"({test_point.fn} defective parts passed)"
        )
    dm = detection_metrics or {}
    for key, bound in (("box_map50", c.min_box_map50), ("mask_map50", c.min_mask_map50)):
        if bound is None:
            continue
        value = dm.get(key)
        if value is None:
            reasons.append(f"{key} required (>= {bound}) but not measured")
        else:
            measured[key] = float(value)
            if value < bound:
                reasons.append(f"{key} {value:.4f} < {bound:.4f}")
    return GateDecision(not reasons, reasons, measured, c.model_dump())
