"""The daemon: wires the components from a LineConfig and runs them until told to stop.

Start order: PLC first (so every later fault can be signalled), then model, spool, pipeline, and
cameras last (no frame arrives before something can decide it). Stop order is the reverse: cameras
stop, in-flight frames drain to the PLC, then the spool is flushed.
Nothing a component does at run time may take the process down: faults become health states, PLC
alarm bits and fail-safe verdicts. Only a broken config at start-up stops the daemon (exit 2).
Every long-lived task runs under the supervisor (edge/supervisor.py); /healthz and the systemd
watchdog tell the truth about them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from camera.config import TriggeredMode
from camera.frame import Frame
from camera.worker import CameraWorker
from edge import gcpause, malloc
from edge.config import ConfigError, LineConfig, load_config
from edge.control import ControlError, ControlServer
from edge.cpulatency import CpuLatencyHint
from edge.decision import DecisionSettings
from edge.http import ObservabilityServer
from edge.inference import ProcessWorker, ThreadWorker, Worker
from edge.lifecycle import ModelManager
from edge.logs import configure_logging
from edge.metrics import Metrics, Sample, SnapshotCollector
from edge.operator import OperatorView
from edge.pipeline import Pipeline
from edge.plcinputs import PlcInputWatcher
from edge.plcqueue import DeadlineOrderedLink
from edge.pool import CANDIDATE_NICE, InferencePool, PoolModel
from edge.recipes import RecipeBook, build_rules
from edge.stats import RunStats
from edge.supervisor import Supervisor
from edge.systemd import Notifier
from models.config import ModelSettings
from models.drift import (
    DRIFT_METRICS,
    CameraDrift,
    DriftWatch,
    FrameSampler,
    FrameStats,
    load_package_baseline,
)
from models.loader import load_detector
from models.package import ModelPackage, verify_package
from plc.config import ModbusSettings
from plc.factory import create_link, simulated_settings
from plc.record import Alarm, WriteOutcome
from plc.sim import ModbusPlcSimulator
from uplink.forwarder import Forwarder
from uplink.spool import Spool

log = structlog.get_logger(__name__)


GIL_SWITCH_INTERVAL_S = 0.0005
HEARTBEAT_FLOOR_MS = 50.0
"""The shortest heartbeat period honoured: a status write must fit in it with room for records
(a 10 ms period starved the heartbeat for seconds under load)."""
HEAP_TRIM_PERIOD_S = 60.0
_LIVE_SECTIONS = frozenset({"model", "decision", "status", "logging"})
"""Config sections a SIGHUP applies live; a change anywhere else is logged as needing a restart."""

_early_signals: list[str] = []


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); systemd restarts on anything but OK and 2."""

    OK = 0
    INTERNAL_ERROR = 1
    CONFIG_ERROR = 2
    STARTUP_FAILED = 3
    DRAIN_TIMEOUT = 4


