"""One thread per camera: open, read, hand frames on; detect stalls and faults; reopen with backoff.

Every backend blocks in vendor code (a GenTL fetch, an Aravis pop), so each camera gets its own
thread and the asyncio loop only ever sees finished frames through ``on_frame``. Recovery lives
here, once, so a backend only has to raise CameraError (or stop delivering) for the line to be told
the camera is down and for it to be reopened without taking the other cameras with it.

Software-triggered cameras (``source: software`` or ``plc``) get a second thread that alone fires
the vendor trigger: ``trigger()`` only queues the part id (see camera.triggerq), so the daemon's
event loop never waits on a device, and the frame that answers carries that part id. Every
accepted trigger ends exactly one way: its frame is handed on, or ``on_trigger_lost`` names it.

Every frame read is handed on exactly once (or counted as unsolicited when nobody triggered it);
frames the line cannot inspect are marked (camera.guard) rather than dropped, and everything
lost before that point is counted in ``stats()``, which another thread may read at any time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from camera.config import CameraSettings, MaxFrameSettings, TriggeredMode
from camera.frame import Frame
from camera.guard import FrameGuard
from camera.source import CameraConfigError, FrameSource
from camera.triggerq import TriggerQueue

log = structlog.get_logger(__name__)

State = Literal["up", "down"]
FrameCallback = Callable[[Frame], None]
StateCallback = Callable[[str, State, "str | None"], None]
TriggerLostCallback = Callable[[str, int, str], None]
"""(camera_id, part_id, reason): an accepted trigger whose frame will never come."""

COUNTERS = (
    "frames", "missed", "reopens", "stalls", "errors", "idle_reads", "triggers",
    "refused_triggers", "lost_triggers", "unsolicited", "bad_files", "incomplete", "refused",
    "downscaled", "callback_errors",
)
"""The monotonically growing counters of ``stats()`` (documented in docs/camera.md)."""


class CameraWorker:
    """Runs one FrameSource in a dedicated thread.

    ``on_frame``, ``on_state`` and ``on_trigger_lost`` are called from the worker's threads: the
    caller passes thread-safe callbacks (e.g. ``loop.call_soon_threadsafe`` wrappers). They must
    not block: while ``on_frame`` runs, the device's buffers fill up.
    """

    def __init__(
        self,
        source: FrameSource,
        *,
        on_frame: FrameCallback,
        on_state: StateCallback,
        stall_timeout_s: float = 2.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        triggered: bool = False,
        hardware_trigger: bool = False,
        read_timeout_s: float | None = None,
        trigger_rate_hz: float | None = None,
        plc_trigger: bool = False,
        plc_part_id: bool = False,
        max_frame: MaxFrameSettings | None = None,
        on_trigger_lost: TriggerLostCallback | None = None,
        max_pending_triggers: int = 64,
    ) -> None:
        self.source = source
        self.camera_id = source.camera_id
        self._on_frame = on_frame
        self._on_state = on_state
        self._on_trigger_lost = on_trigger_lost
        self._stall_timeout_s = stall_timeout_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = max(backoff_max_s, backoff_min_s)
        self._triggered = triggered or plc_trigger
        self._hardware_trigger = hardware_trigger and not plc_trigger
        self._fires = self._triggered and not self._hardware_trigger
        self._plc_trigger = plc_trigger and self._fires
        self._plc_part_id = plc_part_id and self._hardware_trigger
        self._trigger_rate_hz = trigger_rate_hz if self._fires and not plc_trigger else None
        self._tq = TriggerQueue(max_pending_triggers)
        self._guard = FrameGuard(max_frame)
        self._trigger_thread: threading.Thread | None = None
        # Short reads keep stop() and stall detection responsive without busy-waiting.
        self._read_timeout_s = read_timeout_s or min(0.2, stall_timeout_s / 4)
        self._stop = threading.Event()
        self._src_lock = threading.Lock()  # vendor trigger vs. open/close; never held by callers
        self._open = False
        self._fault: str | None = None  # set by the trigger thread: the read loop takes it down
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        """Set when the thread has ended (stopped, or a finite replay ran out)."""
        # Everything stats() reports, guarded by one lock that is only ever held for a few
        # assignments (never across a vendor call or a callback), so a reader gets a consistent
        # snapshot without ever waiting on a device.
        self._lock = threading.Lock()
        self._n: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._state: State | None = None
        self._reason: str | None = None
        self._last_frame_mono: float | None = None
        self._last_frame_id: int | None = None
        self._logged: set[str] = set()

    @classmethod
    def from_settings(
        cls,
        settings: CameraSettings,
        *,
        on_frame: FrameCallback,
        on_state: StateCallback,
        source: FrameSource | None = None,
        on_trigger_lost: TriggerLostCallback | None = None,
    ) -> CameraWorker:
        """Build the worker (and, unless given, the source) for one ``CameraSettings`` entry."""
        from camera.factory import open_source

        trig = settings.trigger
        t = trig if isinstance(trig, TriggeredMode) else None
        return cls(
            source if source is not None else open_source(settings),
            on_frame=on_frame,
            on_state=on_state,
            stall_timeout_s=settings.stall_timeout_s,
            backoff_min_s=settings.reopen_backoff_min_s,
            backoff_max_s=settings.reopen_backoff_max_s,
            triggered=t is not None,
            hardware_trigger=t is not None and t.source == "hardware",
            trigger_rate_hz=t.rate_hz if t is not None else None,
            plc_trigger=t is not None and t.source == "plc",
            plc_part_id=t is not None and t.part_id_from_plc,
            max_frame=settings.max_frame,
            on_trigger_lost=on_trigger_lost,
        )

    # -- what the daemon wires ----------------------------------------------------------------
    @property
    def triggered_by_plc(self) -> bool:
        """The daemon fires ``trigger(part_id)`` when the PLC's trigger counter moves."""
        return self._plc_trigger

    @property
    def plc_part_id_on_frame(self) -> bool:
        """Hardware trigger, part id read from the PLC by the daemon when each frame arrives."""
        return self._plc_part_id

    @property
    def software_triggered(self) -> bool:
        """``trigger()`` fires this camera (source: software or plc)."""
        return self._fires

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"camera {self.camera_id}: worker already started")
        self._thread = threading.Thread(
            target=self._run, name=f"camera-{self.camera_id}", daemon=True
        )
        self._thread.start()
        if self._fires:
            self._trigger_thread = threading.Thread(
                target=self._trigger_loop, name=f"camera-{self.camera_id}-trigger", daemon=True
            )
            self._trigger_thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop and join; False if the thread is still stuck in vendor code after ``timeout_s``."""
        self._stop.set()
        self._tq.wake.set()
        if self._trigger_thread is not None:
            self._trigger_thread.join(timeout_s)
        if self._thread is None:
            self._drain("camera stopped")
            return True
        self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        if alive:
            log.error("camera_worker_stuck", camera=self.camera_id, timeout_s=timeout_s)
        return not alive

    def trigger(self, part_id: int | None = None) -> bool:
        """Fire one software trigger for ``part_id`` (None: the trigger count); never blocks.

        True: the trigger is fired or queued behind the one in flight, and exactly one of two
        things follows: a frame with this ``part_id`` reaches ``on_frame``, or
        ``on_trigger_lost(camera_id, part_id, reason)`` is called. False: it could not be
        accepted (camera down, closed, stopped, ``max_pending_triggers`` waiting, or a camera
        that is not software-triggered); nothing more will be said about it, so the caller
        fail-safes that part at once.
        """
        if not self._fires:
            self._count("refused_triggers")
            self._log_once(
                "not_software_triggered", "camera_trigger_refused",
                why="this camera is not software-triggered (trigger.source: software or plc)",
            )
            return False
        with self._lock:  # one section with the count: stats() never sees one without the other
            accepted = None if self._stop.is_set() else self._tq.request(part_id)
            self._n["triggers" if accepted is not None else "refused_triggers"] += 1
        return accepted is not None

    @property
    def state(self) -> State | None:
        return self._state

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the counters (docs/camera.md lists every key); cheap and
        safe from any thread at any time."""
        with self._lock:
            pending = self._tq.pending()
            out: dict[str, Any] = {
                "camera_id": self.camera_id,
                "state": self._state,
                "reason": self._reason,
                **self._n,
                "last_frame_id": self._last_frame_id,
                "last_frame_mono": self._last_frame_mono,
            }
        last = out.pop("last_frame_mono")
        out["pending_triggers"] = pending
        out["last_frame_age_s"] = None if last is None else time.monotonic() - last
        return out

    # -- the trigger thread -------------------------------------------------------------------
    def _trigger_loop(self) -> None:
        """Fire queued triggers one at a time; and, with ``rate_hz``, request them on an
        absolute schedule (no drift; skipped while the camera is down)."""
        period = 1.0 / self._trigger_rate_hz if self._trigger_rate_hz else None
        due = time.monotonic() + (period or 0.0)
        while not self._stop.is_set():
            wait = None
            if period is not None:
                now = time.monotonic()
                if now >= due:
                    if self._tq.accepting:
                        self.trigger()
                    due += period
                    if due < now - period:  # fell behind (e.g. the host stalled): resynchronise
                        due = now + period
                wait = max(due - time.monotonic(), 0.0)
            self._tq.wake.wait(wait)
            self._tq.wake.clear()
            while not self._stop.is_set():
                part = self._tq.take_next()
                if part is None:
                    break
                self._fire(part)

    def _fire(self, part: int) -> None:
        try:
            with self._src_lock:
                if not self._open:
                    raise RuntimeError("camera closed")
                self.source.trigger()
        except Exception as exc:  # vendor code raises anything
            reason = f"trigger failed: {type(exc).__name__}: {exc}"
            with self._lock:
                lost = [part, *self._tq.close()] if self._tq.fire_failed(part) else []
                self._n["lost_triggers"] += len(lost)
            if lost:
                # The device may still have taken it (a lost acknowledgement): a frame could
                # come for it later and take the next part's id. Only a reopen makes the
                # sequence certain again, so the camera goes down; the queue dies with it.
                self._fault = reason
                self._report_lost(lost, reason)

    def _drain(self, reason: str) -> None:
        """Stop accepting triggers; report every accepted one still unanswered as lost."""
        with self._lock:
            lost = self._tq.close()
            self._n["lost_triggers"] += len(lost)
        self._report_lost(lost, reason)

    def _report_lost(self, parts: list[int], reason: str) -> None:
        if not parts:
            return
        log.warning("camera_triggers_lost", camera=self.camera_id, parts=parts[:20],
                    count=len(parts), reason=reason)
        if self._on_trigger_lost is None:
            return
        for part in parts:
            try:
                self._on_trigger_lost(self.camera_id, part, reason)
            except Exception:
                log.exception("camera_on_trigger_lost_failed", camera=self.camera_id)

    # -- the acquisition thread ---------------------------------------------------------------
    def _set_state(self, state: State, reason: str | None) -> None:
        with self._lock:
            if state == self._state and reason == self._reason:
                return
            changed = state != self._state
            self._state, self._reason = state, reason
        if changed:
            (log.info if state == "up" else log.warning)(
                "camera_state", camera=self.camera_id, state=state, reason=reason
            )
            try:
                self._on_state(self.camera_id, state, reason)
            except Exception:
                log.exception("camera_on_state_failed", camera=self.camera_id)

    def _run(self) -> None:
        backoff = self._backoff_min_s
        try:
            while not self._stop.is_set():
                try:
                    with self._src_lock:
                        self.source.open()
                        self._open = True
                except Exception as exc:
                    self._count("errors")
                    kind = "config" if isinstance(exc, CameraConfigError) else "open"
                    self._set_state("down", f"{kind} failed: {exc}")
                    self._safe_close(None)
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, self._backoff_max_s)
                    self._count("reopens")
                    continue
                with self._lock:
                    self._last_frame_id = None
                self._sync_source_counters()
                self._fault = None
                if self._fires:
                    self._tq.open()  # before "up": a trigger sent on hearing "up" is accepted
                self._set_state("up", None)
                reason, got_frame = self._read_loop(time.monotonic())
                if reason is not None:
                    # Lost triggers first (the daemon fail-safes those parts now), then the
                    # state, both before closing: closing a vanished device can block.
                    self._drain(reason)
                    self._set_state("down", reason)
                self._safe_close("camera stopped" if reason is None else reason)
                if reason is None:  # stopped, or end of a finite replay
                    break
                if got_frame:
                    backoff = self._backoff_min_s
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self._backoff_max_s)
                self._count("reopens")
        finally:
            self._safe_close("camera stopped")
            self.finished.set()

    def _read_loop(self, session_start: float) -> tuple[str | None, bool]:
        """Read until stop (None), a fault or a stall (the reason); and whether any frame came."""
        got_frame = False
        last = session_start
        while not self._stop.is_set():
            try:
                frame = self.source.read(self._read_timeout_s)
            except EOFError as exc:
                self._sync_source_counters()
                self._drain(f"finished: {exc}")
                self._set_state("down", f"finished: {exc}")
                return None, got_frame
            except Exception as exc:
                self._count("errors")
                self._sync_source_counters()
                return f"read failed: {type(exc).__name__}: {exc}", got_frame
            now = time.monotonic()
            if frame is None:
                self._sync_source_counters(idle=True)
                if self._fault is not None:
                    return self._fault, got_frame
                stalled = self._stalled(now, last)
                if stalled:
                    self._count("stalls")
                    return stalled, got_frame
                continue
            got_frame = True
            last = now
            out = self._prepare(frame, now)
            if out is not None:
                try:
                    self._on_frame(out)
                except Exception:
                    self._count("callback_errors")
                    self._log_once("on_frame", "camera_on_frame_failed", exc_info=True)
            if self._fault is not None:
                return self._fault, got_frame
        return None, got_frame

    def _prepare(self, frame: Frame, now: float) -> Frame | None:
        """Part id, guard and books for one frame; None for a frame no trigger asked for."""
        src_counts = self._source_counts()
        with self._lock:  # the trigger answered and the frame counted in one section
            n = self._n
            n.update(src_counts)
            prev = self._last_frame_id
            self._last_frame_id = frame.frame_id
            part = self._tq.answered() if self._fires else None
            if self._fires and part is None:
                n["unsolicited"] += 1
            else:
                n["frames"] += 1
                if prev is not None and frame.frame_id > prev + 1:
                    n["missed"] += frame.frame_id - prev - 1
                self._last_frame_mono = now
        if self._fires and part is None:
            self._log_once("unsolicited", "camera_unsolicited_frame", frame_id=frame.frame_id,
                           why="a frame arrived with no software trigger in flight; dropped")
            return None
        if part is not None and part != frame.part_id:
            frame = dataclasses.replace(frame, part_id=part)
        frame, verdict = self._guard.check(frame)
        if verdict != "ok":
            self._count(verdict)
            self._log_once(f"{verdict}:{(frame.problem or '').split(' ')[0]}",
                           "camera_frame_" + verdict, frame_id=frame.frame_id,
                           problem=frame.problem, meta=frame.source_meta.get("downscaled_from"))
        return frame

    def _stalled(self, now: float, last: float) -> str | None:
        limit = self._stall_timeout_s
        if not self._triggered:
            if now - last > limit:
                return f"stalled: no frame for {now - last:.2f}s (limit {limit}s)"
            return None
        # Triggered: silence is normal; a stall is a trigger fired and no frame coming at all.
        fired = self._tq.in_flight_since()
        if fired is not None:
            since = max(fired, last)
            if now - since > limit:
                n = self._tq.pending()
                return f"stalled: trigger unanswered for {now - since:.2f}s ({n} pending)"
        return None

    def _safe_close(self, reason: str | None) -> None:
        if reason is not None:
            self._drain(reason)
        with self._src_lock:
            self._open = False
            try:
                self.source.close()
            except Exception as exc:
                log.warning("camera_close_failed", camera=self.camera_id, error=str(exc))

    # -- books --------------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._n[key] += n

    def _source_counts(self) -> dict[str, int]:
        """Losses a backend counts itself: undecodable replay files/frames, incomplete GigE
        buffers (whose ids also show up in ``missed``)."""
        src = self.source
        return {
            "bad_files": int(getattr(src, "skipped_files", 0) or 0),
            "incomplete": int(getattr(src, "incomplete", 0) or 0),
        }

    def _sync_source_counters(self, idle: bool = False) -> None:
        counts = self._source_counts()
        with self._lock:
            if idle:
                self._n["idle_reads"] += 1
            self._n.update(counts)

    def _log_once(self, key: str, event: str, exc_info: bool = False, **kw: Any) -> None:
        """Per-frame conditions are logged the first time only; stats() counts the rest."""
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(event, camera=self.camera_id, exc_info=exc_info,
                    note="logged once; see the camera's stats() counters", **kw)
