"""CVAT for images 1.1 XML (``annotations.xml``), CVAT's own export format.

Polygons are taken as they are; boxes (rotated ones too) and ellipses become polygons; masks are
CVAT's run lengths (comma-separated, row-major within the mask's box, starting with background).
Shapes a segmentation label cannot express (polyline, points, cuboid, skeleton) are skipped and
counted; an image whose every shape was of that kind is left out, since calling it defect-free
would be a guess. Labels come from ``<meta>`` (task, job or project).

The file is a local export the user chose to import, so the standard library parser is enough;
defusedxml is used when installed.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import numpy as np

try:
    from defusedxml.ElementTree import iterparse, parse
except ImportError:
    from xml.etree.ElementTree import iterparse, parse

from models.datasets.sources.base import (
    Sample,
    Shape,
    Skip,
    SourceRead,
    box_polygon,
    find_image,
    mask_shapes,
    missing_image,
    stem_of,
)

BOXES_WARNING = "box shapes turned into box polygons"
ELLIPSE_WARNING = "ellipses turned into polygons"
TAGS_NOTE = "image tags ignored (a tag is not a region)"
UNSUPPORTED = ("polyline", "points", "cuboid", "skeleton")


def is_cvat(path: Path) -> bool:
    """An ``<annotations>`` root whose children include ``<image>`` (read only up to it)."""
    try:
        depth = 0
        for event, el in iterparse(str(path), events=("start", "end")):
            if event == "end":
                depth -= 1
                continue
            depth += 1
            if depth == 1 and el.tag != "annotations":
                return False
            if depth == 2 and el.tag == "image":
                return True
    except (OSError, ParseError):
        return False
    return False


def find_annotation_file(src: Path) -> list[Path]:
    """CVAT XML files at ``src`` (a file) or directly in it."""
    if src.is_file():
        return [src] if src.suffix.lower() == ".xml" and is_cvat(src) else []
    return [p for p in sorted(src.glob("*.xml")) if is_cvat(p)]


def rle_to_mask(rle: str, width: int, height: int) -> np.ndarray:
    """CVAT mask run lengths (background first, row-major) as a (height, width) bool array."""
    counts = np.array([int(v) for v in rle.replace(" ", "").split(",") if v], np.int64)
    if counts.sum() != width * height or (counts < 0).any():
        raise ValueError(f"mask RLE covers {counts.sum()} pixels, its box {width}x{height}")
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.repeat(values, counts).reshape(height, width)


def _floats(el: Element, *names: str) -> list[float]:
    return [float(el.attrib[n]) for n in names]


def _rotate(poly: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, clockwise in image coordinates (CVAT's ``rotation``)."""
    if not degrees:
        return poly
    c = poly.mean(axis=0)
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], np.float32)
    return ((poly - c) @ rot.T + c).astype(np.float32)


def _shape(el: Element, width: int, height: int, out: SourceRead) -> list[Shape]:
    label = el.attrib["label"]
    rotation = float(el.attrib.get("rotation", 0))
    if el.tag == "polygon":
        pts = [p.split(",") for p in el.attrib["points"].split(";") if p]
        poly = np.array([[float(x), float(y)] for x, y in pts], np.float32)
        if len(poly) < 3:
            raise ValueError("polygon with fewer than 3 points")
        return [Shape(label, poly)]
    if el.tag == "box":
        out.warnings[BOXES_WARNING] += 1
        return [
            Shape(label, _rotate(box_polygon(*_floats(el, "xtl", "ytl", "xbr", "ybr")), rotation))
        ]
    if el.tag == "ellipse":
        cx, cy, rx, ry = _floats(el, "cx", "cy", "rx", "ry")
        out.warnings[ELLIPSE_WARNING] += 1
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1).astype(np.float32)
        return [Shape(label, _rotate(poly, rotation))]
    if el.tag == "mask":
        left, top, w, h = (int(float(v)) for v in _floats(el, "left", "top", "width", "height"))
        box = rle_to_mask(el.attrib["rle"], w, h)
        full = np.zeros((height, width), bool)
        y1, x1 = min(top + h, height), min(left + w, width)
        full[top:y1, left:x1] = box[: y1 - top, : x1 - left]
        return mask_shapes(full, label)
    raise AssertionError(el.tag)


def _labels(root: Element) -> list[str]:
    names: list[str] = []
    for lab in root.iterfind("meta//labels/label"):
        name = lab.findtext("name")
        if name and name not in names:
            names.append(name)
    return names


def read(xml_path: Path, images_dir: Path | None = None) -> SourceRead:
    """Read one CVAT XML; images are looked up in images/ next to it, next to it, or
    ``images_dir``."""
    try:
        root = parse(str(xml_path)).getroot()
    except (OSError, ParseError) as e:
        raise ValueError(f"{xml_path}: not readable as XML ({e})") from e
    if root.tag != "annotations":
        raise ValueError(f"{xml_path}: not a CVAT export (root <{root.tag}>, want <annotations>)")
    if root.find("image") is None and root.find("track") is not None:
        raise ValueError(f"{xml_path}: a CVAT video (track) export; export 'CVAT for images 1.1'")
    out = SourceRead("cvat", _labels(root))
    known = set(out.classes)
    here = xml_path.parent
    roots = [images_dir] if images_dir else [here / "images", here, here.parent / "images"]
    for im in root.iterfind("image"):
        rel = im.attrib.get("name", "").replace("\\", "/")
        path = find_image(rel, roots) if rel else None
        if path is None:
            out.skipped.append(missing_image(rel or "<image>", roots))
            continue
        width, height = int(im.attrib["width"]), int(im.attrib["height"])
        shapes: list[Shape] = []
        unsupported: list[str] = []
        problem: tuple[str, str] | None = None
        for el in im:
            if el.tag == "tag":
                out.warnings[TAGS_NOTE] += 1
                continue
            if el.tag in UNSUPPORTED or el.tag not in ("polygon", "box", "ellipse", "mask"):
                out.warnings[f"unsupported CVAT shapes skipped: {el.tag}"] += 1
                unsupported.append(el.tag)
                continue
            label = el.attrib.get("label", "")
            if label not in known:
                problem = ("unknown class", repr(label))
                break
            try:
                shapes += _shape(el, width, height, out)
            except (KeyError, ValueError) as e:
                problem = ("bad annotation", f"<{el.tag}>: {e}")
                break
        if problem is None and unsupported and not shapes:
            problem = (
                "only unsupported shapes (truth unknown)",
                ", ".join(sorted(set(unsupported))),
            )
        if problem:
            out.skipped.append(Skip(rel, *problem))
            continue
        out.samples.append(Sample(path, rel, stem_of(rel), (width, height), tuple(shapes)))
    return out
