"""Frames to inference workers through shared memory: one copy in, zero copies out.

Pickling a frame through a pipe costs four copies (pickle, kernel in, kernel out, unpickle) and
a syscall per 64 KB: for a 1280x1024 RGB frame that is ~4 MB moved four times per part. Here the
daemon copies the pixels once into a slot the worker maps, and the message on the pipe carries
only the slot's name and the array's shape. A worker owns a fixed set of slots (its queue depth x
batch size), so memory is bounded by configuration, not by load; a slot grows (is re-created)
only when a larger frame than any before arrives.

The parent creates and unlinks every segment; a worker only attaches by name. Spawned workers
share the parent's resource tracker (multiprocessing passes its fd), so an attach registers a
name the tracker already holds, and if the daemon is killed the tracker still unlinks them.
"""

from __future__ import annotations

import contextlib
from multiprocessing import shared_memory

import numpy as np

_ALIGN = 1 << 16
"""Slot sizes are rounded up to 64 KB so small size changes do not re-create a slot."""


SlotRef = tuple[str, tuple[int, ...], str]
"""What crosses the pipe for one frame: its segment's name, the array's shape and dtype (str).

A plain tuple, not a dataclass: pickle runs dataclasses' Python ``__getstate__`` per object, and
on the daemon's loop, cold between two frames at 60 fps, the message to a worker took 66 µs to
pickle with a dataclass here against 22 µs with tuples (18 against 9 µs to unpickle)."""


class SlotPool:
    """Parent side: a worker's slots, handed out per frame and returned after its batch."""

    def __init__(self, count: int) -> None:
        self._slots: list[shared_memory.SharedMemory | None] = [None] * count
        self._free = list(range(count))

    @property
    def free(self) -> int:
        return len(self._free)

    def put(self, image: np.ndarray) -> tuple[int, SlotRef]:
        """Copy `image` into a free slot; (slot index, its reference). Raises IndexError if none."""
        index = self._free.pop()
        need = max(image.nbytes, 1)
        shm = self._slots[index]
        if shm is None or shm.size < need:
            if shm is not None:
                _destroy(shm)
            size = -(-need // _ALIGN) * _ALIGN
            shm = shared_memory.SharedMemory(create=True, size=size)
            self._slots[index] = shm
        view: np.ndarray = np.ndarray(image.shape, dtype=image.dtype, buffer=shm.buf)
        view[...] = image
        return index, (shm.name, tuple(image.shape), image.dtype.str)

    def release(self, indices: list[int]) -> None:
        self._free.extend(indices)

    def close(self) -> None:
        for i, shm in enumerate(self._slots):
            if shm is not None:
                _destroy(shm)
                self._slots[i] = None
        self._free = list(range(len(self._slots)))


def _destroy(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(OSError, BufferError):
        shm.close()
    with contextlib.suppress(OSError, FileNotFoundError):
        shm.unlink()


class SlotReader:
    """Worker side: maps slots by name (cached) and gives numpy views of their frames."""

    def __init__(self) -> None:
        self._maps: dict[str, shared_memory.SharedMemory] = {}

    def view(self, ref: SlotRef) -> np.ndarray:
        name, shape, dtype = ref
        shm = self._maps.get(name)
        if shm is None:
            shm = shared_memory.SharedMemory(name=name)
            self._maps[name] = shm
            if len(self._maps) > 64:  # slots re-created for bigger frames: drop stale maps
                self._evict(keep=name)
        return np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf)

    def _evict(self, keep: str) -> None:
        for name in list(self._maps)[:-32]:
            if name != keep:
                with contextlib.suppress(OSError, BufferError):
                    self._maps.pop(name).close()

    def close(self) -> None:
        for shm in self._maps.values():
            with contextlib.suppress(OSError, BufferError):
                shm.close()
        self._maps.clear()
