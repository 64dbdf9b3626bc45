"""Fewer glibc malloc arenas for the daemon and its workers, and free heap handed back.

glibc gives each thread that contends for the heap an arena of its own (up to 8 per core), and
memory freed in an arena stays with it. The daemon has many short-lived thread users (the default
executor for config reloads and spool statistics, the spool and forwarder threads, librdkafka,
the HTTP server), so its RSS rose in steps with each new thread that allocated: 214 -> 231 MB over
40 SIGHUPs (a refused config, then the good one), plateauing, and ~8 MB per fault cycle in the
soak. With two arenas: 203 -> 212 MB, flat after a few reloads. The daemon's threads are mostly
waiting on I/O, so two arenas cost no throughput that the benchmarks could see.

Faults still raise the heap's high-water mark (a paused broker or a dead S3 fills queues and
batches, freed again once they drain), and glibc keeps freed pages below the top of the heap.
`trim()` once a minute gives them back, so the RSS follows what the daemon holds, not the worst
moment it went through.
"""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc <malloc.h>
DEFAULT_ARENAS = 2


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_arenas() -> bool:
    """Cap the arenas of this process (and, through the environment, of the worker processes it
    spawns). MALLOC_ARENA_MAX set by the operator wins. False where libc is not glibc."""
    n = int(os.environ.setdefault("MALLOC_ARENA_MAX", str(DEFAULT_ARENAS)))
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt(M_ARENA_MAX, n)) if mallopt is not None else False


def trim() -> bool:
    """Return free heap pages to the OS (glibc malloc_trim). False where there is no glibc."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    return bool(malloc_trim(0)) if malloc_trim is not None else False
