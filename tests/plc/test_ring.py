"""Ring mode (results.mode: ring) and acknowledged mode on real servers, and the burst that shows
why the ring exists: a PLC scanning every 15 ms during a back-to-back burst of records.

The ring layout is decoded by hand from docs/plc-register-map.md out of what independent readers
return (mbpoll for Modbus, the S7 servers' own memory, the OPC UA server's address space).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TypeVar

import pytest

from plc.config import ModbusSettings, OpcUaSettings, S7Settings
from plc.modbus import ModbusLink
from plc.opcua import OpcUaLink
from plc.record import Alarm, DecisionRecord, Verdict, WriteOutcome, WriteResult
from plc.s7 import S7Link
from tests.plc.conftest import OpcUaPeer, PyModbusTcpPeer, S7Peer
from tests.plc.plcpeers import RingScanner
from tests.support import free_port, mbpoll_read, wait_until

MS = 1_000_000


def dl(ms: float = 300) -> int:
    return time.monotonic_ns() + int(ms * MS)


def rec(cam: int, seq: int) -> DecisionRecord:
    return DecisionRecord(cam, seq, 100 + seq, Verdict.OK if seq % 2 else Verdict.DEFECT,
                          seq % 2, 900, seq, 4, recipe=seq % 3)


def ring(**kw: object) -> dict[str, object]:
    return {"mode": "ring", **kw}


L = TypeVar("L", ModbusLink, S7Link, OpcUaLink)


async def started(link: L) -> L:
    await link.start()
    assert await link.wait_connected(10), link.health()
    return link


def decode_block(w: list[int], n: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Hand decoding per the map: head (uint32) then n slots of 12 registers:
    (sequence, part_id, recipe) per slot."""
    head = w[0] << 16 | w[1]
    slots = []
    for k in range(n):
        r = w[2 + 12 * k : 14 + 12 * k]
        slots.append((r[8] << 16 | r[9], r[0] << 16 | r[1], r[10]))
    return head, slots


async def test_modbus_ring_layout_read_back_by_mbpoll(
    pymodbustcp_server: PyModbusTcpPeer,
) -> None:
    port = pymodbustcp_server.port
    s = ModbusSettings(port=port, results=ring(plc_scan_ms=1))  # type: ignore[arg-type]
    link = await started(ModbusLink(s, 2))
    try:
        for seq in range(1, 11):  # 10 records into a ring of 8: slots 0 and 1 wrap
            r = await link.write_decision(rec(1, seq), dl())
            assert r.outcome is WriteOutcome.ACKED, r
        assert await link.read_sequences(dl()) == [0, 10]
        view = await link.read_ring(1, dl())
        newest = await link.read_record(1, dl())
    finally:
        await link.close()
    # camera 1's ring at 1000 + 112: head at 1112..1113, slot k at 1114 + 12k
    head, slots = decode_block(mbpoll_read(port, 1112, 98), 8)
    assert head == 10
    assert [sq for sq, _, _ in slots] == [9, 10, 3, 4, 5, 6, 7, 8]
    assert all(part == 100 + sq and recipe == sq % 3 for sq, part, recipe in slots)
    assert mbpoll_read(port, 1000, 14) == [0] * 14  # camera 0's ring untouched
    assert view is not None and view.head == 10 and [x.sequence for x in view.records] == \
        [9, 10, 3, 4, 5, 6, 7, 8]
    assert newest is not None and newest.sequence == 10 and newest.part_id == 110


