"""The deadline invariant with in-process fakes (real peers: test_deadline_modbus.py)."""

from __future__ import annotations

import asyncio
import collections
import time

from edge.metrics import Metrics
from edge.pipeline import Pipeline, PipelineSettings
from edge.plcqueue import DeadlineOrderedLink
from edge.stats import RunStats
from plc.record import FailsafeReason, Verdict, WriteOutcome
from tests.core.fakes import FakeDetector, FakeLink, make_frame, thread_pool

BUDGET_MS = 120.0


async def build(
    det: FakeDetector | None, link: FakeLink, *, error_threshold: int = 3, **kw: object
) -> Pipeline:
    settings = PipelineSettings(budget_ms=BUDGET_MS, failsafe_reserve_ms=20, **kw)  # type: ignore[arg-type]
    pool, model = (
        await thread_pool(det, error_threshold=error_threshold, hang_s=settings.model_hang_s)
        if det
        else (None, None)
    )
    edf = DeadlineOrderedLink(link)
    await edf.start()
    p = Pipeline(
        settings, "L1", pool, model, edf, None, Metrics(), RunStats(), {"cam0": 0, "cam1": 1}
    )
    p.start()
    return p


async def settle(p: Pipeline) -> None:
    assert await p.drain()
    p._accepting = True  # drain() stops admission; these tests go on submitting


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


async def test_raising_model_opens_the_breaker_then_a_probe_closes_it() -> None:
    """Regression (issue 9.2): model-down used to be permanent (197/197 later frames rejected
    with a healthy model). Now the breaker opens, and after its backoff one probe frame is
    inferred; the model being healthy again, real verdicts resume."""
    det, link = FakeDetector(), FakeLink()
    det.fail = True
    p = await build(det, link, error_threshold=2)
    for i in range(2):
        p.submit(make_frame("cam0", i))
        await settle(p)
    assert p.pool is not None and p.pool.breaker_open and not p.model_up
    p.submit(make_frame("cam0", 2))
    await settle(p)
    reasons = [FailsafeReason(w.record.reason) for w in link.writes]
    assert reasons == [FailsafeReason.MODEL_ERROR] * 2 + [FailsafeReason.MODEL_DOWN]
    calls = det.calls
    det.fail = False  # the transient fault is over
    i = 3
    deadline = time.monotonic() + 10
    while not any(w.record.verdict is Verdict.OK for w in link.writes):
        assert time.monotonic() < deadline, "the breaker never let a probe through"
        p.submit(make_frame("cam0", i))
        i += 1
        await settle(p)
        await asyncio.sleep(0.05)
    assert det.calls > calls and not p.pool.breaker_open and p.model_up
    for j in range(i, i + 5):
        p.submit(make_frame("cam0", j))
    await settle(p)
    await p.close()
    after = [w.record.verdict for w in link.writes[-5:]]
    assert after == [Verdict.OK] * 5
    assert_invariant(link, i + 5)


async def test_breaker_stays_open_while_the_model_keeps_failing() -> None:
    det, link = FakeDetector(), FakeLink()
    det.fail = True
    p = await build(det, link, error_threshold=1)
    end = time.monotonic() + 1.6  # past the first backoff: one probe fails and reopens
    i = 0
    while time.monotonic() < end:
        p.submit(make_frame("cam0", i))
        i += 1
        await settle(p)
        await asyncio.sleep(0.02)
    await p.close()
    assert_invariant(link, i)
    assert all(w.record.verdict is Verdict.FAILSAFE_REJECT for w in link.writes)
    # Only the first frame and the probe(s) reached the model: the rest were refused at once.
    assert 2 <= det.calls <= 3, det.calls
    assert p.pool is not None and p.pool.breaker_open


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


async def test_one_slow_frame_does_not_lock_admission() -> None:
    """Regression (issues 9.1, 9.8): one very slow batch (a huge frame, a worker restart) used to
    pin the service estimate so high that every later frame was refused as `overload` and no
    batch ever ran again to bring it down. An idle worker always takes a frame (a probe), and the
    estimate is a median of the window, so one outlier cannot shut admission."""
    det, link = FakeDetector(), FakeLink()
    p = await build(det, link, max_batch=1)
    det.delay_s = 0.25  # slower than the whole budget: its frame is fail-safed by the guard
    p.submit(make_frame("cam0", 0))
    await settle(p)
    det.delay_s = 0.0
    while p.stats.late_results == 0:  # noqa: ASYNC110 - the slow batch has returned
        await asyncio.sleep(0.01)
    for i in range(1, 21):
        p.submit(make_frame("cam0", i))
        await asyncio.sleep(0.005)
    await settle(p)
    await p.close()
    assert_invariant(link, 21)
    verdicts = [w.record.verdict for w in link.writes]
    assert verdicts[0] is Verdict.FAILSAFE_REJECT
    assert verdicts[1:] == [Verdict.OK] * 20, collections.Counter(
        FailsafeReason(w.record.reason) for w in link.writes
    )


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
    assert p.pool is not None and p.pool.busy_for_s() > 0
    det.release.set()
    await p.close()
    assert_invariant(link, 10)
    assert all(w.record.verdict is Verdict.FAILSAFE_REJECT for w in link.writes)


async def test_events_of_never_written_records_carry_no_sequence() -> None:
    """Regression (issue 10): an event of a frame whose record never reached the wire carried
    the sequence number another part then got."""
    from edge.pipeline import EventSink  # noqa: F401 - the protocol the spool implements

    class Sink:
        def __init__(self) -> None:
            self.events: list = []

        def submit(self, event: object, image: object) -> bool:
            self.events.append(event)
            return True

    det = FakeDetector()
    link = FakeLink(down_until_ns=time.monotonic_ns() + 10**12)  # never comes back
    pool, model = await thread_pool(det)
    edf = DeadlineOrderedLink(link)
    await edf.start()
    sink = Sink()
    p = Pipeline(
        PipelineSettings(budget_ms=BUDGET_MS, failsafe_reserve_ms=20), "L1", pool, model, edf,
        sink, Metrics(), RunStats(), {"cam0": 0},
    )
    p.submit(make_frame("cam0", 1))
    assert await p.drain()
    await p.close()
    (event,) = sink.events
    assert event.sequence is None and event.plc_outcome == "failed"
