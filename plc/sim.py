"""An embedded Modbus TCP PLC simulator: a real pymodbus server on 127.0.0.1.

It runs in its own thread with its own event loop so it never competes with the daemon's loop
(a simulator stalled by a busy daemon loop would look like a slow PLC and mask real latency).
The demo (`edge run` with no config) and `edge bench` write to it over real Modbus TCP; tests
also run it as a separate process (`python -m plc.sim`) so they can SIGSTOP or kill it.

It decodes every decision record it receives per the documented map and keeps the counters a
PLC programmer would watch: records per camera and gaps in the sequence strobe. Given a
`SimProgramSettings` (`plc.sim_program` in the line YAML) it also PLAYS the PLC program of
docs/plc-register-map.md: it announces part ids and increments the trigger counters at a rate,
switches the recipe register, scans the results (slot or ring) every `scan_ms` like a PLC task,
writes acknowledgements, and counts what a PLC would: records consumed and lost, part-id and
recipe mismatches, parts left without an answer (`program_counters()`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import structlog
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc import layout
from plc.config import ModbusSettings, SimProgramSettings
from plc.modbus import ModbusMap
from plc.record import Alarm, Verdict, next_sequence, unacked_count

T = TypeVar("T")
log = structlog.get_logger(__name__)

_WRITE_FCS = {6, 16, 23}
_INTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("plc_sim_internal", default=False)
"""True while the simulated PLC program touches its own memory: pymodbus runs the request
action for those accesses too, and they are not Modbus requests from a client."""


@dataclass(slots=True)
class SimCounters:
    """What the simulated PLC has seen, per camera slot (index = camera_index)."""

    records_received: list[int] = field(default_factory=list)
    sequence_gaps: list[int] = field(default_factory=list)
    last_sequence: list[int | None] = field(default_factory=list)
    write_requests: int = 0
    """Modbus write requests of any kind (one per decision record if the link is right)."""
    heartbeats_received: int = 0
    last_heartbeat: int | None = None
    last_alarms: int = 0
    last_record_at: list[float | None] = field(default_factory=list)
    """time.monotonic() of the last record per camera."""
    read_requests: int = 0
    """Modbus read requests (FC3/4) from clients: a snapshot should cost one."""


@dataclass(slots=True)
class ProgramCounters:
    """What the PLC program played by the simulator saw, per camera slot (index = slot)."""

    parts_triggered: list[int]
    records_consumed: list[int]
    """New records the program's scans read (each once)."""
    records_lost: list[int]
    """Sequences the scans never saw: overwritten before a scan, or never written."""
    part_id_matches: list[int]
    """Consumed records whose part id is a part the program announced and awaited."""
    part_id_mismatches: list[int]
    """Consumed records for a part id the program was not waiting for (ignored by a PLC)."""
    recipe_mismatches: list[int]
    """Matched records whose recipe differs from the recipe selected when the part triggered."""
    parts_unanswered: list[int]
    """Announced parts with no matching record within answer_timeout_ms (ejected by a PLC)."""
    verdicts: dict[str, int] = field(default_factory=dict)
    """Consumed records by verdict: ok, defect, failsafe, other."""
    failsafe_reasons: dict[int, int] = field(default_factory=dict)
    scans: int = 0
    acks_written: int = 0
    recipe: int = 0
    """The recipe the program currently selects."""
    recipe_switches: int = 0
    last_consumed: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_VERDICT_NAMES = {int(Verdict.OK): "ok", int(Verdict.DEFECT): "defect",
                  int(Verdict.FAILSAFE_REJECT): "failsafe"}


