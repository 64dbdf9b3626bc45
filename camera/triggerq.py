"""Software triggers, one in flight at a time, so frame k is always the answer to trigger k.

A camera ignores a trigger that arrives while it is still exposing or reading out the previous
one (TLSimu drops triggers closer than ~5 ms; real sensors do the same without TriggerOverlap).
Fired blindly, a dropped trigger would shift every later part id by one and the PLC would eject
the wrong parts. Here a request made while a trigger is in flight waits, and is fired by the
acquisition thread as soon as the previous frame arrives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class TriggerQueue:
    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire_fn = fire
        self._lock = threading.Lock()
        self.requested = 0
        self.fired = 0
        self.in_flight = False
        self.last_error: Exception | None = None

    def request(self) -> None:
        """Called by whoever triggers (the daemon); fires now unless a trigger is in flight."""
        with self._lock:
            self.requested += 1
            if not self.in_flight:
                self._fire()

    def answered(self) -> int:
        """Called by the acquisition thread per frame: its part id; fires the next queued one."""
        with self._lock:
            part = self.fired
            self.in_flight = False
            if self.requested > self.fired:
                try:
                    self._fire()
                except Exception as exc:  # this frame is still good; the next read will fail
                    self.last_error = exc
            return part

    def reset(self) -> int:
        """Drop queued triggers (the device was reopened); returns how many were dropped."""
        with self._lock:
            dropped = self.requested - self.fired
            self.requested = self.fired
            self.in_flight = False
            return dropped

    def _fire(self) -> None:
        try:
            self._fire_fn()
        except BaseException:
            self.requested = self.fired  # the device refused: queued requests die with it
            raise
        self.fired += 1
        self.in_flight = True
