"""Drift watch on real frames: the bundled demo samples run through the demo model, replayed as a
camera would deliver them (a seeded random order, so windows never line up with the 12 images).

Unchanged images never raise anything over many windows; brightness shifted, blurred, or a new
defect mix raise the statistic that physically moved within one window and clear again once the
original images are back; a package baseline recorded with StatsAccumulator (what
`edge model package` does) judges from the first frames and catches a camera that was already
off at activation, which a learned baseline cannot.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from models.config import ModelSettings
from models.drift import (
    DEFECT_RATE,
    DRIFT_METRICS,
    CameraDrift,
    DriftSettings,
    DriftWatch,
    FrameSampler,
    FrameStats,
    _bin,
    defect_rate_p_value,
    frame_stats,
    load_package_baseline,
)
from models.imagestats import (
    DETECTIONS_EDGES,
    IMAGE_EDGES,
    SCORE_EDGES,
    Histogram,
    StatsAccumulator,
)
from models.loader import load_detector
from models.package import load_package
from models.types import Detection

SAMPLES = Path(__file__).resolve().parents[2] / "models" / "demo" / "samples"
PACKAGE_FLOOR = 0.05
"""The score floor `edge model package` records the demo package's stats at (its hint)."""

Frame = tuple[FrameStats, bool]


@dataclass(frozen=True)
class Replay:
    classes: tuple[str, ...]
    names: list[str]
    thresholds: dict[str, float]
    daemon_floor: float
    """The floor the daemon decodes at by default (the lowest decision threshold)."""
    frames: dict[str, list[Frame]]
    """Variant -> one (stats, defect) per sample, at the package floor."""
    daemon_frames: list[Frame]
    """The original samples decoded at the daemon's floor."""
    detections: list[list[Detection]]
    """The original samples' detections at the package floor."""
    images: list[np.ndarray]


@pytest.fixture(scope="module")
def replay(demo_package: Path) -> Iterator[Replay]:
    pkg = load_package(demo_package, check_model=False)
    m = pkg.manifest
    thr = {c: m.thresholds.per_class.get(c, m.thresholds.default) for c in m.classes}
    daemon_floor = min(thr.values())
    paths = sorted(SAMPLES.glob("*.png"))
    assert len(paths) == 12, "the demo samples are 12 images"
    images: list[np.ndarray] = []
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert im is not None, f"cannot read {p}"
        images.append(im)
    variants: dict[str, list[np.ndarray]] = {
        "original": images,
        "brightness": [cv2.add(im, np.full_like(im, 60)) for im in images],  # saturating
        "blur": [cv2.GaussianBlur(im, (0, 0), 3) for im in images],
    }

    def decode(floor: float, imgs: list[np.ndarray]) -> list[list[Detection]]:
        det = load_detector(
            ModelSettings(package=demo_package, conf_threshold=floor, warmup_runs=0), pkg
        )
        try:
            out = []
            for im in imgs:
                prep = det.preprocess(im)
                out.append(det.postprocess(det.infer(prep.tensor), [prep], masks=False)[0])
            return out
        finally:
            det.close()

    def defect(dets: list[Detection]) -> bool:  # the package's decision rule
        area = m.thresholds.min_area_px
        return any(
            d.score >= thr[d.class_name] and d.area_px >= area.get(d.class_name, 0) for d in dets
        )

    frames: dict[str, list[Frame]] = {}
    original_dets: list[list[Detection]] = []
    for name, imgs in variants.items():
        dets = decode(PACKAGE_FLOOR, imgs)
        if name == "original":
            original_dets = dets
        frames[name] = [(frame_stats(im, d), defect(d)) for im, d in zip(imgs, dets, strict=True)]
    daemon = [
        (frame_stats(im, d), defect(d))
        for im, d in zip(images, decode(daemon_floor, images), strict=True)
    ]
    yield Replay(
        tuple(m.classes),
        [p.name for p in paths],
        thr,
        daemon_floor,
        frames,
        daemon,
        original_dets,
        images,
    )


def feed(
    watch: DriftWatch,
    frames: list[Frame],
    n: int,
    rng: random.Random,
    *,
    only: list[int] | None = None,
    every: int = 0,
    camera: str = "cam1",
) -> list[tuple[int, CameraDrift]]:
    """Replay ``n`` frames drawn at random from ``frames`` (indices ``only``); evaluate every
    ``every`` frames. Returns (frames fed so far, verdict) per evaluation."""
    pick = only if only is not None else list(range(len(frames)))
    out = []
    for k in range(1, n + 1):
        stats, defect = frames[rng.choice(pick)]
        watch.observe(camera, stats, defect)
        if every and k % every == 0:
            out.append((k, watch.evaluate()[camera]))
    return out


