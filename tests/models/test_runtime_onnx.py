"""ONNX Runtime detector: the Detector contract, batching, threads, errors, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelSettings
from models.loader import load_detector
from models.onnx_runtime import OnnxDetector
from models.package import write_package
from models.types import Detection, Detector, ModelError, ModelPackageError

REPO = Path(__file__).resolve().parents[2]
ImageFactory = Callable[[list[tuple[int, int]]], list[np.ndarray]]


@pytest.fixture(scope="module")
def detector(demo_package: Path) -> Iterator[OnnxDetector]:
    d = load_detector(ModelSettings(package=demo_package, max_batch=4, warmup_runs=1))
    assert isinstance(d, OnnxDetector)
    yield d
    d.close()


def _same(a: list[Detection], b: list[Detection]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.class_id == y.class_id
        assert x.score == pytest.approx(y.score, abs=1e-5)
        np.testing.assert_allclose(x.box, y.box, atol=1e-2)
        assert abs(x.area_px - y.area_px) <= max(2, 0.01 * x.area_px)


def test_detector_satisfies_protocol(detector: OnnxDetector, demo_package: Path) -> None:
    assert isinstance(detector, Detector)
    manifest = json.loads((demo_package / "manifest.json").read_text())
    assert detector.info.runtime == "onnxruntime"
    assert detector.info.classes == tuple(manifest["classes"])
    assert detector.info.model_id == f"{manifest['name']}:{manifest['version']}"
    assert detector.info.sha256 == manifest["files"][manifest["model_file"]]["sha256"]
    assert detector.max_batch == 4
    assert detector.providers == ["CPUExecutionProvider"]


def test_detects_defects_on_synthetic_images(
    detector: OnnxDetector, synthetic_images: ImageFactory
) -> None:
    """The demo model finds something on defect images; every field is consistent."""
    images = synthetic_images([(256, 256), (240, 320), (480, 640)])
    found = 0
    for img in images:
        dets = detector.detect(img)
        found += len(dets)
        for d in dets:
            assert 0 <= d.class_id < len(detector.info.classes)
            assert d.class_name == detector.info.classes[d.class_id]
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= img.shape[1] and 0 <= y1 <= y2 <= img.shape[0]
            full = d.full_mask(img.shape)
            assert full is not None and full.shape == img.shape[:2]
            assert d.area_px == int(full.sum()) > 0
            ys, xs = np.nonzero(full)
            assert xs.min() >= x1 - 1 and xs.max() <= x2 and ys.min() >= y1 - 1 and ys.max() <= y2
    assert found > 0, "the demo model detected nothing on defect images"


def test_batch_equals_single_images(detector: OnnxDetector, synthetic_images: ImageFactory) -> None:
    images = synthetic_images([(256, 256), (240, 320), (457, 123)])
    prepared = [detector.preprocess(i) for i in images]
    batch = np.concatenate([p.tensor for p in prepared])
    together = detector.postprocess(detector.infer(batch), prepared)
    for img, dets in zip(images, together, strict=True):
        _same(dets, detector.detect(img))


def test_mono_frames_give_the_same_detections(
    detector: OnnxDetector, synthetic_images: ImageFactory
) -> None:
    import cv2

    (bgr,) = synthetic_images([(300, 400)])
    mono = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    _same(detector.detect(mono), detector.detect(bgr))


def test_masks_false_keeps_areas_and_outlines(
    detector: OnnxDetector, synthetic_images: ImageFactory
) -> None:
    (img,) = synthetic_images([(256, 256)])
    p = detector.preprocess(img)
    out = detector.infer(p.tensor)
    with_masks = detector.postprocess(out, [p], masks=True)[0]
    without = detector.postprocess(out, [p], masks=False)[0]
    assert [d.area_px for d in without] == [d.area_px for d in with_masks]
    assert [d.outline for d in without] == [d.outline for d in with_masks]
    assert all(d.mask is None for d in without)


def test_bad_batches_raise_model_error(detector: OnnxDetector) -> None:
    h, w = detector.input_hw
    with pytest.raises(ModelError, match="batch shape"):
        detector.infer(np.zeros((1, 3, h + 1, w), np.float32))
    with pytest.raises(ModelError, match="exceeds max_batch"):
        detector.infer(np.zeros((5, 3, h, w), np.float32))
    with pytest.raises(ModelError, match="expected 2 model outputs"):
        detector.postprocess([np.zeros((1, 4, 4), np.float32)], [])


def test_concurrent_inference_from_threads(
    detector: OnnxDetector, synthetic_images: ImageFactory
) -> None:
    """The daemon runs several inference workers on one detector."""
    images = synthetic_images([(256, 256), (240, 320)])
    expected = [detector.detect(i) for i in images]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(3):
                _same(detector.detect(images[k % 2]), expected[k % 2])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_thread_settings_reach_the_session(demo_package: Path) -> None:
    d = load_detector(
        ModelSettings(package=demo_package, intra_op_threads=1, inter_op_threads=1, warmup_runs=0)
    )
    assert isinstance(d, OnnxDetector)
    opts = d.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # BLAS pools (numpy's and OpenCV's OpenBLAS) are capped so they do not spin against ORT.
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
    d.close()
    with pytest.raises(ModelError, match="closed"):
        d.infer(np.zeros((1, 3, *d.input_hw), np.float32))


def test_cuda_requested_without_provider_falls_back_to_cpu(demo_package: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is installed: the fallback path cannot be seen")
    d = load_detector(ModelSettings(package=demo_package, use_cuda=True, warmup_runs=0))
    assert isinstance(d, OnnxDetector)
    assert d.providers == ["CPUExecutionProvider"]
    d.close()


def test_loader_refuses_bare_file_and_tampered_package(package_copy: Path) -> None:
    manifest = json.loads((package_copy / "manifest.json").read_text())
    model = package_copy / manifest["model_file"]
    with pytest.raises(ModelPackageError, match="bare model file"):
        load_detector(ModelSettings(package=model))
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="sha256"):
        load_detector(ModelSettings(package=package_copy))


def test_settings_reject_unknown_keys(demo_package: Path) -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        ModelSettings.model_validate({"package": str(demo_package), "thredas": 2})
    with pytest.raises(ValueError, match="runtime"):
        ModelSettings.model_validate({"package": str(demo_package), "runtime": "tflite"})


def test_runtime_imports_neither_torch_nor_ultralytics(demo_package: Path) -> None:
    """The daemon path (loader -> ONNX Runtime -> decode) must not pull AGPL/torch code in."""
    code = (
        "import sys, numpy as np\n"
        "from models.config import ModelSettings\n"
        "from models.loader import load_detector\n"
        "import models.tensorrt_runtime\n"
        f"d = load_detector(ModelSettings(package={str(demo_package)!r}, warmup_runs=1))\n"
        "p = d.preprocess(np.zeros((100, 120, 3), np.uint8))\n"
        "d.postprocess(d.infer(p.tensor), [p])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'ultralytics', 'tensorrt', 'pycuda'))\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---- dynamic-batch export (the default export is fixed batch 1: infer() loops) ----


@pytest.fixture(scope="module")
def dynamic_package(ultralytics_offline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained yolov8n-seg exported with a dynamic batch axis (a few seconds, offline)."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("dyn")
    model = YOLO("yolov8n-seg.yaml", task="segment")
    onnx = Path(model.export(format="onnx", imgsz=160, opset=17, dynamic=True, simplify=True))
    moved = work / "dyn.onnx"
    onnx.replace(moved)
    return write_package(
        work / "pkg",
        moved,
        name="dyn",
        version="0",
        plc_model_id=0,
        classes=[f"c{i}" for i in range(80)],
        input_size=[160, 160],
    )


def test_dynamic_batch_model_runs_batches_in_one_call(
    dynamic_package: Path, synthetic_images: ImageFactory
) -> None:
    d = load_detector(
        ModelSettings(package=dynamic_package, max_batch=3, conf_threshold=0.001, warmup_runs=1)
    )
    assert isinstance(d, OnnxDetector)
    images = synthetic_images([(160, 160), (100, 200), (300, 120)])
    prepared = [d.preprocess(i) for i in images]
    outs = d.infer(np.concatenate([p.tensor for p in prepared]))
    assert outs[0].shape[0] == 3 and outs[1].shape[0] == 3
    together = d.postprocess(outs, prepared)
    for img, dets in zip(images, together, strict=True):
        _same(dets, d.detect(img))
    d.close()