class ModbusPlcSimulator:
    """A Modbus TCP PLC on 127.0.0.1 that holds the project's register map."""

    def __init__(
        self,
        settings: ModbusSettings | None = None,
        camera_slots: int = 4,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.settings = settings or ModbusSettings(port=0, simulator=True)
        self.map = ModbusMap(self.settings, camera_slots)
        self.camera_slots = camera_slots
        self.host = host
        self._want_port = self.settings.port if port is None else port
        self.port: int | None = None
        self.on_record: Callable[[int, layout.DecodedRecord], None] | None = None
        """Called in the simulator's thread for each decision record received."""
        self.response_delay_s = 0.0
        """Delay applied before each request is executed and answered (to emulate a slow PLC)."""
        self._lock = threading.Lock()
        self._counters = SimCounters(
            records_received=[0] * camera_slots,
            sequence_gaps=[0] * camera_slots,
            last_sequence=[None] * camera_slots,
            last_record_at=[None] * camera_slots,
        )
        self._program_counters: ProgramCounters | None = None
        self._program_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: ModbusTcpServer | None = None
        m = self.map
        if m.ring:
            self._record_addr = {
                m.ring_slot_address(i, k): i
                for i in range(camera_slots)
                for k in range(m.ring_size)
            }
        else:
            self._record_addr = {m.record_address(i): i for i in range(camera_slots)}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> int:
        """Start serving; returns the bound port (a free one when the configured port is 0).

        With settings.sim_program, the PLC program starts playing at once."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._thread = threading.Thread(target=self._run, name="plc-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"PLC simulator did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"PLC simulator failed to start: {self._error}") from self._error
        assert self.port is not None
        if self.settings.sim_program is not None:
            self.start_program(self.settings.sim_program)
        return self.port

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, stop)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> ModbusPlcSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.get_running_loop().create_future()
        device = SimDevice(
            id=0,  # answers any unit id, like most PLC Modbus servers
            simdata=[SimData(0, count=self.map.extent, values=0, datatype=DataType.REGISTERS)],
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self._want_port))
        self._server = server
        await server.serve_forever(background=True)
        sockets = getattr(server.transport, "sockets", None)
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._want_port
        self._ready.set()
        try:
            await self._stop
        finally:
            task = self._program_task
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await server.shutdown()

    # -- the PLC side -------------------------------------------------------------------------

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        if _INTERNAL.get():
            return None
        if self.response_delay_s > 0:  # a slow PLC is slow to read too
            await asyncio.sleep(self.response_delay_s)
        if function_code not in _WRITE_FCS or not set_values:
            if function_code in (3, 4):
                with self._lock:
                    self._counters.read_requests += 1
            return None
        values = [int(v) for v in set_values]
        cam = self._record_addr.get(address)
        s = self.settings
        rec = None
        with self._lock:
            c = self._counters
            c.write_requests += 1
            if cam is not None and count >= layout.RECORD_WORDS:
                rec = self.map.decode_record(values)
                last = c.last_sequence[cam]
                if last is not None and rec.sequence != next_sequence(last):
                    c.sequence_gaps[cam] += 1
                c.last_sequence[cam] = rec.sequence
                c.records_received[cam] += 1
                c.last_record_at[cam] = time.monotonic()
            for i, v in enumerate(values):
                reg = address + i
                if reg == s.heartbeat_register:
                    c.heartbeats_received += 1
                    c.last_heartbeat = self.map.decode_u16(v)
                elif reg == s.alarm_register:
                    c.last_alarms = self.map.decode_u16(v)
        if rec is not None and cam is not None and self.on_record is not None:
            self.on_record(cam, rec)
        return None

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 2.0) -> T:
        loop = self._loop
        if loop is None or self._server is None or loop.is_closed():
            coro.close()
            raise RuntimeError("PLC simulator is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    async def _get(self, address: int, count: int) -> list[int]:
        assert self._server is not None
        token = _INTERNAL.set(True)
        try:
            return [int(v) for v in await self._server.async_getValues(0, 3, address, count)]
        finally:
            _INTERNAL.reset(token)

    async def _set(self, address: int, values: list[int]) -> None:
        assert self._server is not None
        token = _INTERNAL.set(True)
        try:
            await self._server.async_setValues(0, 16, address, list(values))
        finally:
            _INTERNAL.reset(token)

    def read_registers(self, address: int, count: int) -> list[int]:
        """Raw holding registers, read inside the server (no Modbus request)."""
        return self._call(self._get(address, count))

    def write_registers(self, address: int, values: list[int]) -> None:
        """Set registers as the PLC program would (e.g. to announce a part id)."""
        self._call(self._set(address, values))

    def read_record(self, camera_index: int) -> dict[str, int]:
        """The newest decision record of a camera slot (ring mode: where the head points)."""
        m = self.map
        if m.ring:
            head = m.decode_u32(self.read_registers(m.record_address(camera_index), 2))
            address = m.ring_slot_address(camera_index, layout.ring_slot(head, m.ring_size)) \
                if head else m.ring_slot_address(camera_index, 0)
        else:
            address = m.record_address(camera_index)
        return m.decode_record(self.read_registers(address, layout.RECORD_WORDS)).as_dict()

    def read_status(self) -> tuple[int, Alarm]:
        s = self.settings
        hb = self.map.decode_u16(self.read_registers(s.heartbeat_register, 1)[0])
        al = self.map.decode_u16(self.read_registers(s.alarm_register, 1)[0])
        return hb, Alarm(al)

    def trigger_part(self, camera_index: int, part_id: int) -> int:
        """Announce `part_id`, THEN increment the camera's trigger counter (the documented
        order); returns the new counter value."""
        return self._call(self._trigger(camera_index, part_id))

    async def _trigger(self, camera_index: int, part_id: int) -> int:
        m = self.map
        await self._set(m.part_id_address(camera_index), m.encode_u32(part_id))
        addr = m.trigger_address(camera_index)
        count = (m.decode_u16((await self._get(addr, 1))[0]) + 1) & 0xFFFF
        await self._set(addr, [m.encode_u16(count)])
        return count

    def set_recipe(self, recipe: int) -> None:
        """Select a recipe as the PLC program would (uint16)."""
        self.write_registers(self.map.recipe_address, [self.map.encode_u16(recipe)])

    def hold_sequence(self, camera_index: int, sequence: int) -> None:
        """Make the PLC hold `sequence` as the camera's newest record (slot strobe or ring head),
        e.g. to check that a (re)started daemon continues from it."""
        self.write_registers(self.map.sequence_address(camera_index),
                             self.map.encode_u32(sequence))

    def acked_sequence(self, camera_index: int) -> int:
        return self.map.decode_u32(self.read_registers(self.map.ack_address(camera_index), 2))

    def counters(self) -> SimCounters:
        with self._lock:
            c = self._counters
            return SimCounters(
                list(c.records_received),
                list(c.sequence_gaps),
                list(c.last_sequence),
                c.write_requests,
                c.heartbeats_received,
                c.last_heartbeat,
                c.last_alarms,
                list(c.last_record_at),
                c.read_requests,
            )

    # -- the PLC program ----------------------------------------------------------------------

    def start_program(self, program: SimProgramSettings) -> None:
        """Start playing `program` (replaces a running one; its counters start from zero)."""
        bad = [s for s in (program.slots or []) if not 0 <= s < self.camera_slots]
        if bad:
            raise ValueError(f"sim_program.slots {bad} outside 0..{self.camera_slots - 1}")
        self._call(self._start_program(program))

    def stop_program(self) -> None:
        self._call(self._stop_program())

    def program_counters(self) -> ProgramCounters | None:
        """A copy of the program's counters (None when no program ever ran)."""
        with self._lock:
            p = self._program_counters
            if p is None:
                return None
            return ProgramCounters(**{k: _copy(getattr(p, k)) for k in ProgramCounters.__slots__})

    async def _start_program(self, program: SimProgramSettings) -> None:
        await self._stop_program()
        n = self.camera_slots
        held = [self.map.decode_u32(await self._get(self.map.sequence_address(i), 2))
                for i in range(n)]
        with self._lock:
            self._program_counters = ProgramCounters(
                parts_triggered=[0] * n, records_consumed=[0] * n, records_lost=[0] * n,
                part_id_matches=[0] * n, part_id_mismatches=[0] * n, recipe_mismatches=[0] * n,
                parts_unanswered=[0] * n,
                verdicts={"ok": 0, "defect": 0, "failsafe": 0, "other": 0},
                last_consumed=held,
            )
        self._program_task = asyncio.create_task(self._play(program), name="plc-sim-program")
        self._program_task.add_done_callback(_log_crash)

    async def _stop_program(self) -> None:
        task, self._program_task = self._program_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _play(self, p: SimProgramSettings) -> None:
        """The PLC's two tasks: a part every 1/trigger_rate_hz per slot, a result scan every
        scan_ms. A stalled loop does not fire a backlog of triggers (that would read as missed
        triggers at the daemon): the schedule slips instead."""
        c = self._program_counters
        assert c is not None
        slots = list(p.slots) if p.slots is not None else list(range(self.camera_slots))
        pending: list[dict[int, tuple[int, int]]] = [{} for _ in range(self.camera_slots)]
        next_id = {s: p.part_id_start for s in slots}
        recipe_index = 0
        if p.recipes:
            await self._set(self.map.recipe_address, [self.map.encode_u16(p.recipes[0])])
            with self._lock:
                c.recipe = p.recipes[0]
        period_ns = int(1e9 / p.trigger_rate_hz) if p.trigger_rate_hz > 0 else 0
        scan_ns = int(p.scan_ms * 1e6)
        t0 = time.monotonic_ns()
        next_trig = {s: t0 + (i * period_ns) // max(1, len(slots)) for i, s in enumerate(slots)}
        next_scan = t0
        total_parts = 0
        while True:
            now = time.monotonic_ns()
            if period_ns:
                for s in slots:
                    if now < next_trig[s] or (p.max_parts is not None
                                              and c.parts_triggered[s] >= p.max_parts):
                        continue
                    if (p.recipes and p.recipe_switch_every_parts and total_parts
                            and total_parts % p.recipe_switch_every_parts == 0):
                        recipe_index = (recipe_index + 1) % len(p.recipes)
                        await self._set(self.map.recipe_address,
                                        [self.map.encode_u16(p.recipes[recipe_index])])
                        with self._lock:
                            c.recipe = p.recipes[recipe_index]
                            c.recipe_switches += 1
                    part = next_id[s]
                    next_id[s] = (part + 1) & 0xFFFF_FFFF
                    pending[s][part] = (c.recipe, now)
                    await self._trigger(s, part)
                    total_parts += 1
                    with self._lock:
                        c.parts_triggered[s] += 1
                    next_trig[s] += period_ns
                    if next_trig[s] <= now:
                        next_trig[s] = now + period_ns
            if now >= next_scan:
                await self._scan(p, pending)
                next_scan += scan_ns
                if next_scan <= now:
                    next_scan = now + scan_ns
            active = [next_trig[s] for s in slots if period_ns and (
                p.max_parts is None or c.parts_triggered[s] < p.max_parts)]
            wake = min([next_scan, *active])  # (a slot done with max_parts no longer wakes us)
            await asyncio.sleep(max(0.0, (wake - time.monotonic_ns()) / 1e9))

    async def _scan(self, p: SimProgramSettings,
                    pending: list[dict[int, tuple[int, int]]]) -> None:
        """One PLC scan: consume every new record (slot or ring), answer-timeout old parts,
        acknowledge. Reads the PLC's own memory, as a PLC program does."""
        c = self._program_counters
        assert c is not None
        m = self.map
        now = time.monotonic_ns()
        timeout_ns = int(p.answer_timeout_ms * 1e6)
        for cam in range(self.camera_slots):
            last = c.last_consumed[cam]
            got: list[layout.DecodedRecord] = []
            lost = 0
            if m.ring:
                block = await self._get(m.record_address(cam), layout.ring_block_words(m.ring_size))
                head = m.decode_u32(block[:2])
                todo = unacked_count(head, last) if head and head != last else 0
                if todo:  # (a head that stepped back, e.g. a stalled late write, is not new)
                    if todo > m.ring_size:  # overwritten before this scan
                        lost += todo - m.ring_size
                        todo = m.ring_size
                    s = head
                    for _ in range(todo - 1):
                        s = (s - 2) % 0xFFFF_FFFF + 1  # the sequence before s, skipping 0
                    for _ in range(todo):
                        k = layout.ring_slot(s, m.ring_size)
                        off = layout.RING_HEAD_WORDS + k * layout.RECORD_WORDS
                        rec = m.decode_record(block[off:off + layout.RECORD_WORDS])
                        if rec.sequence == s:
                            got.append(rec)
                        else:
                            lost += 1
                        s = next_sequence(s)
                    last = head
            else:
                rec = m.decode_record(await self._get(m.record_address(cam), layout.RECORD_WORDS))
                if rec.sequence and rec.sequence != last:
                    lost += max(0, unacked_count(rec.sequence, last) - 1)
                    got.append(rec)
                    last = rec.sequence
            with self._lock:
                c.records_lost[cam] += lost
                for rec in got:
                    c.records_consumed[cam] += 1
                    name = _VERDICT_NAMES.get(rec.verdict, "other")
                    c.verdicts[name] = c.verdicts.get(name, 0) + 1
                    if rec.verdict == Verdict.FAILSAFE_REJECT:
                        c.failsafe_reasons[rec.reason] = c.failsafe_reasons.get(rec.reason, 0) + 1
                    want = pending[cam].pop(rec.part_id, None)
                    if want is None:
                        c.part_id_mismatches[cam] += 1
                    else:
                        c.part_id_matches[cam] += 1
                        if p.recipes and rec.recipe != want[0]:
                            c.recipe_mismatches[cam] += 1
                for part, (_r, t) in list(pending[cam].items()):
                    if now - t > timeout_ns:
                        del pending[cam][part]
                        c.parts_unanswered[cam] += 1
                changed = last != c.last_consumed[cam]
                c.last_consumed[cam] = last
            if p.acknowledge and changed:
                await self._set(m.ack_address(cam), m.encode_u32(last))
                with self._lock:
                    c.acks_written += 1
        with self._lock:
            c.scans += 1


def _copy(v: Any) -> Any:
    return v.copy() if isinstance(v, (list, dict)) else v


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("plc_sim_program_crashed", error=repr(task.exception()))


def main(argv: list[str] | None = None) -> int:
    """`python -m plc.sim --port N`: run the simulator as its own process (tests, manual use)."""
    p = argparse.ArgumentParser(description="Modbus TCP PLC simulator on 127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--camera-slots", type=int, default=4)
    p.add_argument("--record-base", type=int, default=1000)
    p.add_argument("--record-stride", type=int, default=None)
    p.add_argument("--word-order", choices=["big", "little"], default="big")
    p.add_argument("--byte-order", choices=["big", "little"], default="big")
    p.add_argument("--settings", default=None,
                   help="JSON of further plc settings, e.g. '{\"results\": {\"mode\": \"ring\"}}'")
    p.add_argument("--program", default=None,
                   help="JSON of a sim_program to play, e.g. '{\"trigger_rate_hz\": 10}'")
    p.add_argument(
        "--log-records",
        action="store_true",
        help="print 'REC <camera> <sequence> <part_id> <verdict> <recipe> <reason>' per record",
    )
    a = p.parse_args(argv)
    extra: dict[str, Any] = json.loads(a.settings) if a.settings else {}
    base: dict[str, Any] = {"record_base": a.record_base, "word_order": a.word_order,
                            "byte_order": a.byte_order}
    if a.record_stride is not None:
        base["record_stride"] = a.record_stride
    if a.program:
        base["sim_program"] = json.loads(a.program)
    settings = ModbusSettings.model_validate(
        {**base, **extra, "port": a.port, "simulator": True})
    sim = ModbusPlcSimulator(settings, a.camera_slots, host=a.host)
    if a.log_records:

        def _print(cam: int, rec: layout.DecodedRecord) -> None:
            print(f"REC {cam} {rec.sequence} {rec.part_id} {rec.verdict} {rec.recipe} "
                  f"{rec.reason}", flush=True)

        sim.on_record = _print

    def _print_counters(*_: object) -> None:
        pc = sim.program_counters()
        print("COUNTERS " + json.dumps({"sim": asdict(sim.counters()),
                                        "program": pc.as_dict() if pc else None}), flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    signal.signal(signal.SIGUSR1, _print_counters)
    port = sim.start()
    print(f"READY {port}", flush=True)
    # Wake up now and then: the kernel may deliver a signal to the simulator's thread, and Python
    # runs its handler only when the MAIN thread next runs bytecode (a bare wait() never does).
    while not done.wait(0.05):
        pass
    _print_counters()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
