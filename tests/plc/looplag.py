"""How late the event loop runs: the slack a "returned by its deadline" check must allow.

A write's contract is to return by its deadline; on a loaded 2-core box the loop itself may be
scheduled late, which no code can beat. The checks allow a fixed slack plus the worst lateness
measured meanwhile, so they still catch a link that waits past its deadline by itself.
"""

from __future__ import annotations

import asyncio
import time


class LoopLag:
    """Measures how late the event loop wakes a 2 ms sleeper (a blocked loop shows here)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.stop = False
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while not self.stop:
            t = time.monotonic()
            await asyncio.sleep(0.002)
            self.max_s = max(self.max_s, time.monotonic() - t - 0.002)

    def start(self) -> LoopLag:
        self._task = asyncio.create_task(self.run())
        return self

    async def close(self) -> None:
        self.stop = True
        if self._task is not None:
            await self._task

    def slack_ns(self, base_s: float = 0.010) -> int:
        return int((base_s + self.max_s) * 1e9)
