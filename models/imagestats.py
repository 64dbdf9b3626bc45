"""Image and detection statistics with FIXED histogram bins: the drift baseline's vocabulary.

`edge model package` records these over the validation images in the package
(``validation_stats.json``), and the daemon's drift watch computes the same numbers on live
frames with these same functions and bins, so the two histograms can be compared bin by bin
(e.g. with :func:`population_stability_index`) without any re-binning. Changing a bin edge is a
format change: bump ``STATS_FORMAT``.

Every image statistic is computed on a grayscale copy downscaled (INTER_AREA) so its longest side
is at most ``STATS_SIDE`` pixels: cheap enough for the daemon to sample live frames (~0.3 ms for
a 1280x1024 frame), and independent of the camera resolution. Statistics:

- ``brightness``: mean gray level, 0..255. Bins: 32 of width 8 (edges 0, 8, ..., 256).
- ``contrast``: standard deviation of the gray levels, 0..~128. Bins: 32 of width 4
  (edges 0, 4, ..., 128; larger values land in the last bin).
- ``focus``: variance of the Laplacian, :func:`camera.calibrate.focus_score` (the measure the
  technician focuses the lens with), on the downscaled copy. Spans decades, so log bins:
  edges 0, then 10**(k/4) for k = 0..24 (1 .. 1e6); larger values land in the last bin.
- ``saturated``: share of pixels at 255 (highlights that lost detail). Edges 0, 1e-4, 1e-3,
  0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.
- detection ``score`` per class: edges 0, 0.05, ..., 1.0 (20 bins; 1.0 lands in the last).
- ``detections`` per image: edges 0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 300, 10000.

A histogram bin is [edge_i, edge_i+1); values below the first edge count in the first bin and
values at or above the last edge in the last, so no observation is ever dropped.

Pure numpy/OpenCV: the daemon and the packaging tool share it without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from camera.calibrate import focus_score

STATS_FORMAT = 1
STATS_SIDE = 256
"""Longest side of the downscaled copy the image statistics are computed on."""

BRIGHTNESS_EDGES: tuple[float, ...] = tuple(float(v) for v in range(0, 257, 8))
CONTRAST_EDGES: tuple[float, ...] = tuple(float(v) for v in range(0, 129, 4))
FOCUS_EDGES: tuple[float, ...] = (0.0, *(round(10 ** (k / 4), 6) for k in range(25)))
SATURATED_EDGES: tuple[float, ...] = (0.0, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SCORE_EDGES: tuple[float, ...] = tuple(round(k * 0.05, 2) for k in range(21))
DETECTIONS_EDGES: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 300, 10000)

IMAGE_EDGES: dict[str, tuple[float, ...]] = {
    "brightness": BRIGHTNESS_EDGES,
    "contrast": CONTRAST_EDGES,
    "focus": FOCUS_EDGES,
    "saturated": SATURATED_EDGES,
}


@dataclass(frozen=True, slots=True)
class ImageStats:
    brightness: float
    contrast: float
    focus: float
    saturated: float

    def as_dict(self) -> dict[str, float]:
        return {
            "brightness": self.brightness,
            "contrast": self.contrast,
            "focus": self.focus,
            "saturated": self.saturated,
        }


def downscaled_gray(image: np.ndarray, side: int = STATS_SIDE) -> np.ndarray:
    """uint8 grayscale copy with the longest side <= ``side`` (never upscaled).

    Always a copy, never a view of ``image``: the inference worker takes it from a frame in
    shared memory and computes the statistics after the verdict went back, when the daemon may
    already have written the next frame (of any camera) into that memory."""
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        gray = cv2.cvtColor(image, code) if image.shape[2] in (3, 4) else image[:, :, 0]
    else:
        gray = image
    if gray.dtype != np.uint8:  # 16-bit mono cameras: compare on the 8-bit scale
        scale = 255.0 / 65535.0 if gray.dtype == np.uint16 else 255.0
        gray = np.clip(gray.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    h, w = gray.shape[:2]
    f = side / max(h, w)
    if f < 1.0:
        gray = cv2.resize(
            gray, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
        )
    if np.may_share_memory(gray, image):  # a small Mono8 frame comes through untouched
        return gray.copy()
    return np.ascontiguousarray(gray)


def image_stats(image: np.ndarray) -> ImageStats:
    """The four drift statistics of one frame (mono or BGR, 8 or 16 bit)."""
    g = downscaled_gray(image)
    mean, std = cv2.meanStdDev(g)
    return ImageStats(
        brightness=float(mean[0, 0]),
        contrast=float(std[0, 0]),
        focus=focus_score(g),
        saturated=float(np.count_nonzero(g == 255)) / max(g.size, 1),
    )


@dataclass(slots=True)
class Histogram:
    """Counts over fixed bin edges (see the module docstring for the bin rule)."""

    edges: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    """Sum of the observed values (for the mean)."""

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or any(np.diff(self.edges) <= 0):
            raise ValueError(f"histogram edges must be increasing, got {self.edges}")
        if not self.counts:
            self.counts = [0] * (len(self.edges) - 1)
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError("counts must have one entry per bin")

    def bin_of(self, value: float) -> int:
        i = int(np.searchsorted(self.edges, value, side="right")) - 1
        return min(max(i, 0), len(self.counts) - 1)

    def add(self, value: float) -> None:
        self.counts[self.bin_of(value)] += 1
        self.total += float(value)

    def add_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def as_json(self) -> dict[str, Any]:
        mean = self.mean
        return {
            "edges": list(self.edges),
            "counts": list(self.counts),
            "n": self.n,
            "mean": None if mean is None else round(mean, 6),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Histogram:
        h = cls(tuple(float(e) for e in doc["edges"]), [int(c) for c in doc["counts"]])
        mean = doc.get("mean")
        h.total = float(mean) * h.n if mean is not None else 0.0
        return h


def population_stability_index(
    expected: Histogram | Sequence[int], actual: Histogram | Sequence[int], eps: float = 1e-4
) -> float:
    """PSI between two histograms over the same bins (rule of thumb: < 0.1 stable, 0.1-0.25
    moderate shift, > 0.25 drift). ``eps`` keeps empty bins finite."""
    e = np.asarray(expected.counts if isinstance(expected, Histogram) else expected, np.float64)
    a = np.asarray(actual.counts if isinstance(actual, Histogram) else actual, np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms have {e.size} and {a.size} bins; compare the same bins")
    if e.sum() == 0 or a.sum() == 0:
        return 0.0
    pe = np.clip(e / e.sum(), eps, None)
    pa = np.clip(a / a.sum(), eps, None)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


@dataclass(slots=True)
class StatsAccumulator:
    """Accumulates the drift baseline over images: what `edge model package` records and what a
    drift watch accumulates on live frames (same fields, same bins)."""

    classes: tuple[str, ...]
    images: int = 0
    defect_images: int = 0
    image: dict[str, Histogram] = field(default_factory=dict)
    scores: dict[str, Histogram] = field(default_factory=dict)
    detections: Histogram = field(default_factory=lambda: Histogram(DETECTIONS_EDGES))

    def __post_init__(self) -> None:
        if not self.image:
            self.image = {k: Histogram(e) for k, e in IMAGE_EDGES.items()}
        if not self.scores:
            self.scores = {c: Histogram(SCORE_EDGES) for c in self.classes}

    def add_image(
        self,
        image: np.ndarray | ImageStats,
        detections: Sequence[tuple[str, float]],
        defect: bool,
    ) -> None:
        """One image: its pixels (or precomputed stats), its (class, score) detections, and
        the image-level verdict."""
        st = image if isinstance(image, ImageStats) else image_stats(image)
        for k, v in st.as_dict().items():
            self.image[k].add(v)
        self.detections.add(len(detections))
        for cls, score in detections:
            h = self.scores.get(cls)
            if h is not None:
                h.add(score)
        self.images += 1
        self.defect_images += int(defect)

    @property
    def defect_rate(self) -> float | None:
        return self.defect_images / self.images if self.images else None

    def as_json(self, **extra: Any) -> dict[str, Any]:
        rate = self.defect_rate
        return {
            "format": STATS_FORMAT,
            "stats_side": STATS_SIDE,
            **extra,
            "images": self.images,
            "defect_images": self.defect_images,
            "defect_rate": None if rate is None else round(rate, 6),
            "detections_per_image": self.detections.as_json(),
            "score_histograms": {c: h.as_json() for c, h in self.scores.items()},
            "image_stats": {k: h.as_json() for k, h in self.image.items()},
        }
