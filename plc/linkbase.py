"""What every PLC backend shares: the reconnect supervisor, the deadline gate, serialisation and
the confirmation of outcome-unknown writes.

Why the project owns this instead of the client libraries: pymodbus never starts its reconnect
when the first connect fails, leaves an in-flight request waiting its whole timeout when the
connection drops, and retries with 3 s timeouts; python-snap7 ignores its receive timeout and must
be disconnected+reconnected after one. A verdict that arrives after its part has passed the
ejector is worse than none, so the rules here are strict:

* one request at a time per connection (one asyncio.Lock);
* every request's timeout is the frame's remaining budget; a request that cannot complete before
  its deadline is not sent (DROPPED_LATE);
* a request that times out in flight is UNKNOWN: the connection is dropped (a late response can
  then never be mistaken for the next request's) and, before any later write, the link reads the
  record back to learn whether it was applied. That read-back has its OWN budget
  (readback_timeout_ms): given the triggering write's last milliseconds, a read-back answered in
  < 1 ms timed out, and recovery after SIGSTOP/SIGCONT of the PLC took 417 ms;
* after a connection was lost, the link reports itself connected only once the PLC answered a
  probe on the new connection (the read-back, or a small read): a hung PLC whose kernel still
  accepts TCP connects would otherwise let every write burn its whole budget;
* nothing is queued: after a reconnect there is nothing old to replay;
* ring mode (results.mode: ring): a record never overwrites a slot the PLC may not have read yet
  (written less than results.plc_scan_ms ago, or, acknowledged, not yet acknowledged): the write
  waits inside its budget instead, so a catch-up burst is paced to what the PLC can read.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from plc.config import ResultsSettings, _LinkTiming
from plc.layout import DecodedRecord, ring_slot
from plc.record import (
    Alarm,
    DecisionRecord,
    PlcInputs,
    WriteOutcome,
    WriteResult,
    unacked_count,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")


class DefiniteFailure(Exception):
    """The peer answered and refused (exception response, bad address): nothing was applied."""


class NotSent(Exception):
    """The request never left (no connection at the moment of sending): nothing was applied."""


@dataclass(slots=True)
class LinkStats:
    """Counters a daemon exports as metrics; monotonically increasing."""

    acked: int = 0
    dropped_late: int = 0
    failed: int = 0
    unknown: int = 0
    confirmed_applied: int = 0
    confirmed_not_applied: int = 0
    confirm_impossible: int = 0
    connects: int = 0
    connection_losses: int = 0
    reads_ok: int = 0
    reads_failed: int = 0
    probes_failed: int = 0
    """Reconnects whose first request (read-back or probe) got no answer: a hung PLC."""
    ring_waits: int = 0
    """Ring mode: records that waited for the PLC to read (or acknowledge) the slot they reuse."""
    ring_full: int = 0
    """Ring mode: records dropped because their slot was not free before their deadline."""


@dataclass(frozen=True, slots=True)
class LinkHealth:
    backend: str
    target: str
    connected: bool
    down_since_ns: int | None
    last_error: str
    rtt_ewma_ms: float
    unconfirmed_writes: int
    stats: LinkStats = field(default_factory=LinkStats)


@dataclass(frozen=True, slots=True)
class RingView:
    """One camera's ring as the PLC holds it (tools and tests)."""

    head: int
    """Sequence of the newest record written (0 = none)."""
    records: list[DecodedRecord]
    """Slot 0..N-1 as stored (slot k holds the record whose sequence s has (s-1) mod N == k)."""

    def newest(self) -> DecodedRecord | None:
        if self.head == 0:
            return None
        return self.records[ring_slot(self.head, len(self.records))]


STATUS_PERIOD_FLOOR_MS = 20.0


@dataclass(slots=True)
class _Pending:
    """A write whose outcome is unknown, with how to tell whether it landed."""

    label: str
    confirm: Callable[[float], Awaitable[bool]]
    """Reads back within the given timeout (s); True = applied. Raises like a request."""
    record: tuple[int, int] | None = None
    """(camera_index, sequence) when the write was a decision record."""


