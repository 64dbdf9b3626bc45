"""Which format a source folder or file is in, when that is obvious; otherwise a clear question.

Guessing wrong would import the wrong labels silently, so anything but exactly one match asks for
``--format``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from models.datasets.sources import coco, cvat, masks, yolo

Format = Literal["coco", "yolo", "cvat", "masks"]
FORMATS: tuple[str, ...] = get_args(Format)


def annotation_file(src: Path, fmt: Format) -> Path:
    """The file a COCO or CVAT import reads (``src`` itself or the single one inside it)."""
    found = (coco if fmt == "coco" else cvat).find_annotation_file(src)
    what = "COCO JSON (images, annotations, categories)" if fmt == "coco" else "CVAT XML"
    if not found:
        raise ValueError(f"{src}: no {what} found")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{src}: several {what} files ({names}); pass one of them as SRC")
    return found[0]


def detect(src: Path) -> Format:
    """The format of ``src``; ValueError naming the candidates when none or several fit."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: does not exist")
    hits: list[Format] = []
    if coco.find_annotation_file(src):
        hits.append("coco")
    if cvat.find_annotation_file(src):
        hits.append("cvat")
    if src.is_dir():
        if yolo.looks_like(src):
            hits.append("yolo")
        if masks.looks_like(src):
            hits.append("masks")
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ValueError(f"{src}: cannot tell its format; give --format ({'|'.join(FORMATS)})")
    raise ValueError(f"{src}: looks like {' and '.join(hits)}; give --format ({'|'.join(FORMATS)})")
