"""Drift watch: live frame statistics compared with a baseline, per camera.

(Skeleton: FrameStats is what the inference workers compute per frame; the watch itself is built
on top of it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.imagestats import ImageStats, image_stats
from models.types import Detection


@dataclass(frozen=True, slots=True)
class FrameStats:
    """What the drift watch learns from one frame; computed in the inference worker (it already
    holds the pixels and the detections), a few hundred bytes back to the daemon."""

    image: ImageStats
    class_scores: dict[str, float] = field(default_factory=dict)
    """Highest score per class among the frame's decoded candidates (absent: none)."""
    detections: int = 0
    """Decoded candidates (above the decode floor) in the frame."""


def frame_stats(image: np.ndarray, detections: Sequence[Detection]) -> FrameStats:
    scores: dict[str, float] = {}
    for d in detections:
        if d.score > scores.get(d.class_name, -1.0):
            scores[d.class_name] = float(d.score)
    return FrameStats(image_stats(image), scores, len(detections))
