"""Import a labelled image set (COCO, YOLO, CVAT XML, mask folders) as a YOLO-seg data set.

One path for every format: a reader (``models/datasets/sources/``) gives ``Sample`` records; here
images are checked (decoded, sizes compared with the labels), grouped, split by group and
stratum, and written with the split (``split.json``) and a report of what was imported, left out
and guessed (``import-report.json``). Nothing is dropped silently: every skip has a reason.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from models.datasets.grouping import (
    GroupRule,
    Stratify,
    cover_train,
    group_keys,
    split_groups,
    strata_of,
)
from models.datasets.sources import coco, cvat, masks, yolo
from models.datasets.sources.base import Sample, Skip, SourceRead
from models.datasets.sources.detect import FORMATS, Format, annotation_file, detect
from models.datasets.yolo import (
    COPY_SUFFIXES,
    SPLITS,
    Instance,
    label_lines,
    split_counts,
    write_data_yaml,
    write_json,
)

log = structlog.get_logger(__name__)

BarFactory = Callable[[str, int], Callable[[int], None]]
"""``bar(label, total)`` returns ``advance(n)`` (the CLI passes rich progress bars)."""

OUTPUT_FILES = ("images", "labels", "data.yaml", "split.json", "import-report.json")
EXAMPLES = 5
"""File names shown per skip reason in the report (all of them are in import-report.json)."""
LEFT_OUT_WARNING = "annotations of classes left out by --classes dropped"


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """Everything that shapes an import; the defaults suit a set with one image per part."""

    format: Format | None = None
    classes: tuple[str, ...] | None = None
    """Class order and subset (names); YOLO without a names file: the names of ids 0, 1, ..."""
    images_dir: Path | None = None
    """COCO/CVAT: where the images are, when not in images/ beside the annotation file."""
    class_map: Mapping[str, str | None] | None = None
    images_subdir: str | None = None
    masks_subdir: str | None = None
    mask_suffix: str = ""
    mask_threshold: int = 127
    group: GroupRule = field(default_factory=GroupRule)
    stratify: Stratify = "class"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    yaml_extra: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class Imported:
    out: Path
    report: dict[str, Any]
    split: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Kept:
    sample: Sample
    instances: list[Instance]
    width: int
    height: int


def _check_options(fmt: Format, o: ImportOptions) -> None:
    mask_only = {
        "--class-map": o.class_map is not None,
        "--images-subdir": o.images_subdir is not None,
        "--masks-subdir": o.masks_subdir is not None,
        "--mask-suffix": bool(o.mask_suffix),
    }
    if fmt != "masks":
        used = [k for k, v in mask_only.items() if v]
        if used:
            raise ValueError(f"{', '.join(used)}: only for --format masks (this is {fmt})")
    if o.images_dir is not None and fmt not in ("coco", "cvat"):
        raise ValueError(f"--images: only for --format coco or cvat (this is {fmt})")
    if not 0 <= o.mask_threshold < 255:
        raise ValueError("--mask-threshold must be in 0..254 (pixels above it are the region)")
    split_counts(1000, o.fractions)  # raises on shares that are negative or do not sum to 1
    if o.classes is not None and len(set(o.classes)) != len(o.classes):
        raise ValueError(f"--classes names a class twice: {','.join(o.classes)}")


def read_source(src: Path, o: ImportOptions) -> SourceRead:
    """Detect (unless given) and read the source; ValueError/FileNotFoundError on bad input."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: does not exist")
    fmt: Format = o.format or detect(src)
    _check_options(fmt, o)
    if fmt in ("coco", "cvat"):
        path = annotation_file(src, fmt)
        reader = coco.read if fmt == "coco" else cvat.read
        return reader(path, o.images_dir)
    if not src.is_dir():
        raise ValueError(f"{src}: --format {fmt} reads a folder")
    if fmt == "yolo":
        return yolo.read(src, list(o.classes) if o.classes else None)
    return masks.read(
        src,
        dict(o.class_map) if o.class_map is not None else None,
        images_subdir=o.images_subdir,
        masks_subdir=o.masks_subdir,
        mask_suffix=o.mask_suffix,
        threshold=o.mask_threshold,
    )


def _select_classes(read: SourceRead, o: ImportOptions) -> list[str]:
    if not o.classes:
        if not read.classes:
            raise ValueError("the source declares no classes; give --classes")
        return list(read.classes)
    unknown = [c for c in o.classes if c not in read.classes]
    if unknown:
        raise ValueError(
            f"--classes: {', '.join(unknown)} not among the source's classes "
            f"({', '.join(read.classes) or 'none'})"
        )
    return list(o.classes)


