"""Model lifecycle on a running line: activate, roll back, shadow, canary, promote.

Packages live in the model store (models/store.py, verified, by NAME:VERSION); which one is
active, which was before it and which is being shadowed is persisted in the store's state, so a
restart keeps the last activation. Every switch follows one rule: the new model is loaded and
warmed in its own worker processes BESIDE the running one, and parts move to it between batches;
the old workers finish what they hold and stop. No part waits for a model load.

* **shadow**: the candidate infers a deterministic sample of live frames in its own niced worker
  after the active verdict went out (it never touches the PLC, and it is skipped, never queued,
  when busy); agreement (image verdict and per class), its latency and its fail-safe-free rate
  are accumulated, and each result is an event of kind "shadow".
* **canary**: the candidate decides a deterministic share of parts for real (their records carry
  its PLC model id, their events `canary: true`); the same gates compare it with the active model
  on the same period, and a regression (fail-safe rate, latency p99, defect rate) rolls it back
  automatically.
* **promote**: shadow or canary -> active when the gate holds; refused with the numbers otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from edge.control import ControlError
from edge.inference import BatchItem, BatchOutput
from edge.pipeline import DecidedPart, detection_dict, rfc3339, sampled
from edge.pool import CANDIDATE_NICE
from edge.stats import LatencyHistogram
from models.package import ModelPackage
from models.store import ModelStore, StoreState, default_store_root
from models.types import ModelPackageError
from plc.record import Verdict
from uplink.event import PartEvent, new_event_id

if TYPE_CHECKING:
    from edge.daemon import ActiveModel, Daemon

log = structlog.get_logger(__name__)


class LifecycleSettings(BaseModel):
    """Gates for promoting a shadow or canary model, and the canary's automatic rollback."""

    model_config = ConfigDict(extra="forbid")
    shadow_min_frames: int = Field(default=100, ge=1)
    """Shadow results needed before `edge model promote` may decide."""
    min_agreement: float = Field(default=0.98, ge=0.0, le=1.0)
    """Share of sampled parts on which the candidate's OK/DEFECT equals the active model's."""
    max_latency_ratio: float = Field(default=1.5, gt=0)
    """Candidate inference p99 / active inference p99 allowed."""
    canary_min_parts: int = Field(default=200, ge=10)
    """Canary parts needed before its gates are evaluated (rollback or promote)."""
    canary_max_failsafe_increase: float = Field(default=0.02, ge=0.0, le=1.0)
    """Canary fail-safe rate minus the active model's, on the same period, allowed."""
    canary_max_defect_rate_change: float = Field(default=0.10, ge=0.0, le=1.0)
    """|canary defect rate - active defect rate| allowed (a model flipping parts is caught)."""
    shadow_nice: int = Field(default=10, ge=0, le=19)
    """CPU niceness of the shadow worker: the critical path always goes first."""


@dataclass
class _Side:
    """Outcome counts of one model over a comparison period."""

    parts: int = 0
    failsafes: int = 0
    defects: int = 0
    e2e: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, part: DecidedPart) -> None:
        self.parts += 1
        if part.verdict is Verdict.FAILSAFE_REJECT:
            self.failsafes += 1
        elif part.verdict is Verdict.DEFECT:
            self.defects += 1
        if part.e2e_ms is not None:
            self.e2e.add(part.e2e_ms)

    def rates(self) -> dict[str, float | None]:
        n = self.parts
        return {
            "parts": n,
            "failsafe_rate": self.failsafes / n if n else None,
            "defect_rate": self.defects / n if n else None,
            "e2e_p99_ms": self.e2e.quantile(0.99) if len(self.e2e) else None,
        }


