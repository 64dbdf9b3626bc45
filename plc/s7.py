"""Siemens S7 backend (python-snap7 3.x AsyncClient) of the PLC link.

The DB layout is plc/layout.py's record as big-endian bytes (S7's native order), one record per
camera; one write_area (PUT) request per decision record. Heartbeat and alarm words sit side by
side and go in one request. See docs/plc-register-map.md for the DB a PLC programmer declares.

Traps handled here (FIELD-NOTES): the client's receive timeout is 5 s unless set, so the
connection's timeout is set from the remaining budget before every request; after a timeout the
stream may hold half a response, so the link disconnects and connects afresh (the base class drops
the connection on any timeout). The 3.x AsyncClient does real asyncio I/O, so no thread is needed.
"""

from __future__ import annotations

import contextlib
from typing import Any

from snap7.async_client import AsyncClient
from snap7.error import S7ProtocolError
from snap7.type import Area

from plc import layout
from plc.config import S7Settings
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink
from plc.record import Alarm, DecisionRecord, WriteResult


class S7Map:
    """Byte offsets of one line's DB layout (validated against the camera count)."""

    def __init__(self, s: S7Settings, camera_slots: int) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        self.s = s
        self.camera_slots = camera_slots
        areas = [
            ("decision records", s.record_offset,
             s.record_offset + (camera_slots - 1) * s.record_stride + layout.RECORD_BYTES),
            ("status (heartbeat, alarms)", s.status_offset, s.status_offset + 4),
            ("part ids", s.part_id_offset,
             s.part_id_offset + (camera_slots - 1) * s.part_id_stride + 4),
        ]
        for i, (n1, lo1, hi1) in enumerate(areas):
            for n2, lo2, hi2 in areas[i + 1:]:
                if lo1 < hi2 and lo2 < hi1:
                    raise ValueError(
                        f"plc DB{s.db_number} overlap: {n1} [{lo1}..{hi1 - 1}] and {n2} "
                        f"[{lo2}..{hi2 - 1}] for {camera_slots} camera(s): move one of them"
                    )
        self.size = max(hi for _, _, hi in areas)
        """Bytes the DB must have at least."""

    def _check(self, camera_index: int) -> None:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")

    def record_offset(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.record_offset + camera_index * self.s.record_stride

    def part_id_offset(self, camera_index: int) -> int:
        self._check(camera_index)
        return self.s.part_id_offset + camera_index * self.s.part_id_stride


def status_bytes(heartbeat: int, alarms: Alarm) -> bytes:
    return (int(heartbeat) & 0xFFFF).to_bytes(2, "big") + (int(alarms) & 0xFFFF).to_bytes(2, "big")


class S7Link(ReconnectingLink):
    """plc.record.PlcLink over S7 (ISO-on-TCP, PUT/GET on a DB)."""

    backend = "s7"

    def __init__(self, settings: S7Settings, camera_slots: int) -> None:
        super().__init__(settings, f"{settings.host}:{settings.port} DB{settings.db_number}")
        self.settings = settings
        self.map = S7Map(settings, camera_slots)
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

    def _drop_if_broken(self, client: AsyncClient) -> None:
        if not client.get_connected():
            self._connection_lost("connection closed")

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        offset = self.map.record_offset(record.camera_index)
        data = layout.record_bytes(record)

        async def send(timeout_s: float) -> None:
            await self._db_write(offset, data, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            return await self._db_read(offset, len(data), timeout_s) == data

        return await self._write(
            f"record{record.camera_index}", f"cam{record.camera_index}#seq{record.sequence}",
            send, confirm, deadline_ns,
        )

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        data = status_bytes(heartbeat, alarms)
        offset = self.settings.status_offset

        async def send(timeout_s: float) -> None:
            await self._db_write(offset, data, timeout_s)

        async def confirm(timeout_s: float) -> bool:
            return await self._db_read(offset, len(data), timeout_s) == data

        return await self._write("status", f"heartbeat#{heartbeat}", send, confirm, deadline_ns)

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        offset = self.map.part_id_offset(camera_index)

        async def read(timeout_s: float) -> int:
            return int.from_bytes(await self._db_read(offset, 4, timeout_s), "big")

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> layout.DecodedRecord | None:
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