async def test_ring_slot_is_reused_only_after_a_plc_scan(
    pymodbustcp_server: PyModbusTcpPeer,
) -> None:
    """Not acknowledged: the slot of record s is rewritten (by s + N) no sooner than
    plc_scan_ms after s went out; with less budget than that, s + N is dropped, not written."""
    s = ModbusSettings(port=pymodbustcp_server.port,
                       results=ring(ring_size=4, plc_scan_ms=250))  # type: ignore[arg-type]
    link = await started(ModbusLink(s, 1))
    try:
        first = [await link.write_decision(rec(0, seq), dl()) for seq in range(1, 5)]
        assert all(r.outcome is WriteOutcome.ACKED for r in first)
        short = await link.write_decision(rec(0, 5), dl(20))
        assert short.outcome is WriteOutcome.DROPPED_LATE, short  # "ring full" (or a starved
        assert pymodbustcp_server.get_u32(1000) == 4  # loop's "deadline before..."): not written
        fifth = await link.write_decision(rec(0, 5), dl(1000))
        assert fifth.outcome is WriteOutcome.ACKED, fifth
        assert first[0].acked_ns is not None and fifth.acked_ns is not None
        assert fifth.acked_ns - first[0].acked_ns >= 250 * MS
        assert link.stats.ring_waits >= 1
    finally:
        await link.close()
    assert pymodbustcp_server.get_u32(1000) == 5  # head


async def test_acknowledged_ring_waits_for_the_plcs_ack(
    pymodbustcp_server: PyModbusTcpPeer,
) -> None:
    plc = pymodbustcp_server
    s = ModbusSettings(port=plc.port, results=ring(ring_size=2, plc_scan_ms=2000,
                                                   acknowledged=True))  # type: ignore[arg-type]
    link = await started(ModbusLink(s, 1))
    try:
        for seq in (1, 2):
            assert (await link.write_decision(rec(0, seq), dl())).outcome is WriteOutcome.ACKED
        plc.set_u32(400, 1)  # the PLC consumed 1 (not 2)
        assert (await link.write_decision(rec(0, 3), dl())).outcome is WriteOutcome.ACKED
        late = await link.write_decision(rec(0, 4), dl(60))  # slot of 2: not acknowledged
        assert late.outcome is WriteOutcome.DROPPED_LATE and "not yet acknowledged" in late.detail
        assert plc.get_u32(1000) == 3 and plc.get_u32(1000 + 2 + 12 + 8) == 2  # 2 kept
        acks = await link.read_inputs(dl(), triggers=False, acks=True)
        assert acks is not None and acks.acked_sequences == (1,)

        async def plc_acks_later() -> None:
            await asyncio.sleep(0.03)  # the PLC's next scan, while the link waits
            await asyncio.to_thread(plc.set_u32, 400, 3)

        acker = asyncio.create_task(plc_acks_later())
        r = await link.write_decision(rec(0, 4), dl(1000))
        await acker
        assert r.outcome is WriteOutcome.ACKED, r
    finally:
        await link.close()
    assert plc.get_u32(1000) == 4


@pytest.mark.parametrize("kind", ["python", "native"])
async def test_s7_ring_and_acks(kind: str) -> None:
    from tests.plc.conftest import s7_python

    peer = S7Peer(s7_python(kind), free_port(), size=2048)
    try:
        s = S7Settings(port=peer.port, results=ring(ring_size=4, plc_scan_ms=1,
                                                    acknowledged=True))  # type: ignore[arg-type]
        link = await started(S7Link(s, 2))
        try:
            for seq in range(1, 7):
                if seq == 5:
                    peer.put(620, (1).to_bytes(4, "big"))  # camera 0 acknowledged 1 only
                r = await link.write_decision(rec(0, seq), dl())
                if seq < 6:
                    assert r.outcome is WriteOutcome.ACKED, (seq, r)
            assert r.outcome is WriteOutcome.DROPPED_LATE  # 6 reuses 2's slot: not acked
            assert await link.read_sequences(dl()) == [5, 0]
        finally:
            await link.close()
        # ring of camera 0 at DBB1024 (ring mode default): head DWORD, slot k at +4 + 24k
        mem = peer.dump(1024, 4 + 4 * 24)
        assert int.from_bytes(mem[:4], "big") == 5
        seqs = [int.from_bytes(mem[4 + 24 * k + 16 : 4 + 24 * k + 20], "big") for k in range(4)]
        assert seqs == [5, 2, 3, 4]
        slot0 = mem[4:28]
        assert int.from_bytes(slot0[:4], "big") == 105
        assert int.from_bytes(slot0[20:22], "big") == 2  # the recipe, appended at +20
    finally:
        peer.stop()


