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

**Sequence continuity**: at start and after every reconnect the queue reads the sequences the PLC
holds and continues from them (+1, skipping 0), as docs/plc-register-map.md promises: a restarted
daemon never rewrites a sequence the PLC has already consumed (it would read as "no new result").

**Link state from every request**: the PLC is up when any request is acknowledged, down when one
fails for a link reason, so a recovery is noticed by the first record that gets through, not by
the next heartbeat (`on_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from plc.record import Alarm, DecisionRecord, PlcInputs, PlcLink, WriteOutcome, WriteResult

log = structlog.get_logger(__name__)

_Call = Callable[[], Awaitable[Any]]
_RESYNC_BUDGET_NS = 50_000_000
"""Time a sequence read-back may take before a record write (a loopback read takes < 1 ms)."""


def _next_sequence(held: int) -> int:
    return held % 0xFFFF_FFFF + 1  # 1..2^32-1; 0 = never written


class DeadlineOrderedLink:
    """Wraps a PlcLink; same interface; requests run one at a time, earliest deadline first."""

    def __init__(
        self,
        link: PlcLink,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        on_state: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.link = link
        self._clock_ns = clock_ns
        self._heap: list[tuple[int, int, _Call, asyncio.Future[Any], Any]] = []
        """(deadline, order, request, its future, what it returns if its deadline passes first)"""
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_seq: dict[int, int] = {}
        self._resync = True
        self._busy = False
        """A request is running (inline in its caller, or in serve())."""
        self.up: bool | None = None
        """None until the first request; then whether the last request reached the PLC."""
        self.on_state = on_state or (lambda _up, _detail: None)
        self.resyncs = 0

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def pending(self) -> int:
        return len(self._heap)

    def last_sequences(self) -> dict[int, int]:
        return dict(self._last_seq)

    async def start(self, serve: bool = True) -> None:
        """Start the link; with ``serve`` also the queue's own task (the daemon supervises
        `serve()` itself and passes False)."""
        await self.link.start()
        if serve:
            self._task = asyncio.create_task(self.serve(), name="plc-edf")

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """Send `record` (its sequence field is ignored: assigned here) before `deadline_ns`."""
        result: WriteResult = await self._submit(
            deadline_ns, lambda: self._send(record, deadline_ns)
        )
        return result

    async def _send(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        slot = record.camera_index
        if self._resync:
            await self._read_back_sequences(deadline_ns)
        seq = _next_sequence(self._last_seq.get(slot, 0))
        result = await self.link.write_decision(replace(record, sequence=seq), deadline_ns)
        if result.outcome in (WriteOutcome.ACKED, WriteOutcome.UNKNOWN):
            self._last_seq[slot] = seq
        self._note(result)
        return replace(result, sequence=seq)

    async def _read_back_sequences(self, deadline_ns: int) -> None:
        """Continue from what the PLC holds (start, reconnect); keep going if it cannot tell."""
        reader = getattr(self.link, "read_sequences", None)
        if reader is None:
            self._resync = False
            return
        budget = min(deadline_ns, self._clock_ns() + _RESYNC_BUDGET_NS)
        try:
            held = await reader(budget)
        except Exception as exc:  # a link bug: keep our own numbering
            log.warning("plc_sequence_readback_failed", error=repr(exc))
            held = None
        if held is None:
            return  # try again before the next record
        self._resync = False
        self.resyncs += 1
        changed = {}
        for slot, value in enumerate(held):
            if value and value != self._last_seq.get(slot, 0):
                changed[slot] = value
                self._last_seq[slot] = value
        if changed:
            log.info("plc_sequences_continued", held=changed)

    def _note(self, result: WriteResult) -> None:
        """Track whether the PLC answers, from any request's outcome."""
        if result.outcome is WriteOutcome.ACKED:
            up, detail = True, "connected"
        elif result.outcome is WriteOutcome.DROPPED_LATE and self.link.connected:
            return  # our own budget ran out; says nothing about the PLC
        else:
            up, detail = False, f"{result.outcome.value}: {result.detail}"
            if result.outcome is not WriteOutcome.DROPPED_LATE:
                self._resync = True  # the link dropped: the PLC may have been restarted too
        if up != self.up:
            self.up = up
            self.on_state(up, detail)

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        async def call() -> WriteResult:
            result = await self.link.write_status(heartbeat, alarms, deadline_ns)
            self._note(result)
            return result

        status: WriteResult = await self._submit(deadline_ns, call)
        return status

    async def read_inputs(
        self, deadline_ns: int, *, triggers: bool = True, recipe: bool = False, acks: bool = False
    ) -> PlcInputs | None:
        """The PLC's inputs (trigger counters, part ids, recipe, acks), through the EDF queue."""

        async def call() -> PlcInputs | None:
            return await self.link.read_inputs(
                deadline_ns, triggers=triggers, recipe=recipe, acks=acks
            )

        got: PlcInputs | None = await self._submit(deadline_ns, call, late=None)
        return got

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
        async def call() -> int | None:
            return await self.link.read_part_id(camera_index, deadline_ns)

        got: int | None = await self._submit(deadline_ns, call, late=None)
        return got

    _LATE = WriteResult(WriteOutcome.DROPPED_LATE, detail="deadline passed while queued")

    async def _submit(self, deadline_ns: int, call: _Call, late: Any = _LATE) -> Any:
        if not self._busy and not self._heap:
            # Nothing waits and nothing runs: this request is the earliest deadline by
            # definition, so run it in the caller's task (no queue hop, no loop round trip).
            if self._clock_ns() >= deadline_ns:
                return late
            self._busy = True
            try:
                return await self._run(call, late)
            finally:
                self._busy = False
                if self._heap:
                    self._wake.set()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline_ns, next(self._order), call, fut, late))
        self._wake.set()
        return await fut

    async def _run(self, call: _Call, late: Any) -> Any:
        try:
            return await call()
        except Exception as exc:
            log.error("plc_request_raised", error=repr(exc))
            return (
                WriteResult(WriteOutcome.FAILED, detail=repr(exc))
                if isinstance(late, WriteResult)
                else None
            )

    async def serve(self) -> None:
        """The queue's server loop: one request at a time, earliest deadline first."""
        while True:
            while not self._heap or self._busy:
                self._wake.clear()
                await self._wake.wait()
            deadline_ns, _, call, fut, late = heapq.heappop(self._heap)
            if fut.done():
                continue
            if self._clock_ns() >= deadline_ns:
                fut.set_result(late)
                continue
            self._busy = True
            try:
                result = await self._run(call, late)
            finally:
                self._busy = False
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, _, fut, late in self._heap:
            if not fut.done():
                fut.set_result(
                    WriteResult(WriteOutcome.FAILED, detail="link closed")
                    if isinstance(late, WriteResult)
                    else None
                )
        self._heap.clear()
        await self.link.close()
