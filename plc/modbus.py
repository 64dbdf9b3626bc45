"""Modbus TCP backend (pymodbus asyncio client) of the PLC link.

One write_registers (FC16) request per decision record, laid out per plc/layout.py. The pymodbus
client is only a framer here: retries=0, its own reconnect disabled (reconnect_delay=0), and a
fresh client per connection so no state (transaction ids, a half-received frame, a pending
future) survives a drop. Reconnect, timeouts and unknown-outcome handling live in
plc.linkbase.ReconnectingLink.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException

from plc import layout
from plc.config import ModbusSettings
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink
from plc.record import Alarm, DecisionRecord, WriteResult


class ModbusMap:
    """Addresses and encodings of one line's Modbus map (validated against the camera count)."""

    def __init__(self, s: ModbusSettings, camera_slots: int) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        self.s = s
        self.camera_slots = camera_slots
        areas = [
            (
                "decision records",
                s.record_base,
                s.record_base + (camera_slots - 1) * s.record_stride + layout.RECORD_WORDS,
            ),
            ("heartbeat_register", s.heartbeat_register, s.heartbeat_register + 1),
            ("alarm_register", s.alarm_register, s.alarm_register + 1),
            (
                "part ids",
                s.part_id_base,
                s.part_id_base + (camera_slots - 1) * s.part_id_stride + 2,
            ),
        ]
        for name, _lo, hi in areas:
            if hi > 65536:
                raise ValueError(
                    f"plc.{name} for {camera_slots} camera(s) ends at register {hi - 1}, beyond "
                    "65535: lower the base address or the stride"
                )
        for i, (n1, lo1, hi1) in enumerate(areas):
            for n2, lo2, hi2 in areas[i + 1 :]:
                if lo1 < hi2 and lo2 < hi1:
                    raise ValueError(
                        f"plc map overlap: {n1} [{lo1}..{hi1 - 1}] and {n2} [{lo2}..{hi2 - 1}] "
                        f"for {camera_slots} camera(s): move one of them"
                    )
        self.extent = max(hi for _, _, hi in areas)
        """One past the highest register the map uses."""

    def record_address(self, camera_index: int) -> int:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")
        return self.s.record_base + camera_index * self.s.record_stride

    def part_id_address(self, camera_index: int) -> int:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")
        return self.s.part_id_base + camera_index * self.s.part_id_stride

    def encode_record(self, record: DecisionRecord) -> list[int]:
        return layout.record_words(
            record, word_order=self.s.word_order, byte_order=self.s.byte_order
        )

    def decode_record(self, words: list[int]) -> layout.DecodedRecord:
        return layout.decode_record_words(
            words, word_order=self.s.word_order, byte_order=self.s.byte_order
        )

    def encode_u16(self, value: int) -> int:
        return layout.u16_word(value, byte_order=self.s.byte_order)

    def decode_u16(self, word: int) -> int:
        return layout.u16_from_word(word, byte_order=self.s.byte_order)

    def encode_u32(self, value: int) -> list[int]:
        return layout.u32_words(value, word_order=self.s.word_order, byte_order=self.s.byte_order)

    def decode_u32(self, words: list[int]) -> int:
        return layout.u32_from_words(
            words, word_order=self.s.word_order, byte_order=self.s.byte_order
        )


