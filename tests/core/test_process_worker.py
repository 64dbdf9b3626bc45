"""The inference worker process itself (issue 11): how it is scheduled, and that the drift
statistics it now computes only once its pipe is quiet all still arrive, one per sampled frame."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.decision import DecisionRules, DecisionSettings
from edge.inference import STATS_BACKLOG, BatchItem, ProcessWorker, StatsItem
from models.config import ModelSettings
from models.package import load_package
from models.types import ModelError

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling only")


def _worker(
    demo_package: Path, slots: int, no_preempt: bool, overlap: bool = False
) -> ProcessWorker:
    classes = load_package(demo_package).manifest.classes
    return ProcessWorker(
        "t0",
        ModelSettings(package=demo_package, intra_op_threads=1, warmup_runs=0),
        {0: DecisionRules(DecisionSettings(), classes)},
        slots=slots,
        logging_cfg=("warning", "json"),
        on_death=lambda _w, _why: None,
        no_preempt=no_preempt,
        overlap=overlap,
    )


def _frames(demo_package: Path) -> list[np.ndarray]:
    folder = demo_package.parent / "samples"
    frames = [cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))[:4]]
    assert frames and all(f is not None for f in frames), f"no demo samples in {folder}"
    return frames


@pytest.mark.parametrize("no_preempt", [True, False])
def test_worker_runs_under_sched_batch_unless_told_otherwise(
    demo_package: Path, no_preempt: bool
) -> None:
    async def main() -> int:
        w = _worker(demo_package, slots=1, no_preempt=no_preempt)
        await w.start(60)
        try:
            assert w.pid is not None
            return os.sched_getscheduler(w.pid)
        finally:
            await w.close()

    policy = asyncio.run(main())
    assert policy == (os.SCHED_BATCH if no_preempt else os.SCHED_OTHER)


@pytest.mark.parametrize("overlap", [False, True])
def test_statistics_of_back_to_back_batches_all_arrive_after_their_verdicts(
    demo_package: Path, overlap: bool
) -> None:
    """More batches in flight than the statistics backlog: under load the worker computes one
    per batch served and the rest once the pipe is quiet; none is lost, none comes before its
    verdict, and only the frames marked for statistics (the sampler's) get them."""
    frames = _frames(demo_package)
    batches = STATS_BACKLOG + 6
    marked = [i for i in range(batches) if i % 3]

    async def main() -> tuple[set[int], list[StatsItem], list[str]]:
        w = _worker(demo_package, slots=batches, no_preempt=True, overlap=overlap)
        await w.start(60)
        answered: set[int] = set()
        stats: list[StatsItem] = []
        early: list[str] = []
        all_stats = asyncio.Event()

        def on_stats(items: list[StatsItem]) -> None:
            for cam, _s, _d in items:
                if int(cam.removeprefix("cam")) not in answered:
                    early.append(cam)
            stats.extend(items)
            if len(stats) == len(marked):
                all_stats.set()

        w.on_stats = on_stats
        try:
            futs = [
                w.send([BatchItem(frames[i % len(frames)], f"cam{i}", stats=i in marked)],
                       masks=True)
                for i in range(batches)
            ]
            for i, f in enumerate(futs):
                f.add_done_callback(lambda _f, i=i: answered.add(i))
            outs = await asyncio.wait_for(asyncio.gather(*futs), 60)
            assert all(len(o.decisions) == 1 for o in outs)
            await asyncio.wait_for(all_stats.wait(), 30)
        finally:
            await w.close()
        return answered, stats, early

    answered, stats, early = asyncio.run(main())
    assert answered == set(range(batches))
    assert sorted(cam for cam, _s, _d in stats) == sorted(f"cam{i}" for i in marked)
    assert not early, f"statistics before their verdicts: {early}"


def test_decisions_come_back_without_masks_whether_or_not_they_were_decoded(
    demo_package: Path,
) -> None:
    """Masks stay in the worker (the ROI area is computed there); with and without them the
    verdicts, areas and outlines that go back are the same, and the outlines drawn after the
    decision are those a full decode draws."""
    from edge.inference import run_batch
    from models.loader import load_detector

    classes = load_package(demo_package).manifest.classes
    rules = {0: DecisionRules(DecisionSettings(), classes)}
    det = load_detector(ModelSettings(package=demo_package, intra_op_threads=1, warmup_runs=0))
    try:
        items = [BatchItem(f, "cam0") for f in _frames(demo_package)]
        with_masks = run_batch(det, rules, items, masks=True).decisions
        without = run_batch(det, rules, items, masks=False).decisions
        full = [d for it in items for d in det.detect(it.image)]  # outlined in the decode
    finally:
        det.close()
    assert any(d.counted for d in with_masks), "the demo samples should hold detections"
    assert with_masks == without
    assert all(x.mask is None for d in with_masks for x in d.counted)
    # Only counted detections are outlined (after deciding), exactly as a full decode draws them.
    for x in (x for d in with_masks for x in d.counted):
        assert len(x.outline) >= 3
        assert x.outline == next(y.outline for y in full if y.box == x.box and y.score == x.score)


def test_an_answer_crosses_the_pipe_as_plain_tuples_and_comes_back_equal(
    demo_package: Path,
) -> None:
    """`pack_output` carries every field of the verdicts (the deciding detection as itself, not
    a copy) in tuples and ints that pickle without running Python code; a malformed answer fails
    its own batch, never the worker."""
    from edge.inference import pack_output, run_batch, unpack_output
    from models.loader import load_detector

    classes = load_package(demo_package).manifest.classes
    rules = {0: DecisionRules(DecisionSettings(), classes)}
    det = load_detector(ModelSettings(package=demo_package, intra_op_threads=1, warmup_runs=0))
    try:
        out = run_batch(det, rules, [BatchItem(f, "cam0") for f in _frames(demo_package)], True)
    finally:
        det.close()
    out.received_ns, out.answered_ns = 11, 22
    assert any(d.deciding is not None for d in out.decisions)
    wire = pickle.dumps(pack_output(out))
    assert b"edge.decision" not in wire and b"plc.record" not in wire  # no class pickled
    back = unpack_output(pickle.loads(wire))
    assert back.decisions == out.decisions
    for d in back.decisions:
        assert d.deciding is None or any(d.deciding is x for x in d.counted)
    assert (back.stages_ms, back.compute_ns, back.received_ns, back.answered_ns) == (
        out.stages_ms, out.compute_ns, 11, 22)

    async def malformed() -> None:
        w = _worker(demo_package, slots=1, no_preempt=True)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        w._pending[7] = (fut, [])
        w.inflight = 1
        w._answer("ok", 7, ("not", "an", "answer"))
        with pytest.raises(ModelError, match="unreadable answer from t0"):
            await fut
        assert w.inflight == 0 and not w._dead

    asyncio.run(malformed())


@pytest.mark.parametrize("overlap", [False, True])
def test_the_hop_is_stamped_at_both_ends_on_the_clock_every_process_shares(
    demo_package: Path, overlap: bool
) -> None:
    """The pipeline splits the worker hop into its two legs (``ipc_to_worker``,
    ``ipc_from_worker``) from the worker's receive and answer times: they must lie between the
    daemon's send and its receipt, with the worker's own compute time between them."""
    frames = _frames(demo_package)

    async def main() -> list[tuple[int, int, int, int, int]]:
        w = _worker(demo_package, slots=2, no_preempt=True, overlap=overlap)
        await w.start(60)
        seen = []
        try:
            for f in frames:
                sent = time.monotonic_ns()
                out = await asyncio.wait_for(w.send([BatchItem(f, "cam0")], masks=True), 30)
                seen.append((sent, out.received_ns, out.answered_ns, time.monotonic_ns(),
                             out.compute_ns))
        finally:
            await w.close()
        return seen

    for sent, received, answered, back, compute in asyncio.run(main()):
        assert sent < received < answered < back
        assert answered - received >= compute > 0
