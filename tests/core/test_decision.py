"""The verdict rules (edge/decision.py): thresholds, ignored classes, areas inside the ROI."""

from __future__ import annotations

import numpy as np

from edge.decision import ClassRule, DecisionRules, DecisionSettings, Roi
from models.types import Detection
from plc.record import Verdict

CLASSES = ("crack", "stain")


def _det(score: float, box: tuple[float, float, float, float], name: str = "crack",
         mask: np.ndarray | None = None) -> Detection:
    """A detection whose mask (when given) fills only the box's left half."""
    x1, y1, x2, y2 = box
    area = int((x2 - x1) * (y2 - y1))
    if mask is None:
        return Detection(CLASSES.index(name), name, score, box, area)
    return Detection(CLASSES.index(name), name, score, box, int(mask.sum()), mask=mask,
                     mask_origin=(int(x1), int(y1)))


def _half_mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[:, : w // 2] = True
    return m


def test_scores_ignored_classes_and_the_deciding_detection() -> None:
    rules = DecisionRules(
        DecisionSettings(min_score=0.5, classes={"stain": ClassRule(ignore=True)}), CLASSES
    )
    low, high = _det(0.4, (0, 0, 10, 10)), _det(0.9, (20, 20, 30, 30))
    stain = _det(0.99, (0, 0, 50, 50), "stain")
    assert rules.decide([low], (64, 64, 3), "cam0").verdict is Verdict.OK
    d = rules.decide([stain, low, high, _det(0.6, (40, 40, 45, 45))], (64, 64, 3), "cam0")
    assert d.verdict is Verdict.DEFECT and d.deciding == high and d.reason == "defect:crack"
    assert {x.score for x in d.counted} == {0.9, 0.6}
    assert rules.lowest_score == 0.5


def test_area_inside_the_roi_comes_from_the_mask_unless_masks_are_off() -> None:
    """The mask fills the box's left half (20 x 40 px); the ROI covers only the right half. By
    the mask no defect pixel is inside, by the box overlap 800 are."""
    box = (10.0, 10.0, 50.0, 50.0)
    det = _det(0.9, box, mask=_half_mask(40, 40))
    roi = Roi(x=30, y=0, width=34, height=64)
    rules = DecisionRules(DecisionSettings(min_area_px=100, camera_roi={"cam0": roi}), CLASSES)
    assert rules.decide([det], (64, 64), "cam0").verdict is Verdict.OK
    assert rules.decide([det], (64, 64), "cam0", masks=False).verdict is Verdict.DEFECT
    # Another camera has no ROI: the whole mask area (800 px) counts.
    assert rules.decide([det], (64, 64), "cam1").verdict is Verdict.DEFECT
    # A detection without a mask is always judged by its box.
    assert rules.decide([_det(0.9, box)], (64, 64), "cam0").verdict is Verdict.DEFECT