SETTINGS = DriftSettings(
    baseline_frames=600, window_frames=240, window_blocks=10, defect_rate_alpha=1e-4
)
"""A 600-frame learned baseline, a 240-frame window sliding by 24 frames, default PSI levels.
A test looks at the defect rate ~100 times over ~10 windows; at the default alpha (1e-3 per
window) one chance alarm in ~100 runs of a test is expected, so the tests ask for 1e-4."""
BLOCK = SETTINGS.block_frames


def first_raised(verdicts: list[tuple[int, CameraDrift]], statistic: str) -> int | None:
    return next((k for k, v in verdicts if statistic in v.drifting), None)


# ---- replayed samples ----


def test_unchanged_images_never_drift_over_many_windows(replay: Replay) -> None:
    watch = DriftWatch(SETTINGS, replay.classes)
    rng = random.Random(11)
    learning = feed(watch, replay.frames["original"], SETTINGS.baseline_frames, rng, every=BLOCK)
    *before, (_, done) = learning
    assert all(v.source == "learning" and not v.drifting for _, v in before)
    assert all(math.isnan(x) for x in before[-1][1].psi.values())
    assert done.source == "learned" and done.drifting == []
    verdicts = feed(watch, replay.frames["original"], 8 * SETTINGS.window_frames, rng, every=BLOCK)
    assert all(v.source == "learned" for _, v in verdicts)
    raised = [(k, v.drifting) for k, v in verdicts if v.drifting]
    assert raised == []
    last = verdicts[-1][1]
    assert last.baseline_frames == SETTINGS.baseline_frames
    assert 0.9 * SETTINGS.window_frames <= last.window_frames <= SETTINGS.window_frames
    assert all(last.psi[k] < SETTINGS.psi_alarm for k in IMAGE_EDGES)
    assert last.defect_rate_p_value is not None  # judged, and not raised (drifting == [])
    assert last.defect_rate_baseline == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize(
    ("variant", "only_defects", "expected", "never"),
    [
        ("brightness", False, "brightness", [DEFECT_RATE]),
        ("blur", False, "focus", ["brightness", "saturated", DEFECT_RATE]),
        ("original", True, DEFECT_RATE, ["saturated"]),
    ],
    ids=["brightness+60", "gaussian-blur", "defects-only"],
)
def test_a_shift_raises_the_right_statistic_within_one_window_and_clears(
    replay: Replay, variant: str, only_defects: bool, expected: str, never: list[str]
) -> None:
    watch = DriftWatch(SETTINGS, replay.classes)
    rng = random.Random(5)
    feed(watch, replay.frames["original"], SETTINGS.baseline_frames, rng)
    assert watch.evaluate()["cam1"].drifting == []
    only = [i for i, n in enumerate(replay.names) if "defect" in n] if only_defects else None
    shifted = feed(
        watch, replay.frames[variant], SETTINGS.window_frames, rng, only=only, every=BLOCK
    )
    at = first_raised(shifted, expected)
    assert at is not None and at <= SETTINGS.window_frames, [v.drifting for _, v in shifted]
    for _, v in shifted:
        assert not set(never) & set(v.drifting), v.drifting
    final = shifted[-1][1]
    if expected == DEFECT_RATE:
        assert final.defect_rate_window == 1.0
        assert final.defect_rate_p_value is not None and final.defect_rate_p_value < 1e-3
    else:
        assert final.psi[expected] > SETTINGS.psi_alarm
    # Back to the original images: cleared once the window has turned over (a fresh window of
    # 216-240 frames can sit above psi_clear by chance for a block or two: ~1 % of seeds) ...
    back = feed(watch, replay.frames["original"], 3 * SETTINGS.window_frames, rng, every=BLOCK)
    cleared = next((k for k, v in back if not v.drifting), None)
    assert cleared is not None and cleared <= SETTINGS.window_frames + 2 * BLOCK, [
        (k, {s: round(v.psi.get(s, v.defect_rate_p_value or 0), 3) for s in v.drifting})
        for k, v in back[8:14]
    ]
    # ... and stays clear.
    assert all(not v.drifting for k, v in back if k >= cleared)


