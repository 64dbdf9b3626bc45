"""TensorRT runtime logic on a CPU-only machine, against in-process fakes of tensorrt and pycuda.

These are in addition to (never instead of) the ``gpu`` tests in test_runtime_tensorrt.py,
which need real hardware. The fakes implement the slice of the TensorRT >= 8.5 / pycuda API the
runtime uses (named I/O tensors, execute_async_v3, page-locked buffers, a stream, the INT8
calibrator protocol; tests/models/gpu_check_data/fake_gpu, shared with the gpu_check.sh
rehearsal); the "engine" runs the package's ONNX with ONNX Runtime, and "device memory" is host
memory addressed by integer handles. What this checks: engine build and cache
identity, buffer sizing, batching and chunking, dtype handling, context push/pop balance, the
calibrator protocol and cache, and that results equal the ONNX Runtime detector's.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.config import ModelSettings, TensorRTSettings
from models.loader import load_detector
from models.types import ModelError

ImageFactory = Callable[..., list[np.ndarray]]
FAKE_GPU = Path(__file__).parent / "gpu_check_data" / "fake_gpu"
"""The same stand-ins that rehearse scripts/gpu_check.sh, loaded fresh for every test."""


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    return mod


class _CudaView:
    def __init__(self, driver: types.ModuleType) -> None:
        self._driver = driver

    @property
    def context_depth(self) -> int:
        depth: int = self._driver.context_depth()
        return depth


@pytest.fixture(params=["trt10", "trt11"])
def fake_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("FAKE_TENSORRT_MAJOR", "11" if request.param == "trt11" else "10")
    pycuda = _load("pycuda", FAKE_GPU / "pycuda" / "__init__.py", monkeypatch)
    driver = _load("pycuda.driver", FAKE_GPU / "pycuda" / "driver.py", monkeypatch)
    pycuda.driver = driver  # type: ignore[attr-defined]
    trt = _load("tensorrt", FAKE_GPU / "tensorrt" / "__init__.py", monkeypatch)
    if request.param == "trt11":
        # TensorRT 11 has no FP16 flag: the ONNX is converted first. Stand in for
        # onnxconverter-common with an identity conversion (the converter is not a test dep).
        fc = types.ModuleType("onnxconverter_common")
        fc.float16 = types.SimpleNamespace(  # type: ignore[attr-defined]
            convert_float_to_float16=lambda model, keep_io_types: model
        )
        monkeypatch.setitem(sys.modules, "onnxconverter_common", fc)
    yield types.SimpleNamespace(cuda=_CudaView(driver), trt=trt, kind=request.param)


def _settings(pkg: Path, tmp: Path, **trt: Any) -> ModelSettings:
    return ModelSettings(
        package=pkg,
        runtime="tensorrt",
        max_batch=3,
        warmup_runs=1,
        tensorrt=TensorRTSettings(cache_dir=tmp / "engines", **trt),
    )


def test_fake_engine_matches_onnxruntime(
    fake_gpu: Any, demo_package: Path, tmp_path: Path, synthetic_images: ImageFactory
) -> None:
    if fake_gpu.kind == "trt11":
        pytest.importorskip("onnx")
    ref = load_detector(ModelSettings(package=demo_package, max_batch=3, warmup_runs=0))
    det = load_detector(_settings(demo_package, tmp_path))
    assert det.info.runtime == "tensorrt" and det.info.sha256 == ref.info.sha256
    assert fake_gpu.cuda.context_depth == 0, "CUDA context left pushed after load"
    built = fake_gpu.trt.built
    assert len(built) == 1
    assert built[0] == ([] if fake_gpu.kind == "trt11" else ["fp16"])
    images = synthetic_images([(256, 256), (240, 320), (457, 123)])
    prepared = [det.preprocess(i) for i in images]
    batch = np.concatenate([p.tensor for p in prepared])
    ours = det.postprocess(det.infer(batch), prepared)  # 3 frames through a batch-1 engine
    theirs = ref.postprocess(ref.infer(batch), prepared)
    assert fake_gpu.cuda.context_depth == 0
    assert sum(len(d) for d in ours) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert [(d.class_id, round(d.score, 5), d.area_px) for d in a] == [
            (d.class_id, round(d.score, 5), d.area_px) for d in b
        ]
    # A second load reuses the cached engine (same ONNX, precision, batch, TensorRT version).
    det2 = load_detector(_settings(demo_package, tmp_path))
    assert len(built) == 1
    det2.close()
    det.close()
    with pytest.raises(ModelError, match="closed"):
        det.infer(prepared[0].tensor)
    ref.close()


def test_fake_int8_uses_calibration_images_then_cache(
    fake_gpu: Any, demo_package: Path, tmp_path: Path, synthetic_images: ImageFactory
) -> None:
    if fake_gpu.kind == "trt11":
        pytest.skip("TensorRT 11 INT8 goes through NVIDIA ModelOpt (GPU machine only)")
    import cv2

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(synthetic_images([(256, 256)] * 4, 5)):
        cv2.imwrite(str(calib / f"{i}.png"), img)
    cache = tmp_path / "int8.cache"
    s = _settings(
        demo_package,
        tmp_path,
        precision="int8",
        calibration_images=calib,
        calibration_cache=cache,
    )
    load_detector(s).close()
    assert cache.read_bytes() == b"fake calibration over 4 batches"  # one per image
    assert fake_gpu.trt.built == [["fp16", "int8"]]
    # With the cache present and a new engine dir, the images are not needed any more.
    s2 = _settings(
        demo_package,
        tmp_path / "second",
        precision="int8",
        calibration_images=tmp_path / "gone",
        calibration_cache=cache,
    )
    load_detector(s2).close()
    assert len(fake_gpu.trt.built) == 2
    assert fake_gpu.cuda.context_depth == 0


def test_fake_int8_without_images_is_a_clear_error(
    fake_gpu: Any, demo_package: Path, tmp_path: Path
) -> None:
    if fake_gpu.kind == "trt11":
        pytest.skip("TensorRT 11 INT8 goes through NVIDIA ModelOpt (GPU machine only)")
    with pytest.raises(ModelError, match="calibration_images"):
        load_detector(_settings(demo_package, tmp_path, precision="int8"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no calibration images"):
        load_detector(_settings(demo_package, tmp_path, precision="int8", calibration_images=empty))
    assert fake_gpu.cuda.context_depth == 0


def test_fake_unwritable_cache_dir_is_a_clear_error(
    fake_gpu: Any, demo_package: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = ModelSettings(
        package=demo_package,
        runtime="tensorrt",
        tensorrt=TensorRTSettings(cache_dir=blocker / "engines"),
    )
    if fake_gpu.kind == "trt11":
        pytest.importorskip("onnx")
    with pytest.raises(ModelError, match="writable directory"):
        load_detector(s)
    assert fake_gpu.cuda.context_depth == 0