async def test_opcua_ring_in_one_write_call() -> None:
    cfg = {"results": ring(ring_size=4, plc_scan_ms=1)}
    peer = OpcUaPeer(free_port(), slots=1, settings=cfg)
    try:
        link = await started(OpcUaLink(OpcUaSettings(endpoint=peer.endpoint, **cfg), 1))  # type: ignore[arg-type]
        try:
            assert await link.read_sequences(dl(500)) == [0]
            for seq in range(1, 7):
                assert (await link.write_decision(rec(0, seq), dl(500))).outcome is \
                    WriteOutcome.ACKED
            assert await link.read_sequences(dl(500)) == [6]  # the ring head
            await asyncio.to_thread(peer.set, "Camera0.RingHead", 77)  # as a PLC restore would
            assert await link.read_sequences(dl(500)) == [77]
            await asyncio.to_thread(peer.set, "Camera0.RingHead", 6)
        finally:
            await link.close()
        get = peer.get
        assert await asyncio.to_thread(get, "Camera0.RingHead") == 6
        seqs = [await asyncio.to_thread(get, f"Camera0.Ring{k}.Sequence") for k in range(4)]
        assert seqs == [5, 6, 3, 4]
        assert await asyncio.to_thread(get, "Camera0.Ring1.PartId") == 106
        assert await asyncio.to_thread(get, "Camera0.Ring1.Recipe") == 0
        assert await asyncio.to_thread(get, "Camera0.Ring0.Recipe") == 2
    finally:
        peer.stop()


# -- the burst ------------------------------------------------------------------------------


@pytest.fixture
def plc() -> Iterator[PyModbusTcpPeer]:
    with PyModbusTcpPeer.running() as peer:
        yield peer


async def burst(link: ModbusLink, first: int, n: int) -> list[WriteResult]:
    """A forced EDF catch-up: n records, all due 348 ms from now, written back to back."""
    due = dl(348)
    return [await link.write_decision(rec(0, seq), due) for seq in range(first, first + n)]


def consumed(scanner: RingScanner) -> set[int]:
    return {s for s, *_ in scanner.scan.records}


async def test_burst_ring_acknowledged_loses_nothing(plc: PyModbusTcpPeer) -> None:
    """PLC scanning every 15 ms, acknowledging; 40 records back to back: every record the link
    reports ACKED is read by the PLC (the link waits for acks instead of overwriting)."""
    s = ModbusSettings(port=plc.port,
                       results=ring(acknowledged=True, plc_scan_ms=50))  # type: ignore[arg-type]
    scanner = RingScanner(plc.port, "ring", 1000, 8, 15, ack_address=400)
    link = await started(ModbusLink(s, 1))
    try:
        assert (await link.write_decision(rec(0, 1), dl())).outcome is WriteOutcome.ACKED
        await asyncio.to_thread(wait_until, lambda: plc.get_u32(400) == 1, 5, "the first ack")
        results = await burst(link, 2, 40)
        acked = {2 + i for i, r in enumerate(results) if r.outcome is WriteOutcome.ACKED}
        assert len(acked) > 8  # more than one ring's worth went out (more wait for acks)
        await asyncio.to_thread(wait_until, lambda: max(acked) in consumed(scanner), 5,
                                "the PLC to read the last record")
    finally:
        await link.close()
        scanner.stop()
    assert acked <= consumed(scanner), f"lost: {sorted(acked - consumed(scanner))}"
    assert link.stats.ring_waits > 0  # the burst really outran the PLC's scan


