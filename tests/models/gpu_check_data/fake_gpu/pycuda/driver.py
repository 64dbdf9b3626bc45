"""Stand-in for pycuda.driver: "device memory" is host memory addressed by integer handles.

Used to rehearse scripts/gpu_check.sh end to end on a CPU box (tests/models/
test_gpu_check_script.py) and, loaded fresh per test, by the runtime's fake-GPU unit tests
(tests/models/test_runtime_tensorrt_fake.py, which read `context_depth()`).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

memory: dict[int, bytearray] = {}
_next = itertools.count(0x1000, 0x1000)
_depth = [0]


class Error(Exception):
    pass


def init() -> None:
    pass


def get_driver_version() -> int:
    return 12020


class _Ctx:
    def push(self) -> None:
        _depth[0] += 1

    def pop(self) -> None:
        if _depth[0] < 1:
            raise Error("pop without push")
        _depth[0] -= 1

    def detach(self) -> None:
        pass


class Device:
    def __init__(self, i: int) -> None:
        if i != 0:
            raise Error(f"no device {i}")

    @staticmethod
    def count() -> int:
        return 1

    def name(self) -> str:
        return "Fake T4"

    def compute_capability(self) -> tuple[int, int]:
        return (7, 5)

    def retain_primary_context(self) -> _Ctx:
        return _Ctx()


class _DevMem:
    def __init__(self, nbytes: int) -> None:
        self.addr = next(_next)
        memory[self.addr] = bytearray(int(nbytes))

    def __int__(self) -> int:
        return self.addr

    def free(self) -> None:
        memory.pop(self.addr, None)


def mem_alloc(nbytes: int) -> _DevMem:
    return _DevMem(nbytes)


def context_depth() -> int:
    """Contexts pushed and not popped (0 after every balanced use)."""
    return _depth[0]


def need_context() -> None:
    if _depth[0] < 1:
        raise Error("no current CUDA context")


def memcpy_htod(dev: Any, arr: np.ndarray) -> None:
    need_context()
    buf = np.ascontiguousarray(arr).tobytes()
    memory[int(dev)][: len(buf)] = buf


def memcpy_htod_async(dev: Any, arr: np.ndarray, stream: Any) -> None:
    memcpy_htod(dev, arr)


def memcpy_dtoh_async(arr: np.ndarray, dev: Any, stream: Any) -> None:
    need_context()
    raw = memory[int(dev)]
    arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(raw[: arr.nbytes]), np.uint8)


def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype)


class Stream:
    handle = 42

    def synchronize(self) -> None:
        pass
