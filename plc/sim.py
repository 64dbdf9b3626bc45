"""An embedded Modbus TCP PLC simulator: a real pymodbus server on 127.0.0.1.

It runs in its own thread with its own event loop so it never competes with the daemon's loop
(a simulator stalled by a busy daemon loop would look like a slow PLC and mask real latency).
The demo (`edge run` with no config) and `edge bench` write to it over real Modbus TCP; tests
also run it as a separate process (`python -m plc.sim`) so they can SIGSTOP or kill it.

It decodes every decision record it receives per the documented map and keeps the counters a
PLC programmer would watch: records per camera and gaps in the sequence strobe.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc import layout
from plc.config import ModbusSettings
from plc.modbus import ModbusMap
from plc.record import Alarm

T = TypeVar("T")

_WRITE_FCS = {6, 16, 23}


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


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
        self.host = host
        self._want_port = self.settings.port if port is None else port
        self.port: int | None = None
        self.on_record: Callable[[int, layout.DecodedRecord], None] | None = None
        """Called in the simulator's thread for each decision record received."""
        self.response_delay_s = 0.0
        """Delay applied before each write is executed and answered (to emulate a slow PLC)."""
        self._lock = threading.Lock()
        self._counters = SimCounters(
            records_received=[0] * camera_slots,
            sequence_gaps=[0] * camera_slots,
            last_sequence=[None] * camera_slots,
            last_record_at=[None] * camera_slots,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: ModbusTcpServer | None = None
        self._record_addr = {self.map.record_address(i): i for i in range(camera_slots)}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> int:
        """Start serving; returns the bound port (a free one when the configured port is 0)."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._thread = threading.Thread(target=self._run, name="plc-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"PLC simulator did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"PLC simulator failed to start: {self._error}") from self._error
        assert self.port is not None
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
        if function_code not in _WRITE_FCS or not set_values:
            return None
        if self.response_delay_s > 0:
            await asyncio.sleep(self.response_delay_s)
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
                if last is not None and rec.sequence != (last + 1) & 0xFFFF_FFFF:
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

    def read_registers(self, address: int, count: int) -> list[int]:
        """Raw holding registers, read inside the server (no Modbus request)."""
        assert self._server is not None
        server = self._server
        return [int(v) for v in self._call(server.async_getValues(0, 3, address, count))]

    def write_registers(self, address: int, values: list[int]) -> None:
        """Set registers as the PLC program would (e.g. to announce a part id)."""
        assert self._server is not None
        self._call(self._server.async_setValues(0, 16, address, list(values)))

    def read_record(self, camera_index: int) -> dict[str, int]:
        """The decision record a camera slot currently holds, decoded per the map."""
        words = self.read_registers(self.map.record_address(camera_index), layout.RECORD_WORDS)
        return self.map.decode_record(words).as_dict()

    def read_status(self) -> tuple[int, Alarm]:
        s = self.settings
        hb = self.map.decode_u16(self.read_registers(s.heartbeat_register, 1)[0])
        al = self.map.decode_u16(self.read_registers(s.alarm_register, 1)[0])
        return hb, Alarm(al)

    def announce_part_id(self, camera_index: int, part_id: int) -> None:
        """What a PLC does before triggering a camera: publish the part id it expects."""
        self.write_registers(self.map.part_id_address(camera_index), self.map.encode_u32(part_id))

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
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m plc.sim --port N`: run the simulator as its own process (tests, manual use)."""
    p = argparse.ArgumentParser(description="Modbus TCP PLC simulator on 127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--camera-slots", type=int, default=4)
    p.add_argument("--record-base", type=int, default=1000)
    p.add_argument("--record-stride", type=int, default=16)
    p.add_argument("--word-order", choices=["big", "little"], default="big")
    p.add_argument("--byte-order", choices=["big", "little"], default="big")
    p.add_argument(
        "--log-records",
        action="store_true",
        help="print 'REC <camera> <sequence> <part_id> <verdict>' per record received",
    )
    a = p.parse_args(argv)
    settings = ModbusSettings(
        port=a.port,
        simulator=True,
        record_base=a.record_base,
        record_stride=a.record_stride,
        word_order=a.word_order,
        byte_order=a.byte_order,
    )
    sim = ModbusPlcSimulator(settings, a.camera_slots, host=a.host)
    if a.log_records:

        def _print(cam: int, rec: layout.DecodedRecord) -> None:
            print(f"REC {cam} {rec.sequence} {rec.part_id} {rec.verdict}", flush=True)

        sim.on_record = _print
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    port = sim.start()
    print(f"READY {port}", flush=True)
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
