"""Choose the score threshold the line runs at: meet a recall target on validation, then be precise.

The line's real question is per image (part): OK or DEFECT. An image's score is the highest score
of any detection that passes the minimum-area rule; the image is DEFECT when that score reaches the
threshold. Missing a defect ships a bad part, so the recall target is a constraint and precision
(needless rejects) is what gets optimised under it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    threshold: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    tn: int
    recall_target: float | None = None
    met: bool = True
    """False when no threshold reaches the recall target (some defects were never detected)."""

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def _validate(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if s.size == 0:
        raise ValueError("no images to choose a threshold on")
    if not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1:
        raise ValueError("scores must be finite and within 0..1 (0 = no detection)")
    return s, y


def confusion_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> OperatingPoint:
    """Image-level confusion counts when DEFECT means ``score >= threshold`` (threshold > 0)."""
    s, y = _validate(scores, labels)
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]: 0 would reject every part")
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return OperatingPoint(float(threshold), precision, recall, tp, fp, fn, tn)


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, recall_target: float = 0.95, *, floor: float = 0.0
) -> OperatingPoint:
    """The threshold with the best precision among those reaching ``recall_target``.

    Ties go to the lower threshold (more recall: the safer side). The threshold is placed midway
    between the deciding score and the next lower score, so the same decisions survive small
    numeric differences between runtimes (FP16 engines). ``floor`` is the decoder's confidence
    floor: scores below it are never seen by the line, so the threshold never goes below it.
    """
    s, y = _validate(scores, labels)
    if not 0 < recall_target <= 1:
        raise ValueError("recall_target must be in (0, 1]")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("no defect images: recall is undefined; evaluate on a split with defects")
    pos_scores = np.sort(s[y])[::-1]
    detectable = pos_scores[pos_scores > max(floor, 0.0)]
    need = math.ceil(recall_target * n_pos - 1e-9)
    met = len(detectable) >= need
    if not detectable.size:
        # The model finds nothing above the floor: no threshold helps; report recall 0.
        nothing = confusion_at(s, y, 1.0)
        return OperatingPoint(
            1.0,
            nothing.precision,
            nothing.recall,
            nothing.tp,
            nothing.fp,
            nothing.fn,
            nothing.tn,
            recall_target,
            False,
        )
    # Highest threshold that still reaches the target (or the most recall we can get).
    limit = detectable[need - 1] if met else detectable[-1]
    candidates = np.unique(s[(s > max(floor, 0.0)) & (s <= limit)])[::-1]
    best: OperatingPoint | None = None
    for c in candidates:
        op = confusion_at(s, y, float(c))
        if op.recall + 1e-12 < (recall_target if met else op.recall):
            continue
        if (
            best is None
            or op.precision > best.precision + 1e-12
            or (abs(op.precision - best.precision) <= 1e-12 and op.recall > best.recall)
        ):
            best = op
    assert best is not None
    below = s[s < best.threshold]
    lower = max(float(below.max()) if below.size else 0.0, floor)
    thr = (best.threshold + lower) / 2 if lower < best.threshold else best.threshold
    final = confusion_at(s, y, thr)
    return OperatingPoint(
        final.threshold,
        final.precision,
        final.recall,
        final.tp,
        final.fp,
        final.fn,
        final.tn,
        recall_target,
        met,
    )


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> list[OperatingPoint]:
    """Image-level precision/recall at every distinct positive score, high to low."""
    s, y = _validate(scores, labels)
    return [confusion_at(s, y, float(t)) for t in np.unique(s[s > 0])[::-1]]