class ModbusLink(ReconnectingLink):
    """plc.record.PlcLink over Modbus TCP."""

    backend = "modbus"

    def __init__(self, settings: ModbusSettings, camera_slots: int) -> None:
        super().__init__(settings, f"{settings.host}:{settings.port}")
        self.settings = settings
        self.map = ModbusMap(settings, camera_slots)
        self._client: AsyncModbusTcpClient | None = None

    async def _open(self, timeout_s: float) -> None:
        s = self.settings
        holder: list[AsyncModbusTcpClient] = []
        client = AsyncModbusTcpClient(
            s.host, port=s.port, timeout=timeout_s, retries=0, reconnect_delay=0,
            name=f"plc-{s.host}:{s.port}",
            trace_connect=lambda up: self._on_trace_connect(holder[0] if holder else None, up),
        )
        holder.append(client)
        self._client = client
        if not await client.connect():
            raise ConnectionError(f"cannot connect to {s.host}:{s.port}")

    def _on_trace_connect(self, client: AsyncModbusTcpClient | None, up: bool) -> None:
        if up or client is None or client is not self._client:
            return  # only a drop of the current connection matters
        # pymodbus leaves an in-flight request waiting its whole timeout after a drop:
        # fail it now (its outcome is unknown either way).
        fut = getattr(client.ctx, "response_future", None)
        if isinstance(fut, asyncio.Future) and not fut.done():
            fut.set_exception(ConnectionException("connection lost in flight"))
        self._connection_lost("connection closed by peer")

    async def _shut(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
            await asyncio.sleep(0)  # let the transport really close the socket now

    def _live_client(self, timeout_s: float) -> AsyncModbusTcpClient:
        client = self._client
        if client is None or not client.connected:
            raise NotSent("not connected")
        client.ctx.comm_params.timeout_connect = timeout_s  # per-request timeout = budget
        return client

    async def _write_regs(self, address: int, words: list[int], timeout_s: float) -> None:
        client = self._live_client(timeout_s)
        rsp: Any = await client.write_registers(address, words, device_id=self.settings.device_id)
        if rsp.isError():
            raise DefiniteFailure(f"exception response to write at {address}: {rsp}")

    async def _read_regs(self, address: int, count: int, timeout_s: float) -> list[int]:
        client = self._live_client(timeout_s)
        rsp: Any = await client.read_holding_registers(
            address, count=count, device_id=self.settings.device_id
        )
        if rsp.isError():
            raise DefiniteFailure(f"exception response to read at {address}: {rsp}")
        return list(rsp.registers)

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        address = self.map.record_address(record.camera_index)
        words = self.map.encode_record(record)

        async def send(timeout_s: float) -> None:
            await self._write_regs(address, words, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            return await self._read_regs(address, len(words), timeout_s) == words

        return await self._write(
            f"record{record.camera_index}",
            f"cam{record.camera_index}#seq{record.sequence}",
            send,
            confirm,
            deadline_ns,
        )

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        s = self.settings
        hb, al = self.map.encode_u16(heartbeat), self.map.encode_u16(int(alarms))
        if s.alarm_register == s.heartbeat_register + 1:
            writes = [(s.heartbeat_register, [hb, al])]
        elif s.heartbeat_register == s.alarm_register + 1:
            writes = [(s.alarm_register, [al, hb])]
        else:  # not adjacent: alarms first, so a heartbeat never vouches for stale alarms
            writes = [(s.alarm_register, [al]), (s.heartbeat_register, [hb])]

        async def send(timeout_s: float) -> None:
            for address, words in writes:
                await self._write_regs(address, words, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            for address, words in writes:
                if await self._read_regs(address, len(words), timeout_s) != words:
                    return False
            return True

        return await self._write("status", f"heartbeat#{heartbeat}", send, confirm, deadline_ns)

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        address = self.map.part_id_address(camera_index)

        async def read(timeout_s: float) -> int:
            return self.map.decode_u32(await self._read_regs(address, 2, timeout_s))

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> layout.DecodedRecord | None:
        """Read back a camera's record (for `edge plc test/watch`; the daemon never needs it)."""
        address = self.map.record_address(camera_index)

        async def read(timeout_s: float) -> layout.DecodedRecord:
            return self.map.decode_record(
                await self._read_regs(address, layout.RECORD_WORDS, timeout_s)
            )

        return await self._read(read, deadline_ns)

    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None:
        """(heartbeat, alarms) as the PLC holds them (for `edge plc watch`)."""
        s = self.settings

        async def read(timeout_s: float) -> tuple[int, Alarm]:
            hb = self.map.decode_u16((await self._read_regs(s.heartbeat_register, 1, timeout_s))[0])
            al = self.map.decode_u16((await self._read_regs(s.alarm_register, 1, timeout_s))[0])
            return hb, Alarm(al)

        return await self._read(read, deadline_ns)
