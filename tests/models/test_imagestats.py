"""Drift statistics: fixed bins that never drop a value, image statistics that measure what
they claim on images with known answers, and the focus measure being calibrate's own."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camera.calibrate import focus_score
from models.imagestats import (
    BRIGHTNESS_EDGES,
    DETECTIONS_EDGES,
    FOCUS_EDGES,
    SCORE_EDGES,
    STATS_SIDE,
    Histogram,
    StatsAccumulator,
    downscaled_gray,
    image_stats,
    population_stability_index,
)


def test_bins_are_fixed_and_never_drop_a_value() -> None:
    h = Histogram(SCORE_EDGES)
    h.add_many([-0.1, 0.0, 0.049, 0.05, 0.999, 1.0, 7.0])
    assert h.n == 7
    assert h.counts[0] == 3 and h.counts[1] == 1 and h.counts[-1] == 3
    assert len(BRIGHTNESS_EDGES) == 33 and BRIGHTNESS_EDGES[-1] == 256
    assert FOCUS_EDGES[1] == 1.0 and FOCUS_EDGES[-1] == 1e6
    assert DETECTIONS_EDGES[:3] == (0, 1, 2)
    with pytest.raises(ValueError, match="increasing"):
        Histogram((0.0, 1.0, 1.0))


def test_image_stats_on_images_with_known_answers() -> None:
    flat = np.full((480, 640), 100, np.uint8)
    s = image_stats(flat)
    assert s.brightness == pytest.approx(100) and s.contrast == pytest.approx(0)
    assert s.focus == pytest.approx(0) and s.saturated == 0
    half = np.zeros((100, 100, 3), np.uint8)
    half[:, 50:] = 255
    s = image_stats(half)
    assert s.saturated == pytest.approx(0.5) and s.brightness == pytest.approx(127.5)
    assert s.contrast == pytest.approx(127.5)
    # 16-bit mono: on the 8-bit scale.
    assert image_stats(np.full((64, 64), 65535, np.uint16)).saturated == 1.0


def test_focus_is_calibrates_measure_and_falls_with_blur() -> None:
    rng = np.random.default_rng(0)
    sharp = (rng.random((1024, 1280)) > 0.5).astype(np.uint8) * 255
    small = downscaled_gray(sharp)
    assert max(small.shape) == STATS_SIDE
    assert image_stats(sharp).focus == pytest.approx(focus_score(small))
    blurred = cv2.GaussianBlur(sharp, (0, 0), 8)
    assert image_stats(blurred).focus < image_stats(sharp).focus / 10


@pytest.mark.parametrize(
    "shape", [(200, 240), (200, 240, 1), (200, 240, 3), (600, 800), (600, 800, 3)]
)
def test_downscaled_gray_never_shares_the_frames_memory(shape: tuple[int, ...]) -> None:
    """The worker computes statistics from this copy after the verdict went back, when the
    frame's shared memory may already hold the next frame: overwriting the frame must not
    change it (a small Mono8 frame used to come back as the frame itself)."""
    frame = np.full(shape, 40, np.uint8)
    gray = downscaled_gray(frame)
    before = gray.copy()
    frame[...] = 200
    assert np.array_equal(gray, before)


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    a, b, c = (Histogram(BRIGHTNESS_EDGES) for _ in range(3))
    a.add_many(rng.normal(120, 10, 5000))
    b.add_many(rng.normal(120, 10, 5000))
    c.add_many(rng.normal(160, 10, 5000))
    assert population_stability_index(a, b) < 0.05
    assert population_stability_index(a, c) > 0.25
    with pytest.raises(ValueError, match="same bins"):
        population_stability_index(a, Histogram(SCORE_EDGES))


def test_accumulator_json_round_trips() -> None:
    acc = StatsAccumulator(("pit", "crack"))
    img = np.full((32, 32), 80, np.uint8)
    acc.add_image(img, [("pit", 0.9), ("crack", 0.2), ("unknown", 0.5)], True)
    acc.add_image(img, [], False)
    doc = acc.as_json(source="test")
    assert doc["images"] == 2 and doc["defect_rate"] == 0.5 and doc["source"] == "test"
    assert doc["score_histograms"]["pit"]["n"] == 1
    h = Histogram.from_json(doc["image_stats"]["brightness"])
    assert h.n == 2 and h.mean == pytest.approx(80)
    assert Histogram.from_json(doc["detections_per_image"]).counts[:4] == [1, 0, 0, 1]