def test_a_camera_with_too_few_frames_never_alarms(replay: Replay) -> None:
    # Learned baseline: blurred from the first frame, it is all learning, nothing to compare.
    watch = DriftWatch(SETTINGS, replay.classes)
    rng = random.Random(3)
    verdicts = feed(watch, replay.frames["blur"], SETTINGS.baseline_frames - 1, rng, every=BLOCK)
    assert all(v.source == "learning" and not v.drifting for _, v in verdicts)
    # Package baseline: judged from min_count frames on, never before.
    settings = DriftSettings(
        baseline_frames=600, window_frames=240, min_count=12, defect_rate_alpha=1e-4
    )
    watch = DriftWatch(settings, replay.classes, package_stats(replay), score_floor=PACKAGE_FLOOR)
    verdicts = feed(watch, replay.frames["brightness"], settings.window_frames, rng, every=1)
    assert all(not v.drifting for k, v in verdicts if k < settings.min_frames)
    at = first_raised(verdicts, "brightness")
    assert at is not None and settings.min_frames <= at <= settings.window_frames


def test_package_baseline_judges_from_the_first_frames(replay: Replay, tmp_path: Path) -> None:
    doc = package_stats(replay)
    (tmp_path / "validation_stats.json").write_text(json.dumps(doc))
    loaded = load_package_baseline(tmp_path)
    assert loaded == doc
    settings = DriftSettings(
        baseline_frames=600, window_frames=240, min_count=12, defect_rate_alpha=1e-4
    )
    watch = DriftWatch(settings, replay.classes, loaded, score_floor=replay.daemon_floor)
    rng = random.Random(9)
    verdicts = feed(watch, replay.daemon_frames, 5 * settings.window_frames, rng, every=12)
    for k, v in verdicts:
        assert v.source == "package" and v.drifting == [], (k, v.drifting)
        assert v.baseline_frames == 12
    first = verdicts[1][1]  # 24 frames in: the image statistics are already compared
    for s in IMAGE_EDGES:
        assert first.baselines[s] == "package" and not math.isnan(first.psi[s])
    # The daemon decodes from 0.1505, the package counted from 0.05: candidates per frame cannot
    # be compared with the package, so they are learned; the defect rate is always learned.
    assert first.baselines["detections"] == "learning"
    assert first.baselines[DEFECT_RATE] == "learning"
    assert verdicts[-1][1].baselines["detections"] == "learned"
    h = watch.histograms("cam1")
    assert h["baseline"]["brightness"] == doc["image_stats"]["brightness"]["counts"]

    # A camera already too bright when the model is activated: the package baseline raises
    # brightness within one window; a learned baseline takes the bright frames for normal.
    for baseline, expect in ((loaded, True), (None, False)):
        w = DriftWatch(settings, replay.classes, baseline, score_floor=PACKAGE_FLOOR)
        out = feed(
            w, replay.frames["brightness"], 3 * settings.window_frames, random.Random(2), every=12
        )
        at = first_raised(out, "brightness")
        if expect:
            assert at is not None and at <= settings.window_frames
        else:
            assert at is None and out[-1][1].source == "learned"


def test_package_detections_compare_when_decoded_from_the_same_floor(replay: Replay) -> None:
    doc = package_stats(replay)
    settings = DriftSettings(
        baseline_frames=600, window_frames=240, min_count=12, defect_rate_alpha=1e-4
    )
    watch = DriftWatch(settings, replay.classes, doc, score_floor=PACKAGE_FLOOR)
    verdicts = feed(watch, replay.frames["original"], 240, random.Random(4), every=12)
    assert verdicts[0][1].baselines["detections"] == "package"
    assert all(v.drifting == [] for _, v in verdicts)
    # A frame decoded from a LOWER floor than the package's is counted at the package's floor.
    low = DriftWatch(settings, replay.classes, doc, score_floor=0.0)
    assert low._det_cut == SCORE_EDGES.index(PACKAGE_FLOOR)
    # No floor given: the daemon's default is assumed, the lowest decision threshold (0.1505),
    # above the package's 0.05, so candidates per frame are learned.
    default = DriftWatch(settings, replay.classes, doc)
    feed(default, replay.frames["original"], 20, random.Random(4))
    assert default.evaluate()["cam1"].baselines["detections"] == "learning"


