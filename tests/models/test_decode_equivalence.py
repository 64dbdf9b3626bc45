"""Our numpy decode equals ultralytics' own predict on the same ONNX file.

Reference: ``YOLO(package_onnx, task="segment").predict(image, retina_masks=True)``, the
ultralytics path that returns masks at the original image resolution, as our Detections carry
them. Compared per detection, in order: class, score, box, and mask IoU; over images of many
shapes (square, landscape, portrait, odd sizes, smaller and larger than the network input),
fed to our runtime half as BGR and half as mono.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.config import ModelSettings
from models.decode import params_for
from models.loader import load_detector
from models.package import load_package
from models.types import Detection

SHAPES: list[tuple[int, int]] = [
    (256, 256),
    (240, 320),
    (320, 240),
    (200, 456),
    (457, 123),
    (480, 640),
    (1024, 1280),
    (97, 161),
    (1200, 1920),
    (333, 333),
    (512, 384),
    (150, 700),
]


@pytest.fixture(scope="module")
def reference(ultralytics_offline: Path, demo_package: Path) -> Any:
    from ultralytics import YOLO

    pkg = load_package(demo_package)
    return YOLO(str(pkg.model_path), task="segment")


@pytest.fixture(scope="module")
def images(synthetic_images: Callable[..., list[np.ndarray]]) -> list[np.ndarray]:
    return synthetic_images(SHAPES, 11)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _compare(ours: list[Detection], result: Any, shape: tuple[int, int]) -> list[float]:
    boxes = result.boxes.xyxy.numpy()
    scores = result.boxes.conf.numpy()
    classes = result.boxes.cls.numpy().astype(int)
    masks = (
        result.masks.data.numpy().astype(bool)
        if result.masks is not None
        else np.zeros((0, *shape), bool)
    )
    assert len(ours) == len(boxes), f"{shape}: {len(ours)} detections vs ultralytics {len(boxes)}"
    ious = []
    for d, box, score, cls, mask in zip(ours, boxes, scores, classes, masks, strict=True):
        assert d.class_id == cls, shape
        assert d.score == pytest.approx(float(score), abs=1e-5), shape
        np.testing.assert_allclose(d.box, box, atol=1e-2, err_msg=str(shape))
        full = d.full_mask(shape)
        assert full is not None and mask.shape == full.shape == shape
        ious.append(_iou(full, mask))
        assert d.area_px == int(full.sum())
    return ious


@pytest.mark.parametrize("conf_scale", [1.0, 0.5], ids=["operating-floor", "half-floor"])
def test_decode_equals_ultralytics_predict(
    reference: Any, demo_package: Path, images: list[np.ndarray], conf_scale: float
) -> None:
    """At the package's own candidate floor, and below it (more boxes through NMS)."""
    import cv2

    floor = params_for(ModelSettings(package=demo_package), load_package(demo_package).manifest)
    conf = floor.conf * conf_scale
    det = load_detector(
        ModelSettings(package=demo_package, conf_threshold=conf, iou_threshold=0.7, warmup_runs=0)
    )
    h, w = det.info.input_size
    all_ious: list[float] = []
    for k, img in enumerate(images):
        ours_in = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if k % 2 else img
        p = det.preprocess(ours_in)
        ours = det.postprocess(det.infer(p.tensor), [p])[0]
        ref = reference.predict(
            img, conf=conf, iou=0.7, imgsz=(h, w), retina_masks=True, verbose=False
        )[0]
        all_ious += _compare(ours, ref, img.shape[:2])
    det.close()
    lo, mean = min(all_ious, default=0.0), float(np.mean(all_ious)) if all_ious else 0.0
    print(f"conf {conf:.3f}: {len(all_ious)} detections, mask IoU min {lo:.4f} mean {mean:.5f}")
    assert len(all_ious) >= 10, f"only {len(all_ious)} detections: the comparison is too thin"
    assert min(all_ious) > 0.98, sorted(all_ious)[:5]
    assert float(np.mean(all_ious)) > 0.999
