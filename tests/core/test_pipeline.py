"""The deadline invariant with in-process fakes (real peers: test_deadline_modbus.py)."""

from __future__ import annotations

import asyncio
import collections
import time

from edge.decision import DecisionRules, DecisionSettings
from edge.inference import ThreadRunner
from edge.metrics import Metrics
from edge.pipeline import ModelHolder, Pipeline, PipelineSettings
from edge.plcqueue import DeadlineOrderedLink
from edge.stats import RunStats
from plc.record import FailsafeReason, Verdict, WriteOutcome
from tests.core.fakes import FakeDetector, FakeLink, make_frame

BUDGET_MS = 120.0


async def build(det: FakeDetector | None, link: FakeLink, **kw: object) -> Pipeline:
    settings = PipelineSettings(budget_ms=BUDGET_MS, failsafe_reserve_ms=20, **kw)  # type: ignore[arg-type]
    holder = (
        ModelHolder(
            [ThreadRunner(det, DecisionRules(DecisionSettings(), det.info.classes))], det.info, 7
        )
        if det
        else ModelHolder.empty()
    )
    edf = DeadlineOrderedLink(link)
    await edf.start()
    p = Pipeline(
        settings,
        "L1",
        holder,
        edf,
        None,
        Metrics(),
        RunStats(),
        {"cam0": 0, "cam1": 1},
    )
    p.start()
    return p


def assert_invariant(link: FakeLink, n_frames: int) -> None:
    """Exactly one acknowledged record per frame, each before its deadline."""
    acked = [w for w in link.writes if w.outcome is WriteOutcome.ACKED]
    per_part = collections.Counter((w.record.camera_index, w.record.part_id) for w in acked)
    assert len(per_part) == n_frames, f"{len(per_part)} parts acked of {n_frames}"
    assert max(per_part.values()) == 1, "a frame reached the PLC twice"
    for w in acked:
        assert w.acked_ns is not None and w.acked_ns <= w.deadline_ns


async def test_fast_model_gives_real_verdicts() -> None:
    det, link = FakeDetector(), FakeLink()
    p = await build(det, link)
    for i in range(20):
        p.submit(make_frame("cam0" if i % 2 else "cam1", i))
    assert await p.drain()
    await p.close()
    assert_invariant(link, 20)
    assert {w.record.verdict for w in link.writes} == {Verdict.OK}
    assert [w.record.sequence for w in link.writes if w.record.camera_index == 0] == list(
        range(1, 11)
    )
    assert all(w.record.model_id == 7 for w in link.writes)
    assert p.stats.verdicts["OK"] == 20 and p.stats.deadline_misses == 0


async def test_slow_model_gets_failsafe_before_deadline_and_late_result_is_dropped() -> None:
    det, link = FakeDetector(delay_s=BUDGET_MS / 1000 * 1.5), FakeLink()
    p = await build(det, link)
    p.submit(make_frame("cam0", 1))
    assert await p.drain()
    # The real verdict arrives after the fail-safe: it must be counted and never written.
    while p.stats.late_results == 0:  # noqa: ASYNC110 - polling a counter, bounded by the timeout
        await asyncio.sleep(0.01)
    await p.close()
    assert_invariant(link, 1)
    (w,) = link.writes
    assert w.record.verdict is Verdict.FAILSAFE_REJECT
    assert w.record.reason == FailsafeReason.INFERENCE_TIMEOUT


async def test_raising_model_gives_failsafe_then_model_down() -> None:
    det, link = FakeDetector(), FakeLink()
    det.fail = True
    p = await build(det, link, model_error_threshold=2)
    for i in range(2):
        p.submit(make_frame("cam0", i))
        await p.drain()
        p._accepting = True
    assert not p.model_up
    p.submit(make_frame("cam0", 2))
    await p.drain()
    await p.close()
    assert_invariant(link, 3)
    reasons = [FailsafeReason(w.record.reason) for w in link.writes]
    assert reasons == [FailsafeReason.MODEL_ERROR] * 2 + [FailsafeReason.MODEL_DOWN]


async def test_overload_decides_every_frame_once_and_in_time() -> None:
    det, link = FakeDetector(delay_s=0.02), FakeLink()
    p = await build(det, link, queue_size=8, max_batch=1)
    for i in range(120):  # ~6x what the model can do within one budget
        p.submit(make_frame(f"cam{i % 2}", i))
        if i % 10 == 0:
            await asyncio.sleep(0)
    assert await p.drain()
    await p.close()
    assert_invariant(link, 120)
    reasons = collections.Counter(FailsafeReason(w.record.reason) for w in link.writes)
    assert reasons[FailsafeReason.NONE] >= 1
    assert reasons[FailsafeReason.QUEUE_FULL] + reasons[FailsafeReason.OVERLOAD] >= 1
    assert p.stats.decided == 120 and p.stats.deadline_misses == 0


async def test_failed_plc_write_is_replaced_by_failsafe_with_same_sequence() -> None:
    det, link = FakeDetector(), FakeLink(fail_next=1)
    p = await build(det, link)
    p.submit(make_frame("cam0", 5))
    assert await p.drain()
    await p.close()
    first, second = link.writes
    assert first.outcome is WriteOutcome.FAILED and first.record.verdict is Verdict.OK
    assert second.record.verdict is Verdict.FAILSAFE_REJECT
    assert second.record.reason == FailsafeReason.PLC_RETRY
    assert second.record.sequence == first.record.sequence
    assert_invariant(link, 1)


async def test_short_plc_reconnect_is_retried_within_the_budget() -> None:
    det = FakeDetector()
    link = FakeLink(down_until_ns=time.monotonic_ns() + 60_000_000)
    p = await build(det, link)
    p.submit(make_frame("cam0", 3))
    assert await p.drain()
    await p.close()
    assert link.writes[0].outcome is WriteOutcome.FAILED
    assert link.writes[-1].record.verdict is Verdict.OK  # the real verdict, after the reconnect
    assert p.stats.failsafes == {} and p.stats.deadline_misses == 0
    assert_invariant(link, 1)


async def test_frame_arriving_too_late_is_failsafed_at_once() -> None:
    det, link = FakeDetector(), FakeLink()
    p = await build(det, link)
    p.submit(make_frame("cam0", 1, age_ms=BUDGET_MS - 5))
    assert await p.drain()
    await p.close()
    assert [FailsafeReason(w.record.reason) for w in link.writes] == [FailsafeReason.LATE_ARRIVAL]
    assert det.calls == 0
    assert_invariant(link, 1)


async def test_hung_model_every_frame_failsafed() -> None:
    det, link = FakeDetector(), FakeLink()
    det.hang.set()
    p = await build(det, link, queue_size=4)
    for i in range(10):
        p.submit(make_frame("cam0", i))
        await asyncio.sleep(0.01)
    assert await p.drain()
    assert p.model_busy_for_s() > 0
    det.release.set()
    await p.close()
    assert_invariant(link, 10)
    assert all(w.record.verdict is Verdict.FAILSAFE_REJECT for w in link.writes)
