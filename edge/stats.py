"""Run statistics for the exit summary and the bench report (exact percentiles, not buckets)."""

from __future__ import annotations

import collections
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def percentiles(samples: array[float] | list[float]) -> dict[str, float]:
    if not len(samples):
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    a = (
        np.frombuffer(samples, dtype=np.float64)
        if isinstance(samples, array)
        else np.asarray(samples, dtype=np.float64)
    )
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


@dataclass
class RunStats:
    frames: int = 0
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    failsafes: collections.Counter[str] = field(default_factory=collections.Counter)
    misses: collections.Counter[str] = field(default_factory=collections.Counter)
    late_results: int = 0
    spool_rejected: int = 0
    e2e_ms: array[float] = field(default_factory=lambda: array("d"))
    stages_ms: dict[str, array[float]] = field(
        default_factory=lambda: collections.defaultdict(lambda: array("d"))
    )
    per_camera: collections.Counter[str] = field(default_factory=collections.Counter)

    def record_verdict(self, camera: str, verdict: str, e2e_ms: float) -> None:
        self.verdicts[verdict] += 1
        self.per_camera[camera] += 1
        self.e2e_ms.append(e2e_ms)

    def record_miss(self, camera: str, outcome: str) -> None:
        self.misses[outcome] += 1
        self.per_camera[camera] += 1

    def stage(self, name: str, ms: float) -> None:
        self.stages_ms[name].append(ms)

    @property
    def decided(self) -> int:
        return sum(self.verdicts.values()) + sum(self.misses.values())

    @property
    def deadline_misses(self) -> int:
        return sum(self.misses.values())

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "decided": self.decided,
            "verdicts": dict(self.verdicts),
            "failsafes": dict(self.failsafes),
            "deadline_misses": self.deadline_misses,
            "misses_by_outcome": dict(self.misses),
            "late_results_discarded": self.late_results,
            "spool_rejected": self.spool_rejected,
            "end_to_end_ms": percentiles(self.e2e_ms),
            "stages_ms": {k: percentiles(v) for k, v in sorted(self.stages_ms.items())},
        }
