"""OPC UA backend (asyncua) of the PLC link, with the same record semantics as Modbus and S7.

Each camera's record is a set of typed variables (see docs/plc-register-map.md, "OPC UA"). A
decision is ONE Write service call carrying all fields, Sequence last, so a server that applies
the WriteValues in order (all common stacks do) flips the strobe after the payload. Ring mode:
the same call writes the slot's fields and then `RingHead`, still one request. asyncua's own
auto-reconnect is off: plc.linkbase owns reconnect, timeouts and unknown-outcome confirmation.

`populate_server` builds the same address space on an asyncua server: the reference a PLC
programmer can compare against, and the peer the tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from asyncua import Client, Node, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from plc.config import OpcUaSettings
from plc.layout import DecodedRecord, ring_slot
from plc.linkbase import DefiniteFailure, NotSent, ReconnectingLink, RingView
from plc.record import Alarm, DecisionRecord, PlcInputs, WriteResult

# (field, OPC UA type) in write order: Sequence LAST (the strobe). This is the order of the values
# in the Write call, not the Modbus/S7 memory layout (there the recipe follows the sequence).
RECORD_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("PartId", ua.VariantType.UInt32),
    ("Verdict", ua.VariantType.UInt16),
    ("DefectClass", ua.VariantType.UInt16),
    ("ScorePermille", ua.VariantType.UInt16),
    ("LatencyMs", ua.VariantType.UInt16),
    ("ModelId", ua.VariantType.UInt16),
    ("Reason", ua.VariantType.UInt16),
    ("Recipe", ua.VariantType.UInt16),
    ("Sequence", ua.VariantType.UInt32),
)
PLC_PART_ID = "PlcPartId"
"""Per camera, written by the PLC: the part id it expects next (UInt32)."""
TRIGGER_COUNT = "TriggerCount"
"""Per camera, written by the PLC: +1 per part (UInt16, wraps), after PlcPartId."""
RECIPE = "Recipe"
"""Top level (Inspection.Recipe), written by the PLC: the selected recipe number (UInt16)."""
ACK_SEQUENCE = "AckSequence"
"""Per camera, written by the PLC (acknowledged mode): last sequence consumed (UInt32)."""
RING_HEAD = "RingHead"
"""Ring mode, per camera, written by the appliance after the slot: newest sequence (UInt32)."""


def record_values(record: DecisionRecord) -> list[int]:
    """Field values in RECORD_FIELDS order, saturated/wrapped like the Modbus/S7 encodings."""
    u16 = lambda v: max(0, min(0xFFFF, int(v)))  # noqa: E731
    return [
        int(record.part_id) & 0xFFFF_FFFF, u16(record.verdict), u16(record.defect_class),
        max(0, min(1000, int(record.score_permille))), u16(record.latency_ms),
        u16(record.model_id), u16(record.reason), u16(record.recipe),
        int(record.sequence) & 0xFFFF_FFFF,
    ]


def ring_node(slot: int) -> str:
    return f"Ring{slot}"


def record_paths(camera_index: int, ring_slot_index: int | None = None) -> list[tuple[str, ...]]:
    """Node paths of one record: Camera<i>.<Field>, or Camera<i>.Ring<k>.<Field> in ring mode."""
    cam = camera_node(camera_index)
    if ring_slot_index is None:
        return [(cam, f) for f, _ in RECORD_FIELDS]
    return [(cam, ring_node(ring_slot_index), f) for f, _ in RECORD_FIELDS]


def _decoded(v: list[int]) -> DecodedRecord:
    return DecodedRecord(part_id=v[0], verdict=v[1], defect_class=v[2], score_permille=v[3],
                         latency_ms=v[4], model_id=v[5], reason=v[6], recipe=v[7], sequence=v[8])


def node_id(ns: int, prefix: str, *path: str) -> ua.NodeId:
    return ua.NodeId(ua.String(".".join((prefix, *path))), ua.Int16(ns), ua.NodeIdType.String)


def camera_node(camera_index: int) -> str:
    return f"Camera{camera_index}"


class OpcUaLink(ReconnectingLink):
    """plc.record.PlcLink over OPC UA (binary, SecurityPolicy None, optional user/password)."""

    backend = "opcua"

    def __init__(self, settings: OpcUaSettings, camera_slots: int) -> None:
        super().__init__(settings, settings.endpoint, camera_slots, settings.results)
        self.settings = settings
        self.ring = settings.results.mode == "ring"
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

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        """ONE Write call: the record's fields, Sequence last (ring mode: the slot's fields, then
        RingHead). Ring mode: records of one camera must come in sequence order."""
        cam = record.camera_index
        self._check_cam(cam)
        types = [t for _, t in RECORD_FIELDS]
        values = record_values(record)
        if self.ring:
            slot = ring_slot(record.sequence, self.results.ring_size)
            paths = [*record_paths(cam, slot), (camera_node(cam), RING_HEAD)]
            types.append(ua.VariantType.UInt32)
            values.append(int(record.sequence) & 0xFFFF_FFFF)
        else:
            paths = record_paths(cam)

        async def send(timeout_s: float) -> None:
            await self._write_vals(paths, values, types)

        async def confirm(timeout_s: float) -> bool:
            return [int(v) for v in await self._read_vals(paths)] == values

        return await self._write(
            f"record{cam}", f"cam{cam}#seq{record.sequence}", send, confirm, deadline_ns,
            ring=(cam, record.sequence) if self.ring else None,
            record=(cam, record.sequence),
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

    async def _probe(self, timeout_s: float) -> None:
        await self._read_vals([("Heartbeat",)])

    async def _read_ack(self, camera_index: int, timeout_s: float) -> int:
        (v,) = await self._read_vals([(camera_node(camera_index), ACK_SEQUENCE)])
        return int(v)

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        self._check_cam(camera_index)

        async def read(timeout_s: float) -> int:
            (v,) = await self._read_vals([(camera_node(camera_index), PLC_PART_ID)])
            return int(v)

        return await self._read(read, deadline_ns)

    async def read_inputs(
        self,
        deadline_ns: int,
        *,
        triggers: bool = True,
        recipe: bool = False,
        acks: bool = False,
    ) -> PlcInputs | None:
        """ONE Read call for everything asked (TriggerCount and PlcPartId of every camera,
        Recipe, AckSequence): the server answers it from one state of its address space."""
        n = self.camera_slots
        paths: list[tuple[str, ...]] = []
        if triggers:
            paths += [(camera_node(i), TRIGGER_COUNT) for i in range(n)]
            paths += [(camera_node(i), PLC_PART_ID) for i in range(n)]
        if recipe:
            paths.append((RECIPE,))
        if acks:
            paths += [(camera_node(i), ACK_SEQUENCE) for i in range(n)]

        async def read(timeout_s: float) -> PlcInputs:
            v = [int(x) for x in await self._read_vals(paths)]
            at = 0
            counts = ids = acked = None
            rec = None
            if triggers:
                counts, ids, at = tuple(v[:n]), tuple(v[n:2 * n]), 2 * n
            if recipe:
                rec, at = v[at], at + 1
            if acks:
                acked = tuple(v[at:at + n])
            return PlcInputs(time.monotonic_ns(), counts, ids, rec, acked)

        return await self._read(read, deadline_ns)

    async def read_sequences(self, deadline_ns: int) -> list[int] | None:
        field = RING_HEAD if self.ring else "Sequence"
        paths = [(camera_node(i), field) for i in range(self.camera_slots)]

        async def read(timeout_s: float) -> list[int]:
            return [int(x) for x in await self._read_vals(paths)]

        return await self._read(read, deadline_ns)

    async def read_ring(self, camera_index: int, deadline_ns: int) -> RingView | None:
        if not self.ring:
            raise ValueError("read_ring needs results.mode: ring")
        self._check_cam(camera_index)
        size = self.results.ring_size
        paths: list[tuple[str, ...]] = [(camera_node(camera_index), RING_HEAD)]
        for k in range(size):
            paths += record_paths(camera_index, k)

        async def read(timeout_s: float) -> RingView:
            v = [int(x) for x in await self._read_vals(paths)]
            w = len(RECORD_FIELDS)
            recs = [_decoded(v[1 + k * w:1 + (k + 1) * w]) for k in range(size)]
            return RingView(head=v[0], records=recs)

        return await self._read(read, deadline_ns)

    async def read_record(self, camera_index: int, deadline_ns: int) -> DecodedRecord | None:
        """The newest record (ring mode: the slot RingHead points at). Tools only."""
        self._check_cam(camera_index)
        if self.ring:
            view = await self.read_ring(camera_index, deadline_ns)
            return None if view is None else (view.newest() or view.records[0])
        paths = record_paths(camera_index)

        async def read(timeout_s: float) -> DecodedRecord:
            return _decoded([int(x) for x in await self._read_vals(paths)])

        return await self._read(read, deadline_ns)

    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None:
        async def read(timeout_s: float) -> tuple[int, Alarm]:
            hb, al = await self._read_vals([("Heartbeat",), ("Alarms",)])
            return int(hb), Alarm(int(al))

        return await self._read(read, deadline_ns)


async def populate_server(server: Any, settings: OpcUaSettings, camera_slots: int) -> int:
    """Create the documented address space on an asyncua Server (before server.start()).

    Returns the namespace index. Every variable is writable: the appliance writes the records,
    heartbeat and alarms; the PLC program writes PlcPartId, TriggerCount, Recipe, AckSequence.
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
    await var(root, (RECIPE,), ua.VariantType.UInt16)
    ring = settings.results.mode == "ring"
    for i in range(camera_slots):
        cam = camera_node(i)
        obj = await root.add_object(node_id(ns, prefix, cam), f"{ns}:{cam}")
        if ring:
            await var(obj, (cam, RING_HEAD), ua.VariantType.UInt32)
            for k in range(settings.results.ring_size):
                slot = await obj.add_object(node_id(ns, prefix, cam, ring_node(k)),
                                            f"{ns}:{ring_node(k)}")
                for f, t in RECORD_FIELDS:
                    await var(slot, (cam, ring_node(k), f), t)
        else:
            for f, t in RECORD_FIELDS:
                await var(obj, (cam, f), t)
        await var(obj, (cam, PLC_PART_ID), ua.VariantType.UInt32)
        await var(obj, (cam, TRIGGER_COUNT), ua.VariantType.UInt16)
        await var(obj, (cam, ACK_SEQUENCE), ua.VariantType.UInt32)
    return ns
