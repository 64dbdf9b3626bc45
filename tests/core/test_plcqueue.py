"""Earliest-deadline-first PLC requests and send-time sequence numbers."""

from __future__ import annotations

import asyncio
import time

from edge.plcqueue import DeadlineOrderedLink
from plc.record import DecisionRecord, Verdict, WriteOutcome
from tests.core.fakes import FakeLink

MS = 1_000_000


def rec(slot: int, part: int) -> DecisionRecord:
    return DecisionRecord(slot, 0, part, Verdict.OK, 0, 0, 1, 1)


async def test_earliest_deadline_goes_first_and_sequences_follow_the_wire() -> None:
    link = FakeLink(delay_s=0.01)
    edf = DeadlineOrderedLink(link)
    await edf.start()
    now = time.monotonic_ns()
    busy = asyncio.create_task(edf.write_decision(rec(0, 1), now + 300 * MS))
    await asyncio.sleep(0.002)  # let the first request occupy the link
    relaxed = asyncio.create_task(edf.write_decision(rec(0, 2), now + 300 * MS))
    urgent = asyncio.create_task(edf.write_decision(rec(0, 3), now + 40 * MS))
    results = await asyncio.gather(busy, relaxed, urgent)
    await edf.close()
    assert [w.record.part_id for w in link.writes] == [1, 3, 2]
    assert [w.record.sequence for w in link.writes] == [1, 2, 3]
    assert [r.sequence for r in results] == [1, 3, 2]
    assert all(r.outcome is WriteOutcome.ACKED for r in results)


async def test_failed_write_keeps_its_sequence_and_expired_requests_are_dropped() -> None:
    link = FakeLink(fail_next=1)
    edf = DeadlineOrderedLink(link)
    await edf.start()
    now = time.monotonic_ns()
    failed = await edf.write_decision(rec(1, 7), now + 100 * MS)
    ok = await edf.write_decision(rec(1, 7), now + 100 * MS)
    expired = await edf.write_decision(rec(1, 8), time.monotonic_ns() - 1)
    await edf.close()
    assert failed.outcome is WriteOutcome.FAILED and ok.outcome is WriteOutcome.ACKED
    assert failed.sequence == ok.sequence == 1
    assert expired.outcome is WriteOutcome.DROPPED_LATE
    assert len(link.writes) == 2
