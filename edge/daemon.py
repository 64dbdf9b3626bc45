"""The daemon: wires the components from a LineConfig and runs them until told to stop.

Start order: PLC first (so every later fault can be signalled), then model, spool, pipeline, and
cameras last (no frame arrives before something can decide it). Stop order is the reverse: cameras
stop, in-flight frames drain to the PLC, then the spool is flushed.
Nothing a component does at run time may take the process down: faults become health states, PLC
alarm bits and fail-safe verdicts. Only a broken config at start-up stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from camera.frame import Frame
from camera.worker import CameraWorker
from edge.config import ConfigError, LineConfig, load_config
from edge.decision import DecisionRules, DecisionSettings
from edge.http import ObservabilityServer
from edge.inference import BatchRunner, ProcessRunner, ThreadRunner
from edge.logs import configure_logging
from edge.metrics import Metrics
from edge.pipeline import ModelHolder, Pipeline
from edge.plcqueue import DeadlineOrderedLink
from edge.stats import RunStats
from edge.systemd import Notifier
from models.config import ModelSettings
from models.loader import load_detector
from models.package import load_package
from plc.config import ModbusSettings
from plc.factory import create_link, simulated_settings
from plc.record import Alarm, WriteOutcome
from plc.sim import ModbusPlcSimulator
from uplink.forwarder import Forwarder
from uplink.spool import Spool

log = structlog.get_logger(__name__)


GIL_SWITCH_INTERVAL_S = 0.0005


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); systemd restarts on anything but OK."""

    OK = 0
    INTERNAL_ERROR = 1
    CONFIG_ERROR = 2
    STARTUP_FAILED = 3
    DRAIN_TIMEOUT = 4


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


