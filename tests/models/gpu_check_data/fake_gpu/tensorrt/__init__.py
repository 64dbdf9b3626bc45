"""Stand-in for TensorRT 10 (or 11: FAKE_TENSORRT_MAJOR=11) on a CPU box: an "engine" is the
ONNX file run by ONNX Runtime.

Implements the slice of the API models/tensorrt_runtime.py uses (builder, ONNX parser, INT8
calibrator protocol, named I/O tensors, execute_async_v3). Two users: scripts/gpu_check.sh
rehearsed end to end (engine builds, compares, and `edge bench` with runtime: tensorrt in the
daemon's worker processes; tests/models/test_gpu_check_script.py), and the runtime's unit tests
in-process (tests/models/test_runtime_tensorrt_fake.py, which reads `built`). It proves the
orchestration, not TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pycuda.driver as _cuda

_MAJOR = int(os.environ.get("FAKE_TENSORRT_MAJOR", "10"))
__version__ = f"{_MAJOR}.99.0-fake"
_MAGIC = b"FAKEPLAN"
built: list[list[str]] = []
"""The builder flags of every engine built, in order."""


class Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        pass


class BuilderFlag:
    pass


if _MAJOR < 11:  # TensorRT 11 is strongly typed: no precision flags
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


def nptype(dtype: Any) -> Any:
    return np.float32


class _Tensor:
    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name = name
        self.shape = [d if isinstance(d, int) else -1 for d in shape]


class _Network:
    def __init__(self) -> None:
        self.onnx = b""

    def get_input(self, i: int) -> _Tensor:
        inp = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"]).get_inputs()[i]
        return _Tensor(inp.name, inp.shape)


class OnnxParser:
    num_errors = 0

    def __init__(self, network: _Network, logger: Logger) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx = Path(path).read_bytes()
        return True

    def get_error(self, i: int) -> str:
        return ""


class _Config:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.int8_calibrator: Any = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        if size <= 0:
            raise ValueError(f"memory pool limit {size}")

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: Any) -> None:
        pass


class Builder:
    def __init__(self, logger: Logger) -> None:
        pass

    def create_network(self, flags: int) -> _Network:
        return _Network()

    def create_builder_config(self) -> _Config:
        return _Config()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        cal = config.int8_calibrator
        if cal is not None and cal.read_calibration_cache() is None:
            n = 0
            while cal.get_batch(["images"]) is not None:
                n += 1
            if n == 0:
                return None  # type: ignore[return-value]
            cal.write_calibration_cache(f"fake calibration over {n} batches".encode())
        built.append(sorted(config.flags))
        return _MAGIC + network.onnx


class _Engine:
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

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.addr: dict[str, int] = {}
        self.in_shape: tuple[int, ...] | None = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.in_shape = tuple(shape)
        return True

    def set_tensor_address(self, name: str, addr: int) -> None:
        if addr not in _cuda.memory:
            raise _cuda.Error(f"{name}: {addr:#x} is not device memory")
        self.addr[name] = addr

    def execute_async_v3(self, stream: int) -> bool:
        _cuda.need_context()
        e = self.engine
        shape = self.in_shape or tuple(e.shapes[e.input])
        n = int(np.prod(shape))
        raw = _cuda.memory[self.addr[e.input]]
        x = np.frombuffer(bytes(raw[: n * 4]), np.float32).reshape(shape)
        for name, out in zip(e.outputs, e.session.run(e.outputs, {e.input: x}), strict=True):
            buf = np.ascontiguousarray(out, np.float32).tobytes()
            _cuda.memory[self.addr[name]][: len(buf)] = buf
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        pass

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
        return _Engine(plan[len(_MAGIC) :]) if plan.startswith(_MAGIC) else None
