"""Small labelled sets in the four import formats, written by the tests themselves.

The same 16 images (8 parts x 2 shots, 64 x 64 px) in each format: parts p0-p2 have dents
(circles; p1 two of them), p3-p5 stains (tilted ellipses), p6-p7 are defect-free. The second shot
of a part is the first shifted by 2 px: a near-duplicate that must stay in the first one's split
(group regex ``p(\\d+)_``). ``truth(stem)`` gives the drawn masks, so a test can compare the
imported labels with what was drawn, not with what another converter made of it.

Plain functions (not fixtures) so any test, including a train-one-epoch acceptance test, can
write a set into its own tmp folder: ``src = write_coco_set(tmp_path)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("dent", "stain")
SIZE = 64
GROUP_REGEX = r"p(\d+)_"
Blob = tuple[str, str, tuple[int, ...]]
"""(class, kind, params): ("dent", "circle", (cx, cy, r)) or ("stain", "ellipse", (cx, cy, ax, ay,
angle)): tilted ellipses, so a mask read transposed or a box taken for the region shows."""

_PARTS: dict[int, list[Blob]] = {
    0: [("dent", "circle", (20, 22, 8))],
    1: [("dent", "circle", (16, 16, 6)), ("dent", "circle", (44, 44, 7))],
    2: [("dent", "circle", (36, 28, 9))],
    3: [("stain", "ellipse", (18, 18, 11, 5, 30))],
    4: [("stain", "ellipse", (40, 42, 12, 6, 150))],
    5: [("stain", "ellipse", (28, 14, 10, 4, 60))],
    6: [],
    7: [],
}


def _shift(blob: Blob, dx: int) -> Blob:
    cls, kind, p = blob
    return cls, kind, (p[0] + dx, *p[1:])


SPEC: dict[str, list[Blob]] = {
    f"p{part}_s{shot}": [_shift(b, 2 * shot) for b in blobs]
    for part, blobs in _PARTS.items()
    for shot in (0, 1)
}
"""Image stem -> blobs drawn on it."""


def blob_mask(blob: Blob) -> np.ndarray:
    _, kind, p = blob
    m = np.zeros((SIZE, SIZE), np.uint8)
    if kind == "circle":
        cv2.circle(m, (p[0], p[1]), p[2], 1, -1)
    else:
        cv2.ellipse(m, (p[0], p[1]), (p[2], p[3]), p[4], 0, 360, 1, -1)
    return m.astype(bool)


def truth(stem: str) -> list[tuple[str, np.ndarray]]:
    """(class, mask) of every blob drawn on ``stem``."""
    return [(b[0], blob_mask(b)) for b in SPEC[stem]]


def image(stem: str) -> np.ndarray:
    """A grey textured part; dents dark, stains bright (BGR uint8)."""
    rng = np.random.default_rng(sorted(SPEC).index(stem))
    img = rng.normal(128, 10, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    for cls, m in truth(stem):
        img[m] = 50 if cls == "dent" else 215
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def _contour(mask: np.ndarray) -> list[float]:
    """Outer contour as a flat [x1, y1, ...] list, as labelling tools export polygons."""
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [float(v) for v in max(cs, key=cv2.contourArea).reshape(-1)]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (inclusive pixel indices)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _coco_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: column-major runs, starting with background."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] if flat[0] else []) + runs


def _write_images(folder: Path, ext: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in SPEC:
        assert cv2.imwrite(str(folder / f"{stem}{ext}"), image(stem))


def write_coco_set(root: Path, *, boxes_only: bool = False) -> Path:
    """CVAT's COCO 1.0 layout: annotations/instances_default.json + images/. Dents are polygons;
    stains alternate compressed and uncompressed RLE; ``boxes_only``: bbox and no segmentation."""
    from pycocotools import mask as mask_util

    src = root / ("coco-boxes" if boxes_only else "coco")
    _write_images(src / "images")
    doc: dict[str, list[dict[str, object]]] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
    }
    n_stain = 0
    for iid, stem in enumerate(sorted(SPEC), start=1):
        doc["images"].append({"id": iid, "file_name": f"{stem}.png", "width": SIZE, "height": SIZE})
        for cls, m in truth(stem):
            x0, y0, x1, y1 = _bbox(m)
            seg: object
            if boxes_only:
                seg = []
            elif cls == "dent":
                seg = [_contour(m)]
            else:
                n_stain += 1
                if n_stain % 2:
                    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                    seg = {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}
                else:
                    seg = {"size": [SIZE, SIZE], "counts": _coco_counts(m)}
            doc["annotations"].append(
                {
                    "id": len(doc["annotations"]) + 1,
                    "image_id": iid,
                    "category_id": CLASSES.index(cls) + 1,
                    "segmentation": seg,
                    "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": int(m.sum()),
                    "iscrowd": 0,
                }
            )
    (src / "annotations").mkdir()
    (src / "annotations" / "instances_default.json").write_text(json.dumps(doc))
    return src


def write_yolo_set(root: Path, *, detection: bool = False) -> Path:
    """ultralytics layout, already split (p0-p5 train, p6-p7 val), names in data.yaml;
    ``detection``: ``class cx cy w h`` lines. One OK image has an empty label file, one none."""
    src = root / ("yolo-det" if detection else "yolo")
    for stem in SPEC:
        split = "val" if stem.startswith(("p6", "p7")) else "train"
        (src / "images" / split).mkdir(parents=True, exist_ok=True)
        (src / "labels" / split).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(src / "images" / split / f"{stem}.png"), image(stem))
        lines = []
        for cls, m in truth(stem):
            cid = CLASSES.index(cls)
            if detection:
                x0, y0, x1, y1 = _bbox(m)
                cx, cy = (x0 + x1 + 1) / 2 / SIZE, (y0 + y1 + 1) / 2 / SIZE
                w, h = (x1 - x0 + 1) / SIZE, (y1 - y0 + 1) / SIZE
                lines.append(f"{cid} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            else:
                pts = _contour(m)
                coords = " ".join(f"{v / SIZE:.6f}" for v in pts)
                lines.append(f"{cid} {coords}")
        if stem != "p7_s1":  # no label file at all: background, as ultralytics reads it
            (src / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(CLASSES))
    (src / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    return src


def _cvat_rle(mask: np.ndarray) -> tuple[str, int, int, int, int]:
    """CVAT mask: run lengths row-major within the box, background first; rle, left, top, w, h."""
    x0, y0, x1, y1 = _bbox(mask)
    flat = mask[y0 : y1 + 1, x0 : x1 + 1].flatten().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    runs = ([0] if flat[0] else []) + runs
    return ", ".join(map(str, runs)), x0, y0, x1 - x0 + 1, y1 - y0 + 1


def write_cvat_set(root: Path) -> Path:
    """CVAT for images 1.1: annotations.xml + images/. Dents are polygons, stains masks except
    p5_s1 (a box); p0_s0 also carries a polyline, which a segmentation set cannot use."""
    src = root / "cvat"
    _write_images(src / "images")
    labels = "".join(f"<label><name>{c}</name><type>any</type></label>" for c in CLASSES)
    body = []
    for iid, stem in enumerate(sorted(SPEC)):
        shapes = []
        for cls, m in truth(stem):
            if cls == "dent":
                pts = _contour(m)
                pairs = ";".join(f"{pts[i]:.2f},{pts[i + 1]:.2f}" for i in range(0, len(pts), 2))
                shapes.append(f'<polygon label="dent" occluded="0" points="{pairs}" z_order="0"/>')
            elif stem == "p5_s1":
                x0, y0, x1, y1 = _bbox(m)
                shapes.append(
                    f'<box label="stain" occluded="0" xtl="{x0}" ytl="{y0}" '
                    f'xbr="{x1 + 1}" ybr="{y1 + 1}" z_order="0"/>'
                )
            else:
                rle, left, top, w, h = _cvat_rle(m)
                shapes.append(
                    f'<mask label="stain" occluded="0" rle="{rle}" left="{left}" top="{top}" '
                    f'width="{w}" height="{h}" z_order="0"/>'
                )
        if stem == "p0_s0":
            shapes.append('<polyline label="dent" occluded="0" points="1.0,1.0;5.0,5.0"/>')
        body.append(
            f'<image id="{iid}" name="{stem}.png" width="{SIZE}" height="{SIZE}">'
            + "".join(shapes)
            + "</image>"
        )
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
        f"<meta><task><name>t</name><labels>{labels}</labels></task></meta>"
        + "\n".join(body)
        + "</annotations>\n"
    )
    (src / "annotations.xml").write_text(xml)
    return src


def write_mask_set(root: Path) -> Path:
    """Class folders dent/, stain/ with JPEG images and same-stem PNG masks (0/255); good/ holds
    the defect-free images without masks."""
    src = root / "masks"
    for stem, blobs in SPEC.items():
        folder = src / (blobs[0][0] if blobs else "good")
        folder.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / f"{stem}.jpg"), image(stem))
        if blobs:
            m = np.zeros((SIZE, SIZE), np.uint8)
            for _, bm in truth(stem):
                m[bm] = 255
            assert cv2.imwrite(str(folder / f"{stem}.png"), m)
    return src