class Daemon:
    def __init__(self, config: LineConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.stats = RunStats()
        self.notifier = Notifier()
        self.components: dict[str, ComponentState] = {}
        self.plc_sim: ModbusPlcSimulator | None = None
        self.plc: DeadlineOrderedLink | None = None
        self.spool: Spool | None = None
        self.forwarder: Forwarder | None = None
        self._forwarder_task: asyncio.Task[None] | None = None
        self.pipeline: Pipeline | None = None
        self.http: ObservabilityServer | None = None
        self.workers: dict[str, CameraWorker] = {}
        self.heartbeat = 0
        self.alarms = Alarm(0)
        self._plc_recovered_ns = 0
        """When the PLC link last came back after an outage (PLC_RECOVERED alarm, held)."""
        self.spool_stats: dict[str, Any] = {}
        """Cached by the supervisor (spool stats query the DB: never on the loop)."""
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.monotonic()
        self.exit_reason = "not started"
        self._status_task: asyncio.Task[None] | None = None

    # ---- public --------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self.exit_reason = reason
            self._stop.set()

    async def run(self, duration_s: float | None = None, status_line: bool = False) -> ExitCode:
        self._loop = asyncio.get_running_loop()
        # The loop shares the GIL with the capture and inference threads; CPython hands it over
        # every 5 ms by default, which would let one busy decode delay a deadline timer by that
        # much, several times over. Hand it over more often (a little throughput for latency).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            await self._start()
        except Exception as exc:
            log.exception("startup_failed", error=repr(exc))
            await self._shutdown()
            return ExitCode.STARTUP_FAILED
        self._install_signals()
        if duration_s is not None:
            self._loop.call_later(duration_s, self.request_stop, f"duration {duration_s:g}s")
        if status_line:
            self._status_task = asyncio.create_task(self._status_line())
            self._tasks.append(self._status_task)
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
                await self.reload()
        drained = await self._shutdown()
        return ExitCode.OK if drained else ExitCode.DRAIN_TIMEOUT

    # ---- start ---------------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for name in ["plc", "model", "spool", *(f"camera:{c.id}" for c in cfg.cameras)]:
            self.components[name] = ComponentState()

        slots = {c.id: c.plc_slot for c in cfg.cameras}
        n_slots = max(slots.values()) + 1
        plc_settings = cfg.plc
        if isinstance(plc_settings, ModbusSettings) and plc_settings.simulator:
            self.plc_sim = ModbusPlcSimulator(plc_settings, camera_slots=n_slots)
            port = await loop.run_in_executor(None, self.plc_sim.start)
            plc_settings = simulated_settings(plc_settings, port)
            log.info("plc_simulator_started", host=plc_settings.host, port=port)
        self.plc = DeadlineOrderedLink(create_link(plc_settings, camera_slots=n_slots))
        await self.plc.start()
        # Give the PLC a moment before frames flow; one that stays away is an alarm, not a reason
        # to keep the line blind (its own watchdog rejects parts while we are absent).
        if not await self.plc.wait_connected(cfg.status.plc_startup_wait_s):
            log.error("plc_not_connected_at_start", waited_s=cfg.status.plc_startup_wait_s)

        holder = await self._load_model(cfg.model, cfg.decision)

        self.spool = Spool(cfg.uplink, line=cfg.line)
        try:
            await loop.run_in_executor(None, self.spool.open)
            self._set("spool", True, "open")
            if cfg.uplink.kafka is not None or cfg.uplink.s3 is not None:
                self.forwarder = Forwarder(self.spool)
                self._forwarder_task = asyncio.create_task(self.forwarder.run(), name="uplink")
                self.components["uplink"] = ComponentState()
        except Exception as exc:
            log.error("spool_unavailable", error=repr(exc))
            self._set("spool", False, f"open failed: {exc}")

        self.pipeline = Pipeline(
            cfg.pipeline, cfg.line, holder, self.plc, self.spool, self.metrics, self.stats, slots
        )
        self.pipeline.start()

        if cfg.observability.enabled:
            obs = cfg.observability
            try:
                self.http = ObservabilityServer(
                    obs.host, obs.port, self.metrics.registry, self.health
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

        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self._supervise_loop(), name="supervise"))

        for cam in cfg.cameras:
            worker = CameraWorker.from_settings(
                cam, on_frame=self._frame_from_thread, on_state=self._camera_state_from_thread
            )
            self.workers[cam.id] = worker
            worker.start()

    async def _load_model(self, model: ModelSettings, decision: DecisionSettings) -> ModelHolder:
        """Load the model package; on failure the line runs on fail-safes until a reload works."""
        pipeline = self.config.pipeline
        loop = asyncio.get_running_loop()
        try:
            package = await loop.run_in_executor(None, load_package, model.package)
            th = package.manifest.thresholds
            rules = DecisionRules(
                decision,
                package.manifest.classes,
                package_thresholds=th.per_class,
                package_default=th.default,
                package_min_area=th.min_area_px,
            )
            settings = model
            if settings.conf_threshold is None:
                # Candidates below every decision threshold cannot change a verdict: don't pay
                # for their masks (the cost grows with candidates x frame size).
                settings = settings.model_copy(update={"conf_threshold": rules.lowest_score})
            runners: list[BatchRunner]
            log_cfg = (self.config.logging.level, self.config.logging.format)
            if pipeline.isolation == "process":
                runners = list(
                    await asyncio.gather(
                        *(
                            loop.run_in_executor(None, ProcessRunner, settings, rules, log_cfg)
                            for _ in range(pipeline.workers)
                        )
                    )
                )
                info = runners[0].info  # type: ignore[attr-defined]
            else:
                detector = await loop.run_in_executor(None, load_detector, settings)
                runners = [ThreadRunner(detector, rules)] * pipeline.workers
                info = detector.info
            self._set("model", True, info.model_id)
            return ModelHolder(runners, info, package.manifest.plc_model_id)
        except Exception as exc:
            log.error("model_load_failed", package=str(model.package), error=str(exc))
            self._set("model", False, f"load failed: {exc}")
            return ModelHolder.empty()

    # ---- camera threads -> loop ----------------------------------------------------------

    def _frame_from_thread(self, frame: Frame) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_frame, frame)

    def _on_frame(self, frame: Frame) -> None:
        if self.pipeline is not None:
            self.pipeline.submit(frame)

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
        if name == "plc" and up and not was_up and comp.detail != "starting":
            self._plc_recovered_ns = time.monotonic_ns()
        if comp.set(up, detail):
            self.metrics.component_up.labels(name).set(1 if up else 0)
            if up != was_up or not up:
                (log.info if up else log.warning)(
                    "component_state", component=name, up=up, detail=detail
                )

    def _compute_alarms(self) -> Alarm:
        alarms = Alarm(0)
        if any(not s.up for n, s in self.components.items() if n.startswith("camera:")):
            alarms |= Alarm.CAMERA_DOWN
        if not self.components["model"].up:
            alarms |= Alarm.MODEL_DOWN
        if not self.components["spool"].up:
            alarms |= Alarm.SPOOL_FAULT
        p = self.pipeline
        hold_ns = self.config.status.failsafe_alarm_hold_s * 1e9
        if (
            p is not None
            and p.last_failsafe_ns
            and time.monotonic_ns() - p.last_failsafe_ns < hold_ns
        ):
            alarms |= Alarm.FAILSAFE_ACTIVE
        if self.spool_stats.get("alarms"):
            alarms |= Alarm.UPLINK_BACKLOG_HIGH
        if self._plc_recovered_ns and time.monotonic_ns() - self._plc_recovered_ns < hold_ns:
            alarms |= Alarm.PLC_RECOVERED
        return alarms

    async def _heartbeat_loop(self) -> None:
        """Heartbeat word + alarm bits; the PLC's watchdog rejects parts if it stops moving."""
        period = self.config.status.heartbeat_ms / 1000
        assert self.plc is not None
        next_at = time.monotonic()
        while True:
            self.heartbeat = (self.heartbeat + 1) & 0xFFFF
            self.alarms = self._compute_alarms()
            self.metrics.heartbeat.set(self.heartbeat)
            self.metrics.alarms.set(int(self.alarms))
            deadline = time.monotonic_ns() + int(period * 1e9)
            result = await self.plc.write_status(self.heartbeat, self.alarms, deadline)
            self._set(
                "plc",
                result.outcome is WriteOutcome.ACKED,
                "connected"
                if result.outcome is WriteOutcome.ACKED
                else f"heartbeat {result.outcome.value}: {result.detail}",
            )
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > period:
                next_at = time.monotonic()  # fell behind (PLC down): don't burst to catch up

    async def _supervise_loop(self) -> None:
        """Once a second-ish: model hang detection, spool health, systemd watchdog and STATUS."""
        wd = self.notifier.watchdog_s
        period = min(1.0, wd / 3) if wd else 1.0
        ticks = 0
        while True:
            p = self.pipeline
            if p is not None:
                busy = p.model_busy_for_s()
                hang_s = self.config.pipeline.model_hang_s
                if busy > hang_s:
                    self._set("model", False, f"inference running for {busy:.1f}s (hung?)")
                    p.model_up = False
                    if p.kill_hung(hang_s):
                        p.model_up = True  # the next batch respawns the worker process
                elif p.model_up and not self.components["model"].up and p.model.available:
                    self._set("model", True, p.model.model_id)
                elif not p.model_up and self.components["model"].up:
                    self._set("model", False, "inference errors")
                self.metrics.queue_depth.set(p.queue_depth)
            if self.plc is not None:
                self.metrics.plc_pending.set(self.plc.pending)
            if self.spool is not None and self.components["spool"].detail != "starting":
                await self._poll_spool()
            # The loop itself is alive if we got here; a wedged loop stops the pings and
            # systemd restarts us.
            self.notifier.watchdog()
            ticks += 1
            if ticks % max(1, int(5 / period)) == 0:
                self.notifier.status(self._status_text())
            await asyncio.sleep(period)

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
        e2e = s.summary()["end_to_end_ms"] if s.e2e_ms else {"p99": float("nan")}
        down = [n for n, c in self.components.items() if not c.up]
        return (
            f"frames={s.frames} ok={s.verdicts['OK']} defect={s.verdicts['DEFECT']} "
            f"failsafe={s.verdicts['FAILSAFE_REJECT']} miss={s.deadline_misses} "
            f"p99={e2e['p99']:.1f}ms down={','.join(down) or '-'}"
        )

    async def _status_line(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            q = self.pipeline.queue_depth if self.pipeline else 0
            sys.stderr.write(f"\r{self._status_text()} queue={q}   ")
            sys.stderr.flush()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Snapshot for /healthz (called from the HTTP thread: reads only)."""
        comps = {
            name: {"up": c.up, "detail": c.detail, "since": c.since}
            for name, c in list(self.components.items())
        }
        critical = [n for n in comps if n not in ("spool", "uplink")]
        ok = all(comps[n]["up"] for n in critical)
        doc: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "line": self.config.line,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "components": comps,
            "alarms": [a.name for a in Alarm if a in self.alarms],
            "heartbeat": self.heartbeat,
            "frames": self.stats.frames,
            "deadline_misses": self.stats.deadline_misses,
        }
        if self.spool_stats:
            doc["spool"] = self.spool_stats
        return ok, doc

    # ---- signals, reload -------------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._reload.set)

    async def reload(self) -> bool:
        """SIGHUP: re-read the YAML; apply what is safe live, refuse the rest, never crash.

        Live: decision rules, model package (loaded beside the running one, swapped between
        batches), log level, status thresholds. Cameras, PLC, uplink and pipeline sizing need a
        restart: a change there is logged and ignored.
        """
        if self.config_path is None:
            log.warning("reload_ignored", reason="running on embedded defaults, no file to re-read")
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload_rejected", problems=exc.problems, kept="previous config")
            return False
        old = self.config
        restart_needed = [
            name
            for name in ("line", "cameras", "plc", "uplink", "pipeline", "observability")
            if getattr(new, name) != getattr(old, name)
        ]
        if restart_needed:
            log.warning("reload_needs_restart", sections=restart_needed, applied="no (restart)")
        assert self.pipeline is not None
        if new.model != old.model or new.decision != old.decision:
            holder = await self._load_model(new.model, new.decision)
            if not holder.available:
                current = self.pipeline.model
                self._set("model", current.available, current.model_id)
                log.error("reload_model_rejected", kept=current.model_id)
                return False
            previous = self.pipeline.model
            self.pipeline.model = holder
            self.pipeline.mark_model_up()
            self.config = self.config.model_copy(
                update={"model": new.model, "decision": new.decision}
            )
            # Batches already running on the old runners finish first; then close them.
            asyncio.get_running_loop().run_in_executor(None, previous.close)
            log.info("reload_model_applied", model=holder.model_id)
        if new.logging != old.logging:
            configure_logging(new.logging.level, new.logging.format)
        self.config = self.config.model_copy(update={"status": new.status, "logging": new.logging})
        log.info("reload_done", restart_needed=restart_needed)
        return True

    # ---- stop ----------------------------------------------------------------------------

    async def _shutdown(self) -> bool:
        self.notifier.stopping()
        if self._status_task is not None:
            self._status_task.cancel()
            sys.stderr.write("\n")  # end the live status line before the shutdown logs
        log.info("daemon_stopping", reason=self.exit_reason)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, w.stop) for w in self.workers.values()),
            return_exceptions=True,
        )
        drained = True
        if self.pipeline is not None:
            drained = await self.pipeline.drain()
            await self.pipeline.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.forwarder is not None and self._forwarder_task is not None:
            self.forwarder.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._forwarder_task, 10.0)
        if self.spool is not None:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self.spool.flush, 10.0)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self.spool.close)
        if self.pipeline is not None:
            await loop.run_in_executor(None, self.pipeline.model.close)
        if self.plc is not None:
            await self.plc.close()
        if self.plc_sim is not None:
            await loop.run_in_executor(None, self.plc_sim.stop)
        if self.http is not None:
            self.http.stop()
        self.notifier.close()
        return drained


def run_daemon(
    config: LineConfig, config_path: Path | None, duration_s: float | None, status_line: bool
) -> tuple[ExitCode, Daemon]:
    """Run a daemon to completion in a fresh event loop; the daemon is returned for its stats."""
    daemon = Daemon(config, config_path)
    try:
        code = asyncio.run(daemon.run(duration_s, status_line))
    except Exception:
        log.exception("daemon_crashed")
        code = ExitCode.INTERNAL_ERROR
    return code, daemon
