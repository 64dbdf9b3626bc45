"""A model's inference workers: dispatch, service-time estimate, breaker, respawn, hang killing.

Everything that can turn a transient fault into a permanent line stop is decided here, so it is
decided once:

* **Respawn outside the batch path**: a dead worker (crash, or killed because it hung) is
  replaced in the background after a backoff (doubling, capped, reset once it has served a while;
  a restart budget per window makes a crash loop visible). The time a respawn takes is never
  counted as service time.
* **Service time from the workers' own clocks**: each batch reports how long it computed; the
  estimate is the median per-frame time of the recent window (an outlier frame cannot drag it, and
  samples older than the window are forgotten, so the estimate decays with time). An idle worker
  always takes a frame (a probe): the estimate can never lock admission shut.
* **A breaker for a failing model**: after `error_threshold` consecutive failed batches the model
  is marked down and frames are fail-safed without inference; after a backoff one probe batch
  is let through (half-open); success closes the breaker, failure reopens it for longer.
* **Hang killing by identity**: each batch has its own timer bound to the worker that runs it, so
  after a model swap the killer can never hit another pool's process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from edge.inference import BatchItem, BatchOutput, StatsItem, Worker
from models.types import ModelError, ModelInfo

log = structlog.get_logger(__name__)

WorkerFactory = Callable[[str, Callable[[Worker, str], None], int], Worker]
"""(worker name, on_death, nice) -> a not yet started Worker."""

_ESTIMATE_WINDOW_S = 10.0
_ESTIMATE_SAMPLES = 64
_RESPAWN_MIN_S = 0.25
_RESPAWN_MAX_S = 30.0
_HEALTHY_RESET_S = 10.0
"""A worker that decided batches and lived this long was not crash-looping: its death resets the
respawn backoff (60 s here let a hang and a kill a minute apart double it each time: 8 s
without real verdicts after the sixth fault of a soak)."""
_BREAKER_MIN_S = 1.0
_BREAKER_MAX_S = 30.0
RESTART_WINDOW_S = 300.0
CANDIDATE_NICE = 10
"""A model loading beside the running one does so at low CPU priority (its session build and
warm-up must not take the cores the active workers decide parts on); it is reniced to 0 when it
starts deciding parts."""


@dataclass(frozen=True, slots=True)
class PoolModel:
    """What a pool runs, as the rest of the daemon names it."""

    info: ModelInfo
    plc_model_id: int
    digest: str = ""

    @property
    def model_id(self) -> str:
        return self.info.model_id


class InferencePool:
    def __init__(
        self,
        name: str,
        factory: WorkerFactory,
        *,
        workers: int,
        depth: int,
        hang_s: float,
        error_threshold: int,
        load_timeout_s: float = 120.0,
        on_capacity: Callable[[], None] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        """CPU niceness of this pool's workers (respawns included)."""
        self._factory = factory
        self.size = workers
        self.depth = depth
        self.hang_s = hang_s
        self.error_threshold = error_threshold
        self.load_timeout_s = load_timeout_s
        self.on_capacity = on_capacity or (lambda: None)
        self.on_stats: Callable[[list[StatsItem]], None] = lambda _items: None
        """Drift statistics of finished batches (set by the pipeline)."""
        self._clock_ns = clock_ns
        self.workers: list[Worker | None] = [None] * workers
        self.info: ModelInfo | None = None
        self._samples: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=_ESTIMATE_SAMPLES
        )
        self._busy_since: dict[int, int] = {}
        self._batch_ids = 0
        self._backoff_s = [_RESPAWN_MIN_S] * workers
        self._started_ns = [0] * workers
        self._served = [False] * workers
        """The worker in this slot finished a batch since it started."""
        self._respawn_handles: dict[int, asyncio.Handle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.restarts: collections.deque[float] = collections.deque(maxlen=1000)
        self.last_error = ""
        self._consecutive_errors = 0
        self._breaker_open_until = 0
        self._breaker_backoff_s = _BREAKER_MIN_S
        self._probe_inflight = False
        self.breaker_open = False
        self._closing = False
        self.batches_ok = 0
        self.batches_failed = 0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> ModelInfo:
        """Start every worker; returns once one is ready. ModelError if none could load."""
        results = await asyncio.gather(
            *(self._start_one(i) for i in range(self.size)), return_exceptions=True
        )
        infos = [r for r in results if isinstance(r, ModelInfo)]
        if not infos:
            errors = [r for r in results if isinstance(r, BaseException)]
            raise ModelError(str(errors[0]) if errors else "no inference worker started")
        self.info = infos[0]
        return self.info

    async def _start_one(self, index: int) -> ModelInfo:
        name = f"{self.name}-{index}"
        worker = self._factory(name, self._worker_died, self.nice)
        worker.on_stats = lambda items: self.on_stats(items)
        self.workers[index] = worker
        try:
            info = await worker.start(self.load_timeout_s)
        except Exception as exc:
            self.last_error = f"{name}: {exc}"
            log.error("inference_worker_start_failed", worker=name, error=str(exc))
            self._schedule_respawn(index)
            raise
        self._started_ns[index] = self._clock_ns()
        self._served[index] = False
        self.on_capacity()
        return info

    def _worker_died(self, worker: Worker, why: str) -> None:
        index = next((i for i, w in enumerate(self.workers) if w is worker), None)
        if index is None or self._closing:
            return
        self.last_error = f"{worker.name}: {why}"
        log.warning("inference_worker_died", worker=worker.name, reason=why)
        self._busy_since = {k: v for k, v in self._busy_since.items() if k >> 20 != index}
        self._schedule_respawn(index)

    def _schedule_respawn(self, index: int) -> None:
        if self._closing or index in self._respawn_handles:
            return
        served_s = (self._clock_ns() - self._started_ns[index]) / 1e9
        if self._served[index] and served_s > _HEALTHY_RESET_S:
            self._backoff_s[index] = _RESPAWN_MIN_S
        delay = self._backoff_s[index]
        self._backoff_s[index] = min(delay * 2, _RESPAWN_MAX_S)
        loop = asyncio.get_running_loop()
        self._respawn_handles[index] = loop.call_later(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        self._respawn_handles.pop(index, None)
        if self._closing:
            return
        self.restarts.append(time.monotonic())
        log.warning("inference_process_respawn", pool=self.name, worker=index,
                    restarts_in_window=self.restarts_in_window())
        task = asyncio.ensure_future(self._respawn_task(index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn_task(self, index: int) -> None:
        old = self.workers[index]
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(0.5)
        with contextlib.suppress(Exception):  # failures are logged and rescheduled
            info = await self._start_one(index)
            if self.info is None:
                self.info = info

    def renice(self, nice: int) -> None:
        """A candidate loaded at low priority becomes the one that serves parts."""
        self.nice = nice
        for w in self.workers:
            if w is not None:
                w.renice(nice)

    def restarts_in_window(self) -> int:
        cutoff = time.monotonic() - RESTART_WINDOW_S
        return sum(1 for t in self.restarts if t >= cutoff)

    def stop_respawning(self) -> None:
        """The daemon is stopping: a worker that dies now is not replaced."""
        self._closing = True
        for handle in self._respawn_handles.values():
            handle.cancel()
        self._respawn_handles.clear()

    async def close(self, drain_s: float = 2.0) -> None:
        """Let running batches finish (bounded), then stop every worker."""
        end = time.monotonic() + drain_s
        while self.inflight and time.monotonic() < end:  # noqa: ASYNC110 - bounded drain
            await asyncio.sleep(0.01)
        self._closing = True
        for handle in self._respawn_handles.values():
            handle.cancel()
        self._respawn_handles.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *(w.close() for w in self.workers if w is not None), return_exceptions=True
        )

    # ---- state -----------------------------------------------------------------------------

    @property
    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers if w is not None and w.ready]

    @property
    def inflight(self) -> int:
        return sum(w.inflight for w in self.workers if w is not None)

    @property
    def up(self) -> bool:
        """Able to infer now: a ready worker and the breaker not open."""
        return bool(self.ready_workers) and not self.breaker_open

    def busy_for_s(self) -> float:
        if not self._busy_since:
            return 0.0
        return (self._clock_ns() - min(self._busy_since.values())) / 1e9

    def per_frame_ns(self) -> float:
        """Median per-frame compute time over the recent window (0 when unknown)."""
        cutoff = self._clock_ns() - int(_ESTIMATE_WINDOW_S * 1e9)
        recent = [v for t, v in self._samples if t >= cutoff]
        return statistics.median(recent) if recent else 0.0

    def health(self) -> dict[str, object]:
        return {
            "model": self.info.model_id if self.info else None,
            "workers": self.size,
            "ready": len(self.ready_workers),
            "pids": [w.pid for w in self.workers if w is not None and w.pid],
            "restarts_in_window": self.restarts_in_window(),
            "breaker": "open" if self.breaker_open else "closed",
            "per_frame_ms": round(self.per_frame_ns() / 1e6, 3),
            "last_error": self.last_error,
        }

    # ---- admission and dispatch ------------------------------------------------------------

    def admits(self) -> bool:
        """Whether a frame may be sent to inference at all (breaker closed, or a probe slot)."""
        if not self.breaker_open:
            return bool(self.ready_workers)
        if self._clock_ns() < self._breaker_open_until or self._probe_inflight:
            return False
        return bool(self.ready_workers)

    def has_capacity(self) -> bool:
        if self.breaker_open and (
            self._probe_inflight or self._clock_ns() < self._breaker_open_until
        ):
            return False
        return any(w.inflight < self.depth for w in self.ready_workers)

    def idle(self) -> bool:
        """A ready worker with nothing to do: a frame sent now starts at once (a probe)."""
        return any(w.inflight == 0 for w in self.ready_workers)

    def submit(self, items: Sequence[BatchItem], masks: bool) -> asyncio.Future[BatchOutput]:
        """Send one batch to the least-loaded ready worker (call only when has_capacity())."""
        candidates = [w for w in self.ready_workers if w.inflight < self.depth]
        if not candidates:
            raise ModelError("no inference worker has capacity")
        worker = min(candidates, key=lambda w: w.inflight)
        index = self.workers.index(worker)
        probe = self.breaker_open
        if probe:
            self._probe_inflight = True
        self._batch_ids += 1
        key = (index << 20) | (self._batch_ids & 0xFFFFF)
        start = self._clock_ns()
        self._busy_since[key] = start
        fut = worker.send(items, masks)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.hang_s, self._hang_check, worker, fut)
        n = len(items)

        def done(f: asyncio.Future[BatchOutput]) -> None:
            timer.cancel()
            self._busy_since.pop(key, None)
            if probe:
                self._probe_inflight = False
            if f.cancelled() or f.exception() is not None:
                exc = f.exception() if not f.cancelled() else None
                self._batch_failed(str(exc) if exc else "cancelled")
            else:
                out = f.result()
                if self.workers[index] is worker:
                    self._served[index] = True
                self._samples.append((self._clock_ns(), out.compute_ns / max(n, 1)))
                self._batch_ok()
            self.on_capacity()

        fut.add_done_callback(done)
        return fut

    def _hang_check(self, worker: Worker, fut: asyncio.Future[BatchOutput]) -> None:
        if fut.done():
            return
        reason = f"batch running for more than {self.hang_s:g}s (hung)"
        if not worker.kill(reason):
            self.last_error = f"{worker.name}: {reason}; cannot be killed (thread isolation)"
            log.error("inference_hung", worker=worker.name, reason=reason)

    def _batch_ok(self) -> None:
        self.batches_ok += 1
        self._consecutive_errors = 0
        if self.breaker_open:
            self.breaker_open = False
            self._breaker_backoff_s = _BREAKER_MIN_S
            log.info("model_up", pool=self.name, model=self.info.model_id if self.info else None)

    def _batch_failed(self, why: str) -> None:
        self.batches_failed += 1
        self._consecutive_errors += 1
        self.last_error = why
        log.error("inference_failed", pool=self.name, error=why,
                  consecutive=self._consecutive_errors)
        if self.breaker_open or self._consecutive_errors >= self.error_threshold:
            if not self.breaker_open:
                log.error("model_down", pool=self.name, reason="consecutive inference errors",
                          retry_in_s=self._breaker_backoff_s)
            else:
                self._breaker_backoff_s = min(self._breaker_backoff_s * 2, _BREAKER_MAX_S)
            self.breaker_open = True
            self._breaker_open_until = self._clock_ns() + int(self._breaker_backoff_s * 1e9)
            asyncio.get_running_loop().call_later(self._breaker_backoff_s, self.on_capacity)