def test_learned_baseline_counts_what_the_packager_counts(replay: Replay) -> None:
    """Live histograms and `edge model package`'s must be the same quantity bin for bin (every
    candidate's score, not the top one per class), or a package baseline would alarm at once."""
    settings = DriftSettings(baseline_frames=12, window_frames=12, window_blocks=2, min_count=6)
    watch = DriftWatch(settings, replay.classes)
    for stats, defect in replay.frames["original"]:
        watch.observe("cam1", stats, defect)
    learned = watch.histograms("cam1")["baseline"]
    acc = package_accumulator(replay)
    for k, h in acc.image.items():
        assert learned[k] == h.counts, k
    assert learned["detections"] == acc.detections.counts
    for c, h in acc.scores.items():
        assert learned["score:" + c] == h.counts, c
    v = watch.evaluate()["cam1"]
    assert v.source == "learned" and v.defect_rate_baseline == acc.defect_rate


# ---- the package baseline, as `edge model package` records it ----


def package_accumulator(replay: Replay) -> StatsAccumulator:
    acc = StatsAccumulator(replay.classes)
    for im, dets, (_, defect) in zip(
        replay.images, replay.detections, replay.frames["original"], strict=True
    ):
        acc.add_image(im, [(d.class_name, d.score) for d in dets], defect)
    return acc


def package_stats(replay: Replay) -> dict[str, Any]:
    return package_accumulator(replay).as_json(
        source="demo samples", score_floor=PACKAGE_FLOOR, thresholds=replay.thresholds
    )


def test_an_unusable_package_baseline_falls_back_to_learning(replay: Replay) -> None:
    settings = DriftSettings(baseline_frames=100, window_frames=100, min_count=12)
    doc = package_stats(replay)
    for bad in ({**doc, "format": 99}, {**doc, "image_stats": "nonsense"}, {"format": 1}):
        w = DriftWatch(settings, replay.classes, bad)
        feed(w, replay.frames["original"], 20, random.Random(1))
        v = w.evaluate()["cam1"]
        assert v.source == "learning" and not w.package_used
    # One histogram on other edges: that statistic alone is learned.
    other = json.loads(json.dumps(doc))
    other["image_stats"]["focus"]["edges"] = list(range(26))
    w = DriftWatch(settings, replay.classes, other, score_floor=replay.daemon_floor)
    feed(w, replay.frames["original"], 20, random.Random(1))
    v = w.evaluate()["cam1"]
    assert v.baselines["focus"] == "learning" and v.baselines["brightness"] == "package"
    # use_package_baseline: false ignores it.
    off = DriftWatch(
        settings.model_copy(update={"use_package_baseline": False}), replay.classes, doc
    )
    assert not off.package_used


def test_ignored_statistics_are_measured_but_never_raised(replay: Replay) -> None:
    settings = SETTINGS.model_copy(update={"ignore": ["focus", "contrast", "score", "detections"]})
    watch = DriftWatch(settings, replay.classes)
    rng = random.Random(5)
    feed(watch, replay.frames["original"], settings.baseline_frames, rng)
    v = feed(watch, replay.frames["blur"], settings.window_frames, rng, every=BLOCK)[-1][1]
    assert v.psi["focus"] > settings.psi_alarm
    assert v.drifting == []


def test_reset_forgets_baselines_and_alarms(replay: Replay) -> None:
    watch = DriftWatch(SETTINGS, replay.classes)
    rng = random.Random(5)
    feed(watch, replay.frames["original"], SETTINGS.baseline_frames, rng)
    feed(watch, replay.frames["blur"], SETTINGS.window_frames, rng)
    assert "focus" in watch.evaluate()["cam1"].drifting
    watch.reset(classes=("scratch", "dent"))
    assert watch.evaluate() == {}
    feed(watch, replay.frames["blur"], 10, rng)
    v = watch.evaluate()["cam1"]
    assert v.source == "learning" and v.drifting == [] and "score:dent" in v.psi


# ---- metrics, settings, bounds ----