@dataclass
class Shadow:
    model: ActiveModel
    sample: float
    frames: int = 0
    agree: int = 0
    skipped: int = 0
    errors: int = 0
    per_class: dict[str, list[int]] = field(default_factory=dict)
    """class -> [agreeing parts, parts where either model counted it]."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    started: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model.model.model_id,
            "digest": self.model.model.digest,
            "sample": self.sample,
            "frames": self.frames,
            "agreement": self.agree / self.frames if self.frames else None,
            "per_class_agreement": {
                c: a / n if n else None for c, (a, n) in sorted(self.per_class.items())
            },
            "latency_ms": {"p50": self.latency.quantile(0.5) if len(self.latency) else None,
                           "p99": self.latency.quantile(0.99) if len(self.latency) else None},
            "failsafe_free_rate": self.frames / (self.frames + self.errors)
            if self.frames + self.errors else None,
            "skipped_busy": self.skipped,
            "running_s": round(time.time() - self.started, 1),
        }


@dataclass
class Canary:
    model: ActiveModel
    fraction: float
    candidate: _Side = field(default_factory=_Side)
    baseline: _Side = field(default_factory=_Side)
    started: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model.model.model_id,
            "digest": self.model.model.digest,
            "fraction": self.fraction,
            "canary": self.candidate.rates(),
            "active": self.baseline.rates(),
            "running_s": round(time.time() - self.started, 1),
        }


class ModelManager:
    def __init__(self, daemon: Daemon, settings: LifecycleSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        cfg = daemon.config
        self.store = ModelStore(default_store_root(cfg.model.store, Path(cfg.uplink.spool_dir)))
        self.trusted = cfg.model.trusted_keys
        self.previous: str | None = None
        self.shadow: Shadow | None = None
        self.canary: Canary | None = None
        self.last_event: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._sidecar = cfg.state_path() / "model.json"

    # ---- start: which package ---------------------------------------------------------------

    def startup_package(self) -> Path:
        """The package to start with: the last `edge model activate` (kept in the store's state)
        unless the YAML's `model.package` was changed since; the YAML's package otherwise."""
        yaml_path = self.daemon.config.model.package
        try:
            yaml_pkg = self.store.import_package(yaml_path, self.trusted)
            state = self.store.read_state()
        except (ModelPackageError, OSError) as exc:
            log.error("model_store_unavailable", store=str(self.store.root), error=str(exc))
            return yaml_path
        recorded = self._read_sidecar()
        if state.active and recorded == yaml_pkg.digest and state.active != yaml_pkg.ref:
            try:
                pkg = self.store.get(state.active, self.trusted, check_model=False)
            except ModelPackageError as exc:
                log.error("model_store_active_unusable", active=state.active, error=str(exc),
                          fallback=yaml_pkg.ref)
            else:
                self.previous = state.previous
                log.info("model_from_store_state", active=pkg.ref, yaml_package=yaml_pkg.ref)
                return pkg.root
        previous = state.active if state.active and state.active != yaml_pkg.ref else \
            state.previous
        self._persist(StoreState(yaml_pkg.ref, previous, state.shadow))
        self._write_sidecar(yaml_pkg.digest)
        self.previous = previous
        return yaml_pkg.root

    def _read_sidecar(self) -> str | None:
        try:
            value = json.loads(self._sidecar.read_text()).get("yaml_digest")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def _write_sidecar(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            self._sidecar.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._sidecar.with_suffix(".tmp")
            tmp.write_text(json.dumps({"yaml_digest": digest}))
            tmp.replace(self._sidecar)

    def _persist(self, state: StoreState) -> None:
        try:
            self.store.write_state(state)
        except (ModelPackageError, OSError) as exc:
            log.error("model_state_not_saved", error=str(exc))

    # ---- commands -----------------------------------------------------------------------------

    def _resolve(self, ref_or_path: str) -> ModelPackage:
        try:
            return self.store.resolve(ref_or_path, self.trusted)
        except (ModelPackageError, OSError) as exc:
            raise ControlError(f"refused {ref_or_path}: {exc}") from None

    async def _start(self, pkg: ModelPackage, role: str, nice: int = 0) -> ActiveModel:
        d = self.daemon
        settings = d.config.model.model_copy(update={"package": pkg.root})
        started = await d.start_model(settings, d.config.decision, role, workers=None, nice=nice)
        if started is None or not started.pool.up:
            if started is not None:
                await started.pool.close(0)
            raise ControlError(f"{pkg.ref} could not be started: see the daemon log "
                               "(model_load_failed / inference_worker_start_failed)")
        return started

    async def activate(self, ref_or_path: str, canary: float | None = None) -> dict[str, Any]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            pkg = await loop.run_in_executor(None, self._resolve, ref_or_path)
            current = self.daemon.active
            if current is not None and current.package.digest == pkg.digest and canary is None:
                return self.status()
            if canary is not None:
                if not 0 < canary < 1:
                    raise ControlError("--canary is the share of parts, between 0 and 1")
                await self._stop_canary("replaced by a new canary")
                started = await self._start(pkg, "canary", nice=CANDIDATE_NICE)
                started.pool.renice(0)  # it decides real parts from now on
                assert self.daemon.pipeline is not None
                self.canary = Canary(started, canary)
                self.daemon.pipeline.set_canary(started.pool, started.model, canary)
                log.info("canary_started", model=pkg.ref, fraction=canary)
                return self.status()
            started = await self._start(pkg, "active", nice=CANDIDATE_NICE)
            await self._switch_to(started)
            return self.status()

    async def _switch_to(self, started: ActiveModel) -> None:
        d = self.daemon
        old = d.active
        d.switch_active(started)
        self.previous = old.package.ref if old is not None else self.previous
        state = self.store.read_state() if self.store.root.exists() else StoreState()
        shadow = self.shadow.model.package.ref if self.shadow else state.shadow
        self._persist(StoreState(started.package.ref, self.previous, shadow))
        self.last_event = {"event": "activated", "model": started.package.ref,
                           "previous": self.previous, "at": time.time()}
        log.info("model_activated", model=started.package.ref, previous=self.previous)

    async def rollback(self) -> dict[str, Any]:
        if self.canary is not None:
            await self._stop_canary("rolled back by request")
            return self.status()
        if not self.previous:
            raise ControlError("no previous model to roll back to (none was active before)")
        return await self.activate(self.previous)

    async def start_shadow(self, ref_or_path: str, sample: float) -> dict[str, Any]:
        if not 0 < sample <= 1:
            raise ControlError("--sample is the share of parts, in (0, 1]")
        async with self._lock:
            loop = asyncio.get_running_loop()
            pkg = await loop.run_in_executor(None, self._resolve, ref_or_path)
            await self._stop_shadow()
            started = await self._start(pkg, "shadow", nice=self.settings.shadow_nice)
            self.shadow = Shadow(started, sample)
            state = self.store.read_state()
            self._persist(StoreState(state.active, state.previous, pkg.ref))
            log.info("shadow_started", model=pkg.ref, sample=sample)
            return self.status()

    async def stop_shadow(self) -> dict[str, Any]:
        async with self._lock:
            await self._stop_shadow()
            return self.status()

    async def _stop_shadow(self) -> None:
        shadow, self.shadow = self.shadow, None
        if shadow is None:
            return
        await shadow.model.pool.close(1.0)
        with contextlib.suppress(ModelPackageError, OSError):
            state = self.store.read_state()
            self._persist(StoreState(state.active, state.previous, None))
        log.info("shadow_stopped", model=shadow.model.package.ref, **{
            k: v for k, v in shadow.as_json().items() if k in ("frames", "agreement")})

    async def _stop_canary(self, why: str) -> None:
        canary, self.canary = self.canary, None
        if canary is None or self.daemon.pipeline is None:
            return
        self.daemon.pipeline.clear_canary()
        self.last_event = {"event": "canary_stopped", "model": canary.model.package.ref,
                           "why": why, "figures": canary.as_json(), "at": time.time()}
        log.warning("canary_stopped", model=canary.model.package.ref, why=why,
                    figures=canary.as_json())
        await canary.model.pool.close(self.daemon.config.pipeline.model_hang_s)

    async def promote(self) -> dict[str, Any]:
        async with self._lock:
            if self.canary is not None:
                problems = self._canary_problems(final=True)
                if problems:
                    raise ControlError("canary not promoted: " + "; ".join(problems))
                canary, self.canary = self.canary, None
                assert self.daemon.pipeline is not None
                self.daemon.pipeline.clear_canary()
                await self._switch_to(canary.model)
                return self.status()
            if self.shadow is None:
                raise ControlError("nothing to promote: start `edge model shadow` or a canary")
            problems = self._shadow_problems()
            if problems:
                raise ControlError("shadow not promoted: " + "; ".join(problems))
            shadow = self.shadow
            pkg = shadow.model.package
            started = await self._start(pkg, "active", nice=CANDIDATE_NICE)
            await self._stop_shadow()
            await self._switch_to(started)
            return self.status()

    def _shadow_problems(self) -> list[str]:
        sh, gate = self.shadow, self.settings
        assert sh is not None
        out = []
        if sh.frames < gate.shadow_min_frames:
            out.append(f"{sh.frames} shadow frames < {gate.shadow_min_frames} needed")
        elif sh.agree / sh.frames < gate.min_agreement:
            out.append(f"agreement {sh.agree / sh.frames:.4f} < {gate.min_agreement}")
        active_p99 = self.daemon.stats.stages_ms["infer"].quantile(0.99)
        if len(sh.latency) and active_p99 == active_p99:  # not NaN
            ratio = sh.latency.quantile(0.99) / max(active_p99, 1e-3)
            if ratio > gate.max_latency_ratio:
                out.append(f"latency p99 {sh.latency.quantile(0.99):.1f} ms is {ratio:.2f}x the "
                           f"active model's (max {gate.max_latency_ratio}x)")
        if sh.errors:
            out.append(f"{sh.errors} shadow inferences failed")
        return out

    def _canary_problems(self, final: bool = False) -> list[str]:
        c, gate = self.canary, self.settings
        assert c is not None
        cand, base = c.candidate.rates(), c.baseline.rates()
        if c.candidate.parts < gate.canary_min_parts:
            return [f"{c.candidate.parts} canary parts < {gate.canary_min_parts} needed"] \
                if final else []
        out = []
        fs = (cand["failsafe_rate"] or 0.0) - (base["failsafe_rate"] or 0.0)
        if fs > gate.canary_max_failsafe_increase:
            limit = gate.canary_max_failsafe_increase
            out.append(f"fail-safe rate {cand['failsafe_rate']:.3f} vs active "
                       f"{base['failsafe_rate'] or 0:.3f} (max +{limit})")
        dr = abs((cand["defect_rate"] or 0.0) - (base["defect_rate"] or 0.0))
        if dr > gate.canary_max_defect_rate_change:
            out.append(f"defect rate {cand['defect_rate']:.3f} vs active "
                       f"{base['defect_rate'] or 0:.3f} (max change "
                       f"{gate.canary_max_defect_rate_change})")
        if cand["e2e_p99_ms"] is not None and base["e2e_p99_ms"]:
            ratio = cand["e2e_p99_ms"] / base["e2e_p99_ms"]
            if ratio > gate.max_latency_ratio:
                out.append(f"end-to-end p99 {cand['e2e_p99_ms']:.1f} ms is {ratio:.2f}x the "
                           f"active model's (max {gate.max_latency_ratio}x)")
        return out

    async def watch(self) -> None:
        """Periodic (housekeeping): roll a regressing canary back."""
        if self.canary is None:
            return
        problems = self._canary_problems()
        if problems:
            await self._stop_canary("automatic rollback: " + "; ".join(problems))

    def yaml_activated(self, package: ModelPackage) -> None:
        """SIGHUP brought a new `model.package` (or rules): record it as the active model."""
        try:
            pkg = self.store.import_package(package.root, self.trusted)
        except (ModelPackageError, OSError) as exc:
            log.error("model_store_unavailable", error=str(exc))
            return
        state = self.store.read_state()
        previous = state.active if state.active != pkg.ref else state.previous
        self.previous = previous
        self._persist(StoreState(pkg.ref, previous, state.shadow))
        self._write_sidecar(pkg.digest)

    def running(self) -> list[ActiveModel]:
        """The candidate models with worker pools (shadow, canary)."""
        return [x.model for x in (self.shadow, self.canary) if x is not None]

    async def close(self) -> None:
        await self._stop_canary("daemon stopping")
        await self._stop_shadow()

    def status(self) -> dict[str, Any]:
        active = self.daemon.active
        out: dict[str, Any] = {
            "active": active.package.ref if active else None,
            "active_digest": active.package.digest if active else None,
            "previous": self.previous,
            "shadow": self.shadow.as_json() if self.shadow else None,
            "canary": self.canary.as_json() if self.canary else None,
            "store": str(self.store.root),
            "last_event": self.last_event,
        }
        return out

    # ---- observing parts (event loop) -------------------------------------------------------

    def observe(self, part: DecidedPart) -> None:
        c = self.canary
        if c is not None:
            (c.candidate if part.canary else c.baseline).add(part)
        sh = self.shadow
        if (
            sh is None
            or part.decision is None
            or part.frame.frame_id < 0
            or not sampled(f"shadow/{part.frame.camera_id}/{part.frame.part_id}", sh.sample)
        ):
            return
        pool = sh.model.pool
        if not pool.has_capacity():
            sh.skipped += 1
            return
        t0 = time.perf_counter_ns()
        fut = pool.submit(
            [BatchItem(part.frame.image, part.frame.camera_id, part.recipe)], masks=True
        )
        fut.add_done_callback(lambda f: self._shadow_done(sh, part, f, t0))

    def _shadow_done(
        self, sh: Shadow, part: DecidedPart, fut: asyncio.Future[BatchOutput], t0: int
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            sh.errors += 1
            return
        out = fut.result()
        (decision,) = out.decisions
        active = part.decision
        assert active is not None
        sh.frames += 1
        sh.latency.add((time.perf_counter_ns() - t0) / 1e6)
        if decision.verdict == active.verdict:
            sh.agree += 1
        mine = {d.class_name for d in decision.counted}
        theirs = {d.class_name for d in active.counted}
        for cls in mine | theirs:
            counts = sh.per_class.setdefault(cls, [0, 0])
            counts[1] += 1
            counts[0] += cls in mine and cls in theirs
        self._shadow_event(sh, part, decision)

    def _shadow_event(self, sh: Shadow, part: DecidedPart, decision: Any) -> None:
        sink = self.daemon.spool
        if sink is None:
            return
        frame = part.frame
        event = PartEvent(
            event_id=new_event_id(frame.captured_wall_ns),
            line=self.daemon.config.line,
            camera=frame.camera_id,
            part_id=frame.part_id,
            sequence=None,
            frame_id=frame.frame_id,
            captured_at=rfc3339(frame.captured_wall_ns),
            decided_at=rfc3339(time.time_ns()),
            plc_acked_at=None,
            verdict=decision.verdict.name,
            reason=decision.reason,
            model_id=sh.model.model.model_id,
            model_digest=sh.model.model.digest,
            recipe=part.recipe,
            detections=[detection_dict(d) for d in decision.counted],
            plc_outcome="not_written",
            kind="shadow",
            amends=part.event_id,
        )
        with contextlib.suppress(Exception):
            sink.submit(event, None)

