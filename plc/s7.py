"""Siemens S7 backend (python-snap7 3.x AsyncClient) of the PLC link.

The DB layout is plc/layout.py's record as big-endian bytes (S7's native order), one record per
camera (ring mode: a head DWORD + N records per camera); one write_area (PUT) request per decision
record (ring mode: then one for the head). Heartbeat and alarm words sit side by
side and go in one request. See docs/plc-register-map.md for the DB a PLC programmer declares.

Traps handled here (FIELD-NOTES): the client's receive timeout is 5 s unless set, so the
connection's timeout is set from the remaining budget before every request; after a timeout the
stream may hold half a response, so the link disconnects and connects afresh (the base class drops
the connection on any timeout). The 3.x AsyncClient does real asyncio I/O, so no thread is needed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from snap7.async_client import AsyncClient
from snap7.error import S7ProtocolError
from snap7.type import Area

from plc import layout
from plc.config import S7Settings
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink, RingView
from plc.record import Alarm, DecisionRecord, PlcInputs, WriteResult

MAX_READ_BYTES = 200
"""Largest read planned as ONE request: the smallest S7 PDU (240 bytes) carries 222 data bytes;
python-snap7 splits larger reads into several requests, which would break the snapshot."""
DB_LIMIT = 65536
"""A non-optimized DB is byte-addressed with 16-bit offsets."""


class S7Map:
    """Byte offsets of one line's DB layout (validated against the camera count)."""

    def __init__(self, s: S7Settings, camera_slots: int) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        self.s = s
        self.camera_slots = camera_slots
        n = camera_slots
        self.ring = s.results.mode == "ring"
        self.ring_size = s.results.ring_size
        rec_size = layout.ring_block_bytes(self.ring_size) if self.ring else layout.RECORD_BYTES
        rec_key = "result rings" if self.ring else "decision records"
        self.areas = [
            layout.Area(f"{rec_key} (record_offset, record_stride)", s.record_offset, rec_size,
                        n, s.record_stride),
            layout.Area("status (status_offset: heartbeat, alarms)", s.status_offset, 4),
            layout.Area("part ids (part_id_offset, part_id_stride)", s.part_id_offset, 4, n,
                        s.part_id_stride),
            layout.Area("trigger counters (trigger_offset, trigger_stride)", s.trigger_offset, 2,
                        n, s.trigger_stride),
            layout.Area("recipe_offset", s.recipe_offset, 2),
            layout.Area("acks (ack_offset, ack_stride)", s.ack_offset, 4, n, s.ack_stride),
        ]
        layout.check_areas(self.areas, DB_LIMIT, "byte", f"plc DB{s.db_number} ")
        self.size = max(a.end for a in self.areas)
        """Bytes the DB must have at least."""

    def _check(self, camera_index: int) -> None:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")

    def record_offset(self, camera_index: int) -> int:
        """Slot mode: the camera's record. Ring mode: the start of its ring (the head DWORD)."""
        self._check(camera_index)
        return self.s.record_offset + camera_index * self.s.record_stride

    def ring_slot_offset(self, camera_index: int, slot: int) -> int:
        if not 0 <= slot < self.ring_size:
            raise ValueError(f"ring slot {slot} outside 0..{self.ring_size - 1}")
        return self.record_offset(camera_index) + layout.RING_HEAD_BYTES + \
            slot * layout.RECORD_BYTES

    def record_write_offset(self, camera_index: int, sequence: int) -> int:
        if not self.ring:
            return self.record_offset(camera_index)
        return self.ring_slot_offset(camera_index, layout.ring_slot(sequence, self.ring_size))

    def sequence_offset(self, camera_index: int) -> int:
        base = self.record_offset(camera_index)
        return base if self.ring else base + layout.SEQUENCE_BYTE

    def part_id_offset(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.part_id_offset + camera_index * self.s.part_id_stride

    def trigger_offset(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.trigger_offset + camera_index * self.s.trigger_stride

    def ack_offset(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.ack_offset + camera_index * self.s.ack_stride


def status_bytes(heartbeat: int, alarms: Alarm) -> bytes:
    return (int(heartbeat) & 0xFFFF).to_bytes(2, "big") + (int(alarms) & 0xFFFF).to_bytes(2, "big")


def _u16(mem: dict[int, int], off: int) -> int:
    return mem[off] << 8 | mem[off + 1]


def _u32(mem: dict[int, int], off: int) -> int:
    return _u16(mem, off) << 16 | _u16(mem, off + 2)


class S7Link(ReconnectingLink):
    """plc.record.PlcLink over S7 (ISO-on-TCP, PUT/GET on a DB)."""

    backend = "s7"

    def __init__(self, settings: S7Settings, camera_slots: int) -> None:
        self.map = S7Map(settings, camera_slots)
        super().__init__(settings, f"{settings.host}:{settings.port} DB{settings.db_number}",
                         camera_slots, settings.results)
        self.settings = settings
        self._client: AsyncClient | None = None

    async def _open(self, timeout_s: float) -> None:
        s = self.settings
        client = AsyncClient()
        self._client = client
        await client.connect(s.host, s.rack, s.slot, tcp_port=s.port)

    async def _shut(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # a dead peer may refuse even the goodbye
                await client.disconnect()

    def _live(self, timeout_s: float) -> AsyncClient:
        client = self._client
        if client is None or not client.get_connected() or client.connection is None:
            raise NotSent("not connected")
        client.connection.timeout = timeout_s  # the receive timeout = the remaining budget
        return client

    async def _db_write(self, offset: int, data: bytes, timeout_s: float) -> None:
        client = self._live(timeout_s)
        try:
            await client.write_area(Area.DB, self.settings.db_number, offset, bytearray(data))
        except S7ProtocolError as exc:
            raise DefiniteFailure(f"PLC refused write DB{self.settings.db_number}.DBB{offset}: "
                                  f"{exc}") from exc
        finally:
            self._drop_if_broken(client)

    async def _db_read(self, offset: int, size: int, timeout_s: float) -> bytes:
        client = self._live(timeout_s)
        try:
            data: Any = await client.read_area(Area.DB, self.settings.db_number, offset, size)
        except S7ProtocolError as exc:
            raise DefiniteFailure(f"PLC refused read DB{self.settings.db_number}.DBB{offset}: "
                                  f"{exc}") from exc
        finally:
            self._drop_if_broken(client)
        return bytes(data)

    async def _read_spans(
        self, spans: list[tuple[int, int]], timeout_s: float
    ) -> tuple[dict[int, int], list[tuple[int, int]]]:
        plan = layout.plan_reads(spans, MAX_READ_BYTES)
        mem: dict[int, int] = {}
        for lo, n in plan:
            mem.update(zip(range(lo, lo + n), await self._db_read(lo, n, timeout_s), strict=True))
        return mem, plan

    def _drop_if_broken(self, client: AsyncClient) -> None:
        if not client.get_connected():
            self._connection_lost("connection closed")

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """One PUT per record (slot mode); ring mode: the record into its slot, then the head.
        Ring mode: records of one camera must come in sequence order (the EDF queue does)."""
        cam = record.camera_index
        offset = self.map.record_write_offset(cam, record.sequence)
        data = layout.record_bytes(record)
        head_off = self.map.record_offset(cam)
        head = (int(record.sequence) & 0xFFFF_FFFF).to_bytes(4, "big")
        ring = self.map.ring

        async def send(timeout_s: float) -> None:
            await self._db_write(offset, data, timeout_s)
            if ring:
                await self._db_write(head_off, head, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            if await self._db_read(offset, len(data), timeout_s) != data:
                return False
            return not ring or await self._db_read(head_off, 4, timeout_s) == head

        return await self._write(
            f"record{cam}", f"cam{cam}#seq{record.sequence}", send, confirm, deadline_ns,
            ring=(cam, record.sequence) if ring else None, record=(cam, record.sequence),
        )

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        data = status_bytes(heartbeat, alarms)
        offset = self.settings.status_offset

        async def send(timeout_s: float) -> None:
            await self._db_write(offset, data, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            return await self._db_read(offset, len(data), timeout_s) == data

        return await self._write("status", f"heartbeat#{heartbeat}", send, confirm, deadline_ns)

    async def _probe(self, timeout_s: float) -> None:
        await self._db_read(self.settings.status_offset, 4, timeout_s)

    async def _read_ack(self, camera_index: int, timeout_s: float) -> int:
        return int.from_bytes(
            await self._db_read(self.map.ack_offset(camera_index), 4, timeout_s), "big"
        )

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        offset = self.map.part_id_offset(camera_index)

        async def read(timeout_s: float) -> int:
            return int.from_bytes(await self._db_read(offset, 4, timeout_s), "big")

        return await self._read(read, deadline_ns)

    async def read_inputs(
        self,
        deadline_ns: int,
        *,
        triggers: bool = True,
        recipe: bool = False,
        acks: bool = False,
    ) -> PlcInputs | None:
        """One GET when the areas asked for lie within 200 bytes (the default DB: part ids
        DBD520.., trigger counters DBW584.., recipe DBW616 for up to 16 cameras; acks DBD620..
        join them while the span allows). Otherwise the counters are read again at the end and
        the read repeats (up to 3 times) until they did not move in between."""
        m, n = self.map, self.camera_slots
        core: list[tuple[int, int]] = []  # read together: the snapshot
        rest: list[tuple[int, int]] = []
        counter_spans: list[tuple[int, int]] = []
        if triggers:
            counter_spans = [(m.trigger_offset(i), m.trigger_offset(i) + 2) for i in range(n)]
            core += [(m.part_id_offset(i), m.part_id_offset(i) + 4) for i in range(n)]
            core += counter_spans
        if recipe:
            r = self.settings.recipe_offset
            (core if triggers else rest).append((r, r + 2))
        if acks:
            rest += [(m.ack_offset(i), m.ack_offset(i) + 4) for i in range(n)]
        # Counters, part ids (and recipe) in one request: the snapshot is atomic as it is.
        atomic = len(layout.plan_reads(core, MAX_READ_BYTES)) <= 1

        async def read(timeout_s: float) -> PlcInputs:
            for _ in range(3):
                mem, _ = await self._read_spans(core, timeout_s)
                if atomic:
                    break
                again, _ = await self._read_spans(counter_spans, timeout_s)
                if all(mem[a] == v for a, v in again.items()):
                    break
            mem.update((await self._read_spans(rest, timeout_s))[0])
            return PlcInputs(
                read_ns=time.monotonic_ns(),
                trigger_counts=tuple(_u16(mem, m.trigger_offset(i)) for i in range(n))
                if triggers else None,
                part_ids=tuple(_u32(mem, m.part_id_offset(i)) for i in range(n))
                if triggers else None,
                recipe=_u16(mem, self.settings.recipe_offset) if recipe else None,
                acked_sequences=tuple(_u32(mem, m.ack_offset(i)) for i in range(n))
                if acks else None,
            )

        return await self._read(read, deadline_ns)

    async def read_sequences(self, deadline_ns: int) -> list[int] | None:
        offs = [self.map.sequence_offset(i) for i in range(self.camera_slots)]

        async def read(timeout_s: float) -> list[int]:
            mem, _ = await self._read_spans([(o, o + 4) for o in offs], timeout_s)
            return [_u32(mem, o) for o in offs]

        return await self._read(read, deadline_ns)

    async def read_ring(self, camera_index: int, deadline_ns: int) -> RingView | None:
        m = self.map
        if not m.ring:
            raise ValueError("read_ring needs results.mode: ring")
        base = m.record_offset(camera_index)

        async def read(timeout_s: float) -> RingView:
            b = await self._db_read(base, layout.ring_block_bytes(m.ring_size), timeout_s)
            recs = [layout.decode_record_bytes(b[4 + k * layout.RECORD_BYTES:])
                    for k in range(m.ring_size)]
            return RingView(head=int.from_bytes(b[:4], "big"), records=recs)

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> layout.DecodedRecord | None:
        """The camera's newest record (ring mode: the slot the head points at)."""
        if self.map.ring:
            view = await self.read_ring(camera_index, deadline_ns)
            return None if view is None else (view.newest() or view.records[0])
        offset = self.map.record_offset(camera_index)

        async def read(timeout_s: float) -> layout.DecodedRecord:
            return layout.decode_record_bytes(
                await self._db_read(offset, layout.RECORD_BYTES, timeout_s))

        return await self._read(read, deadline_ns)

    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None:
        async def read(timeout_s: float) -> tuple[int, Alarm]:
            b = await self._db_read(self.settings.status_offset, 4, timeout_s)
            return int.from_bytes(b[:2], "big"), Alarm(int.from_bytes(b[2:], "big"))

        return await self._read(read, deadline_ns)
