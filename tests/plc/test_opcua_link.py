"""OpcUaLink against a real asyncua server on 127.0.0.1 holding the documented address space.

Values are read back inside the server process (no OPC UA client), and compared field by field.
"""

from __future__ import annotations

import asyncio
import time

from plc.config import OpcUaSettings
from plc.opcua import OpcUaLink
from plc.record import Alarm, DecisionRecord, Verdict, WriteOutcome
from tests.plc.conftest import OpcUaPeer, hang
from tests.plc.looplag import LoopLag
from tests.support import free_port

MS = 1_000_000


def dl(ms: float) -> int:
    return time.monotonic_ns() + int(ms * MS)


async def started(endpoint: str, **kw: object) -> OpcUaLink:
    link = OpcUaLink(OpcUaSettings(endpoint=endpoint, **kw), 4)  # type: ignore[arg-type]
    await link.start()
    assert await link.wait_connected(10), link.health()
    return link


async def test_record_status_and_part_id(opcua_server: OpcUaPeer) -> None:
    rec = DecisionRecord(3, 0xFFFFFFFF, 4242, Verdict.DEFECT, 2, 731, 88, 12, 0)
    link = await started(opcua_server.endpoint)
    try:
        assert (await link.write_decision(rec, dl(500))).outcome is WriteOutcome.ACKED
        r = await link.write_status(65535, Alarm.UPLINK_BACKLOG_HIGH, dl(500))
        assert r.outcome is WriteOutcome.ACKED
        await asyncio.to_thread(opcua_server.set, "Camera0.PlcPartId", 99)
        assert await link.read_part_id(0, dl(500)) == 99
    finally:
        await link.close()
    got = {
        f: opcua_server.get(f"Camera3.{f}")
        for f in (
            "PartId",
            "Verdict",
            "DefectClass",
            "ScorePermille",
            "LatencyMs",
            "ModelId",
            "Reason",
            "Sequence",
        )
    }
    assert got == {
        "PartId": 4242,
        "Verdict": 2,
        "DefectClass": 2,
        "ScorePermille": 731,
        "LatencyMs": 88,
        "ModelId": 12,
        "Reason": 0,
        "Sequence": 0xFFFFFFFF,
    }
    assert opcua_server.get("Heartbeat") == 65535 and opcua_server.get("Alarms") == 8
    assert opcua_server.get("Camera2.Sequence") == 0


async def test_wrong_namespace_is_a_clear_connect_error(opcua_server: OpcUaPeer) -> None:
    link = OpcUaLink(OpcUaSettings(endpoint=opcua_server.endpoint, namespace_uri="urn:nope"), 1)
    await link.start()
    try:
        assert not await link.wait_connected(1.5)
        assert "no namespace 'urn:nope'" in link.health().last_error
        r = await link.write_decision(DecisionRecord(0, 1, 1, Verdict.OK, 0, 1, 1, 1), dl(100))
        assert r.outcome is WriteOutcome.FAILED
    finally:
        await link.close()


async def test_hung_then_restarted_server() -> None:
    port = free_port()
    peer = OpcUaPeer(port)
    link = await started(peer.endpoint)
    try:
        lag = LoopLag().start()
        hang(peer.proc.pid)
        for seq in range(1, 4):
            d = dl(40)
            r = await link.write_decision(DecisionRecord(0, seq, seq, Verdict.OK, 0, 1, 1, 1), d)
            assert r.outcome is not WriteOutcome.ACKED
            assert time.monotonic_ns() <= d + lag.slack_ns(), r
        await lag.close()
        assert link.stats.unknown >= 1
        peer.kill()
        peer = await asyncio.to_thread(OpcUaPeer, port)
        up = time.monotonic()
        seq = 10
        while True:
            seq += 1
            r = await link.write_decision(
                DecisionRecord(0, seq, seq, Verdict.OK, 0, 1, 1, 1), dl(200)
            )
            if r.outcome is WriteOutcome.ACKED:
                break
            assert time.monotonic() - up < 1.0, "writes must resume within 1 s of the PLC's return"
            await asyncio.sleep(0.01)
        assert link.stats.confirmed_not_applied == 1
        await link.close()
        assert await asyncio.to_thread(peer.get, "Camera0.Sequence") == seq
    finally:
        await link.close()
        peer.stop()
