"""Write a synthetic YOLO-seg data set (images + labels, train/val/test, data.yaml)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.datasets.yolo import assign_splits, write_data_yaml, write_json, write_sample
from models.synth.generator import CLASSES, SynthConfig, generate_sample

Progress = Callable[[int], None]


def write_dataset(
    out: Path,
    n_images: int,
    *,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: Progress | None = None,
) -> Path:
    """Generate ``n_images`` samples into ``out``; returns the data.yaml path.

    The split is by image (every synthetic image is an independent part, so there is nothing to
    leak); it is a seeded shuffle so the same seed gives the same split.
    """
    if n_images < sum(1 for f in fractions if f > 0):
        raise ValueError("need at least 3 images (one per split)")
    cfg = cfg or SynthConfig()
    out.mkdir(parents=True, exist_ok=True)
    stems = [f"synth_{seed}_{i:06d}" for i in range(n_images)]
    split_of = assign_splits(stems, fractions, seed)
    counts: dict[str, dict[str, int]] = {
        s: {"images": 0, "ok": 0, **dict.fromkeys(CLASSES, 0)} for s in ("train", "val", "test")
    }
    t0 = time.perf_counter()
    for i, stem in enumerate(stems):
        sample = generate_sample(seed, i, cfg)
        split = split_of[stem]
        write_sample(out, split, stem, sample.image, sample.instances)
        c = counts[split]
        c["images"] += 1
        c["ok"] += 0 if sample.is_defect else 1
        for cls in sample.mask_classes:
            c[CLASSES[cls]] += 1
        if progress:
            progress(1)
    write_json(
        out / "synth.json",
        {
            "generator": "models.synth",
            "seed": seed,
            "n_images": n_images,
            "config": cfg.model_dump(mode="json"),
            "fractions": list(fractions),
            "counts": counts,
            "seconds": round(time.perf_counter() - t0, 2),
            "numpy": np.__version__,
        },
    )
    return write_data_yaml(out, CLASSES, {"synthetic": True, "seed": seed})
