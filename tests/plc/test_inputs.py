"""What the PLC writes for the appliance, read by every backend from real servers: trigger
counters + part ids as one snapshot, the recipe, acknowledgements, and the sequences a restarted
daemon continues from.

The PLC side is played through each server's own memory (stdin side channels, or the simulator's
in-process access), never through the code under test. Addresses are spelled out from
docs/plc-register-map.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

from plc.config import ModbusSettings, OpcUaSettings, S7Settings
from plc.modbus import ModbusLink
from plc.opcua import OpcUaLink
from plc.record import next_sequence
from plc.s7 import S7Link
from plc.sim import ModbusPlcSimulator
from tests.plc.conftest import OpcUaPeer, PyModbusTcpPeer, S7Peer

MS = 1_000_000


def dl(ms: float = 500) -> int:
    return time.monotonic_ns() + int(ms * MS)


L = TypeVar("L", ModbusLink, S7Link, OpcUaLink)


async def started(link: L) -> L:
    await link.start()
    assert await link.wait_connected(10), link.health()
    return link


async def test_modbus_inputs_from_pymodbustcp(pymodbustcp_server: PyModbusTcpPeer) -> None:
    plc = pymodbustcp_server
    for i, part in enumerate([0x0A0B0C0D, 7, 0, 0xFFFFFFFF]):
        plc.set_u32(200 + 2 * i, part)  # part id of camera i, high word first
    plc.set(300, [5, 65535, 0, 1])  # trigger counters of cameras 0..3
    plc.set(299, [12])  # recipe
    plc.set_u32(402, 0x00012345)  # camera 1 acknowledged sequence 0x12345
    plc.set_u32(1008, 5000)  # camera 0's record strobe: the PLC holds sequence 5000
    plc.set_u32(1032 + 8, 0xFFFFFFFF)  # camera 2 (record at 1032, strobe at +8): at the wrap
    link = await started(ModbusLink(ModbusSettings(port=plc.port), 4))
    try:
        got = await link.read_inputs(dl(), recipe=True, acks=True)
        assert got is not None
        assert got.trigger_counts == (5, 65535, 0, 1)
        assert got.part_ids == (0x0A0B0C0D, 7, 0, 0xFFFFFFFF)
        assert got.recipe == 12
        assert got.acked_sequences == (0, 0x12345, 0, 0)
        only = await link.read_inputs(dl())
        assert only is not None and only.recipe is None and only.acked_sequences is None
        assert only.trigger_counts == (5, 65535, 0, 1)
        held = await link.read_sequences(dl())
        assert held == [5000, 0, 0xFFFFFFFF, 0]
        assert [next_sequence(h) for h in held] == [5001, 1, 1, 1]
        assert await link.read_inputs(time.monotonic_ns() - 1) is None  # already late
    finally:
        await link.close()


async def test_snapshot_never_pairs_a_count_with_another_parts_id(
    pymodbustcp_server: PyModbusTcpPeer,
) -> None:
    """The PLC announces parts back to back (id, then counter); every snapshot the link takes
    while it races must show the id written for that very count (part n has id 0x10001 * n)."""
    plc = pymodbustcp_server
    link = await started(ModbusLink(ModbusSettings(port=plc.port), 1))
    seen: list[tuple[int, int]] = []
    try:
        await asyncio.to_thread(plc.play, 200, 300, 4000)
        player = asyncio.create_task(asyncio.to_thread(plc.wait_played))
        while not player.done() or not seen:
            got = await link.read_inputs(dl())
            assert got is not None and got.trigger_counts and got.part_ids
            seen.append((got.trigger_counts[0], got.part_ids[0]))
        await player
        last = await link.read_inputs(dl())
    finally:
        await link.close()
    assert last is not None and last.trigger_counts == (4000,)
    bad = [(c, p) for c, p in seen if p != (0x10001 * c) & 0xFFFF_FFFF]
    assert not bad, f"{len(bad)} of {len(seen)} snapshots paired a count with another id: {bad[:5]}"


async def test_sim_program_triggers_and_one_request_per_snapshot() -> None:
    """The simulator playing a PLC: parts announced at a rate, recipe switched; a snapshot of
    counters + part ids + recipe is ONE Modbus request (the default map keeps them together)."""
    settings = ModbusSettings(
        port=0, simulator=True,
        sim_program={"trigger_rate_hz": 200, "recipes": [3, 4], "recipe_switch_every_parts": 5,
                     "slots": [1], "max_parts": 40},  # type: ignore[arg-type]
    )
    with ModbusPlcSimulator(settings, 2) as sim:
        link = await started(ModbusLink(settings.model_copy(update={"port": sim.port}), 2))
        try:
            reads_before = sim.counters().read_requests
            got = await link.read_inputs(dl(), recipe=True)
            assert sim.counters().read_requests == reads_before + 1
            with_acks = await link.read_inputs(dl(), recipe=True, acks=True)
            assert sim.counters().read_requests == reads_before + 3  # acks at 400..: a 2nd one
            assert got is not None and with_acks is not None
            while (got.trigger_counts or (0, 0))[1] < 40:
                got = await link.read_inputs(dl(), recipe=True)
                assert got is not None and got.trigger_counts and got.part_ids
                assert got.trigger_counts[0] == 0  # slot 0 is not triggered
                c = got.trigger_counts[1]
                if c:  # part ids start at 1: part c has id c
                    assert got.part_ids[1] == c
                    assert got.recipe == (3 if (c - 1) // 5 % 2 == 0 else 4)
                await asyncio.sleep(0.001)
        finally:
            await link.close()
        pc = sim.program_counters()
        assert pc is not None and pc.parts_triggered == [0, 40] and pc.recipe_switches == 7


async def test_s7_inputs_and_sequences(s7_server: S7Peer) -> None:
    """Default DB: part ids DBD520+4i, trigger counters DBW584+2i, recipe DBW616, acks
    DBD620+4i; record strobes at DBD(32i + 16)."""
    s7 = s7_server
    s7.put(520, bytes.fromhex("0a0b0c0d" "00000007"))
    s7.put(584, bytes.fromhex("0005" "ffff"))
    s7.put(616, bytes.fromhex("0102"))
    s7.put(624, bytes.fromhex("00012345"))
    s7.put(16, (5000).to_bytes(4, "big"))
    link = await started(S7Link(S7Settings(port=s7.port), 2))
    try:
        got = await link.read_inputs(dl(), recipe=True, acks=True)
        assert got is not None
        assert (got.trigger_counts, got.part_ids) == ((5, 65535), (0x0A0B0C0D, 7))
        assert (got.recipe, got.acked_sequences) == (0x0102, (0, 0x12345))
        assert await link.read_sequences(dl()) == [5000, 0]
    finally:
        await link.close()


async def test_opcua_inputs_and_sequences(opcua_server: OpcUaPeer) -> None:
    ua = opcua_server
    for node, value in [("Camera0.TriggerCount", 9), ("Camera0.PlcPartId", 123456),
                        ("Camera1.TriggerCount", 65535), ("Camera1.PlcPartId", 0xFFFFFFFF),
                        ("Recipe", 7), ("Camera1.AckSequence", 42), ("Camera0.Sequence", 5000)]:
        await asyncio.to_thread(ua.set, node, value)
    link = await started(OpcUaLink(OpcUaSettings(endpoint=ua.endpoint), 2))
    try:
        got = await link.read_inputs(dl(), recipe=True, acks=True)
        assert got is not None
        assert (got.trigger_counts, got.part_ids) == ((9, 65535), (123456, 0xFFFFFFFF))
        assert (got.recipe, got.acked_sequences) == (7, (0, 42))
        assert await link.read_sequences(dl()) == [5000, 0]
    finally:
        await link.close()
