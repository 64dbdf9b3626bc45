"""From detections to a verdict: per-class score and minimum-area rules inside a region of interest.

The rules are deliberately simple and fully explicit in the line's YAML, because a plant's quality
engineer must be able to read why a part was rejected. Thresholds not set in the YAML fall back to
the operating point shipped in the model package (chosen on validation data for a recall target).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.types import Detection
from plc.record import Verdict


class Roi(BaseModel):
    """Rectangle in original-image pixels; only defect pixels inside it count."""

    model_config = ConfigDict(extra="forbid")
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class ClassRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    """None: the model package's per-class threshold (or its default)."""
    min_area_px: int = Field(default=0, ge=0)
    ignore: bool = False
    """True: this class never makes a part DEFECT (e.g. a cosmetic class on a hidden face)."""


class DecisionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    """Default score threshold for classes without a rule; None: the package's default."""
    min_area_px: int = Field(default=0, ge=0)
    classes: dict[str, ClassRule] = Field(default_factory=dict)
    roi: Roi | None = None
    """Default region of interest for all cameras; None = the whole image."""
    camera_roi: dict[str, Roi] = Field(default_factory=dict)
    """Per-camera override of ``roi``, keyed by camera id (written by ``edge calibrate``)."""

    @model_validator(mode="after")
    def _no_empty_rules(self) -> DecisionSettings:
        for name, rule in self.classes.items():
            if not name.strip():
                raise ValueError("decision.classes has an empty class name")
            if rule.ignore and (rule.min_score is not None or rule.min_area_px):
                raise ValueError(
                    f"decision.classes.{name}: 'ignore' excludes min_score/min_area_px"
                )
        return self


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    """OK or DEFECT (fail-safes are decided by the pipeline, not here)."""
    reason: str
    deciding: Detection | None
    """The highest-scoring detection that made the part DEFECT."""
    counted: tuple[Detection, ...]
    """Every detection that passed the rules (reported in the event)."""


class DecisionRules:
    """Thresholds resolved once (settings over the package's operating point), not per frame."""

    def __init__(
        self,
        settings: DecisionSettings,
        classes: Sequence[str],
        package_thresholds: Mapping[str, float] | None = None,
        package_default: float = 0.25,
        package_min_area: Mapping[str, int] | None = None,
    ) -> None:
        unknown = sorted(set(settings.classes) - set(classes))
        if unknown:
            raise ValueError(
                f"decision.classes names {unknown}, which the model does not have; "
                f"model classes: {list(classes)}"
            )
        self.settings = settings
        pkg = dict(package_thresholds or {})
        areas = dict(package_min_area or {})
        default_score = settings.min_score if settings.min_score is not None else package_default
        self.min_score: dict[str, float] = {}
        self.min_area: dict[str, int] = {}
        self.ignored: set[str] = set()
        for name in classes:
            rule = settings.classes.get(name, ClassRule())
            if rule.ignore:
                self.ignored.add(name)
            if rule.min_score is not None:
                self.min_score[name] = rule.min_score
            elif settings.min_score is not None:
                self.min_score[name] = settings.min_score
            else:
                self.min_score[name] = pkg.get(name, default_score)
            self.min_area[name] = rule.min_area_px or areas.get(name, settings.min_area_px)

    @property
    def lowest_score(self) -> float:
        """The lowest threshold any class is judged by (the decode floor for the runtime)."""
        scores = [s for name, s in self.min_score.items() if name not in self.ignored]
        return min(scores, default=1.0)

    def roi_for(self, camera_id: str) -> Roi | None:
        return self.settings.camera_roi.get(camera_id, self.settings.roi)

    def decide(
        self,
        detections: Sequence[Detection],
        image_shape: tuple[int, ...],
        camera_id: str,
        *,
        masks: bool = True,
    ) -> Decision:
        """``masks`` False: the area inside the ROI is the box overlap even where a detection
        carries a mask (`PipelineSettings.masks`)."""
        roi = self.roi_for(camera_id)
        counted: list[Detection] = []
        for det in detections:
            name = det.class_name
            if name in self.ignored or det.score < self.min_score.get(name, 1.1):
                continue
            area = det.area_px if roi is None else _area_in_roi(det, roi, image_shape, masks)
            if area < max(self.min_area.get(name, 0), 1):
                continue
            counted.append(det)
        if not counted:
            return Decision(Verdict.OK, "no_defect", None, ())
        best = max(counted, key=lambda d: d.score)
        return Decision(Verdict.DEFECT, f"defect:{best.class_name}", best, tuple(counted))


def _area_in_roi(det: Detection, roi: Roi, image_shape: tuple[int, ...], masks: bool) -> int:
    """Defect pixels inside the ROI: the mask when present (and ``masks``), else the box
    overlap."""
    h, w = int(image_shape[0]), int(image_shape[1])
    x0, y0 = min(roi.x, w), min(roi.y, h)
    x1, y1 = min(roi.x + roi.width, w), min(roi.y + roi.height, h)
    if x1 <= x0 or y1 <= y0:
        return 0
    if masks and det.mask is not None:
        mx, my = det.mask_origin
        return int(np.count_nonzero(det.mask[max(0, y0 - my) : y1 - my, max(0, x0 - mx) : x1 - mx]))
    bx0, by0, bx1, by1 = det.box
    ix = max(0.0, min(bx1, x1) - max(bx0, x0))
    iy = max(0.0, min(by1, y1) - max(by0, y0))
    return int(ix * iy)
