"""Choose the score threshold the line runs at: meet a recall target on validation, then be precise.

The line's real question is per image (part): OK or DEFECT. An image's score is the highest score
of any detection that passes the minimum-area rule; the image is DEFECT when that score reaches the
threshold. Missing a defect ships a bad part, so the recall target is a constraint and precision
(needless rejects) is what gets optimised under it.

Precision is only measurable on images that contain OK (defect-free) parts: with none, no false
positive is possible and precision reads 1.000 at every threshold. Recall likewise needs defect
images. A number computed from fewer images of its kind than the minimum is reported as ``None``
with the reason (count and split) in ``not_measurable``, never as a value, and the threshold search
refuses such a split: with nothing to penalise a low threshold it would slide down to the floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

MIN_OK_IMAGES = 20
"""OK images a split needs before image precision (and specificity, AUROC) counts as measured.

The gate's ``min_ok_images`` default: one knob says both what is measured and what may be judged.
With 20 OK parts a single false reject moves precision-side numbers by 5 points."""
MIN_DEFECT_IMAGES = 20
"""Defect images a split needs before image recall counts as measured (the gate's default): fewer
than 20 cannot tell a 95 % recall from 90 % (one missed defect is 5 points)."""

Basis = Literal["precision", "recall-only"]


class NotMeasurableError(ValueError):
    """The split lacks the OK or defect images a number (or a threshold choice) needs."""


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Image-level confusion at one threshold, with the derived rates where they are measurable."""

    threshold: float
    precision: float | None
    """None when the images hold too few OK parts (see ``not_measurable``)."""
    recall: float | None
    """None when the images hold too few defective parts."""
    tp: int
    fp: int
    fn: int
    tn: int
    recall_target: float | None = None
    met: bool = True
    """False when no threshold reaches the recall target (some defects were never detected)."""
    specificity: float | None = None
    """Share of OK parts passed (tn / OK images); None where precision is not measurable."""
    basis: Basis = "precision"
    """How the threshold was chosen: best precision at the recall target, or (an explicit fallback
    for a split without enough OK images) the highest threshold that reaches the recall target."""
    not_measurable: dict[str, str] = field(default_factory=dict)
    """metric -> why it is None, e.g. ``{"precision": "0 OK images in test (need >= 20)"}``."""

    @property
    def ok_images(self) -> int:
        return self.fp + self.tn

    @property
    def defect_images(self) -> int:
        return self.tp + self.fn

    def as_dict(self) -> dict[str, Any]:
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


def shortfall(n_ok: int, n_defect: int, min_ok: int, min_defect: int, split: str) -> dict[str, str]:
    """Which image-level numbers ``split`` cannot measure, each with its count (empty: all can)."""
    where = f" in {split}" if split else ""
    out: dict[str, str] = {}
    if n_ok < min_ok:
        why = (
            "no defect-free parts, so no false positive is possible"
            if n_ok == 0
            else "too few to estimate false rejects"
        )
        out["precision"] = f"{n_ok} OK images{where} (need >= {min_ok}): {why}"
        out["specificity"] = out["precision"]
    if n_defect < min_defect:
        why = "no defects to find" if n_defect == 0 else "too few to estimate missed defects"
        out["recall"] = f"{n_defect} defect images{where} (need >= {min_defect}): {why}"
    if out:
        out["auroc"] = "; ".join(dict.fromkeys(v for k, v in out.items() if k != "specificity"))
    return out


def confusion_at(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    min_ok_images: int = 1,
    min_defect_images: int = 1,
    split: str = "",
) -> OperatingPoint:
    """Image-level confusion counts when DEFECT means ``score >= threshold`` (threshold > 0).

    Precision/specificity are None below ``min_ok_images`` OK images, recall below
    ``min_defect_images`` defect images (the defaults only refuse zero).
    """
    s, y = _validate(scores, labels)
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]: 0 would reject every part")
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    missing = shortfall(tn + fp, tp + fn, min_ok_images, min_defect_images, split)
    precision = None if "precision" in missing else (tp / (tp + fp) if tp + fp else 1.0)
    specificity = None if "specificity" in missing else tn / (tn + fp)
    recall = None if "recall" in missing else tp / (tp + fn)
    return OperatingPoint(
        float(threshold),
        precision,
        recall,
        tp,
        fp,
        fn,
        tn,
        specificity=specificity,
        not_measurable={k: v for k, v in missing.items() if k != "auroc"},
    )


def image_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    min_ok_images: int = 1,
    min_defect_images: int = 1,
) -> float | None:
    """Threshold-free separation of defect and OK images (Mann-Whitney U, ties count half);
    None when either kind is below its minimum."""
    s, y = _validate(scores, labels)
    pos, neg = s[y], s[~y]
    if pos.size < max(min_defect_images, 1) or neg.size < max(min_ok_images, 1):
        return None
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    ties = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


