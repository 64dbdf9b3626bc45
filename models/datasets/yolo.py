"""YOLO-seg dataset plumbing shared by the synthetic generator and the real-data converters.

Masks become polygons with OpenCV contours so that rasterising a label back (what ultralytics
does with ``cv2.fillPoly``) reproduces the mask: the consistency tests rely on that round trip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ruamel.yaml import YAML

SPLITS: tuple[str, str, str] = ("train", "val", "test")
COPY_SUFFIXES: frozenset[str] = frozenset(
    {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
)
"""Image formats both ultralytics and OpenCV read: imported as the original bytes."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One labelled object: its class and its polygon in pixel coordinates (N x 2, x then y)."""

    class_id: int
    polygon: np.ndarray


def mask_to_polygons(
    mask: np.ndarray, *, epsilon_px: float = 0.6, min_area_px: float = 3.0
) -> list[np.ndarray]:
    """Outer contours of a binary mask as float32 (N, 2) polygons in pixel coordinates.

    A mask may fall apart into several pieces (a stain clipped by the part edge); each piece
    becomes its own polygon so no label bridges background. Holes are ignored: YOLO-seg labels
    have no holes.
    """
    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys: list[np.ndarray] = []
    for c in contours:
        if cv2.contourArea(c) + cv2.arcLength(c, True) / 2 < min_area_px:
            continue
        approx = cv2.approxPolyDP(c, epsilon_px, True) if epsilon_px > 0 else c
        if len(approx) < 3:
            approx = c
        if len(approx) < 3:
            # 1- or 2-pixel blobs: describe them by their bounding square so they stay labelled.
            x, y, w, h = cv2.boundingRect(c)
            approx = np.array(
                [[[x, y]], [[x + w - 1, y]], [[x + w - 1, y + h - 1]], [[x, y + h - 1]]]
            )
        polys.append(approx.reshape(-1, 2).astype(np.float32))
    return polys


def polygons_to_mask(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons the way ultralytics does (fillPoly), for round-trip checks."""
    out = np.zeros(shape, np.uint8)
    for p in polygons:
        cv2.fillPoly(out, [np.round(p).astype(np.int32).reshape(-1, 1, 2)], 1)
    return out.astype(bool)


def label_lines(instances: Sequence[Instance], width: int, height: int) -> list[str]:
    """YOLO-seg label lines: ``class x1 y1 x2 y2 ...`` normalised to 0..1."""
    lines = []
    for inst in instances:
        p = inst.polygon.astype(np.float64).copy()
        p[:, 0] = np.clip(p[:, 0] / width, 0.0, 1.0)
        p[:, 1] = np.clip(p[:, 1] / height, 0.0, 1.0)
        coords = " ".join(f"{v:.6f}" for v in p.reshape(-1))
        lines.append(f"{inst.class_id} {coords}")
    return lines


def read_label_file(path: Path, width: int, height: int) -> list[Instance]:
    """Parse a YOLO-seg label file back into pixel-coordinate instances."""
    out: list[Instance] = []
    if not path.exists():
        return out
    for raw in path.read_text().splitlines():
        parts = raw.split()
        if not parts:
            continue
        vals = np.array([float(v) for v in parts[1:]], np.float64).reshape(-1, 2)
        vals[:, 0] *= width
        vals[:, 1] *= height
        out.append(Instance(int(parts[0]), vals.astype(np.float32)))
    return out


def write_sample(
    root: Path, split: str, stem: str, image: np.ndarray, instances: Sequence[Instance]
) -> None:
    """Write one image (PNG, lossless so labels stay pixel-true) and its label file."""
    img_dir = root / "images" / split
    lbl_dir = root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(img_dir / f"{stem}.png"), image):
        raise OSError(f"could not write {img_dir / stem}.png")
    h, w = image.shape[:2]
    text = "\n".join(label_lines(instances, w, h))
    (lbl_dir / f"{stem}.txt").write_text(text + ("\n" if text else ""))


def write_data_yaml(
    root: Path,
    names: Sequence[str],
    extra: Mapping[str, object] | None = None,
    filename: str = "data.yaml",
) -> Path:
    """The ``data.yaml`` ultralytics reads; absolute path so runs work from any cwd."""
    doc: dict[str, object] = {
        "path": str(root.resolve()),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(names)),
    }
    if extra:
        doc.update(extra)
    path = root / filename
    yml = YAML(typ="safe", pure=True)
    yml.default_flow_style = False
    with path.open("w") as fh:
        yml.dump(doc, fh)
    return path


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes of train/val/test for ``n`` items; a split with a share > 0 gets at least one item."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if fractions[1] > 0:
        n_val = max(n_val, 1)
    if fractions[2] > 0:
        n_test = max(n_test, 1)
    if fractions[0] == 0:
        n_test = n - n_val
    if n_val + n_test > n or (fractions[0] > 0 and n_val + n_test >= n):
        raise ValueError(f"{n} items cannot fill the splits {fractions}")
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    keys: Sequence[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Deterministic shuffled assignment of group keys to train/val/test."""
    order = list(keys)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_train, n_val, _ = split_counts(len(order), fractions)
    out: dict[str, str] = {}
    for i, k in enumerate(order):
        out[k] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def load_data_yaml(path: Path) -> dict[str, object]:
    """Read a data.yaml and resolve its root, with a clear error when it is not a dataset."""
    if path.is_dir():
        path = path / "data.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no data.yaml; import labelled images with `edge model import-data` "
            "or generate a set with `edge model synth`"
        )
    doc = YAML(typ="safe", pure=True).load(path.read_text())
    if not isinstance(doc, dict) or "names" not in doc:
        raise ValueError(f"{path}: not a YOLO data.yaml (no 'names')")
    return doc


def class_names(doc: Mapping[str, object]) -> list[str]:
    names = doc["names"]
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError("data.yaml 'names' must be a list or a mapping")


def split_images(doc: Mapping[str, object], split: str) -> list[Path]:
    """Image files of one split, sorted, with their labels next door in labels/<split>."""
    root = Path(str(doc["path"]))
    rel = doc.get(split)
    if rel is None:
        raise ValueError(f"data.yaml has no '{split}' split")
    folder = root / str(rel)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in COPY_SUFFIXES)


def label_path_for(image: Path) -> Path:
    """ultralytics' convention: swap the last 'images' path element for 'labels'."""
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
