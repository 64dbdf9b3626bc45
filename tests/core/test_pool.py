"""Inference pool respawn policy (unit tests over in-process thread workers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from edge.decision import DecisionRules, DecisionSettings
from edge.inference import BatchItem, ThreadWorker, Worker
from edge.pool import InferencePool
from tests.core.fakes import FakeDetector


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


async def respawn_delays(*, serve: bool, lived_s: float, deaths: int) -> list[float]:
    """Let the pool's worker die `deaths` times (after serving one batch or not, having lived
    `lived_s` by the pool's clock); returns how long each respawn waited (loop time)."""
    det = FakeDetector()
    rules = {0: DecisionRules(DecisionSettings(), det.info.classes)}
    loop = asyncio.get_running_loop()
    spawned: list[tuple[float, Worker, Callable[[Worker, str], None]]] = []
    started, ready = asyncio.Event(), asyncio.Event()

    def factory(name: str, on_death: Callable[[Worker, str], None], nice: int) -> Worker:
        w = ThreadWorker(name, lambda: det, rules, on_death=on_death)
        spawned.append((loop.time(), w, on_death))
        loop.call_soon(started.set)
        return w  # type: ignore[return-value]

    clock = Clock()
    pool = InferencePool("t", factory, workers=1, depth=1, hang_s=5, error_threshold=3,
                         clock_ns=clock, on_capacity=ready.set)
    await pool.start()
    delays = []
    for _ in range(deaths):
        _, worker, on_death = spawned[-1]
        await asyncio.wait_for(ready.wait(), 10)  # the pool saw this worker start
        assert worker.ready
        if serve:
            await pool.submit([BatchItem(np.zeros((48, 64), np.uint8), "cam0")], masks=False)
        clock.ns += int(lived_s * 1e9)
        died_at = loop.time()
        started.clear()
        ready.clear()  # from here only the respawned worker's start sets it
        on_death(worker, "killed (test)")
        await asyncio.wait_for(started.wait(), 10)
        delays.append(spawned[-1][0] - died_at)
    await pool.close()
    return delays


async def test_a_worker_that_served_a_while_respawns_at_once_every_time() -> None:
    """Regression (soak): the backoff reset only after 60 s of service, so faults a minute apart
    doubled it each time (8 s without real verdicts after the sixth)."""
    delays = await respawn_delays(serve=True, lived_s=11, deaths=4)
    assert all(d < 0.45 for d in delays), delays


async def test_a_crash_looping_worker_backs_off() -> None:
    """A worker that dies before deciding anything (a model that crashes at load or on its
    first frame) is respawned ever more slowly, not in a tight loop."""
    delays = await respawn_delays(serve=False, lived_s=11, deaths=4)
    assert delays[0] < 0.45 and delays[-1] >= 1.9, delays
    assert delays == sorted(delays), delays
