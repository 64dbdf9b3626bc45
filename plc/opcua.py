"""OPC UA backend (asyncua) of the PLC link, with the same record semantics as Modbus and S7.

Each camera's record is a set of typed variables (see docs/plc-register-map.md, "OPC UA"). A
decision is ONE Write service call carrying all fields, Sequence last, so a server that applies
the WriteValues in order (all common stacks do) flips the strobe after the payload. asyncua's own
auto-reconnect is off: plc.linkbase owns reconnect, timeouts and unknown-outcome confirmation.

`populate_server` builds the same address space on an asyncua server: the reference a PLC
programmer can compare against, and the peer the tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from asyncua import Client, Node, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from plc.config import OpcUaSettings
from plc.layout import DecodedRecord
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink
from plc.record import Alarm, DecisionRecord, WriteResult

# (field, OPC UA type) in write order: Sequence LAST (the strobe)
RECORD_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("PartId", ua.VariantType.UInt32),
    ("Verdict", ua.VariantType.UInt16),
    ("DefectClass", ua.VariantType.UInt16),
    ("ScorePermille", ua.VariantType.UInt16),
    ("LatencyMs", ua.VariantType.UInt16),
    ("ModelId", ua.VariantType.UInt16),
    ("Reason", ua.VariantType.UInt16),
    ("Sequence", ua.VariantType.UInt32),
)
PLC_PART_ID = "PlcPartId"
"""Per camera, written by the PLC: the part id it expects next (UInt32)."""


def record_values(record: DecisionRecord) -> list[int]:
    """Field values in RECORD_FIELDS order, saturated/wrapped like the Modbus/S7 encodings."""
    u16 = lambda v: max(0, min(0xFFFF, int(v)))  # noqa: E731
    return [
        int(record.part_id) & 0xFFFF_FFFF, u16(record.verdict), u16(record.defect_class),
        max(0, min(1000, int(record.score_permille))), u16(record.latency_ms),
        u16(record.model_id), u16(record.reason), int(record.sequence) & 0xFFFF_FFFF,
    ]


def node_id(ns: int, prefix: str, *path: str) -> ua.NodeId:
    return ua.NodeId(ua.String(".".join((prefix, *path))), ua.Int16(ns), ua.NodeIdType.String)


def camera_node(camera_index: int) -> str:
    return f"Camera{camera_index}"


class OpcUaLink(ReconnectingLink):
    """plc.record.PlcLink over OPC UA (binary, SecurityPolicy None, optional user/password)."""

    backend = "opcua"

    def __init__(self, settings: OpcUaSettings, camera_slots: int) -> None:
        if camera_slots < 1:
            raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
        super().__init__(settings, settings.endpoint)
        self.settings = settings
        self.camera_slots = camera_slots
        self._client: Client | None = None
        self._ns = 0

    async def _open(self, timeout_s: float) -> None:
        s = self.settings
        client = Client(s.endpoint, timeout=timeout_s, watchdog_intervall=1.0)
        if s.username:
            client.set_user(s.username)
        if s.password is not None:
            client.set_password(s.password.get_secret_value())
        client.connection_lost_callback = self._on_lost
        self._client = client
        await client.connect(auto_reconnect=False)
        try:
            self._ns = await client.get_namespace_index(s.namespace_uri)
        except ValueError as exc:
            raise ConnectionError(
                f"OPC UA server has no namespace {s.namespace_uri!r}: check plc.namespace_uri"
            ) from exc

    async def _on_lost(self, exc: Exception) -> None:
        self._connection_lost(f"OPC UA connection lost: {type(exc).__name__}: {exc}")

    async def _shut(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.connection_lost_callback = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 0.2)  # a hung server gets no more time
        with contextlib.suppress(Exception):
            client.disconnect_socket()

    def _live(self) -> Client:
        client = self._client
        if client is None:
            raise NotSent("not connected")
        return client

    def _nodes(self, client: Client, *paths: Sequence[str]) -> list[Node]:
        return [client.get_node(node_id(self._ns, self.settings.node_prefix, *p)) for p in paths]

    async def _write_vals(self, paths: Sequence[Sequence[str]], values: list[int],
                          types: list[ua.VariantType]) -> None:
        client = self._live()
        nodes = self._nodes(client, *paths)
        dvs = [ua.DataValue(ua.Variant(v, t)) for v, t in zip(values, types, strict=True)]
        try:
            results = await client.uaclient.write_attributes(
                [n.nodeid for n in nodes], dvs, ua.AttributeIds.Value)
        except UaStatusCodeError as exc:
            raise DefiniteFailure(f"write refused: {exc}") from exc
        bad = [(p, r) for p, r in zip(paths, results, strict=True) if not r.is_good()]
        if bad:
            raise DefiniteFailure("write refused: " + ", ".join(
                f"{'.'.join(p)}={r.name}" for p, r in bad))

    async def _read_vals(self, paths: Sequence[Sequence[str]]) -> list[Any]:
        client = self._live()
        try:
            res = await client.read_attributes(self._nodes(client, *paths), ua.AttributeIds.Value)
        except UaStatusCodeError as exc:
            raise DefiniteFailure(f"read refused: {exc}") from exc
        out = []
        for p, r in zip(paths, res, strict=True):
            if r.StatusCode is not None and not r.StatusCode.is_good():
                raise DefiniteFailure(f"read refused: {'.'.join(p)}={r.StatusCode.name}")
            out.append(r.Value.Value if r.Value is not None else None)
        return out

    def _check_cam(self, camera_index: int) -> None:
        if not 0 <= camera_index < self.camera_slots:
            raise ValueError(f"camera_index {camera_index} outside 0..{self.camera_slots - 1}")

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        self._check_cam(record.camera_index)
        cam = camera_node(record.camera_index)
        paths = [(cam, f) for f, _ in RECORD_FIELDS]
        types = [t for _, t in RECORD_FIELDS]
        values = record_values(record)

        async def send(timeout_s: float) -> None:
            await self._write_vals(paths, values, types)

        async def confirm(timeout_s: float) -> bool:
            return [int(v) for v in await self._read_vals(paths)] == values

        return await self._write(
            f"record{record.camera_index}", f"cam{record.camera_index}#seq{record.sequence}",
            send, confirm, deadline_ns,
        )

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        paths = [("Alarms",), ("Heartbeat",)]
        values = [int(alarms) & 0xFFFF, int(heartbeat) & 0xFFFF]
        types = [ua.VariantType.UInt16, ua.VariantType.UInt16]

        async def send(timeout_s: float) -> None:
            await self._write_vals(paths, values, types)

        async def confirm(timeout_s: float) -> bool:
            return [int(v) for v in await self._read_vals(paths)] == values

        return await self._write("status", f"heartbeat#{heartbeat}", send, confirm, deadline_ns)

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        self._check_cam(camera_index)

        async def read(timeout_s: float) -> int:
            (v,) = await self._read_vals([(camera_node(camera_index), PLC_PART_ID)])
            return int(v)

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> DecodedRecord | None:
        """Read back a camera's record (for `edge plc test/watch`; the daemon never needs it)."""
        self._check_cam(camera_index)
        paths = [(camera_node(camera_index), f) for f, _ in RECORD_FIELDS]

        async def read(timeout_s: float) -> DecodedRecord:
            v = [int(x) for x in await self._read_vals(paths)]
            return DecodedRecord(part_id=v[0], verdict=v[1], defect_class=v[2],
                                 score_permille=v[3], latency_ms=v[4], model_id=v[5],
                                 reason=v[6], sequence=v[7])

        return await self._read(read, deadline_ns)

    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None:
        async def read(timeout_s: float) -> tuple[int, Alarm]:
            hb, al = await self._read_vals([("Heartbeat",), ("Alarms",)])
            return int(hb), Alarm(int(al))

        return await self._read(read, deadline_ns)


async def populate_server(server: Any, settings: OpcUaSettings, camera_slots: int) -> int:
    """Create the documented address space on an asyncua Server (before server.start()).

    Returns the namespace index. Variables the daemon writes are writable; PlcPartId is what the
    PLC program would set.
    """
    ns = int(await server.register_namespace(settings.namespace_uri))
    prefix = settings.node_prefix
    root = await server.nodes.objects.add_object(node_id(ns, prefix), f"{ns}:{prefix}")

    async def var(parent: Any, path: tuple[str, ...], vtype: ua.VariantType) -> None:
        node = await parent.add_variable(node_id(ns, prefix, *path), f"{ns}:{path[-1]}",
                                         ua.Variant(0, vtype))
        await node.set_writable()

    await var(root, ("Heartbeat",), ua.VariantType.UInt16)
    await var(root, ("Alarms",), ua.VariantType.UInt16)
    for i in range(camera_slots):
        cam = camera_node(i)
        obj = await root.add_object(node_id(ns, prefix, cam), f"{ns}:{cam}")
        for f, t in RECORD_FIELDS:
            await var(obj, (cam, f), t)
        await var(obj, (cam, PLC_PART_ID), ua.VariantType.UInt32)
    return ns
