"""Inference workers: a batch in, decisions out, in a process of its own (or a thread, for tests).

A process is the default on a line. The event loop that keeps the deadlines must never share the
GIL with a Python-heavy decode (hundreds of candidates on a large frame), and a hung process can be
killed and respawned while a hung thread cannot. The parent side is asyncio-native: the worker's
pipe and its process sentinel are watched by the event loop itself (`add_reader`), so a finished
batch or a dead worker is noticed without a thread hop, and nothing blocks the loop.

Frames travel through shared memory (edge/shm.py); decisions come back without their masks (the
area inside the ROI was already computed in the worker; events and the operator page only need
the outlines), so a result is a few KB whatever the frame size.

Inside a worker process the network can run in a thread of its own (`WorkerLoop`, overlap), so
that preprocess, decode and the pipe never keep it waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import multiprocessing as mp
import operator
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np
import structlog

from edge import gcpause
from edge.decision import Decision, DecisionRules
from edge.logs import configure_logging
from edge.shm import SlotPool, SlotReader, SlotRef
from models.config import ModelSettings
from models.decode import outlined
from models.drift import FrameStats, frame_stats
from models.imagestats import downscaled_gray
from models.loader import load_detector
from models.types import Detection, Detector, ModelError, ModelInfo, Prepared
from plc.record import Verdict

log = structlog.get_logger(__name__)

_MS = 1_000_000
STATS_QUIET_S = 0.002
"""How long a worker's pipe must stay quiet before it computes the drift statistics of the
batches it answered: the verdict's PLC write happens in that time (~1 ms)."""
STATS_BACKLOG = 8
"""Batches whose statistics may wait; under sustained load one is computed per batch served."""


@dataclass(slots=True)
class BatchOutput:
    decisions: list[Decision]
    stages_ms: dict[str, float]
    compute_ns: int
    """The worker's time on the batch, its stages summed: the service time admission control
    learns from (never the time a respawn, a full pipe or the batch before it took)."""
    stats_later: list[tuple[str, np.ndarray, list[Detection], bool]] | None = None
    """What the drift statistics are computed from AFTER the verdicts went back (camera,
    downscaled gray copy, detections, defect); never sent back (`pack_output` leaves it out)."""
    received_ns: int = 0
    """`time.monotonic_ns()` (one clock for every process of the box) when a worker process
    received the batch, and when it sent the answer: they split the hop into its two legs."""
    answered_ns: int = 0


_DETECTION = operator.attrgetter(*(f.name for f in dataclasses.fields(Detection)))
"""Every field of a Detection, in its constructor's order (so a new field travels too)."""
_VERDICTS = {int(v): v for v in Verdict}
WireOutput = tuple[Any, ...]


def pack_output(out: BatchOutput) -> WireOutput:
    """A worker's answer as plain tuples, for the pipe.

    Pickle runs Python code per dataclass and per enum member it meets (dataclasses'
    ``__getstate__``, ``Enum.__reduce_ex__``); right after an inference that code is cold: an OK
    answer took 91 µs to pickle and 42 µs to unpickle, against 34 and 28 µs as tuples (a
    defect with 6 detections: 134 and 57 against 56 and 51 µs), on the critical path of every
    part. The deciding detection travels as its index in ``counted``.
    """
    return (
        [
            (
                int(d.verdict),
                d.reason,
                -1 if d.deciding is None else d.counted.index(d.deciding),
                [_DETECTION(x) for x in d.counted],
            )
            for d in out.decisions
        ],
        out.stages_ms,
        out.compute_ns,
        out.received_ns,
        out.answered_ns,
    )


def unpack_output(wire: WireOutput) -> BatchOutput:
    packed, stages_ms, compute_ns, received_ns, answered_ns = wire
    decisions = []
    for verdict, reason, deciding, dets in packed:
        counted = tuple(Detection(*values) for values in dets)
        decisions.append(
            Decision(_VERDICTS[verdict], reason, counted[deciding] if deciding >= 0 else None,
                     counted)
        )
    return BatchOutput(decisions, stages_ms, compute_ns, None, received_ns, answered_ns)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One frame of a batch as a worker needs it."""

    image: np.ndarray
    camera_id: str
    recipe: int = 0
    stats: bool = False
    """Also compute the frame's drift statistics (a sample of frames: models.drift.FrameSampler)."""