def test_metrics_are_the_declared_gauges_with_every_label_set(replay: Replay) -> None:
    watch = DriftWatch(SETTINGS, replay.classes)
    rng = random.Random(5)
    feed(watch, replay.frames["original"], 50, rng)
    learning = list(watch.evaluate()["cam1"].metrics())
    feed(watch, replay.frames["original"], SETTINGS.baseline_frames, rng)
    feed(watch, replay.frames["blur"], SETTINGS.window_frames, rng)
    v = watch.evaluate()["cam1"]
    triples = list(v.metrics())
    assert [(n, sorted(lb)) for n, lb, _ in learning] == [(n, sorted(lb)) for n, lb, _ in triples]
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for name, labels, value in triples:
        assert name.startswith("edge_drift_") and name in DRIFT_METRICS
        assert tuple(labels) == DRIFT_METRICS[name][1]
        assert labels["camera"] == "cam1" and isinstance(value, float)
        key = tuple(sorted(labels.items()))
        assert key not in seen.setdefault(name, set()), f"{name}{labels} twice"
        seen[name].add(key)
    assert set(seen) == set(DRIFT_METRICS)
    got = {(n, tuple(sorted(lb.items()))): val for n, lb, val in triples}
    assert got[("edge_drift_active", (("camera", "cam1"),))] == 1.0
    focus = ("edge_drift_drifting", (("camera", "cam1"), ("statistic", "focus")))
    assert got[focus] == 1.0
    learning_vals = {(n, tuple(sorted(lb.items()))): val for n, lb, val in learning}
    assert (
        learning_vals[("edge_drift_baseline_source", (("camera", "cam1"), ("source", "learning")))]
        == 1.0
    )
    assert math.isnan(learning_vals[("edge_drift_defect_rate_p_value", (("camera", "cam1"),))])
    json.dumps(v.as_json(), allow_nan=False)
    json.dumps(watch.evaluate()["cam1"].as_json(), allow_nan=False)


def test_memory_is_bounded_by_blocks_not_frames(replay: Replay) -> None:
    settings = DriftSettings(baseline_frames=100, window_frames=100, window_blocks=5)
    watch = DriftWatch(settings, replay.classes)
    rng = random.Random(0)
    for n in (37, 1000, 5003):
        feed(watch, replay.frames["original"], n, rng)
        cam = watch._cams["cam1"]
        assert len(cam.ring) <= settings.window_blocks - 1
        win = watch.evaluate()["cam1"].window_frames
        assert win <= settings.window_frames
        total = sum(watch.histograms("cam1")["window"]["brightness"])
        assert total == win


def test_settings_refuse_what_could_never_work() -> None:
    with pytest.raises(ValidationError, match="psi_clear"):
        DriftSettings(psi_alarm=0.1, psi_clear=0.2)
    with pytest.raises(ValidationError, match="min_count"):
        DriftSettings(window_frames=50, min_count=100)
    with pytest.raises(ValidationError, match="unknown statistic"):
        DriftSettings(ignore=["brightnes"])
    with pytest.raises(ValidationError, match="defect_rate_clear_p"):
        DriftSettings(defect_rate_alpha=0.1, defect_rate_clear_p=0.05)
    with pytest.raises(ValidationError, match="extra"):
        DriftSettings.model_validate({"baseline_frame": 10})
    assert DriftSettings(ignore=["score:pit", "score"]).ignore == ["score:pit", "score"]
    with pytest.raises(ValidationError, match="sample_hz"):
        DriftSettings(sample_hz=0)
    assert DriftSettings(sample_hz=None).sample_hz is None


def _sampled(sampler: FrameSampler, camera: str, times_ms: list[float]) -> list[float]:
    return [t for t in times_ms if sampler.due(camera, round(t * 1e6))]


def test_sampler_takes_half_a_60fps_camera_at_30hz_and_every_part_of_a_repeating_line() -> None:
    """A line whose parts repeat every 12 frames (a 12-nest rotary table; the demo's 12-image
    replay): every nest is sampled about equally. A fixed schedule took exactly every second
    frame of this camera, so 6 of the 12 nests were never sampled."""
    rng = random.Random(3)
    times = [i * 1000 / 60 + rng.uniform(-1.0, 1.0) for i in range(3600)]  # 60 s, +-1 ms jitter
    sampler = FrameSampler(30.0, random.Random(5))
    got = [i for i, t in enumerate(times) if sampler.due("cam0", round(t * 1e6))]
    assert 0.95 * 1800 <= len(got) <= 60 * 30 + 2, len(got)
    per_nest = np.bincount(np.asarray(got) % 12, minlength=12)
    assert per_nest.min() >= 0.75 * len(got) / 12, per_nest  # binomial spread: ~±25 of ~150
    gaps = np.diff([times[i] for i in got])
    assert gaps.min() > 14.0 and gaps.max() < 70.0, (gaps.min(), gaps.max())  # 1 to 4 frames