def _is_truncated_jpeg(path: Path) -> bool:
    """OpenCV decodes a cut-off JPEG with a grey bottom and a stderr line; ultralytics would
    rewrite it in place. Neither is an image one can trust, so it is treated as unreadable. The
    end marker is looked for in the last 4 KiB: some cameras append bytes after it."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return False
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 4096))
        return b"\xff\xd9" not in fh.read()


def _check(
    read: SourceRead, classes: list[str], tick: Callable[[int], None] | None
) -> tuple[list[_Kept], list[Skip]]:
    """Decode every image, compare sizes, map class names to ids; skips carry the reason."""
    ids = {c: i for i, c in enumerate(classes)}
    kept: list[_Kept] = []
    skipped: list[Skip] = []
    for s in sorted(read.samples, key=lambda s: s.rel):
        if tick:
            tick(1)
        img = cv2.imread(str(s.image), cv2.IMREAD_GRAYSCALE)
        if img is None or _is_truncated_jpeg(s.image):
            why = "truncated JPEG" if img is not None else "OpenCV cannot decode it"
            skipped.append(Skip(s.rel, "image unreadable", why))
            continue
        h, w = img.shape[:2]
        if s.size is not None and s.size != (w, h):
            detail = f"labels say {s.size[0]}x{s.size[1]}, image is {w}x{h}"
            skipped.append(Skip(s.rel, "image size differs from the labels'", detail))
            continue
        scale = np.array([w, h], np.float32) if s.size is None else np.ones(2, np.float32)
        inst = [Instance(ids[sh.label], sh.polygon * scale) for sh in s.shapes if sh.label in ids]
        dropped = len(s.shapes) - len(inst)
        if dropped:
            read.warnings[LEFT_OUT_WARNING] += dropped
            if not inst:
                # Not defect-free: its defects are of classes the user left out.
                skipped.append(Skip(s.rel, "only classes left out by --classes"))
                continue
        kept.append(_Kept(s, inst, w, h))
    return kept, skipped


def _names(kept: list[_Kept]) -> list[str]:
    """Output file stems: the reader's proposal; clashes get the folder path, then a number."""
    counts = Counter(k.sample.name.lower() for k in kept)
    used: set[str] = set()
    out: list[str] = []
    for k in kept:
        name = k.sample.name
        if counts[name.lower()] > 1:
            folders = [p for p in Path(k.sample.rel).parent.parts if p not in ("", ".", "..")]
            name = "_".join([*folders, name])
        base, i = name, 2
        while name.lower() in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name.lower())
        out.append(name)
    return out