class ReconnectingLink(abc.ABC):
    """Base of ModbusLink, S7Link, OpcUaLink (implements plc.record.PlcLink's plumbing)."""

    backend = "?"

    def __init__(
        self,
        timing: _LinkTiming,
        target: str,
        camera_slots: int,
        results: ResultsSettings | None = None,
    ) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        self._timing = timing
        self._target = target
        self.camera_slots = camera_slots
        self.results = results or ResultsSettings()
        self._ring_hist: dict[int, deque[tuple[int, int]]] = {}
        """Ring mode, per camera: (sequence, time written ns) of the last ring_size records."""
        self._ack_seen: dict[int, int] = {}
        self.on_write_confirmed: Callable[[int, int, bool], None] | None = None
        """Called (camera_index, sequence, applied) when the read-back settles a decision record
        whose write was UNKNOWN, so the daemon can give its event the final outcome."""
        self._connected = False
        self._closing = False
        self._lock: asyncio.Lock | None = None
        self._lost: asyncio.Event | None = None
        self._up: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._rtt_ewma_s = 0.0
        self._down_since_ns: int | None = time.monotonic_ns()
        self._last_error = "not started"
        self._healthy: bool | None = None
        """None until the first request succeeds; False from a failure until the next success."""
        self._bad_since_ns = 0
        self.stats = LinkStats()

    # -- backend hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self, timeout_s: float) -> None:
        """Open a fresh connection or raise. Must call self._connection_lost() if it drops later."""

    @abc.abstractmethod
    async def _shut(self) -> None:
        """Close the current connection (idempotent, never raises)."""

    @abc.abstractmethod
    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult: ...

    @abc.abstractmethod
    async def write_status(
        self, heartbeat: int, alarms: Alarm, deadline_ns: int
    ) -> WriteResult: ...

    @abc.abstractmethod
    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None: ...

    @abc.abstractmethod
    async def read_record(self, camera_index: int, deadline_ns: int) -> DecodedRecord | None:
        """Read back a camera's record (tools and tests; the daemon never needs it)."""

    @abc.abstractmethod
    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None:
        """(heartbeat, alarms) as the PLC holds them (tools and tests)."""

    @abc.abstractmethod
    async def read_inputs(
        self,
        deadline_ns: int,
        *,
        triggers: bool = True,
        recipe: bool = False,
        acks: bool = False,
    ) -> PlcInputs | None: ...

    @abc.abstractmethod
    async def read_sequences(self, deadline_ns: int) -> list[int] | None: ...

    @abc.abstractmethod
    async def read_ring(self, camera_index: int, deadline_ns: int) -> RingView | None:
        """Ring mode: head and every slot of a camera's ring (tools and tests)."""

    @abc.abstractmethod
    async def _probe(self, timeout_s: float) -> None:
        """One small read that proves the PLC answers on this connection (raises otherwise)."""

    @abc.abstractmethod
    async def _read_ack(self, camera_index: int, timeout_s: float) -> int:
        """Acknowledged mode: the sequence the PLC last consumed for this camera (raises)."""

    def _check_cam(self, camera_index: int) -> None:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")

    @property
    def min_status_period_ms(self) -> float:
        """The shortest heartbeat period this link can honour.

        A status write may wait behind a read-back (readback_timeout_ms) and needs a few round
        trips: a heartbeat_ms below this (10 ms was accepted) starved the heartbeat for 14.5 s.
        """
        return max(
            STATUS_PERIOD_FLOOR_MS,
            self._timing.readback_timeout_ms,
            4.0 * self._timing.min_request_ms,
            10.0 * self._rtt_ewma_s * 1e3,
        )

    # -- PlcLink plumbing ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def health(self) -> LinkHealth:
        return LinkHealth(
            backend=self.backend,
            target=self._target,
            connected=self._connected,
            down_since_ns=self._down_since_ns,
            last_error=self._last_error,
            rtt_ewma_ms=self._rtt_ewma_s * 1e3,
            unconfirmed_writes=len(self._pending),
            stats=LinkStats(**{k: getattr(self.stats, k) for k in LinkStats.__slots__}),
        )

    async def start(self) -> None:
        if self._task is not None:
            return
        self._lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._supervise(), name=f"plc-{self.backend}-link")

    async def wait_connected(self, timeout_s: float) -> bool:
        """For tools and tests: wait until the link is up (the daemon never waits)."""
        if self._up is None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self._connected

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected = False
        await self._shut()

    def _connection_lost(self, reason: str) -> None:
        """Called by the backend (any context in the loop) when the connection is gone."""
        self._ack_seen.clear()  # the PLC may come back restarted: ask again
        if self._up is not None:
            self._up.clear()
        if self._connected:
            self._connected = False
            self.stats.connection_losses += 1
            self._down_since_ns = time.monotonic_ns()
        self._mark_bad(reason)
        if self._lost is not None:
            self._lost.set()

    def _mark_bad(self, reason: str) -> None:
        """Log once per outage (like Home Assistant's Modbus hub), not once per failed request."""
        self._last_error = reason
        if self._healthy is not False:
            self._healthy = False
            self._bad_since_ns = time.monotonic_ns()
            log.warning("plc_unavailable", backend=self.backend, target=self._target, error=reason)

    def _mark_good(self) -> None:
        """A request succeeded: the PLC really answers (a TCP connect alone proves little)."""
        if self._healthy is True:
            return
        if self._healthy is False:
            log.info(
                "plc_back",
                backend=self.backend,
                target=self._target,
                down_s=round((time.monotonic_ns() - self._bad_since_ns) / 1e9, 3),
            )
        else:
            log.info("plc_connected", backend=self.backend, target=self._target)
        self._healthy = True

    async def _supervise(self) -> None:
        assert self._lost is not None and self._up is not None
        t = self._timing
        backoff_min, backoff_max = (
            t.reconnect_backoff_min_ms / 1e3,
            t.reconnect_backoff_max_ms / 1e3,
        )
        backoff = backoff_min
        while not self._closing:
            self._lost.clear()
            try:
                await asyncio.wait_for(
                    self._open(t.connect_timeout_ms / 1e3), t.connect_timeout_ms / 1e3 + 0.05
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any connect failure: the line must keep running
                self._mark_bad(f"connect failed: {type(exc).__name__}: {exc}")
                await self._shut()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, backoff_max)
                continue
            t_probe = time.monotonic()
            if (self._healthy is False or self._pending) and not await self._verify():
                self.stats.probes_failed += 1
                await self._shut()
                if time.monotonic() - t_probe >= 0.9 * t.readback_timeout_ms / 1e3:
                    # No answer at all (hung, SIGSTOPped PLC whose kernel accepts connects):
                    # the probe's own timeout paced this attempt; retry almost at once, since a
                    # PLC that resumes answers the next probe immediately (SIGCONT -> first
                    # acknowledged write: ~40 ms with a 50 ms pause here, ~5 ms without).
                    await asyncio.sleep(0.005)
                else:  # refused fast (reset, closed): back off like a failed connect
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, backoff_max)
                continue
            backoff = backoff_min
            self._connected = True
            self._up.set()
            self._down_since_ns = None
            self.stats.connects += 1
            log.debug("plc_connect", backend=self.backend, target=self._target)
            if not self._lost.is_set():  # (it may have dropped during the handshake)
                await self._lost.wait()
            self._connected = False
            self._up.clear()
            if self._down_since_ns is None:
                self._down_since_ns = time.monotonic_ns()
            await self._shut()
            # Reconnect at once: a timed-out request drops a healthy socket too, and the probe
            # above keeps a hung PLC from being reported connected.

    async def _verify(self) -> bool:
        """On a fresh connection after trouble: settle unknown writes (or probe) with the
        read-back budget, before anyone may write. False = the PLC did not answer."""
        assert self._lock is not None
        budget_s = self._timing.readback_timeout_ms / 1e3
        try:
            await asyncio.wait_for(self._lock.acquire(), budget_s)
        except TimeoutError:
            return False
        try:
            if self._pending:
                return await self._confirm_pending() is None
            try:
                await asyncio.wait_for(self._probe(budget_s), budget_s)
            except DefiniteFailure as exc:
                # It answered, even if only to refuse (e.g. a map the PLC does not hold):
                # connected; the refusal shows on the requests that need the address.
                self._last_error = f"probe refused: {exc}"
                self._mark_good()
                return True
            except Exception as exc:
                self._last_error = f"no answer after reconnect: {type(exc).__name__}: {exc}"
                return False
            self._mark_good()
            return True
        finally:
            self._lock.release()

    # -- requests -----------------------------------------------------------------------------

    def _needed_s(self) -> float:
        return max(self._timing.min_request_ms / 1e3, 2.0 * self._rtt_ewma_s)

    def _note_rtt(self, rtt_s: float) -> None:
        self._rtt_ewma_s = (
            rtt_s if self._rtt_ewma_s == 0.0 else 0.9 * self._rtt_ewma_s + 0.1 * rtt_s
        )

    async def _acquire(self, deadline_ns: int) -> bool:
        assert self._lock is not None
        remaining = (deadline_ns - time.monotonic_ns()) / 1e9 - self._needed_s()
        if remaining <= 0:
            return False
        if not self._lock.locked():  # the common case: no timer, no task, no loop round trip
            await self._lock.acquire()
            return True
        try:
            async with asyncio.timeout(remaining):
                await self._lock.acquire()
        except TimeoutError:
            return False
        return True

    async def _confirm_pending(self) -> str | None:
        """Resolve outcome-unknown writes before any other write (lock held). None = resolved.

        Each read-back gets readback_timeout_ms of its own: it changes nothing at the PLC, so it
        may outlive the budget of the write that waits for it (that write is then dropped late,
        and the next one goes out on a settled link).
        """
        timeout_s = self._timing.readback_timeout_ms / 1e3
        for key, pend in list(self._pending.items()):
            try:
                applied = await asyncio.wait_for(pend.confirm(timeout_s), timeout_s)
            except DefiniteFailure as exc:
                self.stats.confirm_impossible += 1
                log.warning(
                    "plc_confirm_impossible", backend=self.backend, write=pend.label, error=str(exc)
                )
                del self._pending[key]
                continue
            except Exception as exc:  # timeout or connection trouble: the connection is suspect
                self._connection_lost(f"read-back failed: {type(exc).__name__}: {exc}")
                return f"could not confirm earlier write {pend.label}: {type(exc).__name__}"
            del self._pending[key]
            self._mark_good()
            if applied:
                self.stats.confirmed_applied += 1
            else:
                self.stats.confirmed_not_applied += 1
            if pend.record is not None and self.on_write_confirmed is not None:
                try:
                    self.on_write_confirmed(*pend.record, applied)
                except Exception as exc:  # a consumer's bug must not break the link
                    log.error("plc_confirm_callback_failed", error=repr(exc))
            log.warning(
                "plc_write_confirmed", backend=self.backend, write=pend.label, applied=applied
            )
        return None

    async def _write(
        self,
        key: str,
        label: str,
        send: Callable[[float], Awaitable[None]],
        confirm: Callable[[float], Awaitable[bool]],
        deadline_ns: int,
        *,
        ring: tuple[int, int] | None = None,
        record: tuple[int, int] | None = None,
    ) -> WriteResult:
        """Run one write under the rules in the module docstring.

        ``ring`` = (camera_index, sequence) for a record written into a ring: the slot it reuses
        must be free (see _ring_guard), and the write is remembered for the next guard.
        ``record`` = (camera_index, sequence) of a decision record (for on_write_confirmed).
        """
        if self._lock is None:
            self.stats.failed += 1
            return WriteResult(WriteOutcome.FAILED, detail="link not started")
        if not self._connected:
            self.stats.failed += 1
            return WriteResult(WriteOutcome.FAILED, detail=f"not connected: {self._last_error}")
        if not await self._acquire(deadline_ns):
            self.stats.dropped_late += 1
            return WriteResult(
                WriteOutcome.DROPPED_LATE, detail="deadline before the link was free"
            )
        try:
            if not self._connected:
                self.stats.failed += 1
                return WriteResult(WriteOutcome.FAILED, detail=f"not connected: {self._last_error}")
            if self._pending:
                why = await self._confirm_pending()
                if why is not None:
                    self.stats.failed += 1
                    return WriteResult(WriteOutcome.FAILED, detail=why)
            if ring is not None:
                why = await self._ring_guard(ring[0], ring[1], deadline_ns)
                if why is not None:
                    self.stats.dropped_late += 1
                    self.stats.ring_full += 1
                    return WriteResult(WriteOutcome.DROPPED_LATE, detail=why)
            t0 = time.monotonic_ns()
            timeout_s = (deadline_ns - t0) / 1e9
            if timeout_s < self._needed_s():
                self.stats.dropped_late += 1
                return WriteResult(WriteOutcome.DROPPED_LATE, detail="not enough budget to send")
            try:
                # asyncio.timeout, not wait_for: wait_for wraps the request in a task of its own
                # (3.11), a loop round trip per record on the critical path.
                async with asyncio.timeout(timeout_s):
                    await send(timeout_s)
            except DefiniteFailure as exc:
                self.stats.failed += 1
                return WriteResult(WriteOutcome.FAILED, detail=f"refused: {exc}")
            except NotSent as exc:
                self.stats.failed += 1
                return WriteResult(WriteOutcome.FAILED, detail=f"not sent: {exc}")
            except asyncio.CancelledError:
                # The caller gave up on us: the request may be on the wire.
                self.stats.unknown += 1
                self._mark_unknown(key, label, confirm, "cancelled in flight", record)
                if ring is not None:
                    self._ring_note(ring[0], ring[1], time.monotonic_ns())
                raise
            except Exception as exc:  # timeout, connection lost in flight, socket error
                self._mark_unknown(key, label, confirm, f"{type(exc).__name__}: {exc}", record)
                self.stats.unknown += 1
                if ring is not None:
                    self._ring_note(ring[0], ring[1], time.monotonic_ns())
                return WriteResult(
                    WriteOutcome.UNKNOWN, detail=f"no answer in time ({type(exc).__name__})"
                )
            now = time.monotonic_ns()
            self._note_rtt((now - t0) / 1e9)
            if ring is not None:
                self._ring_note(ring[0], ring[1], now)
            self.stats.acked += 1
            self._mark_good()
            return WriteResult(WriteOutcome.ACKED, acked_ns=now)
        finally:
            self._lock.release()

    # -- ring pacing ----------------------------------------------------------------------------

    def _ring_note(self, camera_index: int, sequence: int, t_ns: int) -> None:
        hist = self._ring_hist.get(camera_index)
        if hist is None:
            hist = self._ring_hist[camera_index] = deque(maxlen=self.results.ring_size)
        hist.append((sequence, t_ns))

    async def _ring_guard(self, camera_index: int, sequence: int, deadline_ns: int) -> str | None:
        """Wait (lock held, inside the budget) until the slot `sequence` reuses may be
        overwritten; None = go, else why not (the write is then DROPPED_LATE).

        The slot is free when the record in it was written by an earlier session (unknown), or
        `plc_scan_ms` ago (the PLC has scanned since), or, acknowledged, when the PLC's ack
        covers it. A PLC whose ack reads 0 (fresh, never acknowledged) falls back to time. The
        wait is bounded by the deadline and, acknowledged, by two scans after the slot was
        written: at most ~2 x plc_scan_ms inside the link.
        """
        r = self.results
        hist = self._ring_hist.get(camera_index)
        if not hist:
            return None
        slot = ring_slot(sequence, r.ring_size)
        occupant = next(
            ((s, t) for s, t in hist if s != sequence and ring_slot(s, r.ring_size) == slot), None
        )
        if occupant is None:
            return None
        occ_seq, occ_t = occupant
        free_at = occ_t + int(r.plc_scan_ms * 1e6)
        # Acknowledged: a PLC that scans every plc_scan_ms has acknowledged well within two
        # scans; one that has not is not keeping up (or stopped acknowledging): drop at once
        # instead of holding the link (and the heartbeat behind it) for the whole budget.
        give_up_at = min(deadline_ns, occ_t + int(2 * r.plc_scan_ms * 1e6))
        waited = False
        try:
            while True:
                now = time.monotonic_ns()
                if not r.acknowledged and now >= free_at:
                    return None
                if r.acknowledged:
                    ack = self._ack_seen.get(camera_index, 0)
                    if ack and unacked_count(occ_seq, ack) == 0:
                        return None
                    budget_s = min(
                        self._timing.readback_timeout_ms / 1e3,
                        (deadline_ns - now) / 1e9 - self._needed_s(),
                    )
                    if budget_s <= self._needed_s():
                        break
                    try:
                        ack = await asyncio.wait_for(
                            self._read_ack(camera_index, budget_s), budget_s
                        )
                    except DefiniteFailure:  # the PLC holds no ack there: time rule, not a stop
                        ack = 0
                    self._ack_seen[camera_index] = ack
                    if ack == 0 and time.monotonic_ns() >= free_at:
                        return None  # a PLC that never acknowledged: time rule
                    if ack and unacked_count(occ_seq, ack) == 0:
                        return None
                    pause_s = min(0.002, r.plc_scan_ms / 4e3)
                    if ack == 0:
                        pause_s = max(pause_s, (free_at - time.monotonic_ns()) / 1e9)
                    elif time.monotonic_ns() + int(pause_s * 1e9) > give_up_at:
                        break
                else:
                    pause_s = (free_at - now) / 1e9
                if time.monotonic_ns() + int((pause_s + self._needed_s()) * 1e9) > deadline_ns:
                    break
                if not waited:
                    waited = True
                    self.stats.ring_waits += 1
                await asyncio.sleep(pause_s)
        except NotSent as exc:
            return f"ring slot {slot} busy and the ack could not be read: {exc}"
        except Exception as exc:  # the ack read timed out: the connection is suspect
            self._connection_lost(f"ack read failed: {type(exc).__name__}: {exc}")
            return f"ring slot {slot} busy and the ack read failed ({type(exc).__name__})"
        age_ms = (time.monotonic_ns() - occ_t) / 1e6
        what = "not yet acknowledged" if r.acknowledged else f"written {age_ms:.1f} ms ago"
        return (
            f"ring full: slot {slot} still holds sequence {occ_seq} ({what}; plc_scan_ms "
            f"{r.plc_scan_ms:g}) and the deadline came first"
        )

    def _mark_unknown(
        self,
        key: str,
        label: str,
        confirm: Callable[[float], Awaitable[bool]],
        why: str,
        record: tuple[int, int] | None = None,
    ) -> None:
        self._pending[key] = _Pending(label, confirm, record)
        self._connection_lost(f"write {label} outcome unknown: {why}")

    async def _read(self, read: Callable[[float], Awaitable[T]], deadline_ns: int) -> T | None:
        """A read under the same rules; None on any failure (reads never change the PLC)."""
        if self._lock is None or not self._connected:
            self.stats.reads_failed += 1
            return None
        if not await self._acquire(deadline_ns):
            self.stats.reads_failed += 1
            return None
        try:
            timeout_s = (deadline_ns - time.monotonic_ns()) / 1e9
            if not self._connected or timeout_s < self._needed_s():
                self.stats.reads_failed += 1
                return None
            try:
                async with asyncio.timeout(timeout_s):
                    value = await read(timeout_s)
            except (DefiniteFailure, NotSent) as exc:
                self.stats.reads_failed += 1
                self._last_error = f"read failed: {exc}"
                return None
            except Exception as exc:
                self.stats.reads_failed += 1
                self._connection_lost(f"read failed: {type(exc).__name__}: {exc}")
                return None
            self.stats.reads_ok += 1
            self._mark_good()
            return value
        finally:
            self._lock.release()
