"""The worker's loop (issue 11): with overlap, the next batch is received and preprocessed while
one is in the network; without, each batch goes through in turn. A batch that finds an
overlapped worker idle, with nothing behind it, runs in the loop's own thread (nothing to overlap
with). Either way every batch is answered once, in order, bad ones as errors, and a stop still
answers what was handed over.

These run `WorkerLoop` in a thread of the test over a real pipe and real shared memory, with a
detector that records the order of its steps; tests/core/test_process_worker.py runs the real
worker process."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.decision import DecisionRules, DecisionSettings
from edge.inference import ProcessWorker, WorkerLoop, unpack_output
from edge.pipeline import PipelineSettings
from edge.shm import SlotPool, SlotReader
from models.config import ModelSettings
from models.package import load_package
from models.types import ModelError, Prepared
from tests.core.fakes import FakeDetector

STEP_TIMEOUT_S = 10.0
"""Only bounds a failing run; nothing waits this long when the loop works."""


class StepDetector(FakeDetector):
    """Frame n carries n in its first pixel. Records ("pre", n) and ("infer", n) in order;
    frame 3's inference fails. With ``hold_first``, frame 1's inference waits until frame 2
    has been preprocessed (bounded), and records whether it was."""

    def __init__(self, hold_first: bool = False) -> None:
        super().__init__()
        self.steps: list[tuple[str, int]] = []
        self.hold_first = hold_first
        self.second_staged = threading.Event()
        self.first_saw_second_staged: bool | None = None
        self.infer_threads: list[str] = []

    def preprocess(self, image: np.ndarray) -> Prepared:
        n = int(image[0, 0, 0])
        self.steps.append(("pre", n))
        if n == 2:
            self.second_staged.set()
        return Prepared(np.full((1, 3, 32, 32), n, np.float32), image.shape[:2], 1.0, (0.0, 0.0))

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        n = int(batch[0, 0, 0, 0])
        if n == 1 and self.hold_first:
            self.first_saw_second_staged = self.second_staged.wait(STEP_TIMEOUT_S)
        self.steps.append(("infer", n))
        self.infer_threads.append(threading.current_thread().name)
        if n == 3:
            raise ModelError("injected failure")
        return [batch]


def _frame(n: int) -> np.ndarray:
    frame = np.zeros((8, 8, 3), np.uint8)
    frame[0, 0, 0] = n
    return frame


@contextmanager
def _serving(
    det: StepDetector,
    overlap: bool,
    inline_after_idle_s: float | None = WorkerLoop.INLINE_AFTER_IDLE_S,
    queued: Callable[[Any], None] = lambda _conn: None,
) -> Iterator[Any]:
    """A WorkerLoop serving in a thread (named "serve"); yields the daemon's end of its pipe.
    ``queued`` sends batches before the loop starts: they all wait in the pipe at once."""
    parent, child = mp.Pipe(duplex=True)
    rules = {0: DecisionRules(DecisionSettings(), det.info.classes)}
    loop = WorkerLoop(child, det, rules, overlap=overlap, inline_after_idle_s=inline_after_idle_s)
    reader = SlotReader()
    done = threading.Event()
    queued(parent)

    def serve() -> None:
        try:
            loop.serve(reader)
        finally:
            loop.close()
            reader.close()
            done.set()

    t = threading.Thread(target=serve, name="serve", daemon=True)
    t.start()
    try:
        yield parent
    finally:
        if not done.is_set():
            parent.send(None)
        t.join(STEP_TIMEOUT_S)
        assert not t.is_alive(), "the worker loop did not stop when told to"
        parent.close()
        child.close()


def _send(conn: Any, slots: SlotPool, batch_id: int, frames: Sequence[int], recipe: int = 0
          ) -> None:
    refs = [slots.put(_frame(n))[1] for n in frames]
    conn.send((batch_id, refs, [f"cam{n}" for n in frames], [recipe] * len(frames), True,
               [False] * len(frames)))


def _answers(conn: Any, n: int) -> list[tuple[str, int | None, Any]]:
    out: list[tuple[str, int | None, Any]] = []
    for _ in range(n):
        assert conn.poll(STEP_TIMEOUT_S), f"only {len(out)} of {n} answers came"
        out.append(conn.recv())
    return out


def _two_batches(det: StepDetector, overlap: bool) -> list[tuple[str, int | None, Any]]:
    """Two batches that wait in the pipe together (a backlog, as under load)."""
    slots = SlotPool(4)

    def queue_both(conn: Any) -> None:
        _send(conn, slots, 1, [1])
        _send(conn, slots, 2, [2])

    try:
        with _serving(det, overlap=overlap, queued=queue_both) as conn:
            return _answers(conn, 2)
    finally:
        slots.close()


def test_overlapped_worker_preprocesses_the_next_batch_while_one_is_in_the_network() -> None:
    det = StepDetector(hold_first=True)
    answers = _two_batches(det, overlap=True)
    assert det.first_saw_second_staged is True, det.steps
    assert det.steps.index(("pre", 2)) < det.steps.index(("infer", 1))
    assert det.infer_threads == ["infer", "infer"]
    assert [(kind, bid) for kind, bid, _ in answers] == [("ok", 1), ("ok", 2)]


@pytest.mark.parametrize(("idle_s", "where"), [(0.0, "serve"), (3600.0, "infer")])
def test_a_batch_alone_runs_in_the_loops_thread_once_the_worker_has_been_idle(
    idle_s: float, where: str
) -> None:
    """One batch at a time, each answered before the next is sent (a camera at 60 fps): with the
    worker idle for `inline_after_idle_s` and nothing behind the batch, the network runs in the
    loop's own thread; a worker that has not been idle that long still hands it over."""
    det = StepDetector()
    slots = SlotPool(4)
    try:
        with _serving(det, overlap=True, inline_after_idle_s=idle_s) as conn:
            answers = []
            for n in (1, 2, 4):
                _send(conn, slots, n, [n])
                answers += _answers(conn, 1)
    finally:
        slots.close()
    assert det.infer_threads == [where] * 3
    assert [(kind, bid) for kind, bid, _ in answers] == [("ok", 1), ("ok", 2), ("ok", 4)]
    assert det.steps == [("pre", 1), ("infer", 1), ("pre", 2), ("infer", 2), ("pre", 4),
                         ("infer", 4)]