def choose_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    recall_target: float = 0.95,
    *,
    floor: float = 0.0,
    min_ok_images: int = 1,
    min_defect_images: int = 1,
    allow_recall_only: bool = False,
    split: str = "",
) -> OperatingPoint:
    """The threshold with the best precision among those reaching ``recall_target``.

    Ties go to the lower threshold (more recall: the safer side). The threshold is placed midway
    between the deciding score and the next lower score, so the same decisions survive small
    numeric differences between runtimes (FP16 engines). ``floor`` is the decoder's confidence
    floor: scores below it are never seen by the line, so the threshold never goes below it.

    With fewer than ``min_ok_images`` OK images precision cannot rank thresholds (with none it is
    1.0 everywhere and the tie rule walks the threshold down to the floor), so this raises
    :class:`NotMeasurableError`, or, with ``allow_recall_only``, takes the highest threshold that
    reaches the recall target (``basis="recall-only"``). Fewer than ``min_defect_images`` defect
    images refuse likewise unless allowed (the choice is then made, its recall marked unmeasured).
    """
    s, y = _validate(scores, labels)
    if not 0 < recall_target <= 1:
        raise ValueError("recall_target must be in (0, 1]")
    where, on = (f" in {split}", f" on {split}") if split else ("", "")
    n_pos = int(y.sum())
    n_ok = int(y.size - n_pos)
    if n_pos == 0:
        raise NotMeasurableError(
            f"no defect images{where} ({n_ok} OK images): recall is undefined; "
            "choose the threshold on a split with defects"
        )
    missing = shortfall(n_ok, n_pos, min_ok_images, min_defect_images, split)
    if missing and not allow_recall_only:
        raise NotMeasurableError(
            f"cannot choose a threshold{on}: {n_ok} OK and {n_pos} defect images{where} "
            f"(need >= {min_ok_images} OK and >= {min_defect_images} defect images). "
            + (
                "Without enough defect-free parts nothing penalises a low threshold: the search "
                f"would drive it down to the floor ({floor}). "
                if "precision" in missing
                else "The recall target cannot be verified on so few defects. "
            )
            + "Choose on a split that has them, add images, or allow the recall-only fallback "
            "(--allow-recall-only: the highest threshold that reaches the recall target)."
        )
    mins = {"min_ok_images": min_ok_images, "min_defect_images": min_defect_images}
    pos_scores = np.sort(s[y])[::-1]
    detectable = pos_scores[pos_scores > max(floor, 0.0)]
    need = math.ceil(recall_target * n_pos - 1e-9)
    met = len(detectable) >= need
    basis: Basis = "recall-only" if "precision" in missing else "precision"
    if not detectable.size:
        # The model finds nothing above the floor: no threshold helps; report recall 0.
        nothing = confusion_at(s, y, 1.0, split=split, **mins)
        return _with(nothing, recall_target, False, basis)
    # Highest threshold that still reaches the target (or the most recall we can get).
    limit = float(detectable[need - 1] if met else detectable[-1])
    chosen = limit if basis == "recall-only" else _best_precision(s, y, floor, limit)
    below = s[s < chosen]
    lower = max(float(below.max()) if below.size else 0.0, floor)
    thr = (chosen + lower) / 2 if lower < chosen else chosen
    return _with(confusion_at(s, y, thr, split=split, **mins), recall_target, met, basis)


def _best_precision(s: np.ndarray, y: np.ndarray, floor: float, limit: float) -> float:
    """Among scores in (floor, limit] (all reach the recall target, or the most recall there
    is): the best precision, ties to more recall. Counts only: the caller made sure both kinds
    of image are there."""
    best: tuple[float, int, float] | None = None  # precision, tp, threshold
    for c in np.unique(s[(s > max(floor, 0.0)) & (s <= limit)])[::-1]:
        pred = s >= c
        tp = int(np.sum(pred & y))
        fp = int(np.sum(pred & ~y))
        p = tp / (tp + fp) if tp + fp else 1.0
        if best is None or p > best[0] + 1e-12 or (abs(p - best[0]) <= 1e-12 and tp > best[1]):
            best = (p, tp, float(c))
    assert best is not None  # limit itself is a candidate
    return best[2]


def _with(op: OperatingPoint, target: float, met: bool, basis: Basis) -> OperatingPoint:
    return OperatingPoint(
        op.threshold,
        op.precision,
        op.recall,
        op.tp,
        op.fp,
        op.fn,
        op.tn,
        target,
        met,
        op.specificity,
        basis,
        dict(op.not_measurable),
    )


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> list[OperatingPoint]:
    """Image-level precision/recall at every distinct positive score, high to low."""
    s, y = _validate(scores, labels)
    return [confusion_at(s, y, float(t)) for t in np.unique(s[s > 0])[::-1]]