def _outlined(decision: Decision) -> Decision:
    """The decision as it goes back: counted detections outlined, no masks (they stay here)."""
    if not decision.counted:
        return decision
    counted = tuple(outlined(d) for d in decision.counted)
    deciding = None
    if decision.deciding is not None:
        deciding = counted[decision.counted.index(decision.deciding)]
    return dataclasses.replace(decision, counted=counted, deciding=deciding)


@dataclass(slots=True)
class StagedBatch:
    """A batch between the worker's stages: preprocessed, then inferred, then decoded."""

    items: Sequence[BatchItem]
    chunks: list[list[Prepared]]
    preprocess_ns: int
    outputs: list[list[np.ndarray]] = dataclasses.field(default_factory=list)
    infer_ns: int = 0
    received_ns: int = 0


def stage_batch(detector: Detector, items: Sequence[BatchItem]) -> StagedBatch:
    t0 = time.perf_counter_ns()
    prepared = [detector.preprocess(it.image) for it in items]
    step = max(1, detector.max_batch)
    chunks = [prepared[i : i + step] for i in range(0, len(prepared), step)]
    return StagedBatch(items, chunks, time.perf_counter_ns() - t0)


def infer_staged(detector: Detector, batch: StagedBatch) -> None:
    t0 = time.perf_counter_ns()
    batch.outputs = [
        detector.infer(c[0].tensor if len(c) == 1 else np.concatenate([p.tensor for p in c]))
        for c in batch.chunks
    ]
    batch.infer_ns = time.perf_counter_ns() - t0


def finish_batch(
    detector: Detector, rules: Mapping[int, DecisionRules], batch: StagedBatch, masks: bool
) -> BatchOutput:
    """Decode and decide an inferred batch. Every runtime hands back outputs of its own (never a
    buffer the next inference overwrites), so this may run beside the next batch's inference."""
    t2 = time.perf_counter_ns()
    items = batch.items
    # Masks are kept for the outlines, which only the counted detections get (after deciding).
    detections = [
        d
        for c, out in zip(batch.chunks, batch.outputs, strict=True)
        for d in detector.postprocess(out, c, masks=True, outlines=False)
    ]
    t3 = time.perf_counter_ns()
    decided = []
    for dets, it in zip(detections, items, strict=True):
        recipe_rules = rules.get(it.recipe)
        if recipe_rules is None:
            raise ModelError(f"no decision rules for recipe {it.recipe}")
        decided.append(recipe_rules.decide(dets, it.image.shape, it.camera_id, masks=masks))
    t4 = time.perf_counter_ns()
    decisions = [_outlined(d) for d in decided]
    t5 = time.perf_counter_ns()
    later = [
        (it.camera_id, downscaled_gray(it.image), dets, d.verdict is Verdict.DEFECT)
        for it, dets, d in zip(items, detections, decisions, strict=True)
        if it.stats
    ]
    return BatchOutput(
        decisions,
        {
            "preprocess": batch.preprocess_ns / _MS,
            "infer": batch.infer_ns / _MS,
            "postprocess": (t3 - t2 + t5 - t4) / _MS,
            "decide": (t4 - t3) / _MS,
        },
        batch.preprocess_ns + batch.infer_ns + (t5 - t2),
        later or None,
    )


def run_batch(
    detector: Detector,
    rules: Mapping[int, DecisionRules],
    items: Sequence[BatchItem],
    masks: bool,
) -> BatchOutput:
    """Every CPU-heavy step of one batch, timed per stage, one after the other."""
    batch = stage_batch(detector, items)
    infer_staged(detector, batch)
    return finish_batch(detector, rules, batch, masks)


