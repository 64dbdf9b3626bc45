"""Supervision of the daemon's long-lived asyncio tasks (Frigate's watchdog, for coroutines).

A background task that dies silently is the worst failure a line PC can have: the heartbeat stops
moving while systemd's watchdog is still fed, or the uplink quietly stops forwarding. Every task
is started here from a factory. A crash is logged and the task is restarted after a backoff
(doubling, capped); a task that crashes more than `budget` times in `window_s` is given up on,
and if it is critical the supervisor reports unhealthy, so /healthz turns 503 and the daemon stops
feeding the systemd watchdog (systemd then restarts the whole process: a clean slate beats a
half-working line). A critical periodic task also promises a `beat()` at least every
`stale_after_s`: a task alive but stuck (awaiting forever) reads as unhealthy too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


@dataclass
class _Supervised:
    name: str
    factory: Callable[[], Awaitable[None]]
    critical: bool
    stale_after_s: float | None
    task: asyncio.Task[None] | None = None
    crashes: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=64))
    backoff_s: float = _BACKOFF_MIN_S
    last_beat: float = field(default_factory=time.monotonic)
    given_up: bool = False
    last_error: str = ""
    restarts: int = 0
    """Since the daemon started (monotonic: a Prometheus counter)."""


class Supervisor:
    def __init__(self, budget: int = 5, window_s: float = 300.0) -> None:
        self.budget = budget
        self.window_s = window_s
        self._tasks: dict[str, _Supervised] = {}
        self._closing = False

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        critical: bool = True,
        stale_after_s: float | None = None,
    ) -> None:
        entry = _Supervised(name, factory, critical, stale_after_s)
        self._tasks[name] = entry
        self._start(entry)

    def beat(self, name: str) -> None:
        entry = self._tasks.get(name)
        if entry is not None:
            entry.last_beat = time.monotonic()

    def _start(self, entry: _Supervised) -> None:
        entry.last_beat = time.monotonic()
        entry.task = asyncio.ensure_future(self._run(entry))
        entry.task.set_name(entry.name)

    async def _run(self, entry: _Supervised) -> None:
        started = time.monotonic()
        try:
            await entry.factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            entry.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("task_crashed", task=entry.name)
        else:
            if self._closing:
                return
            entry.last_error = "returned unexpectedly"
            log.error("task_exited", task=entry.name)
        if self._closing:
            return
        now = time.monotonic()
        if now - started > self.window_s:
            entry.backoff_s = _BACKOFF_MIN_S  # it ran fine for a long while: a fresh start
        entry.crashes.append(now)
        recent = sum(1 for t in entry.crashes if now - t <= self.window_s)
        if recent > self.budget:
            entry.given_up = True
            log.error(
                "task_given_up",
                task=entry.name,
                crashes=recent,
                window_s=self.window_s,
                critical=entry.critical,
            )
            return
        delay = entry.backoff_s
        entry.backoff_s = min(delay * 2, _BACKOFF_MAX_S)
        entry.restarts += 1
        log.warning("task_restarting", task=entry.name, in_s=delay)
        await asyncio.sleep(delay)
        if not self._closing:
            self._start(entry)

    def problems(self) -> list[str]:
        """Why the daemon is not healthy (critical tasks given up or stuck); empty when fine."""
        now = time.monotonic()
        out = []
        for e in self._tasks.values():
            if not e.critical:
                continue
            if e.given_up:
                out.append(f"task {e.name} gave up after repeated crashes: {e.last_error}")
            elif e.stale_after_s is not None and now - e.last_beat > e.stale_after_s:
                out.append(f"task {e.name} stuck for {now - e.last_beat:.1f}s")
        return out

    def health(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        return {
            e.name: {
                "running": e.task is not None and not e.task.done(),
                "restarts": e.restarts,
                "restarts_in_window": sum(1 for t in e.crashes if now - t <= self.window_s),
                "given_up": e.given_up,
                "last_error": e.last_error,
            }
            for e in self._tasks.values()
        }

    async def close(self) -> None:
        self._closing = True
        tasks = [e.task for e in self._tasks.values() if e.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
