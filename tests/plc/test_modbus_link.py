"""ModbusLink against real Modbus TCP servers on 127.0.0.1, read back by independent clients.

Peers: the project's simulator (pymodbus server), libmodbus (C) and pyModbusTCP; readers: Debian's
mbpoll (libmodbus) and the simulator's own decoder. Expected register values are spelled out from
docs/plc-register-map.md, not recomputed with plc.layout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from plc.config import ModbusSettings
from plc.modbus import ModbusLink
from plc.record import Alarm, DecisionRecord, Verdict, WriteOutcome
from plc.sim import ModbusPlcSimulator
from tests.plc.conftest import Peer
from tests.support import free_port, mbpoll_read, mbpoll_write

MS = 1_000_000


def deadline(ms: float) -> int:
    return time.monotonic_ns() + int(ms * MS)


REC = DecisionRecord(
    camera_index=2,
    sequence=0x00012345,
    part_id=0xA1B2C3D4,
    verdict=Verdict.DEFECT,
    defect_class=3,
    score_permille=875,
    latency_ms=42,
    model_id=7,
    reason=0,
    recipe=0x0102,
)
# docs/plc-register-map.md (record v2), big word order, big byte order, camera 2 at 1000 + 2*16
# words 0-9 are record v1 (sequence at 8-9), the recipe is appended at word 10
REC_WORDS = [0xA1B2, 0xC3D4, 0x0002, 0x0003, 0x036B, 0x002A, 0x0007, 0x0000, 0x0001, 0x2345,
             0x0102, 0x0000]


async def started(settings: ModbusSettings, slots: int = 4) -> ModbusLink:
    link = ModbusLink(settings, slots)
    await link.start()
    assert await link.wait_connected(5), link.health()
    return link


@pytest.fixture
async def sim_link(sim: ModbusPlcSimulator) -> AsyncIterator[ModbusLink]:
    link = await started(ModbusSettings(port=sim.port or 0, simulator=True))
    yield link
    await link.close()


@pytest.mark.parametrize("peer_name", ["sim_process", "libmodbus_server", "pymodbustcp_server"])
async def test_record_matches_the_documented_map_byte_for_byte(
    peer_name: str, request: pytest.FixtureRequest
) -> None:
    peer: Peer = request.getfixturevalue(peer_name)
    link = await started(ModbusSettings(port=peer.port))
    try:
        r = await link.write_decision(REC, deadline(200))
        assert r.outcome is WriteOutcome.ACKED, r
        assert r.acked_ns is not None
        s = await link.write_status(
            0xBEEF, Alarm.CAMERA_DOWN | Alarm.FAILSAFE_ACTIVE, deadline(200)
        )
        assert s.outcome is WriteOutcome.ACKED, s
    finally:
        await link.close()
    assert mbpoll_read(peer.port, 1032, 12) == REC_WORDS
    assert mbpoll_read(peer.port, 100, 2) == [0xBEEF, 0x0005]
    assert mbpoll_read(peer.port, 1000, 12) == [0] * 12  # other cameras untouched


async def test_little_word_and_byte_order_reach_the_wire(libmodbus_server: Peer) -> None:
    link = await started(
        ModbusSettings(port=libmodbus_server.port, word_order="little", byte_order="little")
    )
    try:
        assert (await link.write_decision(REC, deadline(200))).outcome is WriteOutcome.ACKED
    finally:
        await link.close()
    assert mbpoll_read(libmodbus_server.port, 1032, 12) == [
        0xD4C3,
        0xB2A1,
        0x0200,
        0x0300,
        0x6B03,
        0x2A00,
        0x0700,
        0x0000,
        0x4523,  # sequence 0x00012345, low word first, bytes swapped
        0x0100,
        0x0201,  # recipe 0x0102, bytes swapped
        0x0000,
    ]


async def test_one_request_per_record_and_serialised_concurrent_writers(
    sim: ModbusPlcSimulator, sim_link: ModbusLink
) -> None:
    n = 50

    async def camera(i: int) -> list[WriteOutcome]:
        out = []
        for seq in range(1, n + 1):
            rec = DecisionRecord(i, seq, 1000 * i + seq, Verdict.OK, 0, 990, 5, 1)
            out.append((await sim_link.write_decision(rec, deadline(500))).outcome)
        return out

    results = await asyncio.gather(*(camera(i) for i in range(4)))
    assert all(o is WriteOutcome.ACKED for res in results for o in res)
    c = sim.counters()
    assert c.write_requests == 4 * n  # exactly one Modbus request per decision record
    assert c.records_received == [n] * 4
    assert c.sequence_gaps == [0] * 4
    for i in range(4):
        rec = sim.read_record(i)
        assert (rec["sequence"], rec["part_id"], rec["verdict"]) == (n, 1000 * i + n, 1)


async def test_part_id_announced_by_the_plc_is_read(pymodbustcp_server: Peer) -> None:
    # camera 1's part id at 200 + 1*2, written by an independent client (mbpoll) as the PLC would
    await asyncio.to_thread(mbpoll_write, pymodbustcp_server.port, 202, [4660, 22136])
    link = await started(ModbusSettings(port=pymodbustcp_server.port))
    try:
        assert await link.read_part_id(1, deadline(200)) == 0x12345678
        assert await link.read_part_id(0, deadline(200)) == 0
        assert await link.read_part_id(1, time.monotonic_ns() - 1) is None  # already late
    finally:
        await link.close()


async def test_late_requests_are_not_sent(sim: ModbusPlcSimulator, sim_link: ModbusLink) -> None:
    rec = DecisionRecord(0, 1, 1, Verdict.OK, 0, 900, 1, 1)
    past = await sim_link.write_decision(rec, time.monotonic_ns() - MS)
    assert past.outcome is WriteOutcome.DROPPED_LATE
    tiny = await sim_link.write_decision(rec, deadline(0.2))  # below min_request_ms (1 ms)
    assert tiny.outcome is WriteOutcome.DROPPED_LATE
    assert sim.counters().write_requests == 0
    assert sim_link.stats.dropped_late == 2


async def test_exception_response_is_a_definite_failure(libmodbus_server: Peer) -> None:
    # libmodbus holds 8192 registers: camera 0's record at 8186 runs off the end
    link = await started(ModbusSettings(port=libmodbus_server.port, record_base=8186))
    try:
        ok = await link.write_decision(
            REC.__class__(0, 1, 1, Verdict.OK, 0, 1, 1, 1), deadline(200)
        )
        assert ok.outcome is WriteOutcome.FAILED and "exception response" in ok.detail, ok
        assert link.connected  # a refusal is not a broken connection
        assert (await link.write_status(1, Alarm(0), deadline(200))).outcome is WriteOutcome.ACKED
        assert link.health().unconfirmed_writes == 0
    finally:
        await link.close()


async def test_first_connect_fails_then_link_comes_up_on_its_own() -> None:
    port = free_port()
    link = ModbusLink(ModbusSettings(port=port, reconnect_backoff_max_ms=100), 1)
    await link.start()
    try:
        t0 = time.monotonic()
        r = await link.write_decision(
            DecisionRecord(0, 1, 1, Verdict.OK, 0, 1, 1, 1), deadline(100)
        )
        assert r.outcome is WriteOutcome.FAILED and "not connected" in r.detail
        assert time.monotonic() - t0 < 0.05  # a down link answers at once, it does not wait
        with ModbusPlcSimulator(ModbusSettings(port=port, simulator=True), 1) as sim:
            assert await link.wait_connected(3), link.health()
            r = await link.write_decision(
                DecisionRecord(0, 2, 2, Verdict.OK, 0, 1, 1, 1), deadline(100)
            )
            assert r.outcome is WriteOutcome.ACKED
            assert sim.read_record(0)["sequence"] == 2
    finally:
        await link.close()
