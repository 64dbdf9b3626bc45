"""Software triggers, one in flight at a time, so frame k is always the answer to trigger k.

A camera ignores a trigger that arrives while it is still exposing or reading out the previous
one (TLSimu drops triggers closer than ~5 ms; real sensors do the same without TriggerOverlap).
Fired blindly, a dropped trigger would shift every later part id by one and the PLC would eject
the wrong parts. Here a request made while a trigger is in flight waits, and is fired as soon as
the previous frame arrives.

Each request carries its part id (the one the PLC announced, or the trigger count), and the frame
that answers a trigger takes that id. Every accepted id ends exactly one way: answered by a frame,
or returned by :meth:`TriggerQueue.close` (or :meth:`TriggerQueue.fire_failed`) as lost, so the
daemon can fail-safe that part at once instead of waiting for its deadline.

This object only keeps the books; it never calls vendor code, and its lock is never held across
one, so ``request`` (called by the daemon) cannot block behind a slow device.
"""

from __future__ import annotations

import collections
import threading
import time


class TriggerQueue:
    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._queued: collections.deque[int] = collections.deque()
        self._in_flight: tuple[int, float] | None = None
        self._accepting = False
        self.accepted = 0
        """Requests accepted since creation (the part id of a request without one)."""
        self.wake = threading.Event()
        """Set when a trigger may be fired (a request arrived, or the one in flight answered)."""

    # -- the daemon's side --------------------------------------------------------------------
    def request(self, part_id: int | None = None) -> int | None:
        """Queue one trigger; returns its part id, or None when it cannot be accepted (closed or
        ``max_pending`` waiting: the caller fail-safes that part itself)."""
        with self._lock:
            if not self._accepting or self._pending_locked() >= self.max_pending:
                return None
            self.accepted += 1
            part = self.accepted if part_id is None else part_id
            self._queued.append(part)
        self.wake.set()
        return part

    # -- the firing thread --------------------------------------------------------------------
    def take_next(self) -> int | None:
        """The part whose trigger is to be fired now (marked in flight first, so its frame can
        never arrive unexpected); None while one is in flight or none is queued."""
        with self._lock:
            if self._in_flight is not None or not self._queued or not self._accepting:
                return None
            part = self._queued.popleft()
            self._in_flight = (part, time.monotonic())
            return part

    def fire_failed(self, part_id: int) -> bool:
        """The device refused the trigger for ``part_id``: True if that part is now lost (its
        frame did not already arrive, and a close did not already report it)."""
        with self._lock:
            if self._in_flight is not None and self._in_flight[0] == part_id:
                self._in_flight = None
                return True
            return False

    # -- the acquisition thread ---------------------------------------------------------------
    def answered(self) -> int | None:
        """A frame arrived: the part id of the trigger in flight, or None if none was (a frame
        nobody asked for must not take the next part's id)."""
        with self._lock:
            if self._in_flight is None:
                return None
            part = self._in_flight[0]
            self._in_flight = None
            more = bool(self._queued)
        if more:
            self.wake.set()
        return part

    def open(self) -> None:
        with self._lock:
            self._accepting = True

    def close(self) -> list[int]:
        """Stop accepting; the part ids whose frames will now never come, in trigger order."""
        with self._lock:
            self._accepting = False
            lost = [self._in_flight[0]] if self._in_flight is not None else []
            lost.extend(self._queued)
            self._in_flight = None
            self._queued.clear()
            return lost

    # -- state --------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    def in_flight_since(self) -> float | None:
        """time.monotonic() when the unanswered trigger was fired; None if none is in flight."""
        with self._lock:
            return None if self._in_flight is None else self._in_flight[1]

    def pending(self) -> int:
        """Accepted triggers not answered yet (in flight + queued)."""
        with self._lock:
            return self._pending_locked()

    def _pending_locked(self) -> int:
        return len(self._queued) + (1 if self._in_flight is not None else 0)
