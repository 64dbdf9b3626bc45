"""COCO instance JSON (CVAT "COCO 1.0" export, labelme2coco, Roboflow, ...).

Segmentations come as polygons (a list of ``[x1, y1, ...]``), as uncompressed RLE (``counts`` a
list) or as compressed RLE (``counts`` a string); RLE is decoded with pycocotools (the reference
implementation, a wheel in the ``train`` extra) and becomes polygons like any mask. Annotations
with only a ``bbox`` become box polygons, counted once in the warnings.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from models.datasets.sources.base import (
    Sample,
    Shape,
    Skip,
    SourceRead,
    box_polygon,
    find_image,
    flat_polygon,
    mask_shapes,
    missing_image,
    stem_of,
)

BOXES_WARNING = "box-only annotations turned into box polygons (no segmentation given)"
CROWD_WARNING = "iscrowd regions imported as ordinary instances (one per connected piece)"
DEGENERATE_WARNING = "polygons with fewer than 3 points dropped"
_KEYS = ("images", "annotations", "categories")


@functools.lru_cache(maxsize=1)
def _parsed(path: Path, mtime_ns: int, size: int) -> Any:
    return json.loads(path.read_text())


def _load(path: Path) -> Any:
    """The file's JSON, parsed once for detection, the file lookup and the read (an export of a
    large set is hundreds of MB); a changed file is parsed again."""
    st = path.stat()
    return _parsed(path.resolve(), st.st_mtime_ns, st.st_size)


def is_coco(path: Path) -> bool:
    """A JSON object with images, annotations and categories lists."""
    try:
        doc = _load(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in _KEYS)


def find_annotation_file(src: Path) -> list[Path]:
    """COCO files at ``src`` (a file) or in it or its ``annotations/`` folder."""
    if src.is_file():
        return [src] if src.suffix.lower() == ".json" and is_coco(src) else []
    found = [p for p in sorted(src.glob("*.json")) if is_coco(p)]
    found += [p for p in sorted((src / "annotations").glob("*.json")) if is_coco(p)]
    return found


def _image_roots(json_path: Path, images_dir: Path | None) -> list[Path]:
    if images_dir is not None:
        return [images_dir]
    here = json_path.parent
    return [here / "images", here, here.parent / "images", here.parent]


def _rle_mask(seg: dict[str, Any], height: int, width: int) -> np.ndarray:
    try:
        from pycocotools import mask as mask_util
    except ImportError as e:  # pragma: no cover - pycocotools is in the train extra
        raise RuntimeError("COCO RLE masks need pycocotools: pip install -e '.[train]'") from e
    h, w = (int(v) for v in seg["size"])
    if (h, w) != (height, width):
        raise ValueError(f"RLE size {w}x{h} differs from the image's {width}x{height}")
    counts = seg["counts"]
    # frPyObjects treats every dict as uncompressed RLE; a string is compressed already.
    rle = mask_util.frPyObjects(seg, h, w) if isinstance(counts, list) else seg
    with warnings.catch_warnings():
        # pycocotools 2.0.11 under numpy 2: "__array__ ... copy keyword" on every decode.
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_util.decode(rle), bool)


def _shapes(
    ann: dict[str, Any], label: str, height: int, width: int, out: SourceRead
) -> list[Shape]:
    seg = ann.get("segmentation")
    if ann.get("iscrowd"):
        out.warnings[CROWD_WARNING] += 1
    if isinstance(seg, dict) and "counts" in seg:
        return mask_shapes(_rle_mask(seg, height, width), label)
    shapes: list[Shape] = []
    if isinstance(seg, list) and seg:
        for part in seg:
            poly = flat_polygon([float(v) for v in part]) if isinstance(part, list) else None
            if poly is None:
                out.warnings[DEGENERATE_WARNING] += 1
            else:
                shapes.append(Shape(label, poly))
        return shapes
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4:
        x, y, w, h = (float(v) for v in bbox)
        out.warnings[BOXES_WARNING] += 1
        return [Shape(label, box_polygon(x, y, x + w, y + h))]
    raise ValueError(f"annotation {ann.get('id')} has neither segmentation nor bbox")


def read(json_path: Path, images_dir: Path | None = None) -> SourceRead:
    """Read one COCO file; images are looked up beside it, in images/, or in ``images_dir``."""
    try:
        doc = _load(json_path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not readable as COCO JSON ({e})") from e
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in _KEYS):
        raise ValueError(f"{json_path}: not a COCO file (needs images, annotations, categories)")
    cats = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
    # Stable class order: by COCO category id (ids themselves are remapped to 0..N-1).
    out = SourceRead("coco", [cats[k] for k in sorted(cats)])
    anns: dict[Any, list[dict[str, Any]]] = {}
    images = {im.get("id"): im for im in doc["images"] if isinstance(im, dict)}
    for ann in doc["annotations"]:
        iid = ann.get("image_id")
        if iid not in images:
            what = f"annotation {ann.get('id')}"
            out.skipped.append(Skip(what, "label for a missing image", f"image_id {iid}", False))
            continue
        anns.setdefault(iid, []).append(ann)
    roots = _image_roots(json_path, images_dir)
    for iid, im in images.items():
        rel = str(im.get("file_name", "")).replace("\\", "/")
        path = find_image(rel, roots) if rel else None
        if path is None:
            out.skipped.append(missing_image(rel or f"image {iid}", roots))
            continue
        if not isinstance(im.get("width"), int) or not isinstance(im.get("height"), int):
            out.skipped.append(Skip(rel, "bad annotation", "image entry without width/height"))
            continue
        try:
            shapes = _image_shapes(anns.get(iid, []), cats, im["height"], im["width"], out)
        except KeyError as e:
            out.skipped.append(Skip(rel, "unknown class", str(e.args[0])))
            continue
        except (ValueError, TypeError) as e:
            out.skipped.append(Skip(rel, "bad annotation", str(e)))
            continue
        out.samples.append(Sample(path, rel, stem_of(rel), (im["width"], im["height"]), shapes))
    return out


def _image_shapes(
    anns: list[dict[str, Any]], cats: dict[int, str], height: int, width: int, out: SourceRead
) -> tuple[Shape, ...]:
    """All shapes of one image; KeyError for an unknown category, so the whole image is left out
    (dropping one annotation would teach that its defect is background)."""
    shapes: list[Shape] = []
    for ann in anns:
        cid = ann.get("category_id")
        if cid not in cats:
            raise KeyError(f"category_id {cid}")
        shapes += _shapes(ann, cats[cid], height, width, out)
    return tuple(shapes)
