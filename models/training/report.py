"""Markdown tables from an evaluation report (models/REPORT.md is written with these).

Every number comes with what it was measured on (images, defect/OK images, instances), and a
number the split cannot give is printed as "not measurable" with the count, never as a value:
a test split without OK parts shows no precision rather than a perfect one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from models.training.evaluate import EvalReport
from models.training.operating_point import OperatingPoint


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _count(reason: str) -> str:
    """'0 OK images in test (need >= 20): ...' -> '0 OK images, need >= 20'."""
    m = re.match(r"(\d+ \w+ images)(?: in \S+)? \(need >= (\d+)\)", reason)
    return f"{m[1]}, need >= {m[2]}" if m else reason


def precision_cell(p: OperatingPoint) -> str:
    if p.precision is None:
        return f"not measurable ({_count(p.not_measurable.get('precision', ''))})"
    return f"{p.precision:.3f} ({p.fp} FP / {p.ok_images} OK)"


def recall_cell(p: OperatingPoint) -> str:
    if p.recall is None:
        return f"not measurable ({_count(p.not_measurable.get('recall', ''))})"
    return f"{p.recall:.3f} ({p.fn} FN / {p.defect_images} defect)"


def metrics_table(report: EvalReport, splits: Sequence[str] | None = None) -> str:
    """One row per split: what it holds, detection mAPs, image-level P/R at the chosen threshold."""
    rows = [
        "| split | images (defect/OK) | instances | box mAP50 | box mAP50-95 | mask mAP50 "
        "| mask mAP50-95 | image precision | image recall | image AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split in splits or list(report.images):
        det = report.detection.get(split, {})
        c = report.counts(split)
        p = report.image_point(split)
        auroc = report.auroc(split)
        rows.append(
            f"| {split} | {c['images']} ({c['defect_images']}/{c['ok_images']}) "
            f"| {'n/a' if c['instances'] is None else c['instances']} "
            f"| {_f(det.get('box_map50'))} | {_f(det.get('box_map50_95'))} "
            f"| {_f(det.get('mask_map50'))} | {_f(det.get('mask_map50_95'))} "
            + (
                "| no threshold chosen | no threshold chosen "
                if p is None
                else f"| {precision_cell(p)} | {recall_cell(p)} "
            )
            + f"| {'not measurable' if auroc is None else f'{auroc:.3f}'} |"
        )
    return "\n".join(rows)


def per_class_table(report: EvalReport, split: str, classes: list[str] | None = None) -> str:
    """AP per class on ``split`` with the images and instances it rests on; a class the split
    has no instances of is marked so (its AP is undefined, not 0)."""
    names = classes or report.classes or sorted(report.per_class.get(split, {}))
    per = report.per_class.get(split)
    counts = report.counts(split)["per_class"] if split in report.images else None
    rows = [
        "| class | images | instances | box AP50 | box AP50-95 | mask AP50 | mask AP50-95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in names:
        if per is None:  # a report written before per-class AP: the flat mAP50 keys
            det = report.detection.get(split, {})
            n: dict[str, Any] = (counts or {}).get(c, {})
            rows.append(
                f"| {c} | {n.get('images', 'n/a')} | {n.get('instances', 'n/a')} "
                f"| {_f(det.get(f'box_map50_{c}'))} | n/a "
                f"| {_f(det.get(f'mask_map50_{c}'))} | n/a |"
            )
            continue
        r = per.get(c, {"images": 0, "instances": 0, "note": "no instances"})
        if r.get("note") == "no instances" or not r.get("instances"):
            aps = "| no instances | no instances | no instances | no instances |"
        else:
            aps = (
                f"| {_f(r['box_ap50'])} | {_f(r['box_ap50_95'])} "
                f"| {_f(r['mask_ap50'])} | {_f(r['mask_ap50_95'])} |"
            )
        rows.append(f"| {c} | {r['images']} | {r['instances']} {aps}")
    return "\n".join(rows)


def notes(report: EvalReport) -> str:
    """The threshold and every warning (numbers not measurable, fallbacks), as a quote block."""
    lines = []
    op = report.operating_point
    if op is not None:
        how = (
            "recall-only fallback: precision not weighed"
            if op.get("basis") == "recall-only"
            else "best precision at the target"
        )
        met = "" if op.get("met", True) else "; the target was NOT reached"
        lines.append(
            f"threshold {float(op['threshold']):.4f} chosen on {op.get('split', '?')} for recall "
            f"target {op.get('recall_target')} ({how}{met})"
        )
    lines += [f"warning: {w}" for w in report.warnings()]
    return "\n".join(f"> {ln}" for ln in lines)


def markdown(report: EvalReport) -> str:
    parts = [metrics_table(report)]
    for split in report.images:
        if split in report.per_class or report.detection.get(split):
            parts.append(f"Per class on {split}:\n\n{per_class_table(report, split)}")
    if text := notes(report):
        parts.append(text)
    return "\n\n".join(parts)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from models.datasets.yolo import class_names, load_data_yaml

    rep = EvalReport.load(Path(sys.argv[1]))
    if not rep.classes and Path(rep.data).is_file():  # a report written before it kept them
        rep.classes = class_names(load_data_yaml(Path(rep.data)))
    print(markdown(rep))
