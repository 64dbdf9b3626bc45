"""TensorRT runtime logic on a CPU-only machine, against in-process fakes of tensorrt and pycuda.

These are in addition to (never instead of) the ``gpu`` tests in test_runtime_tensorrt.py,
which need real hardware. The fakes implement the slice of the TensorRT >= 8.5 / pycuda API the
runtime uses (named I/O tensors, execute_async_v3, page-locked buffers, a stream, the INT8
calibrator protocol); the "engine" runs the package's ONNX with ONNX Runtime, and "device
memory" is host memory addressed by integer handles. What this checks: engine build and cache
identity, buffer sizing, batching and chunking, dtype handling, context push/pop balance, the
calibrator protocol and cache, and that results equal the ONNX Runtime detector's.
"""

from __future__ import annotations

import itertools
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
_MAGIC = b"FAKEPLAN"


class _FakeCuda:
    """Just enough of pycuda.driver."""

    class Error(Exception):
        pass

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self._next = itertools.count(0x1000, 0x1000)
        self.context_depth = 0
        self.copies = 0

    def init(self) -> None:
        pass

    def make_device(self) -> Any:
        cuda = self

        class Ctx:
            def push(self) -> None:
                cuda.context_depth += 1

            def pop(self) -> None:
                assert cuda.context_depth > 0, "pop without push"
                cuda.context_depth -= 1

            def detach(self) -> None:
                pass

        class Device:
            def __init__(self, i: int) -> None:
                assert i == 0

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Fake GPU T4"

            def compute_capability(self) -> tuple[int, int]:
                return (7, 5)

            def retain_primary_context(self) -> Ctx:
                return Ctx()

        return Device

    def mem_alloc(self, nbytes: int) -> Any:
        addr = next(self._next)
        self.memory[addr] = bytearray(int(nbytes))
        cuda = self

        class DevMem:
            def __int__(self) -> int:
                return addr

            def free(self) -> None:
                cuda.memory.pop(addr, None)

        return DevMem()

    def _check_context(self) -> None:
        if self.context_depth < 1:
            raise self.Error("no current CUDA context")

    def memcpy_htod(self, dev: Any, arr: np.ndarray) -> None:
        self._check_context()
        buf = np.ascontiguousarray(arr).tobytes()
        self.memory[int(dev)][: len(buf)] = buf
        self.copies += 1

    def memcpy_htod_async(self, dev: Any, arr: np.ndarray, stream: Any) -> None:
        self.memcpy_htod(dev, arr)

    def memcpy_dtoh_async(self, arr: np.ndarray, dev: Any, stream: Any) -> None:
        self._check_context()
        raw = self.memory[int(dev)]
        arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(raw[: arr.nbytes]), np.uint8)

    @staticmethod
    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    class Stream:
        handle = 42

        def synchronize(self) -> None:
            pass


def _fake_trt(cuda: _FakeCuda, strongly_typed: bool) -> types.ModuleType:
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.0.0-fake" if strongly_typed else "10.3.0-fake"  # type: ignore[attr-defined]
    trt.built = []  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class BuilderFlag:
        pass

    if not strongly_typed:
        BuilderFlag.FP16 = "fp16"  # type: ignore[attr-defined]
        BuilderFlag.INT8 = "int8"  # type: ignore[attr-defined]

    class MemoryPoolType:
        WORKSPACE = "ws"

    class TensorIOMode:
        INPUT = "in"
        OUTPUT = "out"

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    class Tensor:
        def __init__(self, name: str, shape: list[Any]) -> None:
            self.name = name
            self.shape = [d if isinstance(d, int) else -1 for d in shape]

    class Network:
        def __init__(self) -> None:
            self.onnx: bytes = b""

        def get_input(self, i: int) -> Tensor:
            s = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])
            inp = s.get_inputs()[i]
            return Tensor(inp.name, inp.shape)

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            self.network.onnx = Path(path).read_bytes()
            return True

        def get_error(self, i: int) -> str:
            return ""

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.int8_calibrator: Any = None
            self.profiles: list[Any] = []

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            assert size > 0

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, p: Any) -> None:
            self.profiles.append(p)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Any:
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            cal = config.int8_calibrator
            # The calibrator protocol as TensorRT drives it.
            if cal is not None and cal.read_calibration_cache() is None:
                n = 0
                while cal.get_batch(["images"]) is not None:
                    n += 1
                assert n > 0, "calibrator produced no batch"
                cal.write_calibration_cache(b"calibration-table")
            trt.built.append(sorted(config.flags))
            return _MAGIC + network.onnx

    class Context:
        in_shape: tuple[int, ...] | None = None

        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.in_shape = tuple(shape)
            return True

        def set_tensor_address(self, name: str, addr: int) -> None:
            assert addr in cuda.memory
            self.addr[name] = addr

        def execute_async_v3(self, stream: int) -> bool:
            cuda._check_context()
            e = self.engine
            shape = self.in_shape or tuple(e.shapes[e.input])
            raw = cuda.memory[self.addr[e.input]]
            n = int(np.prod(shape))
            x = np.frombuffer(bytes(raw[: n * 4]), np.float32).reshape(shape)
            outs = e.session.run(e.outputs, {e.input: x})
            for name, o in zip(e.outputs, outs, strict=True):
                buf = np.ascontiguousarray(o, np.float32).tobytes()
                cuda.memory[self.addr[name]][: len(buf)] = buf
            return True

    class Engine:
        def __init__(self, onnx: bytes) -> None:
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.shapes = {
                t.name: [d if isinstance(d, int) else -1 for d in t.shape]
                for t in [*self.session.get_inputs(), *self.session.get_outputs()]
            }
            self.names = [self.input, *self.outputs]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == self.input else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> list[int]:
            return self.shapes[name]

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine(plan[len(_MAGIC) :]) if plan.startswith(_MAGIC) else None

    for obj in (
        Logger,
        BuilderFlag,
        MemoryPoolType,
        TensorIOMode,
        NetworkDefinitionCreationFlag,
        IInt8EntropyCalibrator2,
        OnnxParser,
        Builder,
        Runtime,
    ):
        setattr(trt, obj.__name__, obj)
    trt.nptype = lambda dt: np.float32  # type: ignore[attr-defined]
    return trt


@pytest.fixture(params=["trt10", "trt11"])
def fake_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    cuda = _FakeCuda()
    driver = types.ModuleType("pycuda.driver")
    for name in (
        "init",
        "mem_alloc",
        "memcpy_htod",
        "memcpy_htod_async",
        "memcpy_dtoh_async",
        "pagelocked_empty",
    ):
        setattr(driver, name, getattr(cuda, name))
    driver.Error = cuda.Error  # type: ignore[attr-defined]
    driver.Stream = cuda.Stream  # type: ignore[attr-defined]
    driver.Device = cuda.make_device()  # type: ignore[attr-defined]
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver  # type: ignore[attr-defined]
    trt = _fake_trt(cuda, strongly_typed=request.param == "trt11")
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if request.param == "trt11":
        # TensorRT 11 has no FP16 flag: the ONNX is converted first. Stand in for
        # onnxconverter-common with an identity conversion (the converter is not a test dep).
        fc = types.ModuleType("onnxconverter_common")
        fc.float16 = types.SimpleNamespace(  # type: ignore[attr-defined]
            convert_float_to_float16=lambda model, keep_io_types: model
        )
        monkeypatch.setitem(sys.modules, "onnxconverter_common", fc)
    yield types.SimpleNamespace(cuda=cuda, trt=trt, kind=request.param)


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
    assert cache.read_bytes() == b"calibration-table"
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