def _prepare_out(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or s.is_relative_to(o) or o.is_relative_to(s):
        raise ValueError(f"--out {out}: must be outside SRC {src} (and not contain it)")
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if o.is_dir() and any(o.iterdir()) and not (o / "split.json").exists():
        raise ValueError(f"--out {out}: not empty and not an earlier import; choose a new folder")


def _write_image(src: Path, dst_stem: Path) -> Path:
    """Original bytes where ultralytics reads the format (no recompression), else lossless PNG."""
    suffix = src.suffix.lower()
    if suffix in COPY_SUFFIXES:
        dst = dst_stem.with_suffix(suffix)
        shutil.copyfile(src, dst)
        return dst
    dst = dst_stem.with_suffix(".png")
    img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if img is None or not cv2.imwrite(str(dst), img):
        raise OSError(f"could not re-encode {src} as {dst}")
    return dst


def _skip_summary(skips: list[Skip]) -> dict[str, Any]:
    by: dict[str, list[Skip]] = defaultdict(list)
    for sk in skips:
        by[sk.reason].append(sk)
    return {
        "total": len(skips),
        "by_reason": {
            r: {
                "count": len(v),
                "examples": [f"{s.rel} ({s.detail})" if s.detail else s.rel for s in v[:EXAMPLES]],
            }
            for r, v in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        },
        "files": [{"file": s.rel, "reason": s.reason, "detail": s.detail} for s in skips],
    }


def import_data(
    src: Path, out: Path, options: ImportOptions | None = None, progress: BarFactory | None = None
) -> Imported:
    """Read ``src``, write the YOLO-seg data set to ``out``; returns the report and the split.

    ``out`` is rewritten only after everything was read and checked, so a failing import leaves an
    earlier one intact.
    """
    o = options or ImportOptions()
    t0 = time.monotonic()
    read = read_source(src, o)
    classes = _select_classes(read, o)
    _prepare_out(src, out)
    kept, bad = _check(read, classes, progress("check", len(read.samples)) if progress else None)
    skipped = read.skipped + bad
    if not kept:
        raise ValueError(f"{src}: nothing to import ({len(skipped)} files skipped)")
    # Group keys from every image file name found, skipped ones too: a skipped shot of a part
    # still links the shots before and after it when numeric keys are clustered.
    rels = [k.sample.rel for k in kept] + [s.rel for s in skipped if s.image]
    groups = group_keys(rels, o.group)
    group_classes: dict[str, set[int]] = defaultdict(set)
    for k in kept:
        group_classes[groups.key_of[k.sample.rel]].update(i.class_id for i in k.instances)
    strata = strata_of(group_classes, classes, o.stratify)
    split_of = split_groups(strata, o.fractions, o.seed)
    moved = cover_train(split_of, group_classes, len(classes)) if o.stratify == "class" else []

    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    tick = progress("write", len(kept)) if progress else None
    per_image: dict[str, dict[str, str]] = {}
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    instances: dict[str, Counter[str]] = {c: Counter() for c in classes}
    for k, name in zip(kept, _names(kept), strict=True):
        key = groups.key_of[k.sample.rel]
        split = split_of[key]
        dst = _write_image(k.sample.image, out / "images" / split / name)
        lines = label_lines(k.instances, k.width, k.height)
        text = "\n".join(lines) + ("\n" if lines else "")
        (out / "labels" / split / f"{name}.txt").write_text(text)
        per_image[dst.name] = {"source": k.sample.rel, "split": split, "group": key}
        c = counts[split]
        c["images"] += 1
        c["defect_images" if k.instances else "ok_images"] += 1
        c["instances"] += len(k.instances)
        for i in k.instances:
            instances[classes[i.class_id]][split] += 1
        if tick:
            tick(1)

    groups_per_split = Counter(split_of.values())
    rule = o.group
    split_doc: dict[str, Any] = {
        "source": str(src.resolve()),
        "format": read.format,
        "seed": o.seed,
        "fractions": list(o.fractions),
        "stratify": o.stratify,
        "group_rule": {
            "regex": rule.regex,
            "gap": rule.gap,
            "csv": str(rule.csv) if rule.csv else None,
            "column": rule.column if rule.csv else None,
            "described": rule.describe(),
        },
        "groups": len(set(groups.key_of.values())),
        "groups_per_split": {s: groups_per_split[s] for s in SPLITS},
        "strata": {
            n: {s: sum(split_of[k] == s for k in keys) for s in SPLITS}
            for n, keys in strata.items()
            if keys
        },
        "moved_to_train": moved,
        "splits": {s: dict(counts[s]) for s in SPLITS if counts[s]},
        "images": per_image,
        "split_of_group": dict(sorted(split_of.items())),
    }
    write_json(out / "split.json", split_doc)
    write_data_yaml(out, classes, dict(o.yaml_extra) if o.yaml_extra else None)

    notes = list(read.notes)
    if rule.regex is None and rule.csv is None:
        notes.append(
            "each image is its own group: shots of one part can straddle train and test; "
            "give --group-regex or --group-csv when names tell the part"
        )
    for why, files in groups.fallback.items():
        read.warnings[f"own group: {why}"] += len(files)
    for key in moved:
        notes.append(f"group {key} moved to train so every class with >= 3 groups is trained on")
    for cid, name in enumerate(classes):
        n_groups = sum(cid in cs for cs in group_classes.values())
        if n_groups == 0:
            notes.append(f"class {name!r}: no instances")
        elif n_groups < 3:
            notes.append(f"class {name!r}: only {n_groups} group(s), it cannot be in every split")
    ok_held = counts["val"]["ok_images"] + counts["test"]["ok_images"]
    if ok_held == 0:
        notes.append("no defect-free images in val/test: image-level precision cannot be measured")
    report: dict[str, Any] = {
        "source": str(src.resolve()),
        "format": read.format,
        "out": str(out.resolve()),
        "classes": classes,
        "seed": o.seed,
        "fractions": list(o.fractions),
        "images": {**{s: counts[s]["images"] for s in SPLITS}, "total": len(kept)},
        "images_without_defects": {
            **{s: counts[s]["ok_images"] for s in SPLITS},
            "total": sum(counts[s]["ok_images"] for s in SPLITS),
        },
        "instances": {
            c: {**{s: instances[c][s] for s in SPLITS}, "total": sum(instances[c].values())}
            for c in classes
        },
        "groups": {
            "rule": rule.describe(),
            "stratify": o.stratify,
            "found": split_doc["groups"],
            "split": len(split_of),
            "per_split": split_doc["groups_per_split"],
            "own_group": {why: len(f) for why, f in groups.fallback.items()},
        },
        "skipped": _skip_summary(skipped),
        "warnings": dict(sorted(read.warnings.items())),
        "notes": notes,
        "seconds": round(time.monotonic() - t0, 2),
    }
    write_json(out / "import-report.json", report)
    log.info(
        "dataset.imported",
        out=str(out),
        format=read.format,
        images=len(kept),
        skipped=len(skipped),
        groups=len(split_of),
    )
    return Imported(out, report, split_doc)


def report_text(report: Mapping[str, Any]) -> str:
    """The report as a person reads it (the CLI prints this; the JSON has every file)."""
    lines = [
        f"imported {report['images']['total']} images ({report['format']}) from {report['source']}",
        f"classes: {', '.join(report['classes'])}",
        f"groups: {report['groups']['split']} ({report['groups']['rule']}; "
        f"stratified by {report['groups']['stratify']}; seed {report['seed']})",
        "",
        f"{'':<24}{'train':>8}{'val':>8}{'test':>8}{'total':>8}",
    ]

    def row(label: str, d: Mapping[str, int]) -> str:
        return f"{label[:23]:<24}" + "".join(f"{d[k]:>8}" for k in (*SPLITS, "total"))

    lines.append(row("images", report["images"]))
    lines.append(row("  without defects", report["images_without_defects"]))
    gps = report["groups"]["per_split"]
    lines.append(row("groups", {**gps, "total": sum(gps.values())}))
    lines.append("instances")
    for c, d in report["instances"].items():
        lines.append(row(f"  {c}", d))
    sk = report["skipped"]
    lines.append("")
    lines.append(f"skipped: {sk['total']}")
    for reason, d in sk["by_reason"].items():
        lines.append(f"  {reason}: {d['count']}  e.g. {'; '.join(d['examples'][:3])}")
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  {w}: {n}" for w, n in report["warnings"].items()]
    if report["notes"]:
        lines.append("notes:")
        lines += [f"  {n}" for n in report["notes"]]
    return "\n".join(lines)


PRESETS = ("magnetic-tile",)


def options_from_args(preset: str | None = None, **given: Any) -> ImportOptions:
    """Command-line values over a preset's: ``given`` uses ImportOptions' field names (plus
    group_regex, group_gap, group_csv, group_column) and holds strings as typed; None = not given.
    """
    if preset is None:
        base = ImportOptions()
    elif preset == "magnetic-tile":
        from models.datasets import magnetic_tile

        base = magnetic_tile.options()
    else:
        raise ValueError(f"--preset {preset!r}: known presets are {', '.join(PRESETS)}")
    g = {k: v for k, v in given.items() if v is not None}
    fmt = g.pop("format", None)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: want one of {'|'.join(FORMATS)}")
    stratify = g.pop("stratify", None)
    if stratify is not None and stratify not in ("class", "defect", "none"):
        raise ValueError(f"--stratify {stratify!r}: want class, defect or none")
    changes: dict[str, Any] = {}
    if fmt is not None:
        changes["format"] = fmt
    if stratify is not None:
        changes["stratify"] = stratify
    if "classes" in g:
        changes["classes"] = tuple(c.strip() for c in g.pop("classes").split(",") if c.strip())
    if "class_map" in g:
        changes["class_map"] = masks.parse_class_map(g.pop("class_map"))
    if "fractions" in g:
        try:
            tr, va, te = (float(v) for v in g.pop("fractions").split(","))
        except ValueError as e:
            raise ValueError("--fractions wants three numbers: train,val,test") from e
        changes["fractions"] = (tr, va, te)
    rule = base.group
    keys = {
        "group_regex": "regex",
        "group_gap": "gap",
        "group_csv": "csv",
        "group_column": "column",
    }
    rule_changes = {keys[k]: g.pop(k) for k in list(g) if k in keys}
    if rule_changes:
        if "csv" in rule_changes:
            rule_changes.setdefault("regex", None)  # a CSV replaces a preset's regex
        rule = replace(rule, **rule_changes)
        if rule.csv is not None and not rule.csv.is_file():
            raise FileNotFoundError(f"--group-csv {rule.csv}: no such file")
    changes["group"] = rule
    changes.update(g)  # images_dir, images_subdir, masks_subdir, mask_suffix, mask_threshold, seed
    return replace(base, **changes)
