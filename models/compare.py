"""Do two ways of running a model make the same OK/DEFECT decisions? (INT8 vs FP32, OpenVINO bf16
vs ONNX Runtime f32, a new package vs the running one.)

Image-level decisions are what the line acts on, so that is what is compared, under the decision
rule the packages carry (a detection with ``score >= thresholds.per_class[class]`` and
``area_px >= thresholds.min_area_px[class]`` makes the image DEFECT). Both detectors see the same
preprocessed tensor per image; inference time is taken side by side, image by image, so a burst of
load from elsewhere hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from models.config import ModelSettings, OnnxRuntimeSettings
from models.imagestats import StatsAccumulator
from models.loader import load_detector
from models.package import ModelPackage
from models.training.valstats import decision_floor
from models.types import Detection, Detector


def is_defect(pkg: ModelPackage, dets: Sequence[Detection]) -> bool:
    """The package's own image-level decision rule."""
    t = pkg.manifest.thresholds
    return any(
        d.score >= t.per_class.get(d.class_name, t.default)
        and d.area_px >= t.min_area_px.get(d.class_name, 0)
        for d in dets
    )


def onnx_detector(pkg: ModelPackage, threads: int = 2) -> Detector:
    """The reference: the package on ONNX Runtime (f32), decoding down to its decision floor."""
    return load_detector(
        ModelSettings(
            package=pkg.root,
            onnxruntime=OnnxRuntimeSettings(intra_op_threads=threads),
            conf_threshold=decision_floor(pkg),
            warmup_runs=1,
        ),
        pkg,
    )


@dataclass(slots=True)
class Comparison:
    images: int
    agreement: float
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    reference_ms: float = 0.0
    candidate_ms: float = 0.0
    """Median infer() time per image (batch of 1), measured side by side."""
    max_score_diff: float = 0.0
    """Largest difference of the image's top detection score."""
    stats: StatsAccumulator | None = None
    """The candidate's drift statistics over the images (when asked for)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "agreement": round(self.agreement, 6),
            "disagreements": self.disagreements[:50],
            "reference_infer_ms_p50": round(self.reference_ms, 3),
            "candidate_infer_ms_p50": round(self.candidate_ms, 3),
            "max_top_score_diff": round(self.max_score_diff, 6),
        }


def compare_decisions(
    ref_pkg: ModelPackage,
    reference: Detector,
    cand_pkg: ModelPackage,
    candidate: Detector,
    images: Sequence[Path],
    *,
    progress: Callable[[int], None] | None = None,
    stats: bool = False,
    close: bool = True,
) -> Comparison:
    """Run both detectors over ``images`` and compare their image-level decisions."""
    acc = StatsAccumulator(tuple(cand_pkg.manifest.classes)) if stats else None
    agree = 0
    diffs: list[dict[str, Any]] = []
    t_ref: list[float] = []
    t_cand: list[float] = []
    max_diff = 0.0
    try:
        for f in images:
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError(f"{f}: unreadable image")
            p = reference.preprocess(img)
            t0 = time.perf_counter()
            out_a = reference.infer(p.tensor)
            t1 = time.perf_counter()
            out_b = candidate.infer(p.tensor)
            t2 = time.perf_counter()
            t_ref.append((t1 - t0) * 1e3)
            t_cand.append((t2 - t1) * 1e3)
            da = reference.postprocess(out_a, [p], masks=False, outlines=False)[0]
            db = candidate.postprocess(out_b, [p], masks=False, outlines=False)[0]
            va, vb = is_defect(ref_pkg, da), is_defect(cand_pkg, db)
            top_a = max((d.score for d in da), default=0.0)
            top_b = max((d.score for d in db), default=0.0)
            max_diff = max(max_diff, abs(top_a - top_b))
            if acc is not None:
                acc.add_image(img, [(d.class_name, d.score) for d in db], vb)
            if va == vb:
                agree += 1
            else:
                diffs.append(
                    {
                        "image": f.name,
                        "reference": "DEFECT" if va else "OK",
                        "candidate": "DEFECT" if vb else "OK",
                        "reference_top": round(top_a, 4),
                        "candidate_top": round(top_b, 4),
                    }
                )
            if progress:
                progress(1)
    finally:
        if close:
            reference.close()
            candidate.close()
    n = len(images)
    return Comparison(
        n,
        agree / max(n, 1),
        diffs,
        statistics.median(t_ref) if t_ref else 0.0,
        statistics.median(t_cand) if t_cand else 0.0,
        max_diff,
        acc,
    )
