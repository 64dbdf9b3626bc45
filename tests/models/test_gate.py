"""Operating-point chooser and promotion gate on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.gate import GateCriteria, judge
from models.training.operating_point import OperatingPoint, choose_threshold, confusion_at, pr_curve

# Ten images; defects at the scores marked 1. Worked by hand:
#   positives 0.9 0.8 0.6 0.5 0.3 (5), negatives 0.7 0.4 0.2 0.1 0.0 (5)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
LABELS = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0], bool)


def test_confusion_counts() -> None:
    op = confusion_at(SCORES, LABELS, 0.5)
    assert (op.tp, op.fp, op.fn, op.tn) == (4, 1, 1, 4)
    assert op.precision == pytest.approx(0.8) and op.recall == pytest.approx(0.8)


def test_recall_target_is_met_with_the_best_precision() -> None:
    # Recall >= 0.8 needs 4 of 5 defects: thresholds <= 0.5 qualify; 0.5 has the best precision
    # (4/5); the threshold lands midway to the next lower score (0.4) for numeric slack.
    op = choose_threshold(SCORES, LABELS, 0.8)
    assert op.met
    assert op.threshold == pytest.approx(0.45)
    assert (op.tp, op.fp, op.fn, op.tn) == (4, 1, 1, 4)
    assert op.recall >= 0.8


def test_full_recall_target() -> None:
    # All 5 defects: threshold <= 0.3; at 0.3: tp 5, fp 2 (0.7, 0.4) -> precision 5/7.
    op = choose_threshold(SCORES, LABELS, 1.0)
    assert op.threshold == pytest.approx(0.25)
    assert op.recall == 1.0 and op.precision == pytest.approx(5 / 7)


def test_lower_threshold_preferred_when_precision_ties() -> None:
    s = np.array([0.9, 0.8, 0.1])
    y = np.array([True, True, False])
    op = choose_threshold(s, y, 0.5)
    assert op.recall == 1.0 and op.precision == 1.0
    assert 0.1 < op.threshold <= 0.8


def test_higher_precision_below_the_recall_limit_wins() -> None:
    # Target 0.25 of 4 defects: 0.95 alone reaches it (precision 1). Nothing lower beats 1.0.
    s = np.array([0.95, 0.9, 0.6, 0.55, 0.5])
    y = np.array([True, False, True, True, True])
    op = choose_threshold(s, y, 0.25)
    assert op.precision == 1.0 and op.tp == 1
    # Target 0.5 (2 defects): candidates <= 0.6: 0.6 -> 2/3, 0.55 -> 3/4, 0.5 -> 4/5: best is 0.5.
    op2 = choose_threshold(s, y, 0.5)
    assert op2.tp == 4 and op2.fp == 1 and op2.precision == pytest.approx(0.8)


def test_unreachable_recall_reports_not_met() -> None:
    s = np.array([0.9, 0.0, 0.0, 0.3])
    y = np.array([True, True, True, False])
    op = choose_threshold(s, y, 0.95)
    assert not op.met
    assert op.recall == pytest.approx(1 / 3)


def test_model_that_finds_nothing_gets_recall_zero_not_an_error() -> None:
    op = choose_threshold(
        np.array([0.01, 0.0, 0.02]), np.array([True, True, False]), 0.9, floor=0.05
    )
    assert not op.met and op.recall == 0.0 and op.tp == 0


def test_floor_bounds_the_threshold() -> None:
    s = np.array([0.9, 0.3, 0.2])
    y = np.array([True, True, False])
    op = choose_threshold(s, y, 1.0, floor=0.25)
    assert op.threshold >= 0.25 and op.fp == 0 and op.recall == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.5, 0.2], [False, False], "no defect images"),
        ([1.5], [True], "within 0..1"),
        ([0.5, 0.2], [True], "2 scores but 1 labels"),
    ],
)
def test_bad_inputs_are_refused(scores: list[float], labels: list[bool], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_threshold(np.array(scores), np.array(labels), 0.9)


def test_pr_curve_is_monotone_in_recall() -> None:
    curve = pr_curve(SCORES, LABELS)
    recalls = [p.recall for p in curve]
    assert recalls == sorted(recalls)
    assert curve[-1].recall == 1.0


def _point(tp: int, fp: int, fn: int, tn: int) -> OperatingPoint:
    return confusion_at(
        np.array([0.9] * tp + [0.9] * fp + [0.1] * fn + [0.1] * tn),
        np.array([True] * tp + [False] * fp + [True] * fn + [False] * tn),
        0.5,
    )


def test_gate_passes_a_good_model() -> None:
    d = judge(_point(tp=96, fp=2, fn=4, tn=98))
    assert d.passed and d.reasons == []
    assert d.measured["image_precision"] == pytest.approx(96 / 98)


@pytest.mark.parametrize(
    ("point", "needle"),
    [
        ((90, 2, 10, 98), "recall"),  # 0.90 recall
        ((97, 10, 3, 90), "precision"),  # 0.907 precision
        ((10, 0, 0, 100), "defect images"),  # too few held-out defects to measure 95 %
        ((100, 0, 0, 5), "OK images"),
    ],
)
def test_gate_refuses_weak_or_unmeasurable(point: tuple[int, int, int, int], needle: str) -> None:
    d = judge(_point(*point))
    assert not d.passed
    assert any(needle in r for r in d.reasons), d.reasons


def test_gate_lists_every_failure_and_thresholds_are_configurable() -> None:
    weak = _point(tp=80, fp=20, fn=20, tn=80)
    d = judge(weak)
    assert len(d.reasons) == 2
    assert judge(weak, GateCriteria(min_precision=0.75, min_recall=0.75)).passed


def test_gate_checks_map_when_asked() -> None:
    good = _point(tp=99, fp=1, fn=1, tn=99)
    crit = GateCriteria(min_box_map50=0.8)
    assert not judge(good, crit, {"box_map50": 0.5}).passed
    assert not judge(good, crit, {}).passed  # required but not measured
    assert judge(good, crit, {"box_map50": 0.85}).passed