StatsItem = tuple[str, FrameStats, bool]
"""(camera id, the frame's drift statistics, whether the part was called DEFECT)."""


def drift_stats(out: BatchOutput) -> list[StatsItem]:
    """The drift statistics of a batch whose verdicts already went back: off the critical path
    (the gray copies were taken before the frame's memory was handed back)."""
    later, out.stats_later = out.stats_later, None
    return [(cam, frame_stats(gray, dets), defect) for cam, gray, dets, defect in later or ()]


class Worker(Protocol):
    """One inference worker as the pool sees it (all methods run on the event loop)."""

    name: str
    inflight: int
    """Batches sent and not yet answered."""
    on_stats: Callable[[list[StatsItem]], None]
    """Receives each batch's drift statistics, after its verdicts."""

    @property
    def pid(self) -> int | None: ...

    @property
    def ready(self) -> bool: ...

    async def start(self, timeout_s: float) -> ModelInfo:
        """Load the model; ModelError if it cannot (the worker is then dead)."""
        ...

    def send(self, items: Sequence[BatchItem], masks: bool) -> asyncio.Future[BatchOutput]:
        """Start one batch; the future fails with ModelError if the worker fails or dies.
        Items marked ``stats`` also get their drift statistics, after the verdicts (on_stats)."""
        ...

    def kill(self, reason: str) -> bool:
        """Stop a hung worker if possible (True if it will die)."""
        ...

    def renice(self, nice: int) -> None:
        """Change the worker's CPU priority (a candidate loads niced, then serves at 0)."""
        ...

    async def close(self, timeout_s: float = 2.0) -> None: ...


DeathCallback = Callable[["Worker", str], None]


# ---- process workers ----------------------------------------------------------------------------


def _child_main(
    conn: Connection,
    settings: ModelSettings,
    rules: Mapping[int, DecisionRules],
    logging_cfg: tuple[str, str],
    nice: int,
    no_preempt: bool = True,
    overlap: bool = False,
) -> None:
    """The worker process: load the model once, then serve batches until told to stop."""
    # The daemon decides when we stop (it drains first): a Ctrl-C or a SIGTERM sent to the whole
    # process group must not kill the worker under frames still in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(*logging_cfg)
    if no_preempt:
        _no_wakeup_preemption()
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    try:
        detector = load_detector(settings)
    except Exception as exc:  # reported to the parent, which keeps the line on fail-safes
        conn.send(("error", None, f"{type(exc).__name__}: {exc}"))
        return
    gcpause.settle()  # a full collection here would hold a frame's verdict back by tens of ms
    conn.send(("ready", None, detector.info))
    reader = SlotReader()
    if overlap:  # process-wide, so set here rather than by the loop (tests run it in threads)
        sys.setswitchinterval(WorkerLoop.SWITCH_INTERVAL_S)
    worker = WorkerLoop(conn, detector, rules, overlap=overlap)
    try:
        worker.serve(reader)
    finally:
        worker.close()
        detector.close()
        reader.close()


