"""Drift watch: live frame statistics compared with a baseline, per camera.

A model is only as good as the likeness of today's frames to the ones it was validated on. The
watch compares, per camera, the histograms of what the inference workers measure on a sample of
the frames (:class:`FrameStats`: brightness, contrast, focus, saturated share, candidates per
frame, every candidate's score per class; :class:`FrameSampler` picks the frames) and the
image-level defect rate with a baseline:

- the model package's ``validation_stats.json`` (`edge model package` writes it with
  :class:`models.imagestats.StatsAccumulator`, on the same fixed bins), so a camera that is
  already off when a model is activated is caught at once; or
- learned on the line over the first ``baseline_frames`` frames after start or an activation.

Each histogram is compared with :func:`models.imagestats.population_stability_index`; the defect
rate with an exact two-sample binomial test (Fisher's: conditional on the total number of defects,
the window's count is hypergeometric). A statistic drifts when its PSI is above ``psi_alarm``
AND the shift is significant for the two samples' sizes (a chi-square test of the two
histograms at ``psi_alpha``: a rare class with 100 frames over 10 bins reaches PSI 0.18 by chance
alone), and clears below ``psi_clear`` (hysteresis). Nothing is judged on fewer than
``min_count`` frames on either side; a class's scores also need ``min_count`` effective
observations, counted in frames rather than candidates (Kish's effective size: the candidates
of one frame come together, the demo model gives up to 8 of one class on one part).

Cost: ``observe`` is a handful of bisects and list increments into the current block (it runs on
the event loop for every frame); the live window is a ring of per-block count vectors whose sum
is kept up to date when a block completes, so memory is ``window_blocks`` x bins per camera and
``evaluate`` is O(bins), whatever the frame rate.
"""

from __future__ import annotations

import json
import math
import random
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.imagestats import (
    DETECTIONS_EDGES,
    IMAGE_EDGES,
    SCORE_EDGES,
    STATS_FORMAT,
    STATS_SIDE,
    ImageStats,
    image_stats,
    population_stability_index,
)
from models.types import Detection

log = structlog.get_logger(__name__)

STATS_FILE = "validation_stats.json"
"""The package baseline's file name (models/training/valstats.py writes it; not imported from
there because that module pulls in the packaging tool chain)."""

IMAGE_STATISTICS: tuple[str, ...] = tuple(IMAGE_EDGES)
"""brightness, contrast, focus, saturated (models/imagestats.py)."""
DEFECT_RATE = "defect_rate"
SCORE_PREFIX = "score:"
Source = Literal["package", "learned", "learning"]
SOURCES: tuple[Source, ...] = ("package", "learned", "learning")
CLEAR_ALPHA = 1e-3
"""A raised statistic also clears once its shift is no longer significant at 1e-3: over a small
window the PSI of unchanged frames can sit above psi_clear by chance (window 240 frames: 0.11 at
the 99th percentile on the demo samples), which would hold an alarm the evidence no longer
supports. Raising needs psi_alpha (1e-4), holding 1e-3: hysteresis on the evidence too."""


@dataclass(frozen=True, slots=True)
class FrameStats:
    """What the drift watch learns from one frame; computed in the inference worker (it already
    holds the pixels and the detections), a few hundred bytes back to the daemon."""

    image: ImageStats
    class_scores: dict[str, float] = field(default_factory=dict)
    """Highest score per class among the frame's decoded candidates (absent: none)."""
    detections: int = 0
    """Decoded candidates (above the decode floor) in the frame."""
    score_bins: tuple[tuple[str, int, int], ...] = ()
    """(class, SCORE_EDGES bin, count) over EVERY decoded candidate: the package baseline's score
    histograms count every candidate, not the top one per class (a frame of the demo model has up
    to 8 candidates of one class), so the live side must too. Binned in the worker so that the
    event loop only adds counts."""


def _bin(edges: Sequence[float], value: float) -> int:
    """Histogram.bin_of's rule (below the first edge -> first bin, at/above the last -> last)
    with bisect: ~0.1 us instead of ~2 us for np.searchsorted on a scalar."""
    i = bisect_right(edges, value) - 1
    last = len(edges) - 2
    return 0 if i < 0 else (last if i > last else i)


def frame_stats(image: np.ndarray, detections: Sequence[Detection]) -> FrameStats:
    """The drift statistics of one frame (run in the worker, off the event loop)."""
    scores: dict[str, float] = {}
    bins: dict[tuple[str, int], int] = {}
    for d in detections:
        if d.score > scores.get(d.class_name, -1.0):
            scores[d.class_name] = float(d.score)
        key = (d.class_name, _bin(SCORE_EDGES, d.score))
        bins[key] = bins.get(key, 0) + 1
    return FrameStats(
        image_stats(image),
        scores,
        len(detections),
        tuple((c, b, n) for (c, b), n in bins.items()),
    )


