"""The one record every labelled-data format is read into.

Each reader (COCO, YOLO, CVAT, mask folders) turns its files into ``Sample`` records and says what
it left out (``Skip``) and what it had to guess (``warnings``); grouping, splitting and writing in
``models/datasets/importer.py`` never need to know which tool exported the labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.datasets.yolo import mask_to_polygons

MASK_EPSILON_PX = 1.0
"""Polygon simplification for masks: the magnetic-tile converter's value, kept so its labels stay
byte-identical after the converter became a preset of the mask importer."""
MASK_MIN_AREA_PX = 4.0
"""Mask pieces smaller than this are noise (same provenance as MASK_EPSILON_PX)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".jp2"}
)
"""Files a reader treats as images (OpenCV decodes them all); which of them are copied unchanged is
the importer's business (``yolo.COPY_SUFFIXES``)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """One labelled object: its class name and its outline as a float32 (N, 2) x,y polygon."""

    label: str
    polygon: np.ndarray


@dataclass(frozen=True, slots=True)
class Sample:
    """One image and everything labelled on it (no shapes: a defect-free image).

    ``size`` is (width, height) as the labels assume it; the importer checks it against the decoded
    image. ``None`` means the polygons are normalised to 0..1 (YOLO labels are relative to the
    image, whose size only decoding it tells).
    """

    image: Path
    rel: str
    """Posix path relative to the source: what --group-regex and --group-csv look at."""
    name: str
    """Proposed output file stem; the importer resolves collisions."""
    size: tuple[int, int] | None
    shapes: tuple[Shape, ...]


@dataclass(frozen=True, slots=True)
class Skip:
    """Something left out, and why (``reason`` is the category the report counts by)."""

    rel: str
    reason: str
    detail: str = ""
    image: bool = True
    """An image file: its name still links its neighbours when groups cluster numeric keys."""


@dataclass(slots=True)
class SourceRead:
    """What a reader found: samples, declared class names (in the format's order), skips."""

    format: str
    classes: list[str]
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A box as a 4-corner polygon: how box-only labels enter a segmentation data set."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def mask_shapes(mask: np.ndarray, label: str) -> list[Shape]:
    """One shape per connected piece of a binary mask (YOLO-seg polygons have no holes)."""
    polys = mask_to_polygons(mask, epsilon_px=MASK_EPSILON_PX, min_area_px=MASK_MIN_AREA_PX)
    return [Shape(label, p) for p in polys]


def flat_polygon(values: list[float]) -> np.ndarray | None:
    """``[x1, y1, x2, y2, ...]`` as (N, 2), or None when it has fewer than 3 points."""
    if len(values) < 6 or len(values) % 2:
        return None
    return np.asarray(values, np.float32).reshape(-1, 2)


def find_image(name: str, roots: list[Path]) -> Path | None:
    """The first root holding ``name`` (exports put images beside or below the annotation file)."""
    for root in roots:
        p = root / name
        if p.is_file():
            return p
    return None


def missing_image(rel: str, roots: list[Path]) -> Skip:
    """The skip of an image that no root holds, naming every place looked in."""
    return Skip(rel, "image file missing", f"looked in {', '.join(map(str, roots))}")


def stem_of(rel: str) -> str:
    """Output stem proposed for a relative image path: its file stem."""
    return Path(rel).stem
