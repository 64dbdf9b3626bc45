"""Mask PNGs in per-class folders: ``SRC/<class folder>[/<images subdir>]/<image>`` with a mask of
the same stem (``.png``, or ``<stem><suffix>.png`` with ``--mask-suffix``, optionally in a masks
subfolder). The magnetic-tile layout (``MT_Blowhole/Imgs/exp1_num_5.jpg`` + ``exp1_num_5.png``) is
one case of it.

The folder gives the class, the mask the region (pixels above the threshold; each connected piece
becomes an instance). A folder named like ok/good/free holds defect-free images. When folder and
mask disagree (an empty mask in a defect folder, a marked mask in a defect-free one) the truth is
unknown, so the image is left out with that reason rather than guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2

from models.datasets.sources.base import IMAGE_SUFFIXES, Sample, Skip, SourceRead, mask_shapes

OK_WORDS = frozenset({"ok", "good", "free", "normal", "nodefect", "defectfree", "clean", "pass"})
"""Folder-name words that mean defect-free (matched per word: MT_Free, good, no_defect)."""


def is_ok_folder(name: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(set(words) & OK_WORDS) or "".join(words) in OK_WORDS


def parse_class_map(text: str) -> dict[str, str | None]:
    """``"MT_Blowhole=blowhole,MT_Free="`` -> folder: class (None: defect-free), in given order."""
    out: dict[str, str | None] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        folder, sep, cls = item.partition("=")
        if not sep or not folder.strip():
            raise ValueError(
                f"--class-map: {item!r} is not FOLDER=CLASS (CLASS empty: defect-free)"
            )
        out[folder.strip()] = cls.strip() or None
    if not out:
        raise ValueError("--class-map is empty")
    return out


def default_class_map(src: Path) -> dict[str, str | None]:
    """Every sub-folder is a class named after it, except ok/good/free-like ones (defect-free)."""
    folders = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {f: (None if is_ok_folder(f) else f) for f in folders}


def _pairs(img_dir: Path, mask_dir: Path, suffix: str) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) in one folder, by the pairing rule."""
    files = sorted(
        p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if suffix:
        images = [p for p in files if not p.stem.endswith(suffix)]
    elif mask_dir != img_dir:
        images = files
    else:
        # Same folder, same stem: the .png is the mask of the image beside it; a .png without a
        # sibling image is an image (a defect-free folder of PNGs has no masks).
        stems = {p.stem for p in files if p.suffix.lower() != ".png"}
        images = [p for p in files if p.suffix.lower() != ".png" or p.stem not in stems]
    pairs: list[tuple[Path, Path | None]] = []
    for img in images:
        found = [mask_dir / f"{img.stem}{suffix}{ext}" for ext in (".png", ".PNG")]
        mask = next((m for m in found if m.is_file() and m != img), None)
        pairs.append((img, mask))
    return pairs


def looks_like(src: Path) -> bool:
    """Sub-folders (or their sub-folders) holding an image and a same-stem .png."""
    for d in [p for p in src.iterdir() if p.is_dir()]:
        for sub in [d, *(p for p in d.iterdir() if p.is_dir())]:
            if any(m is not None for _, m in _pairs(sub, sub, "")):
                return True
    return False


def read(
    src: Path,
    class_map: dict[str, str | None] | None = None,
    *,
    images_subdir: str | None = None,
    masks_subdir: str | None = None,
    mask_suffix: str = "",
    threshold: int = 127,
) -> SourceRead:
    """Read the class folders; an explicit ``class_map`` requires every folder it names."""
    explicit = class_map is not None
    cmap = class_map if class_map is not None else default_class_map(src)
    classes: list[str] = []
    for cls in cmap.values():
        if cls is not None and cls not in classes:
            classes.append(cls)
    out = SourceRead("masks", classes)
    if not cmap:
        raise ValueError(f"{src}: no class folders")
    if explicit:
        others = sorted(
            d.name
            for d in src.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name not in cmap
        )
        if others:
            out.notes.append(f"folders not in --class-map ignored: {', '.join(others)}")
    for folder, cls in cmap.items():
        img_dir = src / folder / images_subdir if images_subdir else src / folder
        if not img_dir.is_dir():
            why = "--class-map names it" if explicit else "a class folder"
            raise FileNotFoundError(f"{img_dir}: missing ({why}; see --images-subdir)")
        mask_dir = src / folder / masks_subdir if masks_subdir else img_dir
        for img, mask in _pairs(img_dir, mask_dir, mask_suffix):
            rel = img.relative_to(src).as_posix()
            name = f"{folder}_{img.stem}"  # the folder keeps names unique (and says the class)
            if mask is None:
                if cls is None:
                    out.samples.append(Sample(img, rel, name, None, ()))
                else:
                    out.skipped.append(
                        Skip(rel, "mask missing", f"{mask_dir.name}/{img.stem}{mask_suffix}.png")
                    )
                continue
            m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
            if m is None:
                out.skipped.append(Skip(rel, "mask unreadable", mask.name))
                continue
            shapes = mask_shapes(m > threshold, cls or "")
            size = (m.shape[1], m.shape[0])
            if cls is None and shapes:
                out.skipped.append(Skip(rel, "marked mask in a defect-free folder (truth unknown)"))
            elif cls is not None and not shapes:
                out.skipped.append(Skip(rel, "empty mask in a defect folder (truth unknown)"))
            else:
                out.samples.append(Sample(img, rel, name, size, tuple(shapes)))
    return out
