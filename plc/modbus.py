"""Modbus TCP backend (pymodbus asyncio client) of the PLC link.

One write_registers (FC16) request per decision record, laid out per plc/layout.py (ring mode:
the record, then the ring head). The pymodbus
client is only a framer here: retries=0, its own reconnect disabled (reconnect_delay=0), and a
fresh client per connection so no state (transaction ids, a half-received frame, a pending
future) survives a drop. Reconnect, timeouts and unknown-outcome handling live in
plc.linkbase.ReconnectingLink.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException

from plc import layout
from plc.config import ModbusSettings
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink, RingView
from plc.record import Alarm, DecisionRecord, PlcInputs, WriteResult

MAX_READ_REGISTERS = 125
"""Modbus FC3 limit per request."""


class ModbusMap:
    """Addresses and encodings of one line's Modbus map (validated against the camera count)."""

    def __init__(self, s: ModbusSettings, camera_slots: int) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        self.s = s
        self.camera_slots = camera_slots
        n = camera_slots
        self.ring = s.results.mode == "ring"
        self.ring_size = s.results.ring_size
        rec_size = layout.ring_block_words(self.ring_size) if self.ring else layout.RECORD_WORDS
        rec_key = "result rings" if self.ring else "decision records"
        self.areas = [
            layout.Area(f"{rec_key} (record_base, record_stride)", s.record_base, rec_size, n,
                        s.record_stride),
            layout.Area("heartbeat_register", s.heartbeat_register, 1),
            layout.Area("alarm_register", s.alarm_register, 1),
            layout.Area("part ids (part_id_base, part_id_stride)", s.part_id_base, 2, n,
                        s.part_id_stride),
            layout.Area("trigger counters (trigger_base, trigger_stride)", s.trigger_base, 1, n,
                        s.trigger_stride),
            layout.Area("recipe_register", s.recipe_register, 1),
            layout.Area("acks (ack_base, ack_stride)", s.ack_base, 2, n, s.ack_stride),
        ]
        layout.check_areas(self.areas, 65536, "register", "plc.")
        self.extent = max(a.end for a in self.areas)
        """One past the highest register the map uses."""

    def _check(self, camera_index: int) -> None:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")

    def record_address(self, camera_index: int) -> int:
        """Slot mode: the camera's record. Ring mode: the start of its ring block (the head)."""
        self._check(camera_index)
        return self.s.record_base + camera_index * self.s.record_stride

    def ring_slot_address(self, camera_index: int, slot: int) -> int:
        if not 0 <= slot < self.ring_size:
            raise ValueError(f"ring slot {slot} outside 0..{self.ring_size - 1}")
        return self.record_address(camera_index) + layout.RING_HEAD_WORDS + \
            slot * layout.RECORD_WORDS

    def record_write_address(self, camera_index: int, sequence: int) -> int:
        """Where the record with this sequence goes (ring: slot (sequence - 1) mod N)."""
        if not self.ring:
            return self.record_address(camera_index)
        return self.ring_slot_address(camera_index, layout.ring_slot(sequence, self.ring_size))

    def sequence_address(self, camera_index: int) -> int:
        """The uint32 that holds the camera's newest sequence: the record's strobe, or the head."""
        base = self.record_address(camera_index)
        return base if self.ring else base + layout.SEQUENCE_WORD

    def part_id_address(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.part_id_base + camera_index * self.s.part_id_stride

    def trigger_address(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.trigger_base + camera_index * self.s.trigger_stride

    def ack_address(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.ack_base + camera_index * self.s.ack_stride

    @property
    def recipe_address(self) -> int:
        return self.s.recipe_register

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
        self.map = ModbusMap(settings, camera_slots)
        super().__init__(
            settings, f"{settings.host}:{settings.port}", camera_slots, settings.results
        )
        self.settings = settings
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
        """One FC3 request up to 125 registers; larger spans in several (not atomic)."""
        out: list[int] = []
        while count > 0:
            n = min(count, MAX_READ_REGISTERS)
            client = self._live_client(timeout_s)
            rsp: Any = await client.read_holding_registers(
                address, count=n, device_id=self.settings.device_id
            )
            if rsp.isError():
                raise DefiniteFailure(f"exception response to read at {address}: {rsp}")
            out.extend(int(v) for v in rsp.registers[:n])
            address, count = address + n, count - n
        return out

    async def _read_spans(
        self, spans: list[tuple[int, int]], timeout_s: float
    ) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """Read [lo, hi) spans in as few requests as the FC3 limit allows: address -> word."""
        plan = layout.plan_reads(spans, MAX_READ_REGISTERS)
        regs: dict[int, int] = {}
        for lo, n in plan:
            regs.update(zip(range(lo, lo + n), await self._read_regs(lo, n, timeout_s),
                            strict=True))
        return regs, plan

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """One request per record (slot mode); ring mode: the record into its slot, then the
        head, so the PLC never sees a head pointing at a half-written slot. Ring mode: records of
        one camera must come in sequence order (the daemon's EDF queue assigns them so)."""
        cam = record.camera_index
        address = self.map.record_write_address(cam, record.sequence)
        words = self.map.encode_record(record)
        head_addr = self.map.record_address(cam)
        head = self.map.encode_u32(record.sequence)
        ring = self.map.ring

        async def send(timeout_s: float) -> None:
            await self._write_regs(address, words, timeout_s)
            if ring:
                await self._write_regs(head_addr, head, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            if await self._read_regs(address, len(words), timeout_s) != words:
                return False
            return not ring or await self._read_regs(head_addr, 2, timeout_s) == head

        return await self._write(
            f"record{cam}", f"cam{cam}#seq{record.sequence}", send, confirm, deadline_ns,
            ring=(cam, record.sequence) if ring else None, record=(cam, record.sequence),
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

    async def _probe(self, timeout_s: float) -> None:
        await self._read_regs(self.settings.heartbeat_register, 1, timeout_s)

    async def _read_ack(self, camera_index: int, timeout_s: float) -> int:
        return self.map.decode_u32(
            await self._read_regs(self.map.ack_address(camera_index), 2, timeout_s)
        )

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        address = self.map.part_id_address(camera_index)

        async def read(timeout_s: float) -> int:
            return self.map.decode_u32(await self._read_regs(address, 2, timeout_s))

        return await self._read(read, deadline_ns)

    async def read_inputs(
        self,
        deadline_ns: int,
        *,
        triggers: bool = True,
        recipe: bool = False,
        acks: bool = False,
    ) -> PlcInputs | None:
        """One FC3 request when the areas asked for lie within 125 registers (the default map:
        recipe 299, part ids 200.., trigger counters 300.. for up to 25 cameras; acks at 400..
        are a second request). When counters and part ids need several requests, the counters
        are read again at the end and the whole read repeats (up to 3 times) until they did
        not move in between, so a new count still comes with its own part id."""
        m, n = self.map, self.camera_slots
        core: list[tuple[int, int]] = []  # read together: the snapshot
        rest: list[tuple[int, int]] = []
        counter_spans: list[tuple[int, int]] = []
        if triggers:
            counter_spans = [(m.trigger_address(i), m.trigger_address(i) + 1) for i in range(n)]
            core += [(m.part_id_address(i), m.part_id_address(i) + 2) for i in range(n)]
            core += counter_spans
        if recipe:
            (core if triggers else rest).append((m.recipe_address, m.recipe_address + 1))
        if acks:
            rest += [(m.ack_address(i), m.ack_address(i) + 2) for i in range(n)]
        # Counters, part ids (and recipe) in one request: the snapshot is atomic as it is.
        atomic = len(layout.plan_reads(core, MAX_READ_REGISTERS)) <= 1

        async def read(timeout_s: float) -> PlcInputs:
            for _ in range(3):
                regs, _ = await self._read_spans(core, timeout_s)
                if atomic:
                    break
                again, _ = await self._read_spans(counter_spans, timeout_s)
                if all(regs[a] == v for a, v in again.items()):
                    break
            regs.update((await self._read_spans(rest, timeout_s))[0])
            now = time.monotonic_ns()

            def u32(a: int) -> int:
                return m.decode_u32([regs[a], regs[a + 1]])

            return PlcInputs(
                read_ns=now,
                trigger_counts=tuple(m.decode_u16(regs[m.trigger_address(i)]) for i in range(n))
                if triggers else None,
                part_ids=tuple(u32(m.part_id_address(i)) for i in range(n)) if triggers else None,
                recipe=m.decode_u16(regs[m.recipe_address]) if recipe else None,
                acked_sequences=tuple(u32(m.ack_address(i)) for i in range(n)) if acks else None,
            )

        return await self._read(read, deadline_ns)

    async def read_sequences(self, deadline_ns: int) -> list[int] | None:
        """Per camera the record's sequence (slot mode) or the ring head: one request for up to
        ~9 cameras at the default stride."""
        m = self.map
        addrs = [m.sequence_address(i) for i in range(self.camera_slots)]

        async def read(timeout_s: float) -> list[int]:
            regs, _ = await self._read_spans([(a, a + 2) for a in addrs], timeout_s)
            return [m.decode_u32([regs[a], regs[a + 1]]) for a in addrs]

        return await self._read(read, deadline_ns)

    async def read_ring(self, camera_index: int, deadline_ns: int) -> RingView | None:
        """Ring mode: the head and every slot (tools and tests)."""
        m = self.map
        if not m.ring:
            raise ValueError("read_ring needs results.mode: ring")
        base = m.record_address(camera_index)
        size = layout.ring_block_words(m.ring_size)

        async def read(timeout_s: float) -> RingView:
            w = await self._read_regs(base, size, timeout_s)
            recs = [m.decode_record(w[2 + k * layout.RECORD_WORDS:]) for k in range(m.ring_size)]
            return RingView(head=m.decode_u32(w[:2]), records=recs)

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> layout.DecodedRecord | None:
        """The camera's newest record (ring mode: the slot the head points at; slot 0 while the
        head is 0). For `edge plc test/watch`; the daemon never needs it."""
        if self.map.ring:
            view = await self.read_ring(camera_index, deadline_ns)
            return None if view is None else (view.newest() or view.records[0])
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
            regs, _ = await self._read_spans(
                [(s.heartbeat_register, s.heartbeat_register + 1),
                 (s.alarm_register, s.alarm_register + 1)], timeout_s)
            hb = self.map.decode_u16(regs[s.heartbeat_register])
            return hb, Alarm(self.map.decode_u16(regs[s.alarm_register]))

        return await self._read(read, deadline_ns)