@pytest.mark.parametrize("fps", [7.0, 29.0, 45.0, 60.0, 200.0, 1000.0])
def test_sampler_never_exceeds_its_rate_and_takes_everything_below_it(fps: float) -> None:
    """n samples span at least (n - 2) intervals whatever the frame rate, bursts and gaps
    included (checked over every run of consecutive samples); a camera slower than the rate is
    sampled whole."""
    rng = random.Random(int(fps))
    hz, t, times = 30.0, 0.0, []
    while t < 20_000:
        times.append(t)
        t += rng.expovariate(fps) * 1000  # Poisson arrivals: bursts and idle gaps
    got = _sampled(FrameSampler(hz, random.Random(int(fps) + 1)), "cam0", times)
    at = np.asarray(got) / 1000
    for n in (2, 3, 5, 10, 50, len(at)):
        spans = at[n - 1 :] - at[: len(at) - n + 1]
        assert n <= spans.min() * hz + 2, (n, spans.min())
    if fps <= 7:
        assert len(got) >= 0.6 * len(times)  # Poisson at 7/s: most gaps are above 1/30 s
    else:
        assert len(got) >= 0.5 * min(fps, hz) * 20, len(got)


def test_sampler_keeps_cameras_apart_and_none_samples_every_frame() -> None:
    s = FrameSampler(10.0, random.Random(1))
    times = [i * 10.0 for i in range(100)]  # two cameras at 100 fps for 1 s, interleaved
    a, b = [], []
    for t in times:
        if s.due("a", round(t * 1e6)):
            a.append(t)
        if s.due("b", round(t * 1e6)):
            b.append(t)
    for got in (a, b):  # each its own schedule: ~10 each, at most 990 ms x 10 + 2
        assert 9 <= len(got) <= 11, (a, b)
    assert len(_sampled(FrameSampler(None), "a", times)) == 100


def test_disabled_watch_does_nothing(replay: Replay) -> None:
    watch = DriftWatch(DriftSettings(enabled=False), replay.classes)
    feed(watch, replay.frames["blur"], 300, random.Random(0))
    assert watch.evaluate() == {} and watch.cameras == []


# ---- pieces ----


def exact_fisher(a: int, n1: int, b: int, n2: int) -> float:
    """Independent reference: exact rationals over the whole support."""
    k, n = a + b, n1 + n2
    denom = math.comb(n, k)
    probs = {
        x: Fraction(math.comb(n2, x) * math.comb(n1, k - x), denom)
        for x in range(max(0, k - n1), min(k, n2) + 1)
    }
    obs = probs[b]
    return float(sum(p for p in probs.values() if p <= obs))


@pytest.mark.parametrize(
    "case",
    [
        (50, 100, 50, 100),
        (10, 1000, 25, 500),
        (0, 600, 1, 240),
        (0, 600, 5, 240),
        (300, 600, 240, 240),
        (3, 40, 9, 30),
        (120, 1200, 40, 400),
        (7, 7, 0, 9),
    ],
)
def test_defect_rate_p_value_is_fishers_exact_test(case: tuple[int, int, int, int]) -> None:
    a, n1, b, n2 = case
    assert defect_rate_p_value(a, n1, b, n2) == pytest.approx(
        exact_fisher(a, n1, b, n2), rel=1e-6, abs=1e-15
    )
    with pytest.raises(ValueError, match="between 0"):
        defect_rate_p_value(5, 4, 0, 10)
    assert defect_rate_p_value(0, 100, 0, 100) == 1.0


def test_bins_follow_the_histogram_rule() -> None:
    for edges in (*IMAGE_EDGES.values(), SCORE_EDGES, DETECTIONS_EDGES):
        h = Histogram(edges)
        values = [
            *edges,
            -1.0,
            edges[-1] * 2,
            math.nan,
            *(e + 1e-6 for e in edges),
            *(e - 1e-6 for e in edges),
        ]
        for x in values:
            assert _bin(edges, x) == h.bin_of(x), (edges, x)


def test_frame_stats_bins_every_candidate(replay: Replay) -> None:
    dets = replay.detections[1]  # 01_defect: several candidates of one class
    st = frame_stats(replay.images[1], dets)
    assert sum(n for _, _, n in st.score_bins) == st.detections == len(dets)
    for c in {d.class_name for d in dets}:
        assert st.class_scores[c] == max(d.score for d in dets if d.class_name == c)
        h = Histogram(SCORE_EDGES)
        h.add_many(d.score for d in dets if d.class_name == c)
        mine = [0] * len(h.counts)
        for cls, b, n in st.score_bins:
            if cls == c:
                mine[b] += n
        assert mine == h.counts
    empty = frame_stats(replay.images[0], [])
    assert empty.score_bins == () and empty.detections == 0
