"""YOLO label folders: ultralytics' ``images/`` + ``labels/`` trees (split or not) and darknet's
labels beside the images (CVAT "YOLO 1.1": ``obj_train_data/``, ``obj.names``).

A line is ``class x1 y1 x2 y2 ...`` (segmentation, normalised) or ``class cx cy w h`` (detection:
turned into a box polygon and counted). Class names come from data.yaml, classes.txt or
obj.names, else from the caller (``--classes``). An image without a label file is defect-free, as
ultralytics reads it; the source's own train/val/test folders are not kept (the split is redone by
group, see the importer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ruamel.yaml import YAML

from models.datasets.sources.base import (
    IMAGE_SUFFIXES,
    Sample,
    Shape,
    Skip,
    SourceRead,
    box_polygon,
)
from models.datasets.yolo import class_names

BOXES_WARNING = "detection lines (class cx cy w h) turned into box polygons"
NO_LABEL_WARNING = "images without a label file taken as defect-free"
SPLIT_DIRS = {"train", "val", "valid", "validation", "test"}
_NAME_FILES = ("classes.txt", "obj.names")
_NOT_LABELS = {"classes.txt", "train.txt", "val.txt", "valid.txt", "test.txt", "obj.data"}


def declared_names(src: Path) -> list[str] | None:
    """Class names from data.yaml / dataset.yaml, classes.txt or obj.names in ``src``."""
    for yml in ("data.yaml", "dataset.yaml"):
        path = src / yml
        if path.is_file():
            doc = YAML(typ="safe", pure=True).load(path.read_text())
            if isinstance(doc, dict) and "names" in doc:
                return class_names(doc)
    for name in _NAME_FILES:
        path = src / name
        if path.is_file():
            return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return None


def _images(src: Path) -> list[Path]:
    return sorted(
        p
        for p in src.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and "labels" not in p.parts
    )


def label_for(image: Path, src: Path) -> Path:
    """ultralytics' rule (last ``images`` folder becomes ``labels``), else the .txt beside it."""
    parts = list(image.relative_to(src).parts)
    if "images" in parts[:-1]:
        idx = len(parts) - 2 - parts[-2::-1].index("images")
        parts[idx] = "labels"
        return (src / Path(*parts)).with_suffix(".txt")
    return image.with_suffix(".txt")


def looks_like(src: Path) -> bool:
    """images/ + labels/, or label .txt files beside images (names file optional)."""
    if (src / "images").is_dir() and (src / "labels").is_dir():
        return True
    return any(label_for(img, src).is_file() for img in _images(src)[:200])


def _parse(line: str, names: list[str]) -> tuple[Shape | None, str | None]:
    """One label line as a shape (polygon normalised 0..1), or the reason it is unusable."""
    parts = line.split()
    try:
        cid = int(parts[0])
        vals = [float(v) for v in parts[1:]]
    except ValueError:
        return None, f"not numbers: {line[:40]!r}"
    if not 0 <= cid < len(names):
        return None, f"class id {cid} (names has {len(names)})"
    if len(vals) == 4:
        cx, cy, w, h = vals
        return Shape(names[cid], box_polygon(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)), "box"
    if len(vals) < 6 or len(vals) % 2:
        return None, f"{len(vals)} coordinates (want 4, or an even number >= 6)"
    return Shape(names[cid], np.array(vals, np.float32).reshape(-1, 2)), None


def read(src: Path, fallback_names: list[str] | None = None) -> SourceRead:
    """Read a YOLO folder; ``fallback_names`` (``--classes``) name the ids when no file does."""
    names = declared_names(src)
    if names is None:
        if not fallback_names:
            raise ValueError(
                f"{src}: no data.yaml, classes.txt or obj.names; give --classes a,b,c "
                "(names in class id order)"
            )
        names = list(fallback_names)
    out = SourceRead("yolo", names)
    used_labels: set[Path] = set()
    split_dirs = False
    images = _images(src)
    image_dirs = {p.parent for p in images}
    for img in images:
        rel = img.relative_to(src).as_posix()
        split_dirs |= any(p in SPLIT_DIRS for p in img.relative_to(src).parts[:-1])
        lbl = label_for(img, src)
        shapes: list[Shape] = []
        problem = None
        if lbl.is_file():
            used_labels.add(lbl)
            for line in lbl.read_text().splitlines():
                if not line.strip():
                    continue
                shape, why = _parse(line, names)
                if shape is None:
                    problem = why
                    break
                if why == "box":
                    out.warnings[BOXES_WARNING] += 1
                shapes.append(shape)
        else:
            out.warnings[NO_LABEL_WARNING] += 1
        if problem is not None:
            reason = "unknown class" if problem.startswith("class id") else "bad label line"
            out.skipped.append(Skip(rel, reason, problem))
            continue
        out.samples.append(Sample(img, rel, img.stem, None, tuple(shapes)))
    for txt in sorted(src.rglob("*.txt")):
        if txt in used_labels or txt.name in _NOT_LABELS or txt.parent == src:
            continue
        in_labels = "labels" in txt.relative_to(src).parts
        if in_labels or txt.parent in image_dirs:
            rel = txt.relative_to(src).as_posix()
            out.skipped.append(Skip(rel, "label for a missing image", "", image=False))
    if split_dirs:
        out.notes.append("the source's train/val/test folders were not kept: split redone by group")
    return out
