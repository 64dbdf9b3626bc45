"""Fixtures for camera tests: small real image files and a video written with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


def write_images(folder: Path, n: int, shape: tuple[int, int] = (48, 64)) -> list[Path]:
    """n distinct PNGs; pixel (0,0) encodes the index so a test can tell which one came back."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.full((*shape, 3), 40, np.uint8)
        img[0, 0] = (i, i, i)
        cv2.putText(img, str(i), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        p = folder / f"img_{i:03d}.png"
        assert cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


ROOT = Path(__file__).resolve().parents[2]


def line_yaml(tmp: Path, cameras_block: str, name: str = "line.yaml") -> Path:
    """A full line config (the demo's, with absolute paths) whose cameras: block is replaced.

    Built from configs/demo.yaml so the test follows the real config schema and keeps its
    comments, which calibration must not destroy.
    """
    import re

    src = (ROOT / "configs" / "demo.yaml").read_text()
    src = src.replace("../models/demo/package", str(ROOT / "models" / "demo" / "package"))
    src = src.replace("../var/demo/uplink", str(tmp / "spool"))
    block = re.search(r"cameras:\n(?:  .*\n|\n)*?(?=\nmodel:)", src)
    assert block is not None, "configs/demo.yaml has no cameras: block before model:"
    path = tmp / name
    path.write_text(src.replace(block.group(0), cameras_block))
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    write_images(tmp_path / "imgs", 5)
    return tmp_path / "imgs"