async def test_burst_ring_paced_by_scan_time(plc: PyModbusTcpPeer) -> None:
    """Not acknowledged: the link assumes the PLC scans at least every plc_scan_ms (50 ms here,
    the emulated PLC scans every 15 ms): nothing ACKED is lost unless the PLC task itself was
    starved for longer than plc_scan_ms (then the guarantee does not apply)."""
    s = ModbusSettings(port=plc.port, results=ring(plc_scan_ms=50))  # type: ignore[arg-type]
    scanner = RingScanner(plc.port, "ring", 1000, 8, 15)
    link = await started(ModbusLink(s, 1))
    try:
        results = await burst(link, 1, 40)
        acked = {1 + i for i, r in enumerate(results) if r.outcome is WriteOutcome.ACKED}
        assert len(acked) >= 16  # paced: 8 per 50 ms inside the 348 ms budget
        await asyncio.to_thread(wait_until, lambda: max(acked) in consumed(scanner), 5,
                                "the PLC to read the last record")
    finally:
        await link.close()
        scanner.stop()
    lost = acked - consumed(scanner)
    gaps = [b - a for a, b in zip(scanner.scan.scans_ns, scanner.scan.scans_ns[1:], strict=False)]
    assert not lost or max(gaps) > 50 * MS, f"lost {sorted(lost)} with scan gaps <= 50 ms"
    assert link.stats.ring_waits > 0


async def test_burst_single_slot_loses_records(plc: PyModbusTcpPeer) -> None:
    """The same burst in slot mode: each record overwrites the last, a 15 ms PLC scan sees at
    most one per scan, so most of the burst is never read (why the ring exists)."""
    scanner = RingScanner(plc.port, "slot", 1000, 1, 15)
    link = await started(ModbusLink(ModbusSettings(port=plc.port), 1))
    try:
        t0 = time.monotonic_ns()
        results = await burst(link, 1, 40)
        t1 = time.monotonic_ns()
        assert all(r.outcome is WriteOutcome.ACKED for r in results)
        await asyncio.to_thread(wait_until, lambda: 40 in consumed(scanner), 5,
                                "the PLC to read the last record")
    finally:
        await link.close()
        scanner.stop()
    scans_during = sum(1 for t in scanner.scan.scans_ns if t0 <= t <= t1 + 20 * MS)
    got = consumed(scanner)
    assert len(got & set(range(1, 41))) <= scans_during + 1  # one record per scan at most
    if scans_during + 1 < 40:
        assert len(set(range(1, 41)) - got) >= 40 - scans_during - 1


async def test_a_plc_that_stops_acknowledging_does_not_hold_the_link(
    pymodbustcp_server: PyModbusTcpPeer,
) -> None:
    """Acknowledged ring, the PLC acknowledged 1 and then nothing: a record for a slot it never
    released is dropped within about two scans, not after its whole budget (the heartbeat and
    the other cameras share the link)."""
    plc = pymodbustcp_server
    s = ModbusSettings(port=plc.port, results=ring(ring_size=2, plc_scan_ms=20,
                                                   acknowledged=True))  # type: ignore[arg-type]
    link = await started(ModbusLink(s, 1))
    try:
        for seq in (1, 2):
            assert (await link.write_decision(rec(0, seq), dl())).outcome is WriteOutcome.ACKED
        plc.set_u32(400, 1)
        assert (await link.write_decision(rec(0, 3), dl())).outcome is WriteOutcome.ACKED
        await asyncio.sleep(0.05)  # two scans pass without an ack for 2
        t0 = time.monotonic_ns()
        r = await link.write_decision(rec(0, 4), dl(1000))
        assert r.outcome is WriteOutcome.DROPPED_LATE and "not yet acknowledged" in r.detail
        assert time.monotonic_ns() - t0 < 500 * MS  # far from its 1 s budget
        hb = await link.write_status(1, Alarm.RESULTS_UNACKNOWLEDGED, dl(100))
        assert hb.outcome is WriteOutcome.ACKED
    finally:
        await link.close()
    assert plc.get(101, 1) == [int(Alarm.RESULTS_UNACKNOWLEDGED)]
