"""Markdown tables from an evaluation report (models/REPORT.md is written with these)."""

from __future__ import annotations

from models.training.evaluate import EvalReport
from models.training.operating_point import confusion_at


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def metrics_table(report: EvalReport, splits: tuple[str, ...] = ("val", "test")) -> str:
    """One row per split: detection mAPs and image-level P/R at the chosen operating point."""
    if report.operating_point is None:
        raise ValueError("the report has no operating point: run choose-threshold first")
    thr = float(report.operating_point["threshold"])
    rows = [
        "| split | images (defect/OK) | box mAP50 | box mAP50-95 | mask mAP50 | mask mAP50-95 "
        "| image precision | image recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in splits:
        det = report.detection.get(split, {})
        imgs = report.images[split]
        op = confusion_at(imgs.scores, imgs.defect, thr)
        n_def = int(imgs.defect.sum())
        rows.append(
            f"| {split} | {len(imgs.files)} ({n_def}/{len(imgs.files) - n_def}) "
            f"| {_f(det.get('box_map50'))} | {_f(det.get('box_map50_95'))} "
            f"| {_f(det.get('mask_map50'))} | {_f(det.get('mask_map50_95'))} "
            f"| {op.precision:.3f} ({op.fp} FP) | {op.recall:.3f} ({op.fn} FN) |"
        )
    return "\n".join(rows)


def per_class_table(report: EvalReport, split: str, classes: list[str]) -> str:
    det = report.detection.get(split, {})
    rows = ["| class | box mAP50 | mask mAP50 |", "|---|---|---|"]
    for c in classes:
        rows.append(f"| {c} | {_f(det.get(f'box_map50_{c}'))} | {_f(det.get(f'mask_map50_{c}'))} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from models.datasets.yolo import class_names, load_data_yaml

    rep = EvalReport.load(Path(sys.argv[1]))
    print(metrics_table(rep))
    print()
    print(per_class_table(rep, "test", class_names(load_data_yaml(Path(rep.data)))))
