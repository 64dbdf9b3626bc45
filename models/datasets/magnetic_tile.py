"""Convert the magnetic-tile data set (Huang et al.) into a YOLO-seg data set.

The same physical tile was photographed under six lighting settings with consecutive ``num``
values; a per-image split would put near-copies of test tiles into training. So images are
grouped by tile (sort by num, new group when the gap exceeds ``gap``) and whole groups are split,
separately for groups with and without defects so every split gets both.
The data has no licence: it is converted into a working directory, never into a package.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from models.datasets.yolo import (
    Instance,
    assign_splits,
    mask_to_polygons,
    write_data_yaml,
    write_json,
)

log = structlog.get_logger(__name__)

FOLDERS: dict[str, str | None] = {
    "MT_Blowhole": "blowhole",
    "MT_Break": "break",
    "MT_Crack": "crack",
    "MT_Fray": "fray",
    "MT_Uneven": "uneven",
    "MT_Free": None,
}
CLASSES: tuple[str, ...] = ("blowhole", "break", "crack", "fray", "uneven")
_NAME = re.compile(r"^exp(?P<exp>\d+)_num_(?P<num>\d+)$")

BarFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True, slots=True)
class Item:
    folder: str
    image: Path
    mask: Path
    num: int
    exp: int


def scan(src: Path) -> list[Item]:
    """All image/mask pairs; a missing mask or an unexpected name is an error, not a skip."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory; point --src at the magnetic-tile folder")
    items: list[Item] = []
    for folder in FOLDERS:
        imgs = src / folder / "Imgs"
        if not imgs.is_dir():
            raise FileNotFoundError(f"{imgs}: missing; expected the MT_* folders of magnetic-tile")
        for jpg in sorted(imgs.glob("*.jpg")):
            m = _NAME.match(jpg.stem)
            if not m:
                raise ValueError(f"{jpg}: unexpected file name (want exp<k>_num_<n>.jpg)")
            mask = jpg.with_suffix(".png")
            if not mask.exists():
                raise FileNotFoundError(f"{mask}: mask missing for {jpg.name}")
            items.append(Item(folder, jpg, mask, int(m["num"]), int(m["exp"])))
    if not items:
        raise ValueError(f"{src}: no images found")
    return items


def tile_groups(nums: list[int], gap: int) -> list[int]:
    """Group index per num (in the given order): sort, new group when the gap exceeds ``gap``."""
    order = sorted(range(len(nums)), key=lambda i: nums[i])
    group = [0] * len(nums)
    g, prev = 0, None
    for i in order:
        if prev is not None and nums[i] - prev > gap:
            g += 1
        group[i] = g
        prev = nums[i]
    return group


def mask_instances(
    mask_path: Path, class_id: int, min_area_px: int = 4
) -> tuple[list[Instance], np.ndarray]:
    m = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ValueError(f"{mask_path}: unreadable mask")
    binary = m > 127
    polys = mask_to_polygons(binary, epsilon_px=1.0, min_area_px=min_area_px)
    return [Instance(class_id, p) for p in polys], binary


def convert(
    src: Path,
    out: Path,
    *,
    seed: int = 0,
    gap: int = 100,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: BarFactory | None = None,
) -> dict[str, Any]:
    """Write ``out`` (images, labels, data.yaml, split.json); returns the summary."""
    items = scan(src)
    groups = tile_groups([it.num for it in items], gap)
    labelled: list[tuple[Item, list[Instance], int]] = []
    skipped: list[str] = []
    for it, g in zip(items, groups, strict=True):
        cls = FOLDERS[it.folder]
        if cls is None:
            labelled.append((it, [], g))
            continue
        inst, _ = mask_instances(it.mask, CLASSES.index(cls))
        if not inst:
            # The folder says defective but the mask is empty: the truth is unknown, leave it out.
            skipped.append(f"{it.folder}/{it.image.name}")
            continue
        labelled.append((it, inst, g))
    defect_groups = sorted({g for _, inst, g in labelled if inst})
    ok_groups = sorted({g for _, _, g in labelled} - set(defect_groups))
    split_of: dict[int, str] = {}
    for keys, salt in ((defect_groups, 1), (ok_groups, 2)):
        assigned = assign_splits([str(k) for k in keys], fractions, seed * 1000 + salt)
        split_of.update({int(k): v for k, v in assigned.items()})
    if out.exists():
        for sub in ("images", "labels"):
            shutil.rmtree(out / sub, ignore_errors=True)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    tick = progress("convert", len(labelled)) if progress else None
    for it, inst, g in labelled:
        split = split_of[g]
        stem = f"{it.folder}_{it.image.stem}"
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(it.image, img_dir / f"{stem}.jpg")  # original bytes: no recompression
        img = cv2.imread(str(it.image), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"{it.image}: unreadable image")
        h, w = img.shape[:2]
        lines = []
        for i in inst:
            p = i.polygon.astype(np.float64)
            coords = " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in p)
            lines.append(f"{i.class_id} {coords}")
        (lbl_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        c = counts[split]
        c["images"] += 1
        c["defect_images" if inst else "ok_images"] += 1
        c["instances"] += len(inst)
        if tick:
            tick(1)
    group_splits: dict[str, int] = defaultdict(int)
    for v in split_of.values():
        group_splits[v] += 1
    summary = {
        "source": str(src.resolve()),
        "seed": seed,
        "gap": gap,
        "groups": len(set(groups)),
        "defect_groups": len(defect_groups),
        "groups_per_split": dict(group_splits),
        "splits": {k: dict(v) for k, v in counts.items()},
        "skipped_empty_masks": skipped,
        "group_of": {f"{it.folder}/{it.image.name}": g for it, _, g in labelled},
        "split_of_group": {str(k): v for k, v in split_of.items()},
    }
    write_json(out / "split.json", summary)
    write_data_yaml(
        out,
        CLASSES,
        {"source": "magnetic-tile (Huang et al. 2020); research use, not redistributed"},
    )
    log.info(
        "magnetic_tile.converted", out=str(out), groups=summary["groups"], skipped=len(skipped)
    )
    return summary