def install_early_signal_handlers() -> None:
    """Until the loop takes over, remember SIGHUP/SIGTERM instead of dying on them (a reload
    sent while the daemon is still loading must not kill it with exit 129)."""

    def remember(signum: int, _frame: object) -> None:
        _early_signals.append(signal.Signals(signum).name)

    for sig in (signal.SIGHUP, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread (tests)
            signal.signal(sig, remember)


@dataclass
class ComponentState:
    up: bool = False
    detail: str = "starting"
    since: float = field(default_factory=time.time)

    def set(self, up: bool, detail: str) -> bool:
        changed = up != self.up or detail != self.detail
        if changed:
            self.up, self.detail, self.since = up, detail, time.time()
        return changed


@dataclass
class ActiveModel:
    pool: InferencePool
    model: PoolModel
    package: ModelPackage
    settings: ModelSettings
    """The model settings it runs with (model.package = this package)."""


class Daemon:
    def __init__(self, config: LineConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.stats = RunStats()
        self.notifier = Notifier()
        self.supervisor = Supervisor()
        self.components: dict[str, ComponentState] = {}
        self.plc_sim: ModbusPlcSimulator | None = None
        self.plc: DeadlineOrderedLink | None = None
        self.spool: Spool | None = None
        self.forwarder: Forwarder | None = None
        self.pipeline: Pipeline | None = None
        self.active: ActiveModel | None = None
        self.http: ObservabilityServer | None = None
        self.workers: dict[str, CameraWorker] = {}
        self.recipes = RecipeBook(config.recipes, config.state_path() / "recipe.json")
        self.inputs: PlcInputWatcher | None = None
        self.models: ModelManager | None = None
        self.view: OperatorView | None = None
        self.cpu_latency = CpuLatencyHint(config.pipeline.cpu_latency_us)
        self.drift: DriftWatch | None = None
        self.drift_state: dict[str, CameraDrift] = {}
        """Cached by the housekeeping task; read by /healthz, /metrics and the alarm word."""
        self._drift_observed: collections.Counter[str] = collections.Counter()
        self._drift_evaluated: dict[str, int] = {}
        """Frames observed per camera, and how many of them the last evaluation had seen."""
        self.control: ControlServer | None = None
        self.heartbeat = 0
        self.alarms = Alarm(0)
        self._plc_recovered_ns = 0
        """When the PLC link last came back after an outage (PLC_RECOVERED alarm, held)."""
        self.spool_stats: dict[str, Any] = {}
        """Cached by the housekeeping task (spool stats query the DB: never on the loop)."""
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.monotonic()
        self.exit_reason = "not started"
        self._status_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.ready_hooks: list[Callable[[Daemon], None]] = []
        """Called once everything runs, before READY=1 (the bench attaches its load here)."""
        self.metrics.registry.register(SnapshotCollector(self._snapshot_metrics))
        self._gc_pauses = gcpause.GcPauses(self._gc_paused)

    # ---- public --------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self.exit_reason = reason
            self._stop.set()

    async def run(self, duration_s: float | None = None, status_line: bool = False) -> ExitCode:
        self._loop = asyncio.get_running_loop()
        # The loop shares the GIL with the capture, spool and PLC-simulator threads; CPython
        # hands it over every 5 ms by default, which would let one busy thread delay a deadline
        # timer by that much. Hand it over more often (a little throughput for latency).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._install_signals()
        try:
            await self._start()
        except Exception as exc:
            log.exception("startup_failed", error=repr(exc))
            await self._shutdown()
            return ExitCode.STARTUP_FAILED
        if duration_s is not None:
            self._loop.call_later(duration_s, self.request_stop, f"duration {duration_s:g}s")
        if status_line:
            self._status_task = asyncio.create_task(self._status_line())
        for hook in self.ready_hooks:
            hook(self)
        self.notifier.ready(self._status_text())
        log.info(
            "daemon_ready",
            line=self.config.line,
            cameras=list(self.workers),
            http_port=self.http.port if self.http else None,
        )
        while not self._stop.is_set():
            reload_wait = asyncio.create_task(self._reload.wait())
            stop_wait = asyncio.create_task(self._stop.wait())
            await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            reload_wait.cancel()
            stop_wait.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                try:
                    await self.reload()
                except Exception:  # a reload must never take the line down
                    log.exception("reload_failed", kept="previous config")
        drained = await self._shutdown()
        return ExitCode.OK if drained else ExitCode.DRAIN_TIMEOUT

    # ---- start ---------------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        structlog.contextvars.bind_contextvars(line=cfg.line)  # on every log line (ELK/Loki)
        self.cpu_latency.start()
        for name in ["plc", "model", "verdicts", "spool", *(f"camera:{c.id}" for c in cfg.cameras)]:
            self.components[name] = ComponentState()

        slots = {c.id: c.plc_slot for c in cfg.cameras}
        n_slots = max(slots.values()) + 1
        plc_settings = cfg.plc
        if isinstance(plc_settings, ModbusSettings) and plc_settings.simulator:
            self.plc_sim = ModbusPlcSimulator(plc_settings, camera_slots=n_slots)
            port = await loop.run_in_executor(None, self.plc_sim.start)
            plc_settings = simulated_settings(plc_settings, port)
            log.info("plc_simulator_started", host=plc_settings.host, port=port)
        self.plc = DeadlineOrderedLink(
            create_link(plc_settings, camera_slots=n_slots), on_state=self._plc_state
        )
        await self.plc.start(serve=False)
        self.supervisor.spawn("plc-queue", self.plc.serve)
        # Give the PLC a moment before frames flow; one that stays away is an alarm, not a reason
        # to keep the line blind (its own watchdog rejects parts while we are absent).
        if not await self.plc.wait_connected(cfg.status.plc_startup_wait_s):
            log.error("plc_not_connected_at_start", waited_s=cfg.status.plc_startup_wait_s)

        self.models = ModelManager(self, cfg.lifecycle)
        package = await loop.run_in_executor(None, self.models.startup_package)
        self.active = await self.start_model(
            cfg.model.model_copy(update={"package": package}), cfg.decision, "active"
        )

        self.spool = Spool(cfg.uplink, line=cfg.line)
        try:
            await loop.run_in_executor(None, self.spool.open)
            self._set("spool", True, "open")
            if cfg.uplink.kafka is not None or cfg.uplink.s3 is not None:
                self.forwarder = Forwarder(self.spool)
                await self.forwarder.open_s3()  # before the heap is settled (edge/gcpause.py)
                self.components["uplink"] = ComponentState()
                self.supervisor.spawn("uplink", self.forwarder.run, critical=False)
        except Exception as exc:
            log.error("spool_unavailable", error=repr(exc))
            self._set("spool", False, f"open failed: {exc}")

        self.pipeline = Pipeline(
            cfg.pipeline,
            cfg.line,
            self.active.pool if self.active else None,
            self.active.model if self.active else None,
            self.plc,
            self.spool,
            self.metrics,
            self.stats,
            slots,
        )
        if hasattr(self.plc.link, "on_write_confirmed"):
            self.plc.link.on_write_confirmed = self.pipeline.write_confirmed
        self.pipeline.observers.append(self.models.observe)
        self.view = OperatorView(cfg.line, budget_ms=cfg.pipeline.budget_ms)
        self.pipeline.observers.append(self.view.observe)
        if cfg.drift.enabled and self.active is not None:
            settings = self.active.settings
            self.drift = DriftWatch(
                cfg.drift,
                self.active.package.manifest.classes,
                await loop.run_in_executor(None, load_package_baseline, settings.package),
                score_floor=settings.conf_threshold,
            )
            self.pipeline.stats_sink = self._drift_observe
            self.pipeline.stats_due = FrameSampler(cfg.drift.sample_hz).due

        if cfg.observability.enabled:
            obs = cfg.observability
            try:
                self.http = ObservabilityServer(
                    obs.host, obs.port, self.metrics.registry, self.health, view=self.view
                )
                self.http.start()
            except OSError as exc:  # a busy port costs the metrics, never the line
                log.error(
                    "observability_unavailable",
                    host=obs.host,
                    port=obs.port,
                    error=str(exc),
                    fix="choose another observability.port",
                )

        hb_s = self._heartbeat_period_s()
        self.supervisor.spawn("heartbeat", self._heartbeat_loop, stale_after_s=max(2.0, 10 * hb_s))
        self.supervisor.spawn("housekeeping", self._housekeeping_loop, stale_after_s=10.0)
        self.supervisor.spawn("loop-lag", self._loop_lag_probe, critical=False)

        for cam in cfg.cameras:
            self.workers[cam.id] = CameraWorker.from_settings(
                cam,
                on_frame=self._frame_from_thread,
                on_state=self._camera_state_from_thread,
                on_trigger_lost=self._trigger_lost_from_thread,
            )
        self._start_plc_inputs()
        if cfg.control.enabled:
            self.control = ControlServer(
                cfg.control_socket(), self._control_handlers(), cfg.control.group
            )
            try:
                await self.control.start()
            except OSError as exc:  # the line runs without remote control rather than not at all
                log.error("control_socket_unavailable", path=str(cfg.control_socket()),
                          error=str(exc))
                self.control = None
        # Everything the line serves with is loaded: freeze it out of the collector's reach before
        # frames flow, so no full collection can stall a deadline guard for ~60 ms later.
        log.info("heap_settled", frozen_objects=gcpause.settle())
        self._gc_pauses.install()  # from here on, a collection is a pause of the running line
        for worker in self.workers.values():
            worker.start()

    def _gc_paused(self, generation: int, ms: float) -> None:
        self.metrics.gc_pause.labels(str(generation)).observe(ms)
        self.stats.gc_pause_ms[generation].add(ms)

    def _start_plc_inputs(self) -> None:
        """The PLC input watcher, when a camera is PLC-triggered, a part id comes from the PLC,
        the PLC selects the recipe, or results are acknowledged."""
        cfg = self.config
        assert self.plc is not None and self.pipeline is not None
        slots: dict[int, tuple[str, CameraWorker | None, bool]] = {}
        for cam in cfg.cameras:
            trig = cam.trigger
            plc_triggered = isinstance(trig, TriggeredMode) and trig.source == "plc"
            latch = isinstance(trig, TriggeredMode) and trig.part_id_from_plc
            slots[cam.plc_slot] = (cam.id, self.workers[cam.id] if plc_triggered else None, latch)
        needs_inputs = any(w is not None or latch for _c, w, latch in slots.values())
        watcher = PlcInputWatcher(
            self.plc,
            cfg.plc_inputs,
            self.recipes,
            slots,
            self.pipeline.fail_part,
            int(cfg.pipeline.budget_ms * 1e6),
            int(cfg.pipeline.failsafe_reserve_ms * 1e6),
            read_triggers=needs_inputs,
            read_acks=cfg.plc.results.acknowledged,
            read_timeout_ms=cfg.plc.readback_timeout_ms,
        )
        if watcher.needed:
            self.inputs = watcher
            self.supervisor.spawn("plc-inputs", watcher.run)

    async def start_model(
        self,
        model: ModelSettings,
        decision: DecisionSettings,
        role: str,
        workers: int | None = None,
        nice: int = 0,
    ) -> ActiveModel | None:
        """Verify the package and start its worker pool.

        A pool whose workers cannot load yet keeps retrying in the background (with backoff);
        meanwhile frames are fail-safed MODEL_DOWN. Only a package that does not verify returns
        None (the line then runs on fail-safes until a reload brings a good one).
        """
        loop = asyncio.get_running_loop()
        try:
            package = await loop.run_in_executor(
                None, verify_package, model.package, model.trusted_keys
            )
            by_recipe = build_rules(self.config.recipes, decision, package)
        except Exception as exc:
            log.error("model_load_failed", package=str(model.package), error=str(exc))
            self._set("model", False, f"load failed: {exc}")
            return None
        settings = model
        if settings.conf_threshold is None:
            # Candidates below every decision threshold cannot change a verdict: don't pay
            # for their masks (the cost grows with candidates x frame size).
            lowest = min(r.lowest_score for r in by_recipe.values())
            settings = settings.model_copy(update={"conf_threshold": lowest})
        p = self.config.pipeline
        log_cfg = (self.config.logging.level, self.config.logging.format)
        n_workers = workers or p.worker_count(model.intra_op_threads)
        overlap = p.overlaps(n_workers, model.cpu_threads)

        def factory(name: str, on_death: Any, nice: int) -> Worker:
            if p.isolation == "process":
                return ProcessWorker(
                    name,
                    settings,
                    by_recipe,
                    slots=p.worker_depth * p.max_batch,
                    logging_cfg=log_cfg,
                    on_death=on_death,
                    nice=nice,
                    no_preempt=p.worker_no_preempt,
                    overlap=overlap,
                )
            return ThreadWorker(name, lambda: load_detector(settings), by_recipe, on_death=on_death)

        pool = InferencePool(
            f"{role}:{package.manifest.name}-{package.manifest.version}",
            factory,
            workers=n_workers,
            depth=p.worker_depth,
            hang_s=p.model_hang_s,
            error_threshold=p.model_error_threshold,
            load_timeout_s=p.model_load_timeout_s,
            nice=nice,
        )
        pm = PoolModel(package.info(model.runtime), package.manifest.plc_model_id, package.digest)
        try:
            await pool.start()
        except Exception as exc:
            log.error("model_workers_not_ready", model=pm.model_id, role=role, error=str(exc))
            if role == "active" and self.active is None:
                self._set("model", False, f"workers not ready: {exc}")
        return ActiveModel(pool, pm, package, model)

    # ---- camera threads -> loop ----------------------------------------------------------

    def _frame_from_thread(self, frame: Frame) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_frame, frame)

    def _on_frame(self, frame: Frame) -> None:
        if self.pipeline is None:
            return
        if self.inputs is not None:
            got = self.inputs.frame_arrived(frame)
            if got is None:
                return  # its part was already fail-safed (the frame came too late)
            frame, recipe = got
        else:
            recipe = self.recipes.for_part()
        self.pipeline.submit(frame, recipe)

    def _drift_observe(self, camera: str, stats: FrameStats, defect: bool) -> None:
        if self.drift is not None:
            self.drift.observe(camera, stats, defect)
            self._drift_observed[camera] += 1

    def _trigger_lost_from_thread(self, camera_id: str, part_id: int, reason: str) -> None:
        loop, inputs = self._loop, self.inputs
        if loop is not None and inputs is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(inputs.trigger_lost, camera_id, part_id, reason)

    def _camera_state_from_thread(self, camera_id: str, state: str, reason: str | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(
                    self._set, f"camera:{camera_id}", state == "up", reason or state
                )

    # ---- status, alarms, heartbeat -------------------------------------------------------

    def _set(self, name: str, up: bool, detail: str) -> None:
        comp = self.components.setdefault(name, ComponentState())
        was_up = comp.up
        if comp.set(up, detail):
            self.metrics.component_up.labels(name).set(1 if up else 0)
            if up != was_up:
                (log.info if up else log.warning)(
                    "component_state", component=name, up=up, detail=detail
                )

    def _plc_state(self, up: bool, detail: str) -> None:
        """From the EDF queue, on the first request whose outcome changes the PLC's state."""
        comp = self.components.get("plc")
        if up and comp is not None and not comp.up and comp.detail != "starting":
            self._plc_recovered_ns = time.monotonic_ns()
        self._set("plc", up, detail)

    def _compute_alarms(self) -> Alarm:
        alarms = Alarm(0)
        if any(not s.up for n, s in self.components.items() if n.startswith("camera:")):
            alarms |= Alarm.CAMERA_DOWN
        if not self.components["model"].up or not self.components["verdicts"].up:
            alarms |= Alarm.MODEL_DOWN
        if not self.components["spool"].up:
            alarms |= Alarm.SPOOL_FAULT
        p = self.pipeline
        now = time.monotonic_ns()
        hold_ns = self.config.status.failsafe_alarm_hold_s * 1e9
        if p is not None and p.last_failsafe_ns and now - p.last_failsafe_ns < hold_ns:
            alarms |= Alarm.FAILSAFE_ACTIVE
        if self.spool_stats.get("alarms"):
            alarms |= Alarm.UPLINK_BACKLOG_HIGH
        if self._plc_recovered_ns and now - self._plc_recovered_ns < hold_ns:
            alarms |= Alarm.PLC_RECOVERED
        if self.recipes.unknown_selected:
            alarms |= Alarm.RECIPE_UNKNOWN
        if any(c.active for c in self.drift_state.values()):
            alarms |= Alarm.DRIFT
        if self.inputs is not None and any(
            n >= self.config.plc_inputs.unacked_alarm for n in self.inputs.unacked.values()
        ):
            alarms |= Alarm.RESULTS_UNACKNOWLEDGED
        return alarms

    def _heartbeat_period_s(self) -> float:
        floor = max(HEARTBEAT_FLOOR_MS, float(getattr(self.plc.link, "min_status_period_ms", 0)
                                             if self.plc is not None else 0))
        return max(self.config.status.heartbeat_ms, floor) / 1000

    async def _heartbeat_loop(self) -> None:
        """Heartbeat word + alarm bits; the PLC's watchdog rejects parts if it stops moving."""
        assert self.plc is not None
        next_at = time.monotonic()
        while True:
            period = self._heartbeat_period_s()
            self.heartbeat = (self.heartbeat + 1) & 0xFFFF
            alarms = self._compute_alarms()
            deadline = time.monotonic_ns() + int(period * 1e9)
            result = await self.plc.write_status(self.heartbeat, alarms, deadline)
            if result.outcome is WriteOutcome.ACKED:
                self.alarms = alarms
                self.metrics.heartbeat.set(self.heartbeat)
                self.metrics.alarms.set(int(alarms))
            self.supervisor.beat("heartbeat")
            if result.outcome is WriteOutcome.ACKED and self._compute_alarms() != alarms:
                continue  # this very write changed what the alarms say (PLC back): say it now
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > period:
                next_at = time.monotonic()  # fell behind (PLC down): don't burst to catch up

    async def _loop_lag_probe(self) -> None:
        """How late a 100 ms timer fires: the loop's scheduling delay, i.e. what a deadline
        guard can suffer (GIL contention, a blocking call that slipped onto the loop)."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.1)
            lag_ms = (loop.time() - t0 - 0.1) * 1000
            self.metrics.loop_lag.observe(max(0.0, lag_ms))
            self.stats.loop_lag_ms.add(max(0.0, lag_ms))

    async def _housekeeping_loop(self) -> None:
        """Once a second-ish: health of model, verdicts, spool; systemd watchdog and STATUS."""
        wd = self.notifier.watchdog_s
        period = min(1.0, wd / 3) if wd else 1.0
        ticks = 0
        while True:
            self.supervisor.beat("housekeeping")
            self._check_model()
            if self.models is not None:
                await self.models.watch()
            if self.drift is not None:  # ~0.2 ms per camera: every tick
                seen = dict(self._drift_observed)
                self.drift_state = self.drift.evaluate()
                self._drift_evaluated = seen
            if self.plc is not None:
                self.metrics.plc_pending.set(self.plc.pending)
            if self.pipeline is not None:
                self.pipeline.flush_logs()
                self.metrics.queue_depth.set(self.pipeline.queue_depth)
            if self.spool is not None and self.components["spool"].detail != "starting":
                await self._poll_spool()
            # The loop itself is alive if we got here; a wedged loop, or a critical task given
            # up on, stops the pings and systemd restarts us.
            problems = self.supervisor.problems()
            if not problems:
                self.notifier.watchdog()
            ticks += 1
            if ticks % max(1, int(5 / period)) == 0:
                self.notifier.status(self._status_text())
            if ticks % max(1, int(HEAP_TRIM_PERIOD_S / period)) == 0:
                await self._trim_heap()
            await asyncio.sleep(period)

    async def _trim_heap(self) -> None:
        """Free heap back to the OS off the loop (edge/malloc.py: why)."""
        t = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, malloc.trim)
        log.debug("heap_trimmed", ms=round((time.perf_counter() - t) * 1000, 2))

    def _check_model(self) -> None:
        p, active = self.pipeline, self.active
        if active is not None:
            pool = active.pool
            if pool.up:
                self._set("model", True, active.model.model_id)
            elif pool.breaker_open:
                self._set("model", False, f"model down (breaker open): {pool.last_error}")
            else:
                self._set("model", False, f"no inference worker ready: {pool.last_error}")
        if p is not None:
            silent = p.seconds_without_real_verdict()
            limit = self.config.status.no_verdict_alarm_s
            if silent > limit:
                self._set("verdicts", False, f"no real verdict for {silent:.0f}s")
            else:
                self._set("verdicts", True, "flowing" if p.last_real_verdict_ns else "idle")

    async def _poll_spool(self) -> None:
        assert self.spool is not None
        loop = asyncio.get_running_loop()
        try:
            self.spool_stats = await asyncio.wait_for(
                loop.run_in_executor(None, self.spool.stats), timeout=5.0
            )
        except Exception as exc:
            self.spool_stats = {"healthy": False, "alarms": [f"stats failed: {exc!r}"]}
        healthy = bool(self.spool_stats.get("healthy", False))
        problems = self.spool_stats.get("alarms") or []
        self._set("spool", healthy, "; ".join(problems) if problems else "ok")
        if self.forwarder is not None:
            fs = self.forwarder.stats()
            self.spool_stats["forwarder"] = fs
            peers_up = fs["kafka_up"] is not False and fs["s3_up"] is not False
            self._set("uplink", peers_up, "ok" if peers_up else f"peer down: {fs['last_error']}")

    def _status_text(self) -> str:
        s = self.stats
        down = [n for n, c in self.components.items() if not c.up]
        return (
            f"frames={s.frames} ok={s.verdicts['OK']} defect={s.verdicts['DEFECT']} "
            f"failsafe={s.verdicts['FAILSAFE_REJECT']} miss={s.deadline_misses} "
            f"p99={s.e2e_ms.quantile(0.99):.1f}ms down={','.join(down) or '-'}"
        )

    async def _status_line(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            q = self.pipeline.queue_depth if self.pipeline else 0
            sys.stderr.write(f"\r{self._status_text()} queue={q}   ")
            sys.stderr.flush()

    def camera_stats(self) -> dict[str, dict[str, Any]]:
        return {cid: w.stats() for cid, w in list(self.workers.items())}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Snapshot for /healthz (called from the HTTP thread: reads only)."""
        comps = {
            name: {"up": c.up, "detail": c.detail, "since": c.since}
            for name, c in list(self.components.items())
        }
        critical = [n for n in comps if n not in ("spool", "uplink")]
        problems = self.supervisor.problems()
        ok = all(comps[n]["up"] for n in critical) and not problems
        doc: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "line": self.config.line,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "components": comps,
            "problems": problems,
            "alarms": [a.name for a in Alarm if a in self.alarms],
            "heartbeat": self.heartbeat,
            "frames": self.stats.frames,
            "deadline_misses": self.stats.deadline_misses,
            "cameras": self.camera_stats(),
            "tasks": self.supervisor.health(),
        }
        if self.active is not None:
            doc["model"] = self.active.pool.health()
        if self.models is not None:
            doc["models"] = self.models.status()
        doc["recipe"] = self.recipes.describe()
        if self.inputs is not None:
            doc["plc_inputs"] = self.inputs.stats()
        if self.drift is not None:
            evaluated = dict(self._drift_evaluated)
            doc["drift"] = {
                "cameras": {
                    c: {**d.as_json(), "evaluated_frames": evaluated.get(c, 0)}
                    for c, d in self.drift_state.items()
                },
                "observed_frames": dict(self._drift_observed),
            }
        if self.spool_stats:
            doc["spool"] = self.spool_stats
        return ok, doc

    def _snapshot_metrics(self) -> Iterator[Sample]:
        """Prometheus samples from state other threads/processes keep (see SnapshotCollector)."""
        for cid, st in self.camera_stats().items():
            for key, help_ in _CAMERA_COUNTERS.items():
                if isinstance(st.get(key), int | float):
                    yield Sample(f"edge_camera_{key}", "counter", help_, {"camera": cid}, st[key])
        if self.active is not None:
            pool = self.active.pool
            m = {"model": self.active.model.model_id}
            yield Sample("edge_model_workers_ready", "gauge", "Inference workers ready.", m,
                         len(pool.ready_workers))
            yield Sample("edge_model_worker_restarts", "counter",
                         "Inference worker respawns.", m, len(pool.restarts))
            yield Sample("edge_model_breaker_open", "gauge",
                         "1 while the model breaker is open (frames fail-safed without "
                         "inference).", m, 1 if pool.breaker_open else 0)
            for w in pool.workers:
                if w is not None and w.pid:
                    yield Sample("edge_model_worker_resident_bytes", "gauge",
                                 "Resident memory of an inference worker process.",
                                 {"worker": w.name}, _rss_bytes(w.pid))
        if self.pipeline is not None:
            yield Sample("edge_seconds_without_real_verdict", "gauge",
                         "Seconds frames have arrived without a real (non-fail-safe) verdict.",
                         {}, self.pipeline.seconds_without_real_verdict())
        if self.recipes.current is not None:
            yield Sample("edge_recipe_current", "gauge", "Recipe number parts are judged by.",
                         {}, self.recipes.current)
        yield Sample("edge_recipe_unknown", "gauge",
                     "1 while the selected recipe is not defined (parts fail-safed).", {},
                     1 if self.recipes.unknown_selected else 0)
        if self.inputs is not None:
            watcher = self.inputs
            for key, value, help_ in (
                ("parts", watcher.parts, "Parts the PLC announced (trigger counter increments)."),
                ("missed_triggers", watcher.missed,
                 "Counter jumps: parts never seen, fail-safed (TRIGGER_MISSED)."),
                ("no_frame", watcher.no_frame, "Announced parts whose frame did not come in time."),
                ("polls_failed", watcher.polls_failed, "Reads of the PLC inputs that failed."),
            ):
                yield Sample(f"edge_plc_{key}", "counter", help_, {}, value)
            names = {i: sl.camera_id for i, sl in watcher.slots.items()}
            for slot, n in watcher.unacked.items():
                yield Sample("edge_plc_unacked_records", "gauge",
                             "Records the PLC has not acknowledged (acknowledged mode).",
                             {"camera": names.get(slot, str(slot))}, n)
        for name, h in self.supervisor.health().items():
            yield Sample("edge_task_restarts", "counter", "Supervised task restarts.",
                         {"task": name}, float(h["restarts"]))  # type: ignore[arg-type]
            yield Sample("edge_task_up", "gauge",
                         "1 while the supervised task runs (0: crashed, or given up on).",
                         {"task": name}, 1.0 if h["running"] and not h["given_up"] else 0.0)
        for drift in list(self.drift_state.values()):
            for metric, labels, level in drift.metrics():
                yield Sample(metric, "gauge", DRIFT_METRICS[metric][0], labels, level)
        yield Sample("edge_line_info", "gauge", "The line this daemon decides parts for.",
                     {"line": self.config.line}, 1.0)
        yield Sample("edge_pipeline_budget_ms", "gauge",
                     "Capture to PLC acknowledgement budget (pipeline.budget_ms).", {},
                     self.config.pipeline.budget_ms)
        s = self.spool_stats
        for key, help_ in _SPOOL_GAUGES.items():
            if isinstance(s.get(key), int | float):
                yield Sample(f"edge_uplink_{key}", "gauge", help_, {}, s[key])
        for key, help_ in _SPOOL_COUNTERS.items():
            if isinstance(s.get(key), int | float):
                yield Sample(f"edge_uplink_{key}", "counter", help_, {}, s[key])
        for cls, n in (s.get("evicted") or {}).items():
            yield Sample("edge_uplink_evicted", "counter",
                         "Spool rows/images evicted for lack of disk, by class.", {"class": cls}, n)
        fwd = s.get("forwarder") or {}
        for key, help_ in _FORWARDER_COUNTERS.items():
            if isinstance(fwd.get(key), int | float):
                yield Sample(f"edge_uplink_{key}", "counter", help_, {}, fwd[key])
        for peer in ("kafka", "s3"):
            if isinstance(fwd.get(f"{peer}_up"), bool):
                yield Sample("edge_uplink_peer_up", "gauge", "1 while the peer accepts data.",
                             {"peer": peer}, 1 if fwd[f"{peer}_up"] else 0)

    # ---- control API (edge/control.py) ------------------------------------------------------

    def _control_handlers(self) -> dict[str, Any]:
        return {
            "status": self._cmd_status,
            "recipe.get": self._cmd_recipe_get,
            "recipe.set": self._cmd_recipe_set,
            "model.status": self._cmd_model_status,
            "model.activate": self._cmd_model_activate,
            "model.rollback": self._cmd_model_rollback,
            "model.shadow": self._cmd_model_shadow,
            "model.promote": self._cmd_model_promote,
        }

    async def _cmd_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        ok, doc = self.health()
        return {"healthy": ok, **doc}

    def _manager(self) -> ModelManager:
        if self.models is None:
            raise ControlError("the daemon is still starting")
        return self.models

    async def _cmd_model_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        return self._manager().status()

    async def _cmd_model_activate(self, args: dict[str, Any]) -> dict[str, Any]:
        ref = args.get("package")
        if not isinstance(ref, str) or not ref:
            raise ControlError("give a package directory or NAME:VERSION")
        canary = args.get("canary")
        if canary is not None and not isinstance(canary, int | float):
            raise ControlError("--canary is a number between 0 and 1")
        return await self._manager().activate(ref, canary)

    async def _cmd_model_rollback(self, _args: dict[str, Any]) -> dict[str, Any]:
        return await self._manager().rollback()

    async def _cmd_model_shadow(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("stop"):
            return await self._manager().stop_shadow()
        ref, sample = args.get("package"), args.get("sample", 0.1)
        if not isinstance(ref, str) or not ref:
            raise ControlError("give a package directory or NAME:VERSION (or --stop)")
        if not isinstance(sample, int | float):
            raise ControlError("--sample is a number in (0, 1]")
        return await self._manager().start_shadow(ref, float(sample))

    async def _cmd_model_promote(self, _args: dict[str, Any]) -> dict[str, Any]:
        return await self._manager().promote()

    async def _cmd_recipe_get(self, _args: dict[str, Any]) -> dict[str, object]:
        return self.recipes.describe()

    async def _cmd_recipe_set(self, args: dict[str, Any]) -> dict[str, object]:
        number = args.get("recipe")
        if not isinstance(number, int) or isinstance(number, bool):
            raise ControlError("give the recipe number: edge recipe set N")
        if self.recipes.settings is None:
            raise ControlError("this line has no `recipes:` section in its config")
        if self.recipes.plc_selects:
            raise ControlError(
                "the PLC selects the recipe on this line (recipes.select: plc): change it in the "
                "PLC program, or set recipes.select: cli to select it with `edge recipe set`"
            )
        if not self.recipes.known(number):
            raise ControlError(
                f"recipe {number} is not defined; defined: {sorted(self.recipes.settings.table)}"
            )
        self.recipes.select(number, by="edge recipe set")
        return self.recipes.describe()

    # ---- signals, reload -------------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        for name in _early_signals:
            if name == "SIGTERM":
                self.request_stop("SIGTERM (before ready)")
            elif name == "SIGHUP":
                self._reload.set()
        _early_signals.clear()

    async def reload(self) -> bool:
        """SIGHUP: re-read the YAML off the loop; apply what is safe live, refuse the rest.

        Live: decision rules, model package (started beside the running one, swapped between
        batches), log level, status thresholds. Every other section (cameras, PLC, uplink,
        pipeline, recipes, drift, ...) needs a restart: a change there is logged and ignored.
        Any failure refuses the reload and keeps the running config (never a crash, never a
        lost frame).
        """
        if self.config_path is None:
            log.warning("reload_ignored", reason="running on embedded defaults, no file to re-read")
            return False
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load_config, self.config_path)
        except ConfigError as exc:
            log.error("reload_rejected", problems=exc.problems, kept="previous config")
            return False
        except Exception as exc:
            log.error("reload_rejected", problems=[repr(exc)], kept="previous config")
            return False
        old = self.config
        restart_needed = [
            name
            for name in type(new).model_fields
            if name not in _LIVE_SECTIONS and getattr(new, name) != getattr(old, name)
        ]
        if restart_needed:
            log.warning("reload_needs_restart", sections=restart_needed, applied="no (restart)")
        assert self.pipeline is not None
        if new.model != old.model or new.decision != old.decision:
            if not await self._activate(new.model, new.decision):
                return False
            self.config = self.config.model_copy(
                update={"model": new.model, "decision": new.decision}
            )
        if new.logging != old.logging:
            configure_logging(new.logging.level, new.logging.format)
        self.config = self.config.model_copy(update={"status": new.status, "logging": new.logging})
        log.info("reload_done", restart_needed=restart_needed)
        return True

    async def _activate(self, model: ModelSettings, decision: DecisionSettings) -> bool:
        """SIGHUP: start the new model/rules beside the running one; switch between batches."""
        assert self.pipeline is not None
        candidate = await self.start_model(model, decision, "active", nice=CANDIDATE_NICE)
        if candidate is None or not candidate.pool.up:
            if candidate is not None:
                await candidate.pool.close(0)
            current = self.active
            log.error("reload_model_rejected", kept=current.model.model_id if current else None)
            return False
        self.switch_active(candidate)
        if self.models is not None:
            self.models.yaml_activated(candidate.package)
        log.info("reload_model_applied", model=candidate.model.model_id)
        return True

    def switch_active(self, candidate: ActiveModel) -> None:
        """Parts go to `candidate` from the next batch on; the old workers finish and stop."""
        assert self.pipeline is not None
        candidate.pool.renice(0)
        previous = self.active
        self.active = candidate
        self.pipeline.swap_model(candidate.pool, candidate.model)
        self._set("model", candidate.pool.up, candidate.model.model_id)
        self.config = self.config.model_copy(update={"model": candidate.settings})
        if self.drift is not None:  # a new model: a new baseline (its package's, or learned)
            self.drift.reset(
                load_package_baseline(candidate.settings.package),
                classes=candidate.package.manifest.classes,
                score_floor=candidate.settings.conf_threshold,
            )
        if previous is not None:
            # Batches already running on the old workers finish first; then they stop.
            task = asyncio.ensure_future(previous.pool.close(self.config.pipeline.model_hang_s))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    # ---- stop ----------------------------------------------------------------------------

    async def _shutdown(self) -> bool:
        """Cameras stop, in-flight frames drain to the PLC, the spool is flushed, the rest
        closes. Every phase is bounded (systemd's TimeoutStopSec is 20 s) and its duration is
        logged in `daemon_stopped`, so a slow stop names its culprit."""
        self.notifier.stopping()
        for model in (self.active, *(self.models.running() if self.models else ())):
            if model is not None:
                model.pool.stop_respawning()
        if self._status_task is not None:
            self._status_task.cancel()
            sys.stderr.write("\n")  # end the live status line before the shutdown logs
        log.info("daemon_stopping", reason=self.exit_reason)
        loop = asyncio.get_running_loop()
        phases: dict[str, float] = {}
        t = time.monotonic()

        def phase(name: str) -> None:
            nonlocal t
            now = time.monotonic()
            phases[name] = round(now - t, 3)
            t = now

        async def bounded(what: str, aw: Any, limit_s: float = 5.0) -> None:
            """One step of the stop, never more than `limit_s`: a peer that does not answer a
            goodbye must not keep the process alive (systemd would SIGKILL it at 20 s)."""
            try:
                await asyncio.wait_for(aw, limit_s)
            except TimeoutError:
                log.error("shutdown_step_timeout", step=what, limit_s=limit_s)
            except Exception as exc:
                log.error("shutdown_step_failed", step=what, error=repr(exc))

        if self.control is not None:
            await bounded("control socket", self.control.close(), 3.0)
        await bounded("cameras", asyncio.gather(
            *(loop.run_in_executor(None, w.stop) for w in self.workers.values()),
            return_exceptions=True,
        ), 8.0)
        phase("cameras")
        drained = True
        if self.pipeline is not None:
            drained = await self.pipeline.drain()
            await self.pipeline.close()
        phase("drain")
        await bounded("tasks", self.supervisor.close(), 3.0)
        if self.forwarder is not None:
            self.forwarder.stop()
            await bounded("uplink client", self.forwarder.aclose(), 2.0)
        phase("tasks")
        if self.spool is not None:
            await bounded("spool flush", loop.run_in_executor(None, self.spool.flush, 5.0), 6.0)
            await bounded("spool close", loop.run_in_executor(None, self.spool.close, 3.0), 4.0)
        phase("spool")
        for task in list(self._retiring):
            await bounded("retiring model", task, 3.0)
        if self.models is not None:
            await bounded("candidate models", self.models.close(), 5.0)
        if self.active is not None:
            await bounded("active model", self.active.pool.close(0.5), 6.0)
        phase("models")
        if self.plc is not None:
            await bounded("plc link", self.plc.close(), 3.0)
        if self.plc_sim is not None:
            await bounded("plc simulator", loop.run_in_executor(None, self.plc_sim.stop), 5.0)
        if self.http is not None:
            await bounded("http", loop.run_in_executor(None, self.http.stop), 3.0)
        phase("plc_http")
        self.notifier.close()
        self.cpu_latency.stop()
        self._gc_pauses.remove()
        gcpause.release()
        log.info("daemon_stopped", drained=drained, phases_s=phases)
        return drained

    def summary(self) -> dict[str, Any]:
        s = self.stats.summary()
        s["cameras"] = self.camera_stats()
        if self.active is not None:
            s["model"] = self.active.pool.health()
        s["recipe"] = self.recipes.describe()
        if self.inputs is not None:
            s["plc_inputs"] = self.inputs.stats()
        if self.plc_sim is not None:
            c = self.plc_sim.counters()
            s["plc_simulator"] = {
                "records_received": c.records_received,
                "sequence_gaps": c.sequence_gaps,
                "heartbeats_received": c.heartbeats_received,
            }
            program = self.plc_sim.program_counters()
            if program is not None:
                s["plc_simulator"]["program"] = program.as_dict()
        return s


_CAMERA_COUNTERS = {
    "frames": "Frames the camera delivered.",
    "missed": "Frames lost at the camera (gaps in the device frame counter, replay lag drops).",
    "incomplete": "Frames that arrived with missing packets (also counted in missed).",
    "reopens": "Times the camera was reopened after a fault.",
    "stalls": "Times the camera stopped delivering (stall timeout).",
    "errors": "Camera open/read errors.",
    "triggers": "Software/PLC triggers accepted.",
    "refused_triggers": "Triggers refused (camera down or too many pending): fail-safed at once.",
    "lost_triggers": "Accepted triggers whose frame never came: fail-safed.",
    "unsolicited": "Frames that answered no trigger (dropped).",
    "bad_files": "Replay files or video frames that could not be decoded (skipped).",
    "refused": "Frames refused as unusable (oversized, bad format, empty): fail-safed.",
    "downscaled": "Oversized frames downscaled before inference.",
    "callback_errors": "Frames the daemon's callback failed on.",
}
_SPOOL_GAUGES = {
    "pending": "Events accepted but not yet committed to the spool.",
    "unsent_events": "Events not yet acknowledged by Kafka.",
    "unsent_images": "Images not yet uploaded to S3.",
    "oldest_unsent_age_s": "Age of the oldest unsent event or image, seconds.",
    "bytes_used": "Spool bytes counted against the quota.",
    "quota_bytes": "Spool disk quota, bytes.",
    "usage_fraction": "Spool usage / quota.",
    "image_bytes_held": "Image pixels held in memory waiting to be written, bytes.",
}
_SPOOL_COUNTERS = {
    "submitted": "Events handed to the spool.",
    "committed": "Events committed durably.",
    "refused": "Events the spool refused (full or broken).",
    "images_written": "Images written to the spool.",
    "images_dropped": "Images dropped by the spool's memory bound (their events kept).",
    "image_errors": "Images that could not be encoded or written.",
    "dead_lettered": "Corrupt stored events moved to the dead-letter table.",
    "commit_failures": "Spool commits that failed (disk full or stalled) and were retried.",
}
_FORWARDER_COUNTERS = {
    "events_sent": "Events acknowledged by Kafka (acks=all).",
    "images_sent": "Images stored in S3.",
    "event_errors": "Kafka send errors.",
    "image_errors": "S3 upload errors.",
}


def _rss_bytes(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return float(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run_daemon(
    config: LineConfig,
    config_path: Path | None,
    duration_s: float | None,
    status_line: bool,
    ready_hooks: Sequence[Callable[[Daemon], None]] = (),
) -> tuple[ExitCode, Daemon]:
    """Run a daemon to completion in a fresh event loop; the daemon is returned for its stats."""
    daemon = Daemon(config, config_path)
    daemon.ready_hooks.extend(ready_hooks)
    try:
        code = asyncio.run(daemon.run(duration_s, status_line))
    except Exception:
        log.exception("daemon_crashed")
        code = ExitCode.INTERNAL_ERROR
    return code, daemon
