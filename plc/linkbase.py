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
  record back to learn whether it was applied;
* nothing is queued: after a reconnect there is nothing old to replay.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from plc.config import _LinkTiming
from plc.layout import DecodedRecord
from plc.record import Alarm, DecisionRecord, WriteOutcome, WriteResult

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


@dataclass(slots=True)
class _Pending:
    """A write whose outcome is unknown, with how to tell whether it landed."""

    label: str
    confirm: Callable[[float], Awaitable[bool]]
    """Reads back within the given timeout (s); True = applied. Raises like a request."""


class ReconnectingLink(abc.ABC):
    """Base of ModbusLink, S7Link, OpcUaLink (implements plc.record.PlcLink's plumbing)."""

    backend = "?"

    def __init__(self, timing: _LinkTiming, target: str) -> None:
        self._timing = timing
        self._target = target
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
            if self._healthy:
                # It answered on this connection: reconnect at once (a timed-out request drops a
                # healthy socket too), and start the backoff from the bottom.
                backoff = backoff_min
            else:
                # Connects succeed but requests do not (hung PLC, wrong unit...): back off, so
                # writes fail at once instead of each burning its budget on a dead connection.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, backoff_max)

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
        try:
            await asyncio.wait_for(self._lock.acquire(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    async def _confirm_pending(self, deadline_ns: int) -> str | None:
        """Resolve outcome-unknown writes before any other write. None = all resolved."""
        for key, pend in list(self._pending.items()):
            timeout_s = (deadline_ns - time.monotonic_ns()) / 1e9
            if timeout_s < self._needed_s():
                return "late"
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
    ) -> WriteResult:
        """Run one write under the rules in the module docstring."""
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
                why = await self._confirm_pending(deadline_ns)
                if why == "late":
                    self.stats.dropped_late += 1
                    return WriteResult(
                        WriteOutcome.DROPPED_LATE,
                        detail="no budget left after confirming an earlier write",
                    )
                if why is not None:
                    self.stats.failed += 1
                    return WriteResult(WriteOutcome.FAILED, detail=why)
            t0 = time.monotonic_ns()
            timeout_s = (deadline_ns - t0) / 1e9
            if timeout_s < self._needed_s():
                self.stats.dropped_late += 1
                return WriteResult(WriteOutcome.DROPPED_LATE, detail="not enough budget to send")
            try:
                await asyncio.wait_for(send(timeout_s), timeout_s)
            except DefiniteFailure as exc:
                self.stats.failed += 1
                return WriteResult(WriteOutcome.FAILED, detail=f"refused: {exc}")
            except NotSent as exc:
                self.stats.failed += 1
                return WriteResult(WriteOutcome.FAILED, detail=f"not sent: {exc}")
            except asyncio.CancelledError:
                # The caller gave up on us: the request may be on the wire.
                self.stats.unknown += 1
                self._mark_unknown(key, label, confirm, "cancelled in flight")
                raise
            except Exception as exc:  # timeout, connection lost in flight, socket error
                self._mark_unknown(key, label, confirm, f"{type(exc).__name__}: {exc}")
                self.stats.unknown += 1
                return WriteResult(
                    WriteOutcome.UNKNOWN, detail=f"no answer in time ({type(exc).__name__})"
                )
            now = time.monotonic_ns()
            self._note_rtt((now - t0) / 1e9)
            self.stats.acked += 1
            self._mark_good()
            return WriteResult(WriteOutcome.ACKED, acked_ns=now)
        finally:
            self._lock.release()

    def _mark_unknown(
        self, key: str, label: str, confirm: Callable[[float], Awaitable[bool]], why: str
    ) -> None:
        self._pending[key] = _Pending(label, confirm)
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
                value = await asyncio.wait_for(read(timeout_s), timeout_s)
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
