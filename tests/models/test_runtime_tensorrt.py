"""TensorRT runtime.

On machines without TensorRT: the module imports, and selecting it fails with a clear error.
Where an NVIDIA GPU and TensorRT are present (tests marked ``gpu``): FP16 and INT8 engines are
built from the demo package and must agree with ONNX Runtime on the same images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelSettings, TensorRTSettings
from models.loader import load_detector
from models.package import load_package
from models.tensorrt_runtime import (
    _expected_meta,
    _sidecar,
    default_engine_path,
    engine_is_current,
    tensorrt_available,
    tensorrt_installed,
)
from models.types import Detection, ModelError

ImageFactory = Callable[..., list[np.ndarray]]

needs_gpu = pytest.mark.skipif(
    not tensorrt_available(), reason="needs an NVIDIA GPU with TensorRT and pycuda"
)


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_selecting_tensorrt_without_it_is_a_clear_error(demo_package: Path) -> None:
    with pytest.raises(ModelError, match=r"tensorrt.*not installed|pycuda is not installed"):
        load_detector(ModelSettings(package=demo_package, runtime="tensorrt"))


def test_engine_cache_identity(demo_package: Path, tmp_path: Path) -> None:
    """An engine is reused only for the same ONNX, precision, batch, GPU and TensorRT version."""
    pkg = load_package(demo_package)
    s = ModelSettings(
        package=demo_package, runtime="tensorrt", tensorrt=TensorRTSettings(cache_dir=tmp_path)
    )
    path = default_engine_path(pkg, s, "10.3.0", "Tesla-T4-sm75")
    assert path.parent == tmp_path and pkg.model_sha256[:12] in path.name and "fp16" in path.name
    assert "Tesla-T4-sm75" in path.name and "trt10.3.0" in path.name
    expected = _expected_meta(pkg, s, "10.3.0", "Tesla-T4-sm75")
    assert not engine_is_current(path, expected)  # nothing built yet
    path.write_bytes(b"engine")
    _sidecar(path).write_text(json.dumps(expected))
    assert engine_is_current(path, expected)
    for key, other in [
        ("onnx_sha256", "0" * 64),
        ("tensorrt", "11.0"),
        ("precision", "int8"),
        ("gpu", "Orin-sm87"),
    ]:
        assert not engine_is_current(path, {**expected, key: other})
    explicit = ModelSettings(
        package=demo_package,
        runtime="tensorrt",
        tensorrt=TensorRTSettings(engine_path=tmp_path / "x.engine"),
    )
    assert default_engine_path(pkg, explicit, "10.3.0", "Tesla-T4-sm75") == tmp_path / "x.engine"


# ---- on a GPU ----


def _canvas(*dets: Detection) -> tuple[int, int]:
    """The smallest image shape that holds the (box-local) masks of `dets`."""
    h = max(d.mask_origin[1] + (d.mask.shape[0] if d.mask is not None else 0) for d in dets)
    w = max(d.mask_origin[0] + (d.mask.shape[1] if d.mask is not None else 0) for d in dets)
    return h, w


def _match(a: list[Detection], b: list[Detection]) -> tuple[int, list[float]]:
    """Greedy match by box IoU (same class); returns matches and their mask IoUs."""
    used: set[int] = set()
    mask_ious: list[float] = []
    for d in a:
        best, best_iou = -1, 0.5
        for j, e in enumerate(b):
            if j in used or e.class_id != d.class_id:
                continue
            iou = _box_iou(d.box, e.box)
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0:
            used.add(best)
            canvas = _canvas(d, b[best])
            m1, m2 = d.full_mask(canvas), b[best].full_mask(canvas)
            assert m1 is not None and m2 is not None
            union = np.logical_or(m1, m2).sum()
            mask_ious.append(float(np.logical_and(m1, m2).sum() / union) if union else 1.0)
    return len(used), mask_ious


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _agreement(
    demo_package: Path, settings: ModelSettings, images: list[np.ndarray]
) -> tuple[int, int, int, list[float]]:
    ort = load_detector(ModelSettings(package=demo_package, warmup_runs=0))
    trt = load_detector(settings)
    assert trt.info.runtime == "tensorrt" and trt.info.sha256 == ort.info.sha256
    n_ort = n_trt = matched = 0
    ious: list[float] = []
    for img in images:
        p_o, p_t = ort.preprocess(img), trt.preprocess(img)
        a = ort.postprocess(ort.infer(p_o.tensor), [p_o])[0]
        b = trt.postprocess(trt.infer(p_t.tensor), [p_t])[0]
        n_ort, n_trt = n_ort + len(a), n_trt + len(b)
        m, i = _match(a, b)
        matched += m
        ious += i
    trt.close()
    ort.close()
    return n_ort, n_trt, matched, ious


@pytest.mark.gpu
@needs_gpu
def test_fp16_engine_agrees_with_onnxruntime(
    demo_package: Path, tmp_path: Path, synthetic_images: ImageFactory
) -> None:
    s = ModelSettings(
        package=demo_package,
        runtime="tensorrt",
        max_batch=2,
        tensorrt=TensorRTSettings(cache_dir=tmp_path, precision="fp16"),
    )
    images = synthetic_images([(256, 256), (240, 320), (480, 640), (457, 123), (1200, 1920)] * 2)
    n_ort, n_trt, matched, ious = _agreement(demo_package, s, images)
    assert n_ort > 0
    assert matched >= 0.9 * max(n_ort, n_trt)
    assert float(np.mean(ious)) > 0.9
    # The engine is cached with its identity and reused on the next load (no rebuild).
    engines = list(tmp_path.glob("*.engine"))
    assert len(engines) == 1 and _sidecar(engines[0]).is_file()
    mtime = engines[0].stat().st_mtime_ns
    d = load_detector(s)
    assert engines[0].stat().st_mtime_ns == mtime
    # Batches up to max_batch in one call, equal to single images.
    prepared = [d.preprocess(i) for i in images[:2]]
    both = d.postprocess(d.infer(np.concatenate([p.tensor for p in prepared])), prepared)
    for p, dets in zip(prepared, both, strict=True):
        single = d.postprocess(d.infer(p.tensor), [p])[0]
        assert [x.class_id for x in dets] == [x.class_id for x in single]
    d.close()
    with pytest.raises(ModelError, match="closed"):
        d.infer(prepared[0].tensor)


@pytest.mark.gpu
@needs_gpu
def test_int8_engine_with_calibration_cache(
    demo_package: Path, tmp_path: Path, synthetic_images: ImageFactory
) -> None:
    import cv2

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(synthetic_images([(256, 256)] * 64, 3)):
        cv2.imwrite(str(calib / f"{i:03d}.png"), img)
    cache = tmp_path / "int8.cache"
    s = ModelSettings(
        package=demo_package,
        runtime="tensorrt",
        tensorrt=TensorRTSettings(
            cache_dir=tmp_path / "engines",
            precision="int8",
            calibration_images=calib,
            calibration_cache=cache,
        ),
    )
    images = synthetic_images([(256, 256), (240, 320), (480, 640)] * 3, 21)
    n_ort, n_trt, matched, ious = _agreement(demo_package, s, images)
    assert n_ort > 0
    assert matched >= 0.7 * max(n_ort, n_trt)
    assert float(np.mean(ious)) > 0.8


@pytest.mark.gpu
@needs_gpu
def test_stale_engine_is_refused_without_build(demo_package: Path, tmp_path: Path) -> None:
    s = ModelSettings(
        package=demo_package,
        runtime="tensorrt",
        tensorrt=TensorRTSettings(cache_dir=tmp_path, build_if_missing=False),
    )
    with pytest.raises(ModelError, match="build-engine"):
        load_detector(s)