class DriftSettings(BaseModel):
    """The line YAML's ``drift:`` section."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    sample_hz: float | None = Field(default=30.0, gt=0, le=10_000)
    """Frames per camera, per second, whose statistics are computed (None: every frame); the
    frame counts below are of these sampled frames. Drift is slow (lighting, focus, lens dirt,
    the product mix) and 30 a second tell it as well as 200 do, while each sampled frame costs
    its inference worker 0.15-0.3 ms (measured: 5 % of one worker's capacity, 1 worker x 1
    thread, closed loop, on a 2-vCPU box). Below this rate every frame is sampled."""
    baseline_frames: int = Field(default=1000, ge=10, le=10_000_000)
    """Sampled frames per camera the learned baseline is taken over after start or a model
    activation (also the defect-rate baseline when a package baseline exists: see
    package_defect_rate).
    PSI sampling noise is ~(bins-1)(1/baseline + 1/window): twice the window keeps the
    baseline's share of it the smaller one."""
    window_frames: int = Field(default=500, ge=10, le=10_000_000)
    """The live window compared with the baseline (a shift is judged within this many sampled
    frames: ~17 s of a camera at or above sample_hz 30).
    At 500 frames a 10-bin PSI has ~0.03 expected noise against 1000 baseline frames, far below
    0.25, and a defect rate going from 2 % to 6 % reaches p < 1e-3."""
    window_blocks: int = Field(default=10, ge=2, le=1000)
    """The window slides by window_frames/window_blocks frames; it holds between
    (blocks-1)/blocks and all of window_frames."""
    psi_alarm: float = Field(default=0.25, gt=0.0)
    """PSI that raises a statistic (the usual 'significant shift' level)."""
    psi_clear: float = Field(default=0.1, ge=0.0)
    """PSI below which a raised statistic clears (hysteresis; the usual 'stable' level). It
    also clears when the shift is no longer significant at 1e-3 (CLEAR_ALPHA)."""
    psi_alpha: float = Field(default=1e-4, gt=0.0, lt=0.5)
    """A shift must also be significant at this level (chi-square test of the two histograms,
    counted in frames), so that a sparse statistic (a rare class's scores over ~100 frames)
    is not raised by sampling noise. Per statistic and window, with ~10 statistics per camera
    judged at every evaluation: 1e-4 keeps chance alarms to about one per camera per
    thousand windows where PSI alone does not already rule them out."""
    defect_rate_alpha: float = Field(default=1e-3, gt=0.0, lt=1.0)
    """Two-sided p-value of the defect-rate test that raises ``defect_rate``. Measured on an
    unchanged 50 % defect rate (600-frame baseline, 240-frame window, a look every 24 frames):
    a chance alarm in 2.8 % of runs of 8 windows at 1e-3, 0.3 % at 1e-4, 0.03 % at 1e-5; take a
    lower level where a chance alarm every few hundred windows is too many."""
    defect_rate_clear_p: float = Field(default=0.01, gt=0.0, le=1.0)
    """p-value above which a raised ``defect_rate`` clears (hysteresis: 10x the raise level, as
    for PSI; at 0.05 a window of unchanged frames held it for several blocks in ~1 % of runs)."""
    min_count: int | None = Field(default=None, ge=1)
    """Frames each side needs before anything is judged (a class's scores: effective
    observations, about the frames showing the class); fewer never alarm. A package histogram
    with fewer falls back to the learned one. None: 100, capped at what the window always holds
    (PSI over fewer than ~100 frames is mostly sampling noise)."""
    use_package_baseline: bool = True
    """Take validation_stats.json when the package has it."""
    package_defect_rate: bool = False
    """Compare the defect rate with the package's validation defect rate. Off by default: a
    validation set's defect mix is chosen by whoever assembled it (often enriched with defects),
    not by the line, so the defect rate is learned on the line even with a package baseline."""
    ignore: list[str] = Field(default_factory=list)
    """Statistics measured and exported but never raised (e.g. ``saturated`` where glare is
    normal): brightness, contrast, focus, saturated, detections, defect_rate, score (every class)
    or score:<class>."""

    @field_validator("ignore")
    @classmethod
    def _known_statistics(cls, v: list[str]) -> list[str]:
        known = {*IMAGE_STATISTICS, "detections", DEFECT_RATE, "score"}
        bad = [s for s in v if s not in known and not s.startswith(SCORE_PREFIX)]
        if bad:
            raise ValueError(
                f"drift.ignore: unknown statistic(s) {bad}; use {sorted(known)} or score:<class>"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DriftSettings:
        if self.psi_clear >= self.psi_alarm:
            raise ValueError(
                f"drift.psi_clear ({self.psi_clear}) must be below drift.psi_alarm "
                f"({self.psi_alarm}), or an alarm could never clear"
            )
        if self.defect_rate_clear_p <= self.defect_rate_alpha:
            raise ValueError(
                f"drift.defect_rate_clear_p ({self.defect_rate_clear_p}) must be above "
                f"drift.defect_rate_alpha ({self.defect_rate_alpha})"
            )
        if self.window_blocks > self.window_frames:
            raise ValueError("drift.window_blocks must be at most drift.window_frames")
        fewest = (self.window_blocks - 1) * self.block_frames
        if self.min_count is not None and self.min_count > min(fewest, self.baseline_frames):
            raise ValueError(
                f"drift.min_count ({self.min_count}) is more than the window always holds "
                f"({fewest} frames) or the baseline ({self.baseline_frames}): nothing would "
                "ever be judged; lower min_count or raise window_frames/baseline_frames"
            )
        return self

    @property
    def block_frames(self) -> int:
        return -(-self.window_frames // self.window_blocks)

    @property
    def min_frames(self) -> int:
        """min_count as applied."""
        if self.min_count is not None:
            return self.min_count
        fewest = (self.window_blocks - 1) * self.block_frames
        return min(100, fewest, self.baseline_frames)


# ---- statistics ----


def chi2_quantile(p: float, df: int) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty; within ~2 % for df >= 1 at p <= 0.05)."""
    z = NormalDist().inv_cdf(1.0 - p)
    k = max(df, 1)
    return k * (1.0 - 2.0 / (9 * k) + z * math.sqrt(2.0 / (9 * k))) ** 3


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def defect_rate_p_value(base_defects: int, base_n: int, win_defects: int, win_n: int) -> float:
    """Two-sided p-value that two binomial samples share one defect rate (Fisher's exact test).

    Exact even when the baseline saw no defect at all (a one-sample test against a learned rate
    of 0 would call the first defect a certainty). Terms are summed outward from the mode and
    stop below 1e-17 of it, so the cost is O(sqrt(window)), not O(window); p-values below
    ~1e-15 come out as 0.
    """
    if not (0 <= base_defects <= base_n and 0 <= win_defects <= win_n):
        raise ValueError("defect counts must lie between 0 and the frame counts")
    n = base_n + win_n
    k = base_defects + win_defects
    if base_n == 0 or win_n == 0 or k == 0 or k == n:
        return 1.0
    lo, hi = max(0, k - base_n), min(k, win_n)

    def log_p(x: int) -> float:
        return _log_comb(win_n, x) + _log_comb(base_n, k - x) - _log_comb(n, k)

    def ratio(x: int) -> float:  # P(x+1) / P(x)
        return (win_n - x) * (k - x) / ((x + 1) * (base_n - k + x + 1))

    mode = min(max((win_n + 1) * (k + 1) // (n + 2), lo), hi)
    log_mode = log_p(mode)
    r_obs = math.exp(log_p(win_defects) - log_mode) * (1.0 + 1e-7)
    total = 1.0 if r_obs >= 1.0 else 0.0
    r = 1.0
    for x in range(mode, hi):
        r *= ratio(x)
        if r <= r_obs:
            total += r
        if r < 1e-17:
            break
    r = 1.0
    for x in range(mode - 1, lo - 1, -1):
        r /= ratio(x)
        if r <= r_obs:
            total += r
        if r < 1e-17:
            break
    return min(1.0, total * math.exp(log_mode))


def _shift_significant(b: np.ndarray, w: np.ndarray, nb: int, nw: int, alpha: float) -> bool:
    """Two-sample chi-square test of homogeneity over the bins, on ``nb``/``nw`` effective
    observations. Not PSI itself: PSI clips empty bins at 1e-4, which inflates it on sparse
    histograms (a share of 1/40 against an empty bin adds 0.14 to PSI, 0.05 to chi-square), so
    noise on a sparse statistic would look significant. X2 = D nb nw / (nb + nw), D the
    chi-square divergence of the shares against the pooled ones."""
    pb = b / b.sum()
    pw = w / w.sum()
    pooled = (b + w) / (b.sum() + w.sum())
    seen = pooled > 0
    df = int(np.count_nonzero(seen)) - 1
    if df < 1:
        return False
    d = float(np.sum((pb[seen] - pw[seen]) ** 2 / pooled[seen]))
    return d * nb * nw / (nb + nw) > chi2_quantile(alpha, df)


# ---- the watch ----


@dataclass(frozen=True, slots=True)
class _Stat:
    name: str
    offset: int
    size: int
    start: int = 0
    """First bin compared (score histograms cut at the common decode floor)."""
    package: np.ndarray | None = None
    """The package's counts for this statistic (full width), or None: learned."""
    squares: int | None = None
    """Offset of the class's sum over frames of (candidates in the frame)^2 (score statistics):
    with the histogram's total it gives the effective number of independent observations."""


_METRIC_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "edge_drift_active": ("1 while any statistic of the camera drifts", ("camera",)),
    "edge_drift_drifting": (
        "1 while this statistic is raised (with hysteresis)",
        ("camera", "statistic"),
    ),
    "edge_drift_psi": (
        "Population stability index of the live window against the baseline (NaN: no baseline)",
        ("camera", "statistic"),
    ),
    "edge_drift_defect_rate": (
        "Image-level defect rate of the baseline and of the live window",
        ("camera", "window"),
    ),
    "edge_drift_defect_rate_p_value": (
        "Two-sided p-value that baseline and window share one defect rate (NaN: not judged)",
        ("camera",),
    ),
    "edge_drift_baseline_frames": (
        "Frames in the baseline (package images or learned)",
        ("camera",),
    ),
    "edge_drift_window_frames": ("Frames in the live window", ("camera",)),
    "edge_drift_baseline_source": (
        "1 for the baseline's source: package, learned or learning",
        ("camera", "source"),
    ),
}
DRIFT_METRICS: Mapping[str, tuple[str, tuple[str, ...]]] = _METRIC_HELP
"""name -> (help, label names) of every gauge :meth:`CameraDrift.metrics` yields."""


@dataclass(slots=True)
class CameraDrift:
    """One camera's drift verdict at an evaluation."""

    camera: str
    source: Source
    """Baseline of the image and model statistics: "package" when any of them compares with the
    package, else "learned", or "learning" while the learned baseline fills."""
    baseline_frames: int
    window_frames: int
    learned_frames: int
    """Frames in the learned baseline so far (baseline_frames when complete)."""
    psi: dict[str, float]
    """PSI per statistic (brightness, contrast, focus, saturated, detections, score:<class>);
    NaN while there is no baseline or no observation."""
    baselines: dict[str, Source]
    """Where each statistic's baseline comes from (defect_rate included)."""
    defect_rate_baseline: float | None
    defect_rate_window: float | None
    defect_rate_p_value: float | None
    """None until both sides hold min_count frames."""
    drifting: list[str]
    """Statistics over threshold now (empty when fine)."""

    @property
    def active(self) -> bool:
        return bool(self.drifting)

    def metrics(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) for every gauge of :data:`DRIFT_METRICS`; every label set is
        yielded at every evaluation (NaN when unknown), so exported gauges never go stale."""
        cam = {"camera": self.camera}
        nan = math.nan
        yield "edge_drift_active", cam, float(self.active)
        for s, v in self.psi.items():
            yield "edge_drift_psi", {**cam, "statistic": s}, v
        for s in (*self.psi, DEFECT_RATE):
            yield "edge_drift_drifting", {**cam, "statistic": s}, float(s in self.drifting)
        for w, r in (("baseline", self.defect_rate_baseline), ("live", self.defect_rate_window)):
            yield "edge_drift_defect_rate", {**cam, "window": w}, nan if r is None else r
        p = self.defect_rate_p_value
        yield "edge_drift_defect_rate_p_value", cam, nan if p is None else p
        yield "edge_drift_baseline_frames", cam, float(self.baseline_frames)
        yield "edge_drift_window_frames", cam, float(self.window_frames)
        for src in SOURCES:
            yield "edge_drift_baseline_source", {**cam, "source": src}, float(src == self.source)

    def as_json(self) -> dict[str, Any]:
        """For /healthz: NaN (not JSON) becomes None."""

        def num(v: float | None) -> float | None:
            return None if v is None or math.isnan(v) else round(v, 6)

        return {
            "drifting": list(self.drifting),
            "source": self.source,
            "baseline_frames": self.baseline_frames,
            "window_frames": self.window_frames,
            "learned_frames": self.learned_frames,
            "psi": {k: num(v) for k, v in self.psi.items()},
            "baselines": dict(self.baselines),
            "defect_rate": {
                "baseline": num(self.defect_rate_baseline),
                "live": num(self.defect_rate_window),
                "p_value": num(self.defect_rate_p_value),
            },
        }


@dataclass(slots=True, eq=False)
class _Camera:
    name: str
    size: int
    block_frames: int
    blocks: int
    block: list[int] = field(default_factory=list)
    block_n: int = 0
    block_defects: int = 0
    ring: deque[tuple[np.ndarray, int, int]] = field(default_factory=deque)
    window: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    window_n: int = 0
    window_defects: int = 0
    learned: list[int] | np.ndarray = field(default_factory=list)
    learned_n: int = 0
    learned_defects: int = 0
    learning: bool = True
    drifting: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.block = [0] * self.size
        self.learned = [0] * self.size
        self.window = np.zeros(self.size, np.int64)
        self.ring = deque()

    def close_block(self) -> None:
        """Push the full block into the ring; drop the oldest once the ring holds blocks-1 (the
        window = ring + the filling block). O(bins), once per block_frames frames."""
        counts = np.asarray(self.block, np.int64)
        self.ring.append((counts, self.block_n, self.block_defects))
        self.window += counts
        self.window_n += self.block_n
        self.window_defects += self.block_defects
        if len(self.ring) > self.blocks - 1:
            old, n, d = self.ring.popleft()
            self.window -= old
            self.window_n -= n
            self.window_defects -= d
        self.block = [0] * self.size
        self.block_n = 0
        self.block_defects = 0


class FrameSampler:
    """Which frames the drift statistics are computed on: on average at most ``hz`` a second
    per camera (see DriftSettings.sample_hz), decided on the loop in O(1) at dispatch.

    One sample per nominal interval: each sample's nominal time is one interval after the
    previous one's (or half an interval after the previous sample, if that came late), and
    the frame taken for it is the first at or after the nominal time plus a random offset of
    up to half an interval either way. So n samples never span less than (n - 2) intervals,
    and a camera slower than the rate is sampled whole.

    The offset keeps the rate but not the phase. Without it (a fixed schedule), a 60 fps
    camera at 30 Hz gave exactly every second frame: where parts repeat with an even period (a
    rotary table with 12 nests, the demo's 12-image replay), half of them were never sampled,
    and each time a late frame flipped the phase the window saw the other half, a false drift
    alarm (the soak raised one per fault round). With it every frame is equally likely to be
    sampled, whatever the period, so the sampled defect rate is the line's."""

    def __init__(self, hz: float | None, rng: random.Random | None = None) -> None:
        self._interval_ns = round(1e9 / hz) if hz else 0
        self._state: dict[str, tuple[int, int]] = {}
        """Per camera: (nominal time, due time) of its next sample."""
        self._rng = rng or random.Random()

    def due(self, camera: str, now_ns: int) -> bool:
        iv = self._interval_ns
        if not iv:
            return True
        state = self._state.get(camera)
        if state is not None and now_ns < state[1]:
            return False
        nominal = now_ns + iv if state is None else max(state[0] + iv, now_ns + iv // 2)
        self._state[camera] = (nominal, nominal + round(self._rng.uniform(-0.5, 0.5) * iv))
        return True


class DriftWatch:
    """Per-camera drift of frame statistics against a package or learned baseline.

    ``observe`` runs on the event loop for every sampled frame; ``evaluate`` periodically (it
    logs raises and clears once per change). ``score_floor``: the decode floor the daemon runs the
    model with (``model.conf_threshold`` as applied); a package's histograms were taken at its
    own floor, so candidate statistics are compared only above both. None assumes the daemon's
    default, the package's lowest decision threshold.
    """

    def __init__(
        self,
        settings: DriftSettings,
        classes: Sequence[str],
        package_baseline: Mapping[str, Any] | None = None,
        *,
        score_floor: float | None = None,
    ) -> None:
        self.settings = settings
        self._cams: dict[str, _Camera] = {}
        self._configure(tuple(classes), package_baseline, score_floor)

    # -- setup --

    def reset(
        self,
        package_baseline: Mapping[str, Any] | None = None,
        *,
        classes: Sequence[str] | None = None,
        score_floor: float | None = None,
    ) -> None:
        """A model was activated: forget every camera's baseline, window and alarms (its
        statistics are the new model's). ``classes``: the new model's, if they changed."""
        self._cams.clear()
        self._configure(
            tuple(classes) if classes is not None else self.classes, package_baseline, score_floor
        )
        log.info("drift_reset", package_baseline=self.package_used)

    def _configure(
        self,
        classes: tuple[str, ...],
        package: Mapping[str, Any] | None,
        score_floor: float | None,
    ) -> None:
        s = self.settings
        self.classes = classes
        layout: list[tuple[str, tuple[float, ...]]] = [
            *((k, IMAGE_EDGES[k]) for k in IMAGE_STATISTICS),
            ("detections", DETECTIONS_EDGES),
            *((SCORE_PREFIX + c, SCORE_EDGES) for c in classes),
        ]
        offsets: dict[str, int] = {}
        off = 0
        for name, edges in layout:
            offsets[name] = off
            off += len(edges) - 1
        # One counter per class after the histograms: sum over frames of (its candidates)^2.
        self._squares_off = {c: off + i for i, c in enumerate(classes)}
        self._size = off + len(classes)
        self._img_off = tuple(offsets[k] for k in IMAGE_STATISTICS)
        self._det_off = offsets["detections"]
        self._score_off = {c: offsets[SCORE_PREFIX + c] for c in classes}
        self._det_cut = 0
        pkg: dict[str, tuple[int, np.ndarray]] = {}
        self._pkg_defects: tuple[int, int] | None = None
        self.package_used = False
        if package is not None and s.use_package_baseline:
            pkg = self._package_histograms(package, classes, score_floor)
        stats = []
        for name, edges in layout:
            start, counts = pkg.get(name, (0, None))
            cls = name.removeprefix(SCORE_PREFIX) if name.startswith(SCORE_PREFIX) else None
            squares = self._squares_off[cls] if cls is not None else None
            stats.append(_Stat(name, offsets[name], len(edges) - 1, start, counts, squares))
        self._stats = tuple(stats)
        self.package_used = bool(pkg) or self._pkg_defects is not None
        self._package_images = 0
        if self.package_used and package is not None:
            self._package_images = int(package.get("images", 0))
        ignored = set(s.ignore)
        if "score" in ignored:
            ignored.update(SCORE_PREFIX + c for c in classes)
        self._ignored = frozenset(ignored)

    def _package_histograms(
        self, doc: Mapping[str, Any], classes: tuple[str, ...], score_floor: float | None
    ) -> dict[str, tuple[int, np.ndarray]]:
        """{statistic: (first compared bin, counts)} for every package histogram that can be
        compared bin for bin with the live one; the rest are learned. Logs what is not usable."""
        s = self.settings
        min_n = s.min_frames
        out: dict[str, tuple[int, np.ndarray]] = {}
        skipped: dict[str, str] = {}
        try:
            if doc.get("format") != STATS_FORMAT or doc.get("stats_side") != STATS_SIDE:
                raise ValueError(
                    f"format {doc.get('format')}/side {doc.get('stats_side')}, this daemon "
                    f"reads format {STATS_FORMAT}/side {STATS_SIDE}: re-package the model"
                )
            images = int(doc.get("images", 0))
            if images < min_n:
                raise ValueError(f"{images} validation images < drift.min_count {min_n}")

            def counts(h: Any, edges: tuple[float, ...], start: int = 0) -> np.ndarray | str:
                if not isinstance(h, Mapping):
                    return "missing"
                e = [float(x) for x in h.get("edges", ())]
                if len(e) != len(edges) or any(
                    abs(a - b) > 1e-9 for a, b in zip(e, edges, strict=True)
                ):
                    return "different bin edges"
                c = np.asarray([int(x) for x in h.get("counts", ())], np.int64)
                if c.size != len(edges) - 1 or (c < 0).any():
                    return "bad counts"
                if int(c[start:].sum()) < min_n:
                    return f"{int(c[start:].sum())} observations < min_count {min_n}"
                return c

            for k in IMAGE_STATISTICS:
                r = counts(doc.get("image_stats", {}).get(k), IMAGE_EDGES[k])
                if isinstance(r, str):
                    skipped[k] = r
                else:
                    out[k] = (0, r)
            pkg_floor = float(doc.get("score_floor", 0.0) or 0.0)
            thresholds = doc.get("thresholds") or {}
            if score_floor is None:
                lowest = [float(v) for v in thresholds.values()] if thresholds else []
                score_floor = min(lowest) if lowest else pkg_floor
            floor = max(pkg_floor, score_floor)
            # First bin whose lower edge is at/above both floors: both sides saw it completely.
            start = next(
                (i for i, e in enumerate(SCORE_EDGES[:-1]) if e >= floor - 1e-9),
                len(SCORE_EDGES) - 2,
            )
            for c in classes:
                r = counts(doc.get("score_histograms", {}).get(c), SCORE_EDGES, start)
                if isinstance(r, str):
                    skipped[SCORE_PREFIX + c] = r
                else:
                    out[SCORE_PREFIX + c] = (start, r)
            # Detections per frame compare only when the live side can count them at the
            # package's floor: decoded from at or below it, and the floor on a score edge.
            at_edge = [i for i, e in enumerate(SCORE_EDGES[:-1]) if abs(e - pkg_floor) < 1e-9]
            if score_floor <= pkg_floor + 1e-9 and at_edge:
                r = counts(doc.get("detections_per_image"), DETECTIONS_EDGES)
                if isinstance(r, str):
                    skipped["detections"] = r
                else:
                    out["detections"] = (0, r)
                    self._det_cut = at_edge[0] if score_floor < pkg_floor - 1e-9 else 0
            else:
                skipped["detections"] = (
                    f"decoded from {score_floor}, the package counted from {pkg_floor}"
                )
            if s.package_defect_rate:
                d = int(doc.get("defect_images", -1))
                if 0 <= d <= images:
                    self._pkg_defects = (d, images)
                else:
                    skipped[DEFECT_RATE] = f"defect_images {d} not within 0..{images}"
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "drift_package_baseline_unusable",
                error=str(exc),
                hint="every statistic is learned on the line instead",
            )
            self._det_cut = 0
            self._pkg_defects = None
            return {}
        if skipped:
            log.info("drift_package_baseline_partial", learned_instead=skipped)
        return out

    # -- per frame (event loop) --

    def observe(self, camera: str, stats: FrameStats, defect: bool) -> None:
        """Count one decided frame (O(candidate bins): a few microseconds)."""
        if not self.settings.enabled:
            return
        cam = self._cams.get(camera)
        if cam is None:
            cam = self._cams[camera] = _Camera(
                camera, self._size, self.settings.block_frames, self.settings.window_blocks
            )
        im = stats.image
        ob, oc, of, os_ = self._img_off
        idx = [
            ob + _bin(IMAGE_EDGES["brightness"], im.brightness),
            oc + _bin(IMAGE_EDGES["contrast"], im.contrast),
            of + _bin(IMAGE_EDGES["focus"], im.focus),
            os_ + _bin(IMAGE_EDGES["saturated"], im.saturated),
        ]
        cut = self._det_cut
        n_det = sum(n for _, b, n in stats.score_bins if b >= cut) if cut else stats.detections
        idx.append(self._det_off + _bin(DETECTIONS_EDGES, n_det))
        adds: list[tuple[int, int]] = []
        if stats.score_bins:
            score_off, squares_off = self._score_off, self._squares_off
            per_class: dict[int, int] = {}
            for cls, b, n in stats.score_bins:
                o = score_off.get(cls)
                if o is not None:
                    adds.append((o + b, n))
                    q = squares_off[cls]
                    per_class[q] = per_class.get(q, 0) + n
            adds.extend((q, m * m) for q, m in per_class.items())
        block = cam.block
        for i in idx:
            block[i] += 1
        for i, n in adds:
            block[i] += n
        cam.block_n += 1
        cam.block_defects += defect
        if cam.learning:
            learned = cam.learned
            assert isinstance(learned, list)
            for i in idx:
                learned[i] += 1
            for i, n in adds:
                learned[i] += n
            cam.learned_n += 1
            cam.learned_defects += defect
            if cam.learned_n >= self.settings.baseline_frames:
                cam.learned = np.asarray(learned, np.int64)
                cam.learning = False
                log.info(
                    "drift_baseline_learned",
                    camera=camera,
                    frames=cam.learned_n,
                    defect_rate=round(cam.learned_defects / cam.learned_n, 6),
                )
        if cam.block_n >= cam.block_frames:
            cam.close_block()

    # -- periodic --

    def evaluate(self) -> dict[str, CameraDrift]:
        """Every camera's verdict now; logs each raise and clear once."""
        if not self.settings.enabled:
            return {}
        return {name: self._evaluate(cam) for name, cam in self._cams.items()}

    def _evaluate(self, cam: _Camera) -> CameraDrift:
        s = self.settings
        min_n = s.min_frames
        win = cam.window + np.asarray(cam.block, np.int64)
        win_n = cam.window_n + cam.block_n
        win_d = cam.window_defects + cam.block_defects
        learned = None if cam.learning else np.asarray(cam.learned, np.int64)
        psi: dict[str, float] = {}
        baselines: dict[str, Source] = {}
        now: set[str] = set()
        for st in self._stats:
            if st.package is not None:
                b = st.package[st.start :]
                b_frames = self._package_images
                baselines[st.name] = "package"
            elif learned is not None:
                b = learned[st.offset + st.start : st.offset + st.size]
                b_frames = self._effective_n(learned, st)
                baselines[st.name] = "learned"
            else:
                psi[st.name] = math.nan
                baselines[st.name] = "learning"
                continue
            w = win[st.offset + st.start : st.offset + st.size]
            nb, nw = int(b.sum()), int(w.sum())
            if nb == 0 or nw == 0:
                psi[st.name] = math.nan
                continue
            v = population_stability_index(b.tolist(), w.tolist())
            psi[st.name] = v
            if st.squares is not None:
                # A frame's candidates of one class come together (one part, one look): they
                # are not independent observations.
                nw = min(nw, self._effective_n(win, st))
                nb = min(nb, b_frames)
            if st.name in self._ignored or win_n < min_n or nb < min_n or nw < min_n:
                continue  # measured, never judged
            if st.name in cam.drifting:
                if v >= s.psi_clear and _shift_significant(b, w, nb, nw, CLEAR_ALPHA):
                    now.add(st.name)
            elif v > s.psi_alarm and _shift_significant(b, w, nb, nw, s.psi_alpha):
                now.add(st.name)
        # Defect rate.
        if self._pkg_defects is not None:
            bd, bn = self._pkg_defects
            baselines[DEFECT_RATE] = "package"
        elif cam.learning:
            bd, bn = 0, 0
            baselines[DEFECT_RATE] = "learning"
        else:
            bd, bn = cam.learned_defects, cam.learned_n
            baselines[DEFECT_RATE] = "learned"
        p: float | None = None
        if bn >= min_n and win_n >= min_n:
            p = defect_rate_p_value(bd, bn, win_d, win_n)
            if DEFECT_RATE not in self._ignored:
                if DEFECT_RATE in cam.drifting:
                    if p <= s.defect_rate_clear_p:
                        now.add(DEFECT_RATE)
                elif p < s.defect_rate_alpha:
                    now.add(DEFECT_RATE)
        for name in sorted(now - cam.drifting):
            log.warning(
                "drift_raised",
                camera=cam.name,
                statistic=name,
                psi=round(psi[name], 4) if name in psi else None,
                p_value=p if name == DEFECT_RATE else None,
                baseline=baselines[name],
                window_frames=win_n,
            )
        for name in sorted(cam.drifting - now):
            log.info("drift_cleared", camera=cam.name, statistic=name)
        cam.drifting = now
        image_sources = {baselines[st.name] for st in self._stats}
        source: Source = (
            "package" if "package" in image_sources else ("learning" if cam.learning else "learned")
        )
        return CameraDrift(
            camera=cam.name,
            source=source,
            baseline_frames=self._package_images if source == "package" else cam.learned_n,
            window_frames=win_n,
            learned_frames=cam.learned_n,
            psi=psi,
            baselines=baselines,
            defect_rate_baseline=bd / bn if bn else None,
            defect_rate_window=win_d / win_n if win_n else None,
            defect_rate_p_value=p,
            drifting=sorted(now),
        )

    @staticmethod
    def _effective_n(counts: np.ndarray, st: _Stat) -> int:
        """Kish's effective sample size of a class's candidates clustered in frames,
        (sum m)^2 / sum m^2 over frames with m candidates: the frame count when every frame has
        one, less when a few frames bring many (the worst case: a frame's candidates all alike)."""
        if st.squares is None:
            return int(counts[st.offset : st.offset + st.size].sum())
        total = int(counts[st.offset : st.offset + st.size].sum())
        sq = int(counts[st.squares])
        return total * total // sq if sq else 0

    def histograms(self, camera: str) -> dict[str, dict[str, list[int]]]:
        """{"baseline"|"window": {statistic: counts}} of one camera, full width (for a detail
        page and for tests; the baseline per statistic as evaluate compares it, before the
        floor cut). Empty for an unknown camera."""
        cam = self._cams.get(camera)
        if cam is None:
            return {}
        win = cam.window + np.asarray(cam.block, np.int64)
        learned = np.asarray(cam.learned, np.int64)
        out: dict[str, dict[str, list[int]]] = {"baseline": {}, "window": {}}
        for st in self._stats:
            sl = slice(st.offset, st.offset + st.size)
            base = st.package if st.package is not None else learned[sl]
            out["baseline"][st.name] = [int(x) for x in base]
            out["window"][st.name] = [int(x) for x in win[sl]]
        return out

    @property
    def cameras(self) -> list[str]:
        return list(self._cams)


def load_package_baseline(package_dir: Path) -> dict[str, Any] | None:
    """The package's validation_stats.json, or None when it has none (or it is unreadable:
    logged; the watch then learns its baseline on the line, it never stops the model)."""
    path = Path(package_dir) / STATS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("drift_package_baseline_unreadable", path=str(path), error=str(exc))
        return None
    if not isinstance(doc, dict):
        log.warning("drift_package_baseline_unreadable", path=str(path), error="not an object")
        return None
    return doc
