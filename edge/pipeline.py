"""The per-frame critical path: queue -> preprocess/infer/postprocess/decide -> PLC write -> spool.

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
CPU-heavy work (pre/post-processing, inference, the decision over masks) runs in a thread pool;
the loop only moves small objects around, so the guard timers fire on time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from camera.frame import Frame
from edge.decision import Decision
from edge.inference import BatchRunner
from edge.metrics import Metrics
from edge.plcqueue import DeadlineOrderedLink
from edge.stats import RunStats
from models.types import Detection, ModelInfo
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
    queue_size: int = Field(default=32, ge=1)
    max_batch: int = Field(default=4, ge=1)
    """Frames (from any camera) that may share one inference batch."""
    workers: int = Field(default=1, ge=1, le=16)
    """Inference threads; each runs whole batches."""
    admission_control: bool = True
    """Fail-safe at once a frame whose predicted completion is past its deadline."""
    model_hang_s: float = Field(default=2.0, gt=0)
    """An inference call running this long marks the model down (alarm) until it returns."""
    model_error_threshold: int = Field(default=3, ge=1)
    """Consecutive inference errors that mark the model down."""
    isolation: Literal["process", "thread"] = "process"
    """Inference in worker processes (a hung model is killed and respawned, and decode never
    competes with the deadline timers for the GIL) or in threads of the daemon."""
    masks: bool = True
    """Decode per-instance masks (area inside the ROI, outlines in events)."""

    def model_post_init(self, _context: object) -> None:
        if self.failsafe_reserve_ms >= self.budget_ms:
            raise ValueError("failsafe_reserve_ms must be smaller than budget_ms")


class EventSink(Protocol):
    """Where decided parts go after the PLC write (the durable spool). Must never block."""

    def submit(self, event: PartEvent, image: np.ndarray | None) -> bool: ...


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
    state: JobState = JobState.QUEUED
    claimed: bool = False
    sequence: int = 0
    guard: asyncio.TimerHandle | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    decision: Decision | None = None


class ModelHolder:
    """The loaded model: one batch runner per inference worker, swapped atomically on reload."""

    def __init__(
        self, runners: Sequence[BatchRunner], info: ModelInfo | None, plc_model_id: int
    ) -> None:
        self.runners = list(runners)
        self.info = info
        self.plc_model_id = plc_model_id

    @property
    def available(self) -> bool:
        return bool(self.runners)

    @property
    def model_id(self) -> str:
        return self.info.model_id if self.info else "none"

    def close(self) -> None:
        for runner in {id(r): r for r in self.runners}.values():
            with contextlib.suppress(Exception):
                runner.close()

    @classmethod
    def empty(cls) -> ModelHolder:
        return cls([], None, 0)


class Pipeline:
    """Owns the frames from admission to the PLC acknowledgement.

    ``plc`` is the daemon's DeadlineOrderedLink (it orders requests and assigns sequence numbers).
    """

    def __init__(
        self,
        settings: PipelineSettings,
        line: str,
        model: ModelHolder,
        plc: DeadlineOrderedLink,
        sink: EventSink | None,
        metrics: Metrics,
        stats: RunStats,
        camera_slots: dict[str, int],
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.settings = settings
        self.line = line
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
        self._queue_ready = asyncio.Event()
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="infer")
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[Job] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._service_ns = 0.0
        """EWMA of one batch's service time, for admission control."""
        self._busy_since: dict[int, int] = {}
        self._consecutive_errors = 0
        self.model_up = model.available
        self.last_failsafe_ns = 0
        self._accepting = True

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.settings.workers):
            self._workers.append(asyncio.create_task(self._worker(i), name=f"infer-worker-{i}"))

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
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        for t in list(self._tasks):
            t.cancel()
        # A hung inference thread cannot be interrupted; don't wait for it on shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def model_busy_for_s(self) -> float:
        """Longest time an inference call has been running (0 if none): the hang detector."""
        if not self._busy_since:
            return 0.0
        return (self._clock_ns() - min(self._busy_since.values())) / 1e9

    # ---- admission (event loop) ----------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """Accept one frame; called on the loop for every frame a camera delivers."""
        now = self._clock_ns()
        slot = self.camera_slots[frame.camera_id]
        job = Job(frame, slot, frame.captured_ns + self._budget_ns, now)
        self.metrics.frames.labels(frame.camera_id).inc()
        self.stats.frames += 1
        self._track(job)
        if not self._accepting:
            self._spawn(self._finish_failsafe(job, FailsafeReason.SHUTDOWN))
            return
        if job.deadline_ns - now <= self._reserve_ns:
            self._spawn(self._finish_failsafe(job, FailsafeReason.LATE_ARRIVAL))
            return
        if not self.model_up or not self.model.available:
            self._spawn(self._finish_failsafe(job, FailsafeReason.MODEL_DOWN))
            return
        if len(self._queue) >= self.settings.queue_size:
            self._spawn(self._finish_failsafe(job, FailsafeReason.QUEUE_FULL))
            return
        if self.settings.admission_control and self._predicted_done_ns(now) > (
            job.deadline_ns - self._reserve_ns
        ):
            self._spawn(self._finish_failsafe(job, FailsafeReason.OVERLOAD))
            return
        loop = asyncio.get_running_loop()
        fire_at = (job.deadline_ns - self._reserve_ns) / 1e9
        job.guard = loop.call_at(fire_at, self._guard_fired, job)
        self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._queue_ready.set()

    def _predicted_done_ns(self, now: int) -> float:
        """When a frame enqueued now would be decided, from the measured batch service time."""
        if self._service_ns <= 0:
            return now
        batches_ahead = len(self._queue) // self.settings.max_batch + 1
        rounds = -(-batches_ahead // self.settings.workers)
        return now + rounds * self._service_ns

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
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._spawn(self._finish_failsafe(job, reason))

    # ---- inference workers ---------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._queue_ready.clear()
                await self._queue_ready.wait()
            batch: list[Job] = []
            while self._queue and len(batch) < self.settings.max_batch:
                job = self._queue.popleft()
                if not job.claimed:
                    job.state = JobState.INFERRING
                    batch.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            if not batch:
                continue
            holder = self.model
            if not holder.available:
                for job in batch:
                    self._spawn(self._finish_failsafe(job, FailsafeReason.MODEL_DOWN))
                continue
            start = self._clock_ns()
            for job in batch:
                job.stages_ms["queue"] = (start - job.received_ns) / _MS
            self._busy_since[index] = start
            try:
                runner = holder.runners[index % len(holder.runners)]
                out = await loop.run_in_executor(
                    self._executor, runner.run, [j.frame for j in batch], self.settings.masks
                )
            except Exception as exc:
                self._on_model_error(exc)
                for job in batch:
                    self._spawn(self._finish_failsafe(job, FailsafeReason.MODEL_ERROR))
                continue
            finally:
                self._busy_since.pop(index, None)
            elapsed = self._clock_ns() - start
            self._service_ns = (
                elapsed if self._service_ns <= 0 else 0.8 * self._service_ns + 0.2 * elapsed
            )
            self._consecutive_errors = 0
            if not self.model_up:
                log.info("model_up", model=holder.model_id)
            self.model_up = True
            self.metrics.batch_size.observe(len(batch))
            for job, decision in zip(batch, out.decisions, strict=True):
                job.stages_ms.update(out.stages_ms)
                job.decision = decision
                if job.claimed:
                    self.metrics.late_results.labels(job.frame.camera_id).inc()
                    self.stats.late_results += 1
                    continue
                self._spawn(self._finish(job, decision.verdict, FailsafeReason.NONE, holder))

    def _on_model_error(self, exc: BaseException) -> None:
        self._consecutive_errors += 1
        log.error("inference_failed", error=repr(exc), consecutive=self._consecutive_errors)
        if self._consecutive_errors >= self.settings.model_error_threshold and self.model_up:
            self.model_up = False
            log.error("model_down", reason="consecutive inference errors")

    def mark_model_up(self) -> None:
        """After a successful reload: accept frames for inference again."""
        self._consecutive_errors = 0
        self.model_up = self.model.available

    def kill_hung(self, busy_s: float) -> int:
        """Kill the worker processes busy for longer than `busy_s`; they respawn on next use."""
        now = self._clock_ns()
        killed = 0
        runners = self.model.runners
        for index, since in list(self._busy_since.items()):
            if runners and (now - since) / 1e9 > busy_s:
                killed += runners[index % len(runners)].kill()
        return killed

    # ---- finishing: claim, write, account ----------------------------------------------------

    async def _finish_failsafe(self, job: Job, reason: FailsafeReason) -> None:
        await self._finish(job, Verdict.FAILSAFE_REJECT, reason, self.model)

    async def _finish(
        self, job: Job, verdict: Verdict, reason: FailsafeReason, holder: ModelHolder
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
            record = self._record(job, verdict, reason, decided_ns, holder)
            result = await self._write(record, write_deadline)
            if not failsafe and result.outcome in (WriteOutcome.FAILED, WriteOutcome.DROPPED_LATE):
                # The real verdict did not reach the PLC and definitely was not applied: use the
                # reserve for the fail-safe (it goes out under the same, unconsumed, sequence).
                verdict, reason = Verdict.FAILSAFE_REJECT, FailsafeReason.PLC_RETRY
                record = self._record(job, verdict, reason, decided_ns, holder)
                result = await self._write(record, job.deadline_ns)
            job.sequence = result.sequence or 0
            self._account(job, verdict, reason, decided_ns, result, holder)
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
        holder: ModelHolder,
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
            model_id=holder.plc_model_id & 0xFFFF,
            reason=int(reason),
        )

    def _account(
        self,
        job: Job,
        verdict: Verdict,
        reason: FailsafeReason,
        decided_ns: int,
        result: WriteResult,
        holder: ModelHolder,
    ) -> None:
        cam = job.frame.camera_id
        reason_name = reason.name.lower() if reason else "none"
        if verdict is Verdict.FAILSAFE_REJECT:
            self.metrics.failsafes.labels(cam, reason_name).inc()
            self.stats.failsafes[reason_name] += 1
            self.last_failsafe_ns = decided_ns
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
            for stage, ms in job.stages_ms.items():
                if stage not in ("total", "decided"):
                    self.metrics.stage_latency.labels(stage).observe(ms)
                    self.stats.stage(stage, ms)
        else:
            self.metrics.deadline_misses.labels(cam, result.outcome.value).inc()
            self.stats.record_miss(cam, result.outcome.value)
            log.warning(
                "deadline_miss",
                camera=cam,
                frame=job.frame.frame_id,
                part=job.frame.part_id,
                verdict=verdict.name,
                reason=reason_name,
                outcome=result.outcome.value,
                detail=result.detail,
            )
        if self.sink is not None:
            self._emit(job, verdict, reason_name, decided_ns, result, holder)

    def _emit(
        self,
        job: Job,
        verdict: Verdict,
        reason_name: str,
        decided_ns: int,
        result: WriteResult,
        holder: ModelHolder,
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
            captured_at=_rfc3339(wall0),
            decided_at=_rfc3339(wall0 + decided_ns - mono0),
            plc_acked_at=_rfc3339(wall0 + result.acked_ns - mono0) if result.acked_ns else None,
            verdict=verdict.name,
            reason=reason_name
            if verdict is Verdict.FAILSAFE_REJECT
            else (job.decision.reason if job.decision else "none"),
            model_id=holder.model_id,
            detections=[_detection_dict(d) for d in counted],
            latency_ms={k: round(v, 3) for k, v in job.stages_ms.items()},
            plc_outcome=result.outcome.value,
        )
        assert self.sink is not None
        try:
            accepted = self.sink.submit(event, frame.image)
        except Exception as exc:
            log.error("spool_submit_raised", error=repr(exc))
            accepted = False
        if not accepted:
            self.metrics.spool_rejected.inc()
            self.stats.spool_rejected += 1


def _detection_dict(d: Detection) -> dict[str, object]:
    return {
        "class": d.class_name,
        "score": round(d.score, 4),
        "box": [round(v, 1) for v in d.box],
        "area_px": d.area_px,
        "outline": [list(p) for p in d.outline[:64]],
    }


def _rfc3339(wall_ns: int) -> str:
    secs, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1000:06d}Z"
