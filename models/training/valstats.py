"""The drift baseline recorded in a package: the model run over its validation images.

`edge model package --data DATA.yaml` runs the package's own runtime (loader -> ONNX Runtime ->
numpy decode, exactly what the daemon runs) over the data set's validation images and stores
``validation_stats.json`` in the package: per-class detection score histograms, detections per
image, the image-level defect rate under the package's own decision rule, and the image
statistics of :mod:`models.imagestats`. A drift watch on the line compares its live histograms
with these, bin for bin. No torch or ultralytics here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2

from models.config import ModelSettings, OnnxRuntimeSettings
from models.imagestats import StatsAccumulator
from models.loader import load_detector
from models.package import ModelPackage, load_package

STATS_FILE = "validation_stats.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def validation_images(doc: Mapping[str, object], data_yaml: Path, split: str = "val") -> list[Path]:
    """Images of ``split`` of a YOLO data.yaml, or [] when it names none that exist.

    ``path`` is taken relative to the data.yaml's folder (absolute paths as they are); ``split``
    may be a folder or a list of folders. A data.yaml holding only class names is fine.
    """
    base = Path(str(doc.get("path") or "."))
    if not base.is_absolute():
        base = (data_yaml.parent / base).resolve()
    rel = doc.get(split)
    if rel is None:
        return []
    folders = [base / str(r) for r in (rel if isinstance(rel, list) else [rel])]
    out: list[Path] = []
    for f in folders:
        if f.is_dir():
            out.extend(p for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(out)


def decision_floor(pkg: ModelPackage) -> float:
    """The decode floor the stats are taken at: the package's hint, capped at its thresholds."""
    m = pkg.manifest
    lowest = min([m.thresholds.default, *m.thresholds.per_class.values()])
    hint = m.runtime_hints.get("conf_threshold")
    return min(float(hint) if isinstance(hint, (int, float)) else 0.25, lowest)


def compute_validation_stats(
    package_dir: Path,
    images: Sequence[Path],
    *,
    threads: int = 2,
    source: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the package over ``images``; the ``validation_stats.json`` document."""
    pkg = load_package(package_dir, check_model=False)
    m = pkg.manifest
    floor = decision_floor(pkg)
    settings = ModelSettings(
        package=package_dir,
        onnxruntime=OnnxRuntimeSettings(intra_op_threads=threads),
        conf_threshold=floor,
        warmup_runs=1,
    )
    det = load_detector(settings, pkg)
    thr = {c: m.thresholds.per_class.get(c, m.thresholds.default) for c in m.classes}
    min_area = m.thresholds.min_area_px
    acc = StatsAccumulator(tuple(m.classes))
    skipped: list[str] = []
    try:
        for path in images:
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                skipped.append(path.name)
                continue
            prep = det.preprocess(img)
            dets = det.postprocess(det.infer(prep.tensor), [prep], masks=False, outlines=False)[0]
            defect = any(
                d.score >= thr[d.class_name] and d.area_px >= min_area.get(d.class_name, 0)
                for d in dets
            )
            acc.add_image(img, [(d.class_name, d.score) for d in dets], defect)
            if progress:
                progress(1)
    finally:
        det.close()
    if acc.images == 0:
        raise ValueError(
            f"none of the {len(images)} validation images could be read ({skipped[:5]}...)"
        )
    return acc.as_json(
        source=source,
        score_floor=round(floor, 6),
        thresholds=thr,
        min_area_px=dict(min_area),
        unreadable_images=skipped,
    )


def write_stats(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
