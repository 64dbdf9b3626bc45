"""One thread per camera: open, read, hand frames on; detect stalls and faults; reopen with backoff.

Every backend blocks in vendor code (a GenTL fetch, an Aravis pop), so each camera gets its own
thread and the asyncio loop only ever sees finished frames through ``on_frame``. Recovery lives
here, once, so a backend only has to raise CameraError (or stop delivering) for the line to be told
the camera is down and for it to be reopened without taking the other cameras with it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from camera.config import CameraSettings, TriggeredMode
from camera.frame import Frame
from camera.source import CameraConfigError, FrameSource

log = structlog.get_logger(__name__)

State = Literal["up", "down"]
FrameCallback = Callable[[Frame], None]
StateCallback = Callable[[str, State, "str | None"], None]


class CameraWorker:
    """Runs one FrameSource in a dedicated thread.

    ``on_frame`` and ``on_state`` are called from the worker thread: the caller passes thread-safe
    callbacks (e.g. ``loop.call_soon_threadsafe`` wrappers). ``on_frame`` must not block: while it
    runs, the device's buffers fill up.
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
    ) -> None:
        self.source = source
        self.camera_id = source.camera_id
        self._on_frame = on_frame
        self._on_state = on_state
        self._stall_timeout_s = stall_timeout_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = max(backoff_max_s, backoff_min_s)
        self._triggered = triggered
        self._hardware_trigger = hardware_trigger
        self._trigger_rate_hz = trigger_rate_hz if triggered and not hardware_trigger else None
        self._trigger_thread: threading.Thread | None = None
        # Short reads keep stop() and stall detection responsive without busy-waiting.
        self._read_timeout_s = read_timeout_s or min(0.2, stall_timeout_s / 4)
        self._stop = threading.Event()
        self._src_lock = threading.Lock()
        self._open = False
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        """Set when the thread has ended (stopped, or a finite replay ran out)."""
        self._state: State | None = None
        self._reason: str | None = None
        self._frames = 0
        self._missed = 0
        self._reopens = 0
        self._stalls = 0
        self._errors = 0
        self._idle_reads = 0
        self._triggers = 0
        self._lost_triggers = 0
        self._outstanding: collections.deque[float] = collections.deque()
        self._last_frame_mono: float | None = None
        self._last_frame_id: int | None = None

    @classmethod
    def from_settings(
        cls,
        settings: CameraSettings,
        *,
        on_frame: FrameCallback,
        on_state: StateCallback,
        source: FrameSource | None = None,
    ) -> CameraWorker:
        """Build the worker (and, unless given, the source) for one ``CameraSettings`` entry."""
        from camera.factory import open_source

        trig = settings.trigger
        return cls(
            source if source is not None else open_source(settings),
            on_frame=on_frame,
            on_state=on_state,
            stall_timeout_s=settings.stall_timeout_s,
            backoff_min_s=settings.reopen_backoff_min_s,
            backoff_max_s=settings.reopen_backoff_max_s,
            triggered=isinstance(trig, TriggeredMode),
            hardware_trigger=isinstance(trig, TriggeredMode) and trig.source == "hardware",
            trigger_rate_hz=trig.rate_hz if isinstance(trig, TriggeredMode) else None,
        )

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"camera {self.camera_id}: worker already started")
        self._thread = threading.Thread(
            target=self._run, name=f"camera-{self.camera_id}", daemon=True
        )
        self._thread.start()
        if self._trigger_rate_hz:
            self._trigger_thread = threading.Thread(
                target=self._trigger_loop, name=f"camera-{self.camera_id}-trigger", daemon=True
            )
            self._trigger_thread.start()

    def _trigger_loop(self) -> None:
        """Fire software triggers on an absolute schedule (no drift); skip while down."""
        assert self._trigger_rate_hz
        period = 1.0 / self._trigger_rate_hz
        due = time.monotonic()
        while not self._stop.is_set():
            due += period
            delay = due - time.monotonic()
            if delay < -period:  # fell behind (e.g. the host stalled): resynchronise
                due = time.monotonic()
            elif self._stop.wait(max(delay, 0.0)):
                return
            if self._open:
                self.trigger()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop and join; False if the thread is still stuck in vendor code after ``timeout_s``."""
        self._stop.set()
        if self._trigger_thread is not None:
            self._trigger_thread.join(timeout_s)
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        if alive:
            log.error("camera_worker_stuck", camera=self.camera_id, timeout_s=timeout_s)
        return not alive

    def trigger(self) -> bool:
        """Fire one software trigger; False (counted as a lost trigger) while the camera is down."""
        with self._src_lock:
            if not self._open:
                self._lost_triggers += 1
                return False
            try:
                self.source.trigger()
            except Exception as exc:  # vendor code raises anything; the read loop will notice
                log.warning("camera_trigger_failed", camera=self.camera_id, error=str(exc))
                self._lost_triggers += 1
                return False
            self._triggers += 1
            self._outstanding.append(time.monotonic())
            return True

    @property
    def state(self) -> State | None:
        return self._state

    def stats(self) -> dict[str, Any]:
        last = self._last_frame_mono
        return {
            "camera_id": self.camera_id,
            "state": self._state,
            "reason": self._reason,
            "frames": self._frames,
            "missed": self._missed,
            "reopens": self._reopens,
            "stalls": self._stalls,
            "errors": self._errors,
            "idle_reads": self._idle_reads,
            "triggers": self._triggers,
            "lost_triggers": self._lost_triggers,
            "last_frame_age_s": None if last is None else time.monotonic() - last,
        }

    # -- thread -------------------------------------------------------------------------------
    def _set_state(self, state: State, reason: str | None) -> None:
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
                    self._errors += 1
                    kind = "config" if isinstance(exc, CameraConfigError) else "open"
                    self._set_state("down", f"{kind} failed: {exc}")
                    self._safe_close()
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, self._backoff_max_s)
                    self._reopens += 1
                    continue
                self._last_frame_id = None
                session_start = time.monotonic()
                self._set_state("up", None)
                reason, got_frame = self._read_loop(session_start)
                if reason is not None:
                    # Report before closing: closing a vanished device can block on timeouts.
                    self._set_state("down", reason)
                self._safe_close()
                if reason is None:  # stopped, or end of a finite replay
                    break
                if got_frame:
                    backoff = self._backoff_min_s
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self._backoff_max_s)
                self._reopens += 1
        finally:
            self._safe_close()
            self.finished.set()

    def _read_loop(self, session_start: float) -> tuple[str | None, bool]:
        """Read until stop (None), a fault or a stall (the reason); and whether any frame came."""
        got_frame = False
        last = session_start
        while not self._stop.is_set():
            try:
                frame = self.source.read(self._read_timeout_s)
            except EOFError as exc:
                self._set_state("down", f"finished: {exc}")
                return None, got_frame
            except Exception as exc:
                self._errors += 1
                return f"read failed: {type(exc).__name__}: {exc}", got_frame
            now = time.monotonic()
            if frame is None:
                self._idle_reads += 1
                stalled = self._stalled(now, last)
                if stalled:
                    self._stalls += 1
                    return stalled, got_frame
                continue
            got_frame = True
            last = now
            self._account(frame, now)
            try:
                self._on_frame(frame)
            except Exception:
                log.exception("camera_on_frame_failed", camera=self.camera_id)
        return None, got_frame

    def _stalled(self, now: float, last: float) -> str | None:
        limit = self._stall_timeout_s
        if not self._triggered:
            if now - last > limit:
                return f"stalled: no frame for {now - last:.2f}s (limit {limit}s)"
            return None
        # Triggered: silence is normal; a stall is triggers pending with no frame coming at all.
        if self._outstanding:
            since = max(self._outstanding[0], last)
            if now - since > limit:
                n = len(self._outstanding)
                return f"stalled: {n} trigger(s) unanswered for {now - since:.2f}s"
        return None

    def _account(self, frame: Frame, now: float) -> None:
        self._frames += 1
        self._last_frame_mono = now
        if self._outstanding:
            self._outstanding.popleft()
        prev = self._last_frame_id
        if prev is not None and frame.frame_id > prev + 1:
            self._missed += frame.frame_id - prev - 1
        self._last_frame_id = frame.frame_id

    def _safe_close(self) -> None:
        with self._src_lock:
            self._open = False
            lost = len(self._outstanding)
            if lost:
                self._lost_triggers += lost
                self._outstanding.clear()
            try:
                self.source.close()
            except Exception as exc:
                log.warning("camera_close_failed", camera=self.camera_id, error=str(exc))
