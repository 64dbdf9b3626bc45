"""Keep CPython's cyclic garbage collector from stalling the deadline loop (and the workers).

A full (oldest-generation) collection walks every tracked object of the process. Once the daemon
has imported its stack (numpy, OpenCV, pydantic, pymodbus, structlog, ...) that is ~105,000
objects, and one such collection took 57-59 ms on the 2-vCPU bench VM with the line idle: a
stall of the event loop that keeps every deadline guard, and twice that with both cores busy
(the 30-minute soak of 2026-11-30 saw a 117 ms loop lag, and one acknowledgement processed after
its deadline). The collector starts a full collection on its own whenever the objects that
survived since the last one reach a quarter of the old generation, which reloads, respawns and
uplink outages make happen a few times an hour.

Almost all of those objects are modules, classes and functions that live as long as the
process. `settle()` collects once and then moves every surviving object to the permanent
generation (`gc.freeze`, the approach Instagram published for its Django fleet): later
collections walk only what was made after it. Measured on the same VM: a full collection 57 ms
before, 0.01-0.4 ms after. In two 30-minute soaks with the freeze, the loop lag peaked at 35 and
49 ms (113-117 ms in the three before it); the full collections that remain walk what outages
leave behind (tracebacks and requests of failed uploads): 25 in 30 minutes, p50 20 ms.

Reference counting still frees frozen objects that are not in a cycle; a frozen cycle that
becomes garbage stays until the process ends, which is why `settle()` runs once, after startup,
and not after every reload, and why `release()` undoes it when a daemon stops inside a
longer-lived process.

`GcPauses` times every collection (any generation, any thread) so a loop-lag spike can be told
apart from a collector pause on the metrics page.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

PauseObserver = Callable[[int, float], None]
"""(generation, pause in ms)"""


def settle() -> int:
    """Collect once, then freeze what survived; returns the number of objects frozen. Call when
    the process has loaded everything it serves with and before frames flow (the one collection
    costs tens of ms)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def release() -> None:
    """Hand the frozen objects back to the collector: a daemon that stopped inside a longer-lived
    process (the tests, `edge bench`) must not pin its object graph for the rest of it."""
    gc.unfreeze()


class GcPauses:
    """Reports the duration of each garbage collection of this process while installed.

    The callback runs in whichever thread triggered the collection, with the GIL held; the
    observer must be cheap and thread-safe (a Prometheus histogram is)."""

    def __init__(self, observe: PauseObserver) -> None:
        self._observe = observe
        self._started_ns = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_ns = time.perf_counter_ns()
        elif self._started_ns:
            ms = (time.perf_counter_ns() - self._started_ns) / 1e6
            self._started_ns = 0
            self._observe(int(info.get("generation", -1)), ms)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
