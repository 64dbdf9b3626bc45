"""Earliest-deadline-first ordering of PLC requests on one connection.

A PLC connection serves one request at a time. Under overload, many records are due at once: the
immediate fail-safes of frames refused at admission (deadline ~300 ms away) and the guard's
fail-safes of frames about to expire (deadline ~30 ms away). First-come-first-served lets the
former starve the latter; serving the earliest deadline first is optimal for meeting deadlines on
one server, so this queue sits in front of the link and is its only caller.

Because records are reordered, the sequence number (the PLC's "new result" strobe) is assigned
here, at send time: on the wire it always grows by exactly one per camera. Only a write that may
have been applied (ACKED, or UNKNOWN: timed out in flight) consumes its number; a FAILED or dropped
one does not, so its fail-safe replacement goes out under the same number.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from plc.record import Alarm, DecisionRecord, PlcLink, WriteOutcome, WriteResult

_Call = Callable[[], Awaitable[WriteResult]]


class DeadlineOrderedLink:
    """Wraps a PlcLink; same interface; requests run one at a time, earliest deadline first."""

    def __init__(self, link: PlcLink, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.link = link
        self._clock_ns = clock_ns
        self._heap: list[tuple[int, int, _Call, asyncio.Future[WriteResult]]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_seq: dict[int, int] = {}

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def start(self) -> None:
        await self.link.start()
        self._task = asyncio.create_task(self._serve(), name="plc-edf")

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """Send `record` (its sequence field is ignored: assigned here) before `deadline_ns`."""
        return await self._submit(deadline_ns, lambda: self._send(record, deadline_ns))

    async def _send(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        slot = record.camera_index
        seq = self._last_seq.get(slot, 0) % 0xFFFF_FFFF + 1  # 1..2^32-1; 0 = never written
        result = await self.link.write_decision(replace(record, sequence=seq), deadline_ns)
        if result.outcome in (WriteOutcome.ACKED, WriteOutcome.UNKNOWN):
            self._last_seq[slot] = seq
        return replace(result, sequence=seq)

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        return await self._submit(
            deadline_ns, lambda: self.link.write_status(heartbeat, alarms, deadline_ns)
        )

    async def wait_connected(self, timeout_s: float) -> bool:
        """Until the link is up (True) or `timeout_s` passed (False)."""
        waiter = getattr(self.link, "wait_connected", None)
        if waiter is not None:
            return bool(await waiter(timeout_s))
        end = time.monotonic() + timeout_s
        while not self.link.connected and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return self.link.connected

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        return await self.link.read_part_id(camera_index, deadline_ns)

    async def _submit(self, deadline_ns: int, call: _Call) -> WriteResult:
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline_ns, next(self._order), call, fut))
        self._wake.set()
        return await fut

    async def _serve(self) -> None:
        while True:
            while not self._heap:
                self._wake.clear()
                await self._wake.wait()
            deadline_ns, _, call, fut = heapq.heappop(self._heap)
            if fut.done():
                continue
            if self._clock_ns() >= deadline_ns:
                fut.set_result(
                    WriteResult(WriteOutcome.DROPPED_LATE, detail="deadline passed while queued")
                )
                continue
            try:
                result = await call()
            except Exception as exc:
                result = WriteResult(WriteOutcome.FAILED, detail=repr(exc))
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, _, fut in self._heap:
            if not fut.done():
                fut.set_result(WriteResult(WriteOutcome.FAILED, detail="link closed"))
        self._heap.clear()
        await self.link.close()