class WorkerLoop:
    """The worker's loop. With ``overlap``, in two threads, so that the network never waits for
    Python: the inference thread only runs the network, while this (main) thread receives and
    preprocesses the next batch, and decodes, decides and answers the one that just left the
    network. Served one after the other, those steps (0.3-0.4 ms a frame on the demo) held the
    network idle ~9 % of the time: 1 worker x 1 thread decided 0.86-0.93 x bare ``session.run``.
    Without ``overlap`` (every core already runs inference) all of it runs here, in turn.

    Why threads are safe here: ``session.run`` (and TensorRT's and OpenVINO's calls) release the
    GIL for the whole network, every runtime returns outputs of its own, and only this thread
    decodes. The worker process cuts the switch interval from 5 ms to 0.2 ms: the network finishing
    while this thread ran pure Python otherwise waited up to 5 ms for the GIL (session.run p50
    9.5 ms beside a Python loop, 4.0 ms alone; 4.1 ms at 0.2 ms).

    Overlap needs a next batch to overlap with. A batch that finds the worker idle for at least
    ``inline_after_idle_s`` with nothing else waiting in its pipe (one camera at 60 fps: ~12 ms
    idle between frames) runs here, in this thread: the two thread hand-offs it saves cost
    ~0.1 ms at p50 on a 2-vCPU VM, and there was nothing to run beside it. Under load the worker
    is never idle that long, so every batch goes to the network's thread."""

    SWITCH_INTERVAL_S = 0.0002
    INLINE_AFTER_IDLE_S = 0.002

    def __init__(
        self,
        conn: Connection,
        detector: Detector,
        rules: Mapping[int, DecisionRules],
        *,
        overlap: bool,
        inline_after_idle_s: float | None = INLINE_AFTER_IDLE_S,
    ) -> None:
        self._conn = conn
        self._detector = detector
        self._rules = rules
        self._inline_after_ns = (
            None if inline_after_idle_s is None else int(inline_after_idle_s * 1e9)
        )
        self._in_thread = 0
        """Batches handed to the network's thread and not yet answered."""
        self._idle_since_ns = time.monotonic_ns()
        """When the worker last had no batch in hand."""
        self._pipe_poll = select.poll()  # is another batch already waiting?
        self._pipe_poll.register(conn.fileno(), select.POLLIN)
        self._stats_due: collections.deque[BatchOutput] = collections.deque()
        self._done: collections.deque[tuple[int, StagedBatch, bool, Exception | None]] = (
            collections.deque()
        )
        """Batches the network's thread has run, waiting for this thread to answer them."""
        self._jobs: queue.SimpleQueue[tuple[int, StagedBatch, bool] | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()  # the inference thread wakes this one's poll
        os.set_blocking(self._wake_r, False)
        self._thread: threading.Thread | None = None
        if overlap:
            self._thread = threading.Thread(target=self._infer_loop, name="infer", daemon=True)
            self._thread.start()

    def _infer(self, batch: StagedBatch) -> Exception | None:
        """Run the network; its failure is answered as that batch's error."""
        try:
            infer_staged(self._detector, batch)
        except Exception as exc:
            return exc
        return None

    def _infer_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch_id, batch, masks = job
            self._done.append((batch_id, batch, masks, self._infer(batch)))
            os.write(self._wake_w, b"\0")

    def serve(self, reader: SlotReader) -> None:
        conn_fd = self._conn.fileno()
        poller = select.poll()  # Connection.poll() would build a selector per call
        poller.register(conn_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        quiet_ms = round(STATS_QUIET_S * 1000)
        while True:
            # Drift statistics wait until neither a batch nor a network result has come for a
            # moment: computed at once, they competed with the daemon handling that very verdict
            # (worker send -> daemon wake-up p90 0.39 ms with them, 0.20 ms without, 60 fps on
            # 2 vCPUs).
            ready = {fd for fd, _ in poller.poll(quiet_ms if self._stats_due else None)}
            if not ready:
                self._send_stats()
                continue
            if conn_fd in ready:  # first keep the network fed
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    return
                if msg is None:
                    self._drain()
                    return
                self._stage(reader, msg, time.monotonic_ns())
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                self._finish_done()

    def _stage(self, reader: SlotReader, msg: tuple[Any, ...], received_ns: int) -> None:
        batch_id, refs, cameras, recipes, masks, stats = msg
        try:
            items = [
                BatchItem(reader.view(ref), cam, recipe, want)
                for ref, cam, recipe, want in zip(refs, cameras, recipes, stats, strict=True)
            ]
            batch = stage_batch(self._detector, items)
            batch.received_ns = received_ns
        except Exception as exc:  # one bad batch is one set of fail-safes, not a dead worker
            self._conn.send(("error", batch_id, f"{type(exc).__name__}: {exc}"))
            return
        if self._thread is not None and not self._idle_for_inline(received_ns):
            self._in_thread += 1
            self._jobs.put((batch_id, batch, masks))
        else:
            self._answer(batch_id, batch, masks, self._infer(batch))
            self._idle_since_ns = time.monotonic_ns()

    def _idle_for_inline(self, now_ns: int) -> bool:
        """Nothing in hand for a while and nothing waiting: no next batch to overlap with."""
        after = self._inline_after_ns
        return (
            after is not None
            and self._in_thread == 0
            and now_ns - self._idle_since_ns >= after
            and not self._pipe_poll.poll(0)
        )

    def _finish_done(self) -> None:
        while self._done:
            batch_id, batch, masks, err = self._done.popleft()
            self._in_thread -= 1
            self._answer(batch_id, batch, masks, err)
        if self._in_thread == 0:
            self._idle_since_ns = time.monotonic_ns()

    def _answer(
        self, batch_id: int, batch: StagedBatch, masks: bool, err: Exception | None
    ) -> None:
        try:
            if err is not None:
                raise err
            out = finish_batch(self._detector, self._rules, batch, masks)
            out.received_ns = batch.received_ns
            out.answered_ns = time.monotonic_ns()
            self._conn.send(("ok", batch_id, pack_output(out)))  # without stats_later
        except Exception as exc:  # one bad batch is one set of fail-safes
            self._conn.send(("error", batch_id, f"{type(exc).__name__}: {exc}"))
            return
        if out.stats_later:
            self._stats_due.append(out)
        if len(self._stats_due) >= STATS_BACKLOG:  # sustained load: one per batch served
            self._send_stats()

    def _send_stats(self) -> None:
        with contextlib.suppress(Exception):  # statistics never cost a verdict
            self._conn.send(("stats", None, drift_stats(self._stats_due.popleft())))

    def _drain(self) -> None:
        """Told to stop: the batches already handed to the network are still answered."""
        self._stop_thread(None)
        self._finish_done()

    def _stop_thread(self, timeout_s: float | None) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def close(self) -> None:
        self._stop_thread(5.0)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _no_wakeup_preemption() -> None:
    """SCHED_BATCH: a worker woken by a new batch must not preempt the daemon's loop on the
    loop's own core. Under the default policy the kernel put the wakee on the waker's core and
    ran it there at once: the loop stalled inside the pipe write for the whole inference (send
    p90 4.1 ms on a 2-vCPU VM; 0.07 ms under SCHED_BATCH, round trip unchanged) while the other
    core idled. Nice is unchanged, no privilege is needed; Linux only."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.warning("worker_sched_batch_unavailable", error=str(exc))


def _threads_of(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # no procfs (not Linux): a process has one priority
        return [pid]


class ProcessWorker:
    """A worker process, watched by the event loop; never respawns itself (the pool does)."""

    _ctx = mp.get_context("spawn")  # fork would copy the daemon's threads' locks

    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        rules: Mapping[int, DecisionRules],
        *,
        slots: int,
        logging_cfg: tuple[str, str],
        on_death: DeathCallback,
        nice: int = 0,
        no_preempt: bool = True,
        overlap: bool = False,
    ) -> None:
        self.name = name
        self.settings = settings
        self._no_preempt = no_preempt
        self._overlap = overlap
        self.rules = dict(rules)
        self.inflight = 0
        self._slots = SlotPool(slots)
        self._logging = logging_cfg
        self._nice = nice
        self._on_death = on_death
        self._proc: Any = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_fut: asyncio.Future[ModelInfo] | None = None
        self._pending: dict[int, tuple[asyncio.Future[BatchOutput], list[int]]] = {}
        self._ids = itertools.count(1)
        self._dead = False
        self._ready = False
        self._kill_reason = ""
        self.on_stats: Callable[[list[StatsItem]], None] = lambda _items: None
        """Where a batch's drift statistics go, after its verdicts (the pool sets it)."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        return self._ready and not self._dead

    async def start(self, timeout_s: float) -> ModelInfo:
        loop = self._loop = asyncio.get_running_loop()
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_child_main,
            args=(
                child,
                self.settings,
                self.rules,
                self._logging,
                self._nice,
                self._no_preempt,
                self._overlap,
            ),
            name=f"edge-infer-{self.name}",
            daemon=True,
        )
        # Process.start() forks and execs a new interpreter: tens of ms, off the loop.
        await loop.run_in_executor(None, proc.start)
        child.close()
        self._proc, self._conn = proc, parent
        self._ready_fut = loop.create_future()
        loop.add_reader(parent.fileno(), self._readable)
        loop.add_reader(proc.sentinel, self._exited)
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready_fut), timeout_s)
        except TimeoutError:
            self.kill(f"did not load the model in {timeout_s:g}s")
            raise ModelError(f"inference worker did not load the model in {timeout_s:g}s") from None
        self._ready = True
        log.info("inference_process_ready", worker=self.name, pid=proc.pid, model=info.model_id,
                 overlap=self._overlap)
        return info

    def send(self, items: Sequence[BatchItem], masks: bool) -> asyncio.Future[BatchOutput]:
        assert self._loop is not None and self._conn is not None
        fut: asyncio.Future[BatchOutput] = self._loop.create_future()
        if self._dead:
            fut.set_exception(ModelError(f"inference worker {self.name} is dead"))
            return fut
        batch_id = next(self._ids)
        used: list[int] = []
        try:
            refs: list[SlotRef] = []
            for it in items:
                index, ref = self._slots.put(it.image)
                used.append(index)
                refs.append(ref)
            self._conn.send(
                (
                    batch_id,
                    refs,
                    [it.camera_id for it in items],
                    [it.recipe for it in items],
                    masks,
                    [it.stats for it in items],
                )
            )
        except (OSError, ValueError, IndexError) as exc:
            self._slots.release(used)
            fut.set_exception(ModelError(f"cannot hand the batch to {self.name}: {exc!r}"))
            return fut
        self._pending[batch_id] = (fut, used)
        self.inflight += 1
        return fut

    def _readable(self) -> None:
        """One message per call: the loop polls the pipe (level-triggered) and calls again while
        more is waiting. No Connection.poll() here: it builds a selector per call (~30 µs, twice
        per batch on the critical path)."""
        conn = self._conn
        if conn is None:
            return
        try:
            kind, batch_id, payload = conn.recv()
        except (EOFError, OSError):
            self._exited()
            return
        self._answer(kind, batch_id, payload)

    def _answer(self, kind: str, batch_id: int | None, payload: Any) -> None:
        if kind == "stats":
            self.on_stats(payload)
            return
        if batch_id is None:  # the load result
            ready = self._ready_fut
            if ready is not None and not ready.done():
                if kind == "ready":
                    ready.set_result(payload)
                else:
                    ready.set_exception(ModelError(f"inference worker could not load: {payload}"))
            return
        entry = self._pending.pop(batch_id, None)
        if entry is None:
            return
        fut, used = entry
        self.inflight -= 1
        self._slots.release(used)
        if fut.done():
            return
        if kind == "ok":
            try:
                fut.set_result(unpack_output(payload))
            except Exception as exc:  # a malformed answer is this batch's fail-safe, no more
                fut.set_exception(ModelError(f"unreadable answer from {self.name}: {exc!r}"))
        else:
            fut.set_exception(ModelError(str(payload)))

    def _exited(self) -> None:
        if self._dead:
            return
        self._dead = True
        self._ready = False
        loop, proc, conn = self._loop, self._proc, self._conn
        if loop is not None:
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._readable_final(conn)
                loop.remove_reader(conn.fileno())
            if proc is not None:
                loop.remove_reader(proc.sentinel)
        code = proc.exitcode if proc is not None else None
        if code is None and proc is not None:
            with contextlib.suppress(Exception):
                proc.join(0.05)
                code = proc.exitcode
        why = self._kill_reason or f"exited with code {code}"
        err = ModelError(f"inference worker {self.name} died: {why}")
        for fut, used in self._pending.values():
            self._slots.release(used)
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self.inflight = 0
        if self._ready_fut is not None and not self._ready_fut.done():
            self._ready_fut.set_exception(err)
        if conn is not None:
            conn.close()
        self._conn = None
        self._slots.close()
        self._on_death(self, why)

    def _readable_final(self, conn: Connection) -> None:
        """Answers the worker sent just before it exited still count."""
        while conn.poll():
            kind, batch_id, payload = conn.recv()
            self._answer(kind, batch_id, payload)

    def kill(self, reason: str) -> bool:
        proc = self._proc
        if proc is None or self._dead or proc.exitcode is not None:
            return False
        self._kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        log.error("inference_process_killed", worker=self.name, pid=proc.pid, reason=reason)
        return True

    def renice(self, nice: int) -> None:
        proc = self._proc
        if proc is None or self._dead:
            return
        try:
            # Linux nice values belong to threads: the process id alone would leave the
            # inference thread (edge/inference.py WorkerLoop) at its old priority.
            for tid in _threads_of(proc.pid):
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as exc:  # lowering needs CAP_SYS_NICE or LimitNICE (systemd unit)
            log.warning("inference_renice_failed", worker=self.name, nice=nice, error=str(exc),
                        fix="allow it with LimitNICE=+0 in the unit (systemd/edge.service)")

    async def close(self, timeout_s: float = 2.0) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or self._dead:
            self._slots.close()
            return
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        end = time.monotonic() + timeout_s
        while not self._dead and time.monotonic() < end:  # noqa: ASYNC110 - the sentinel ends it
            await asyncio.sleep(0.01)
        if not self._dead:
            self._kill_reason = "closed"
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            end = time.monotonic() + 2.0
            while not self._dead and time.monotonic() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        self._slots.close()


