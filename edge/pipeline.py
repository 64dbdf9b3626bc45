"""The per-frame critical path: admission -> inference pool -> decision -> PLC write -> spool.

The invariant the product rests on: exactly one decision per frame reaches the PLC before
``capture + budget``, and nothing is ever written after it. Three mechanisms enforce it:

* a **claim**: each frame is written at most once. The real verdict and the deadline guard race
  for the claim on the event loop (single-threaded, so the claim needs no lock); whoever loses
  does nothing (a late real verdict is counted and discarded);
* a **deadline guard**: a timer at ``deadline - reserve`` claims the frame for a FAILSAFE_REJECT
  if the real verdict has not claimed it yet (slow, hung or crashed inference, a long queue);
* **deadline-bounded writes**: the PLC link gets an absolute deadline and refuses to send what
  cannot complete before it. The real verdict's write must finish by ``deadline - reserve``, so a
  failed write still leaves the reserve for the fail-safe.

Overload never drops a frame silently: a frame that cannot be inferred in time (full queue, or a
predicted completion past its deadline) is fail-safed at once, with the reason.

Everything here runs on the event loop and is O(1) per frame: inference happens in worker
processes (edge/pool.py), whose answers the loop receives without a thread hop; the loop only
moves small objects, so the guard timers fire on time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from camera.frame import Frame
from edge.decision import Decision
from edge.inference import BatchItem, BatchOutput, StatsItem
from edge.logs import Aggregator
from edge.metrics import Metrics
from edge.plcqueue import DeadlineOrderedLink
from edge.pool import InferencePool, PoolModel
from edge.stats import RunStats
from models.drift import FrameStats
from models.types import Detection
from plc.record import (
    DecisionRecord,
    FailsafeReason,
    Verdict,
    WriteOutcome,
    WriteResult,
)
from uplink.event import PartEvent, new_event_id

log = structlog.get_logger(__name__)

_MS = 1_000_000
_RETRY_MIN_S = 0.002
"""Below this much budget a retry after a reconnect is not worth starting."""


class PipelineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_ms: float = Field(default=348.0, gt=0, le=10_000)
    """Capture to PLC acknowledgement, hard limit."""
    failsafe_reserve_ms: float = Field(default=30.0, gt=0)
    """Time kept back before the deadline for writing the fail-safe."""
    queue_size: int = Field(default=32, ge=1, le=4096)
    max_batch: int = Field(default=4, ge=1, le=64)
    """Frames (from any camera) that may share one inference batch."""
    workers: int | Literal["auto"] = 1
    """Inference worker processes; "auto" = the CPUs this process may use divided by the
    model's intra-op threads (at least 1)."""
    worker_depth: int = Field(default=2, ge=1, le=8)
    """Batches handed to one worker ahead of time, so it never idles waiting for the pipe."""
    worker_overlap: bool | Literal["auto"] = "auto"
    """Run a worker's network in a thread of its own, beside the decode of its last batch and
    the preprocess of its next (edge/inference.py). "auto": when the network leaves a core for
    that work, i.e. it runs on a GPU or the workers' inference threads are fewer than the CPUs.
    Where every core already infers it only added thread switches (2 workers x 1 thread on 2
    vCPUs: 310-342 against 330-340 decisions/s). An overlapped worker that was idle still runs a
    batch with nothing behind it in its own thread (WorkerLoop.INLINE_AFTER_IDLE_S)."""
    worker_no_preempt: bool = True
    """Run worker processes under SCHED_BATCH (Linux): a worker woken by a new batch takes a free
    core instead of preempting the daemon's loop on its own (edge/inference.py)."""
    admission_control: bool = True
    """Fail-safe at once a frame whose predicted completion is past its deadline."""
    model_hang_s: float = Field(default=2.0, gt=0)
    """A batch running this long is hung: its worker is killed and respawned."""
    model_error_threshold: int = Field(default=3, ge=1)
    """Consecutive failed batches that open the model breaker (model down, probed later)."""
    model_load_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """A worker that has not loaded its model by then is killed (and retried with backoff)."""
    isolation: Literal["process", "thread"] = "process"
    """Inference in worker processes (a hung model is killed and respawned, and decode never
    competes with the deadline timers for the GIL) or in threads of the daemon."""
    masks: bool = True
    """Count the defect pixels inside a region of interest from the instance masks; False:
    from the box overlap (coarser). Areas and outlines come from the masks either way."""
    cpu_latency_us: int | None = Field(default=0, ge=0, le=1_000_000)
    """PM QoS limit on CPU wake-up latency while the daemon runs (edge/cpulatency.py): waking
    an idle core cost ~0.2 ms per process hop, ~0.8 ms per part at 60 fps. None: leave it."""

    def model_post_init(self, _context: object) -> None:
        if self.failsafe_reserve_ms >= self.budget_ms:
            raise ValueError("failsafe_reserve_ms must be smaller than budget_ms")
        if isinstance(self.workers, int) and not 1 <= self.workers <= 64:
            raise ValueError("workers must be between 1 and 64, or 'auto'")

    def worker_count(self, intra_op_threads: int) -> int:
        if isinstance(self.workers, int):
            return self.workers
        return max(1, usable_cpus() // max(1, intra_op_threads))

    def overlaps(self, workers: int, cpu_threads_per_worker: int) -> bool:
        """Whether workers run their network beside their decode (see ``worker_overlap``)."""
        if isinstance(self.worker_overlap, bool):
            return self.worker_overlap
        return workers * cpu_threads_per_worker < usable_cpus()


def usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


class EventSink(Protocol):
    """Where decided parts go after the PLC write (the durable spool). Must never block."""

    def submit(self, event: PartEvent, image: np.ndarray | None) -> bool: ...

    def amend(self, event_id: str, changes: dict[str, object]) -> bool: ...


@dataclass(frozen=True, slots=True)
class DecidedPart:
    """One part's outcome, for observers (the operator page, drift watch, the bench)."""

    frame: Frame
    verdict: Verdict
    reason: str
    decision: Decision | None
    recipe: int
    model_id: str
    e2e_ms: float | None
    """Capture to PLC acknowledgement, None when the write missed its deadline."""
    canary: bool = False
    event_id: str | None = None


StatsSink = Callable[[str, FrameStats, bool], None]
"""(camera, frame statistics, DEFECT) for every frame the active model inferred; O(1), on the
loop."""

Observer = Callable[[DecidedPart], None]
"""Called on the loop for every decided part; must be O(1) and never block or raise."""


class JobState(enum.Enum):
    QUEUED = "queued"
    INFERRING = "inferring"
    DONE = "done"


@dataclass(slots=True, eq=False)
class Job:
    frame: Frame
    slot: int
    deadline_ns: int
    received_ns: int
    recipe: int = 0
    state: JobState = JobState.QUEUED
    claimed: bool = False
    sequence: int | None = None
    guard: asyncio.TimerHandle | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    decision: Decision | None = None
    canary: bool = False
    """Decided by the canary model (a sample of parts while a candidate is being tried)."""
    event_id: str | None = None


class Pipeline:
    """Owns the frames from admission to the PLC acknowledgement.

    ``plc`` is the daemon's DeadlineOrderedLink (it orders requests and assigns sequence numbers).
    ``pool`` and ``model`` may be swapped between batches (a model activation); frames already
    in flight finish on the pool that took them.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        line: str,
        pool: InferencePool | None,
        model: PoolModel | None,
        plc: DeadlineOrderedLink,
        sink: EventSink | None,
        metrics: Metrics,
        stats: RunStats,
        camera_slots: dict[str, int],
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.settings = settings
        self.line = line
        self.pool = pool
        self.model = model
        self.plc = plc
        self.sink = sink
        self.metrics = metrics
        self.stats = stats
        self.camera_slots = camera_slots
        self._clock_ns = clock_ns
        self._budget_ns = int(settings.budget_ms * _MS)
        self._reserve_ns = int(settings.failsafe_reserve_ms * _MS)
        self._queue: collections.deque[Job] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[Job] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._inferring = 0
        self.last_failsafe_ns = 0
        self.last_frame_ns = 0
        self.last_real_verdict_ns = 0
        self.started_ns = clock_ns()
        self.observers: list[Observer] = []
        self._unknown: collections.OrderedDict[tuple[int, int], str] = collections.OrderedDict()
        """(camera slot, sequence) -> event id of records whose write outcome is unknown, until
        the link's read-back settles them (bounded: the link keeps one per slot)."""
        self.canary: tuple[InferencePool, PoolModel] | None = None
        self.canary_fraction = 0.0
        self.stats_sink: StatsSink | None = None
        """The drift watch: frame statistics of the active model's batches, after their
        verdicts (computed by the workers off the critical path)."""
        self.stats_due: Callable[[str, int], bool] = lambda _camera, _now_ns: True
        """(camera, now) -> whether this frame's statistics are wanted (the watch's sampler)."""
        self._miss_log = Aggregator("deadline_miss")
        self._failsafe_log = Aggregator("failsafe", level="info")
        if pool is not None:
            pool.on_capacity = self._dispatch
            pool.on_stats = self._stats

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Kept for symmetry with close(); dispatch is event-driven (no worker tasks)."""

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop accepting frames and wait until every in-flight frame has its decision written.

        Every job terminates by construction (verdict or guard), so this waits at most about one
        budget; the timeout is a backstop against a wedged PLC link.
        """
        self._accepting = False
        limit = timeout_s if timeout_s is not None else self.settings.budget_ms / 1000 * 3 + 1
        try:
            await asyncio.wait_for(self._idle.wait(), limit)
            return True
        except TimeoutError:
            log.error("drain_timeout", inflight=len(self._inflight))
            return False

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.flush_logs()

    def flush_logs(self) -> None:
        """Periodic: emit the aggregated per-frame warnings of the last interval."""
        self._miss_log.flush()
        self._failsafe_log.flush()

    def swap_model(self, pool: InferencePool, model: PoolModel) -> InferencePool | None:
        """Route new batches to `pool` from now on; returns the previous pool (still draining)."""
        old = self.pool
        self.pool, self.model = pool, model
        pool.on_capacity = self._dispatch
        pool.on_stats = self._stats
        if old is not None and old is not pool:
            old.on_capacity = lambda: None
        self._dispatch()
        return old

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def model_up(self) -> bool:
        return self.pool is not None and self.pool.up

    def seconds_without_real_verdict(self) -> float:
        """How long frames have arrived without one real verdict (0 when none are arriving)."""
        now = self._clock_ns()
        if not self.last_frame_ns or now - self.last_frame_ns > 2 * self._budget_ns:
            return 0.0
        since = max(self.last_real_verdict_ns, self.started_ns)
        return max(0.0, (now - since) / 1e9)

    # ---- admission (event loop) ----------------------------------------------------------

    def submit(self, frame: Frame, recipe: int | None = 0) -> None:
        """Accept one frame; called on the loop for every frame a camera delivers.

        ``recipe`` is the product recipe that judges it (None: the PLC selected one the config
        does not define, so the part is fail-safed, never guessed).
        """
        now = self._clock_ns()
        slot = self.camera_slots[frame.camera_id]
        job = Job(frame, slot, frame.captured_ns + self._budget_ns, now, recipe=recipe or 0)
        self.metrics.frames.labels(frame.camera_id).inc()
        self.stats.frames += 1
        self.stats.per_camera_frames[frame.camera_id] += 1
        self.last_frame_ns = now
        self._track(job)
        reason = FailsafeReason.RECIPE_UNKNOWN if recipe is None else self._refusal(job, now)
        if reason is not None:
            self._spawn(self._finish_failsafe(job, reason))
            return
        loop = asyncio.get_running_loop()
        job.guard = loop.call_at((job.deadline_ns - self._reserve_ns) / 1e9, self._guard_fired, job)
        self._queue.append(job)
        self._dispatch()
        self.metrics.queue_depth.set(len(self._queue))

    def fail_part(
        self,
        camera_id: str,
        part_id: int,
        reason: FailsafeReason,
        captured_ns: int | None = None,
        recipe: int | None = None,
    ) -> None:
        """A part that will never have a frame (a missed or lost trigger): its fail-safe record.

        The deadline counts from when the part was announced (`captured_ns`, default now); the
        record carries the part's recipe when it is known.
        """
        now = self._clock_ns()
        frame = Frame(
            camera_id=camera_id,
            frame_id=-1,
            part_id=part_id,
            captured_ns=captured_ns or now,
            captured_wall_ns=time.time_ns() - (now - (captured_ns or now)),
            image=np.zeros((1, 1), np.uint8),
            pixel_format="none",
        )
        job = Job(frame, self.camera_slots[camera_id], frame.captured_ns + self._budget_ns, now,
                  recipe=recipe or 0)
        self.metrics.frames.labels(camera_id).inc()
        self.stats.frames += 1
        self.stats.per_camera_frames[camera_id] += 1
        self._track(job)
        self._spawn(self._finish_failsafe(job, reason))

    def _refusal(self, job: Job, now: int) -> FailsafeReason | None:
        """Why this frame is fail-safed at admission, or None to infer it."""
        if not self._accepting:
            return FailsafeReason.SHUTDOWN
        if job.deadline_ns - now <= self._reserve_ns:
            return FailsafeReason.LATE_ARRIVAL
        if job.frame.problem:
            return FailsafeReason.BAD_FRAME
        pool = self.pool
        if pool is None or not pool.admits():
            return FailsafeReason.MODEL_DOWN
        if len(self._queue) >= self.settings.queue_size:
            return FailsafeReason.QUEUE_FULL
        if (
            self.settings.admission_control
            and not (not self._queue and pool.idle())  # an idle worker: a probe, never refused
            and self._predicted_done_ns(pool, now) > job.deadline_ns - self._reserve_ns
        ):
            return FailsafeReason.OVERLOAD
        return None

    def _predicted_done_ns(self, pool: InferencePool, now: int) -> float:
        """When a frame enqueued now would be decided, from the workers' measured frame time."""
        per_frame = pool.per_frame_ns()
        if per_frame <= 0:
            return now
        workers = max(1, len(pool.ready_workers))
        ahead = len(self._queue) + self._inferring
        return now + (ahead / workers + 1) * per_frame

    def _track(self, job: Job) -> None:
        self._inflight.add(job)
        self._idle.clear()
        self.metrics.inflight.set(len(self._inflight))

    def _untrack(self, job: Job) -> None:
        self._inflight.discard(job)
        self.metrics.inflight.set(len(self._inflight))
        if not self._inflight:
            self._idle.set()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the guard (event loop) ------------------------------------------------------------

    def _guard_fired(self, job: Job) -> None:
        if job.claimed:
            return
        reason = (
            FailsafeReason.QUEUE_WAIT
            if job.state is JobState.QUEUED
            else FailsafeReason.INFERENCE_TIMEOUT
        )
        if job.state is JobState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)  # O(queue) only on the rare guard path
        self.metrics.queue_depth.set(len(self._queue))
        self._spawn(self._finish_failsafe(job, reason))

    # ---- dispatch to the inference pool ---------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued frames to workers with room; called on submit and when a batch ends.

        With a canary, a deterministic share of parts goes to the candidate's pool (when it has
        room and its breaker is closed; otherwise the part stays with the active model: a canary
        is a sample, never a reason to make a part wait).
        """
        active = self.pool, self.model
        if active[0] is None or active[1] is None:
            return
        while self._queue:
            head = self._queue[0]
            if head.claimed:
                self._queue.popleft()
                continue
            pool, model = self._route(head)
            if not pool.has_capacity():
                break
            batch: list[Job] = []
            while self._queue and len(batch) < self.settings.max_batch:
                job = self._queue[0]
                if not job.claimed and batch and self._route(job)[0] is not pool:
                    break
                self._queue.popleft()
                if not job.claimed:
                    batch.append(job)
            if not batch:
                continue
            start = self._clock_ns()
            self._inferring += len(batch)
            canary = self.canary is not None and pool is self.canary[0]
            for job in batch:
                job.state = JobState.INFERRING
                job.canary = canary
                job.stages_ms["handoff"] = (job.received_ns - job.frame.captured_ns) / _MS
                job.stages_ms["queue"] = (start - job.received_ns) / _MS
            stats = self.stats_sink is not None and not canary
            due = self.stats_due
            fut = pool.submit(
                [
                    BatchItem(j.frame.image, j.frame.camera_id, j.recipe,
                              stats and due(j.frame.camera_id, start))
                    for j in batch
                ],
                self.settings.masks,
            )
            fut.add_done_callback(
                lambda f, jobs=batch, m=model, t=start: self._batch_done(f, jobs, m, t)  # type: ignore[misc]
            )
        self.metrics.queue_depth.set(len(self._queue))

    def _stats(self, items: list[StatsItem]) -> None:
        sink = self.stats_sink
        if sink is not None:
            for camera, stats, defect in items:
                sink(camera, stats, defect)

    def _route(self, job: Job) -> tuple[InferencePool, PoolModel]:
        canary, pool, model = self.canary, self.pool, self.model
        assert pool is not None and model is not None
        if (
            canary is not None
            and sampled(f"{job.frame.camera_id}/{job.frame.part_id}", self.canary_fraction)
            and canary[0].admits()
            and canary[0].has_capacity()
        ):
            return canary
        return pool, model

    def set_canary(self, pool: InferencePool, model: PoolModel, fraction: float) -> None:
        """Let `pool` decide a deterministic `fraction` of parts from now on."""
        self.canary, self.canary_fraction = (pool, model), fraction
        pool.on_capacity = self._dispatch

    def clear_canary(self) -> InferencePool | None:
        """Stop routing to the canary; returns its pool (its running batches still finish)."""
        canary, self.canary = self.canary, None
        if canary is None:
            return None
        canary[0].on_capacity = lambda: None
        return canary[0]

    def _batch_done(
        self, fut: asyncio.Future[BatchOutput], batch: list[Job], model: PoolModel, sent_ns: int
    ) -> None:
        self._inferring -= len(batch)
        if fut.cancelled() or fut.exception() is not None:
            for job in batch:
                if not job.claimed:
                    self._spawn(self._finish_failsafe(job, FailsafeReason.MODEL_ERROR))
            return
        out = fut.result()
        self.metrics.batch_size.observe(len(batch))
        now = self._clock_ns()
        hop: dict[str, float] = {"ipc": max(0.0, (now - sent_ns - out.compute_ns) / _MS)}
        if out.answered_ns:  # a worker process stamped both ends: the hop's two legs
            hop["ipc_to_worker"] = (out.received_ns - sent_ns) / _MS
            hop["ipc_from_worker"] = (now - out.answered_ns) / _MS
        for job, decision in zip(batch, out.decisions, strict=True):
            job.stages_ms.update(out.stages_ms)
            job.stages_ms.update(hop)
            job.decision = decision
            if job.claimed:
                self.metrics.late_results.labels(job.frame.camera_id).inc()
                self.stats.late_results += 1
                continue
            self._spawn(self._finish(job, decision.verdict, FailsafeReason.NONE, model))

    def write_confirmed(self, slot: int, sequence: int, applied: bool) -> None:
        """The link's read-back settled an outcome-unknown record: give its event the final
        outcome (the spool patches it if unsent and sends an amendment either way)."""
        event_id = self._unknown.pop((slot, sequence), None)
        if event_id is None or self.sink is None:
            return
        outcome = "confirmed_applied" if applied else "confirmed_not_applied"
        try:
            self.sink.amend(event_id, {"plc_outcome": outcome})
        except Exception as exc:
            log.error("spool_amend_raised", error=repr(exc))

    # ---- finishing: claim, write, account ----------------------------------------------------

    async def _finish_failsafe(self, job: Job, reason: FailsafeReason) -> None:
        await self._finish(job, Verdict.FAILSAFE_REJECT, reason, self.model)

    async def _finish(
        self, job: Job, verdict: Verdict, reason: FailsafeReason, model: PoolModel | None
    ) -> None:
        if job.claimed:
            return
        job.claimed = True
        job.state = JobState.DONE
        if job.guard is not None:
            job.guard.cancel()
        try:
            decided_ns = self._clock_ns()
            failsafe = verdict is Verdict.FAILSAFE_REJECT
            write_deadline = job.deadline_ns if failsafe else job.deadline_ns - self._reserve_ns
            record = self._record(job, verdict, reason, decided_ns, model)
            result = await self._write(record, write_deadline)
            if not failsafe and result.outcome in (WriteOutcome.FAILED, WriteOutcome.DROPPED_LATE):
                # The real verdict did not reach the PLC and definitely was not applied: use the
                # reserve for the fail-safe (it goes out under the same, unconsumed, sequence).
                verdict, reason = Verdict.FAILSAFE_REJECT, FailsafeReason.PLC_RETRY
                record = self._record(job, verdict, reason, decided_ns, model)
                result = await self._write(record, job.deadline_ns)
            # Only a write that may have been applied carries its sequence (the EDF queue does
            # not consume one for a write that definitely failed).
            job.sequence = (
                result.sequence
                if result.outcome in (WriteOutcome.ACKED, WriteOutcome.UNKNOWN)
                else None
            )
            self._account(job, verdict, reason, decided_ns, result, model)
        except Exception:
            log.exception("finish_failed", camera=job.frame.camera_id, frame=job.frame.frame_id)
            self.stats.record_miss(job.frame.camera_id, "internal_error")
        finally:
            self._untrack(job)

    async def _write(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """Write before `deadline_ns`; while the link is only reconnecting, wait and retry.

        A FAILED write on a link that is down was definitely not applied, so retrying within the
        budget is safe and turns a short reconnect into no miss at all. A refusal on a live link
        is not retried (it would fail again), nor is an UNKNOWN outcome (it may have been applied).
        """
        while True:
            try:
                result = await self.plc.write_decision(record, deadline_ns)
            except Exception as exc:  # a link bug must not take the frame with it
                log.error("plc_write_raised", error=repr(exc))
                return WriteResult(WriteOutcome.FAILED, detail=repr(exc))
            if result.outcome is not WriteOutcome.FAILED or self.plc.connected:
                return result
            left_s = (deadline_ns - self._clock_ns()) / 1e9 - _RETRY_MIN_S
            if left_s <= 0 or not await self.plc.wait_connected(left_s):
                return result

    def _record(
        self,
        job: Job,
        verdict: Verdict,
        reason: FailsafeReason,
        decided_ns: int,
        model: PoolModel | None,
    ) -> DecisionRecord:
        deciding = job.decision.deciding if job.decision and verdict is Verdict.DEFECT else None
        return DecisionRecord(
            camera_index=job.slot,
            sequence=0,  # assigned at send time by the link queue (edge.plcqueue)
            part_id=job.frame.part_id & 0xFFFFFFFF,
            verdict=verdict,
            defect_class=deciding.class_id + 1 if deciding else 0,
            score_permille=round(deciding.score * 1000) if deciding else 0,
            latency_ms=min(65535, (decided_ns - job.frame.captured_ns) // _MS),
            model_id=(model.plc_model_id if model else 0) & 0xFFFF,
            reason=int(reason),
            recipe=job.recipe & 0xFFFF,
        )

    def _account(
        self,
        job: Job,
        verdict: Verdict,
        reason: FailsafeReason,
        decided_ns: int,
        result: WriteResult,
        model: PoolModel | None,
    ) -> None:
        cam = job.frame.camera_id
        reason_name = reason.name.lower() if reason else "none"
        if verdict is Verdict.FAILSAFE_REJECT:
            self.metrics.failsafes.labels(cam, reason_name).inc()
            self.stats.failsafes[reason_name] += 1
            self.last_failsafe_ns = decided_ns
            self._failsafe_log.note(reason_name, camera=cam, part=job.frame.part_id)
        on_time = (
            result.outcome is WriteOutcome.ACKED
            and result.acked_ns is not None
            and result.acked_ns <= job.deadline_ns
        )
        job.stages_ms["decided"] = (decided_ns - job.frame.captured_ns) / _MS
        if on_time:
            assert result.acked_ns is not None
            e2e_ms = (result.acked_ns - job.frame.captured_ns) / _MS
            job.stages_ms["plc"] = (result.acked_ns - decided_ns) / _MS
            job.stages_ms["total"] = e2e_ms
            self.metrics.e2e_latency.labels(cam).observe(e2e_ms)
            self.metrics.verdicts.labels(cam, verdict.name, reason_name).inc()
            self.stats.record_verdict(cam, verdict.name, e2e_ms)
            if verdict is not Verdict.FAILSAFE_REJECT:
                self.last_real_verdict_ns = result.acked_ns
            for stage, ms in job.stages_ms.items():
                if stage not in ("total", "decided"):
                    self.metrics.stage_latency.labels(stage).observe(ms)
                    self.stats.stage(stage, ms)
        else:
            self.metrics.deadline_misses.labels(cam, result.outcome.value).inc()
            self.stats.record_miss(cam, result.outcome.value)
            self._miss_log.note(
                f"{result.outcome.value}/{reason_name}",
                camera=cam,
                part=job.frame.part_id,
                verdict=verdict.name,
                detail=result.detail,
            )
        if self.sink is not None:
            self._emit(job, verdict, reason_name, decided_ns, result, model)
        if self.observers:
            part = DecidedPart(
                job.frame, verdict, reason_name, job.decision, job.recipe,
                model.model_id if model else "none",
                job.stages_ms.get("total"),
                job.canary,
                job.event_id,
            )
            for observe in self.observers:
                try:
                    observe(part)
                except Exception:  # an observer's bug must never cost a frame
                    log.exception("observer_failed", observer=getattr(observe, "__name__", "?"))

    def _emit(
        self,
        job: Job,
        verdict: Verdict,
        reason_name: str,
        decided_ns: int,
        result: WriteResult,
        model: PoolModel | None,
    ) -> None:
        frame = job.frame
        wall0, mono0 = frame.captured_wall_ns, frame.captured_ns
        counted: Sequence[Detection] = job.decision.counted if job.decision else ()
        event = PartEvent(
            event_id=new_event_id(wall0),
            line=self.line,
            camera=frame.camera_id,
            part_id=frame.part_id,
            sequence=job.sequence,
            frame_id=frame.frame_id,
            captured_at=rfc3339(wall0),
            decided_at=rfc3339(wall0 + decided_ns - mono0),
            plc_acked_at=rfc3339(wall0 + result.acked_ns - mono0) if result.acked_ns else None,
            verdict=verdict.name,
            reason=reason_name
            if verdict is Verdict.FAILSAFE_REJECT
            else (job.decision.reason if job.decision else "none"),
            model_id=model.model_id if model else "none",
            model_digest=model.digest if model else None,
            recipe=job.recipe,
            detections=[detection_dict(d) for d in counted],
            latency_ms={k: round(v, 3) for k, v in job.stages_ms.items()},
            plc_outcome=result.outcome.value,
            canary=job.canary,
        )
        job.event_id = event.event_id
        assert self.sink is not None
        if result.outcome is WriteOutcome.UNKNOWN and job.sequence is not None:
            self._unknown[(job.slot, job.sequence)] = event.event_id
            while len(self._unknown) > 1024:
                self._unknown.popitem(last=False)
        image = frame.image if frame.frame_id >= 0 and not frame.problem else None
        try:
            accepted = self.sink.submit(event, image)
        except Exception as exc:
            log.error("spool_submit_raised", error=repr(exc))
            accepted = False
        if not accepted:
            self.metrics.spool_rejected.inc()
            self.stats.spool_rejected += 1


def sampled(key: str, fraction: float) -> bool:
    """Deterministic per key (a part): restarts and replays pick the same parts, no RNG state."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def detection_dict(d: Detection) -> dict[str, object]:
    return {
        "class": d.class_name,
        "score": round(d.score, 4),
        "box": [round(v, 1) for v in d.box],
        "area_px": d.area_px,
        "outline": [list(p) for p in d.outline[:64]],
    }


def rfc3339(wall_ns: int) -> str:
    secs, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1000:06d}Z"
