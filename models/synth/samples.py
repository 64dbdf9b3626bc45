"""The demo camera's bundled images: a few synthetic parts the demo model never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from models.synth.generator import CLASSES, SynthConfig, generate_sample

SAMPLE_SEED = 90210
"""Distinct from every training seed, so the demo shows held-out parts."""


def write_samples(
    out: Path, n: int = 12, *, seed: int = SAMPLE_SEED, size: int = 256
) -> list[Path]:
    """Write ``n`` PNGs alternating OK and DEFECT parts plus ``samples.json`` with the truth."""
    out.mkdir(parents=True, exist_ok=True)
    ok_cfg = SynthConfig(width=size, height=size, defect_fraction=0.0)
    bad_cfg = SynthConfig(width=size, height=size, defect_fraction=1.0)
    paths: list[Path] = []
    truth: dict[str, list[str]] = {}
    for i in range(n):
        defect = i % 2 == 1
        s = generate_sample(seed, i, bad_cfg if defect else ok_cfg)
        name = f"{i:02d}_{'defect' if s.is_defect else 'ok'}.png"
        path = out / name
        if not cv2.imwrite(str(path), s.image, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"could not write {path}")
        truth[name] = sorted({CLASSES[c] for c in s.mask_classes})
        paths.append(path)
    (out / "samples.json").write_text(
        json.dumps(
            {"generator": "models.synth", "seed": seed, "size": size, "defects": truth}, indent=2
        )
        + "\n"
    )
    return paths


if __name__ == "__main__":
    import sys

    write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "models/demo/samples"))