def test_serial_worker_takes_each_batch_through_in_turn() -> None:
    det = StepDetector()
    answers = _two_batches(det, overlap=False)
    assert det.steps == [("pre", 1), ("infer", 1), ("pre", 2), ("infer", 2)]
    assert [(kind, bid) for kind, bid, _ in answers] == [("ok", 1), ("ok", 2)]


@pytest.mark.parametrize(("overlap", "inline_after_idle_s"), [(True, None), (True, 0.0),
                                                              (False, None)])
def test_bad_batches_are_errors_in_order_and_a_stop_still_answers_what_was_handed_over(
    overlap: bool, inline_after_idle_s: float | None
) -> None:
    """An unknown recipe (decide fails) and a failing network are each one batch's error; the
    batches around them still get their verdicts. The stop message comes right behind them:
    nothing handed over is dropped. With inlining allowed, batches that find the pipe empty run
    in the loop's thread and the others in the network's: the outcome is the same."""
    det = StepDetector()
    slots = SlotPool(8)
    try:
        with _serving(det, overlap=overlap, inline_after_idle_s=inline_after_idle_s) as conn:
            _send(conn, slots, 1, [1])
            _send(conn, slots, 2, [2], recipe=7)
            _send(conn, slots, 3, [3])
            _send(conn, slots, 4, [4, 5])
            conn.send(None)
            answers = _answers(conn, 4)
            assert not conn.poll(0.2), "more answers than batches"
    finally:
        slots.close()
    assert [(kind, bid) for kind, bid, _ in answers] == [
        ("ok", 1), ("error", 2), ("error", 3), ("ok", 4)
    ]
    assert "no decision rules for recipe 7" in answers[1][2]
    assert "injected failure" in answers[2][2]
    assert len(unpack_output(answers[3][2]).decisions) == 2
    assert det.steps.count(("infer", 4)) == 1  # frames 4 and 5: one batch, one network run


def test_renice_reaches_every_thread_of_an_overlapped_worker(demo_package: Path) -> None:
    """Nice values belong to Linux threads: a candidate loads niced and serves at 0 after its
    promotion, so the inference thread must follow the process's main thread."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs procfs (Linux)")
    classes = load_package(demo_package).manifest.classes

    async def main() -> tuple[list[int], set[int]]:
        w = ProcessWorker(
            "t0",
            ModelSettings(package=demo_package, intra_op_threads=1, warmup_runs=0),
            {0: DecisionRules(DecisionSettings(), classes)},
            slots=1,
            logging_cfg=("warning", "json"),
            on_death=lambda _w, _why: None,
            overlap=True,
        )
        await w.start(60)
        try:
            assert w.pid is not None
            tids = [int(t) for t in os.listdir(f"/proc/{w.pid}/task")]
            w.renice(7)  # raising needs no privilege
            return tids, {os.getpriority(os.PRIO_PROCESS, t) for t in tids}
        finally:
            await w.close()

    tids, nices = asyncio.run(main())
    assert len(tids) >= 2, "an overlapped worker runs its network in a thread of its own"
    assert nices == {7}


def test_overlap_is_chosen_where_the_network_leaves_a_core_free(
    monkeypatch: pytest.MonkeyPatch, demo_package: Path
) -> None:
    import edge.pipeline

    monkeypatch.setattr(edge.pipeline, "usable_cpus", lambda: 2)
    auto = PipelineSettings()
    assert auto.overlaps(workers=1, cpu_threads_per_worker=1)
    assert not auto.overlaps(workers=2, cpu_threads_per_worker=1)
    assert not auto.overlaps(workers=1, cpu_threads_per_worker=2)
    assert auto.overlaps(workers=4, cpu_threads_per_worker=0)  # a GPU runs the network
    assert PipelineSettings(worker_overlap=True).overlaps(2, 1)
    assert not PipelineSettings(worker_overlap=False).overlaps(1, 1)
    assert ModelSettings(package=demo_package, runtime="tensorrt").cpu_threads == 0
    assert ModelSettings(package=demo_package, intra_op_threads=3).cpu_threads == 3
    assert ModelSettings(
        package=demo_package, runtime="openvino", openvino={"threads": 2}
    ).cpu_threads == 2