# ---- thread workers (tests with injected faults; boxes where memory is very tight) ---------------


class ThreadWorker:
    """A worker thread over a detector owned by the daemon; a hung one cannot be killed."""

    def __init__(
        self,
        name: str,
        detector_factory: Callable[[], Detector],
        rules: Mapping[int, DecisionRules],
        *,
        on_death: DeathCallback,
    ) -> None:
        self.name = name
        self.inflight = 0
        self._factory = detector_factory
        self.rules = dict(rules)
        self._on_death = on_death
        self._detector: Detector | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self.on_stats: Callable[[list[StatsItem]], None] = lambda _items: None
        self._closed = threading.Event()

    @property
    def pid(self) -> int | None:
        return None

    @property
    def ready(self) -> bool:
        return self._detector is not None and not self._closed.is_set()

    async def start(self, timeout_s: float) -> ModelInfo:
        loop = asyncio.get_running_loop()
        try:
            self._detector = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._factory), timeout_s
            )
        except TimeoutError:
            raise ModelError(f"model did not load in {timeout_s:g}s") from None
        return self._detector.info

    def send(self, items: Sequence[BatchItem], masks: bool) -> asyncio.Future[BatchOutput]:
        loop = asyncio.get_running_loop()
        det = self._detector
        if det is None:
            fut: asyncio.Future[BatchOutput] = loop.create_future()
            fut.set_exception(ModelError(f"worker {self.name} has no model"))
            return fut
        self.inflight += 1
        fut = loop.run_in_executor(
            self._pool, run_batch, det, self.rules, list(items), masks
        )

        def done(f: asyncio.Future[BatchOutput]) -> None:
            self.inflight -= 1
            if not f.cancelled() and f.exception() is None and f.result().stats_later:
                self.on_stats(drift_stats(f.result()))

        fut.add_done_callback(done)
        return fut

    def kill(self, reason: str) -> bool:
        return False  # a thread cannot be stopped; the deadline guard fail-safes its frames

    def renice(self, nice: int) -> None:
        return None  # threads share the daemon's priority

    async def close(self, timeout_s: float = 2.0) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        det, self._detector = self._detector, None
        if det is not None:
            with contextlib.suppress(Exception):
                det.close()
