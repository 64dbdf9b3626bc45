"""S7Link against two real S7 servers on 127.0.0.1: python-snap7 3.x's and native Snap7 (2.1).

What the link wrote is read from the server's own memory (not through an S7 client) and compared
with the DB layout of docs/plc-register-map.md byte for byte.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from plc.config import S7Settings
from plc.record import Alarm, DecisionRecord, Verdict, WriteOutcome
from plc.s7 import S7Link
from tests.plc.conftest import S7Peer, hang, s7_python
from tests.plc.looplag import LoopLag
from tests.support import free_port

MS = 1_000_000

REC = DecisionRecord(
    camera_index=1,
    sequence=0x00012345,
    part_id=0xA1B2C3D4,
    verdict=Verdict.FAILSAFE_REJECT,
    defect_class=0,
    score_permille=0,
    latency_ms=349,
    model_id=7,
    reason=4,
    recipe=0x0203,
)
# docs/plc-register-map.md "S7 DB" (record v2): camera 1 at DBB32 (stride 32); sequence at
# +16 (v1), recipe appended at +20
REC_BYTES = bytes.fromhex(
    "a1b2c3d4" "0003" "0000" "0000" "015d" "0007" "0004" "00012345" "0203" "0000"
)


def dl(ms: float) -> int:
    return time.monotonic_ns() + int(ms * MS)


async def started(port: int, **kw: object) -> S7Link:
    link = S7Link(S7Settings(port=port, **kw), 4)  # type: ignore[arg-type]
    await link.start()
    assert await link.wait_connected(5), link.health()
    return link


async def test_record_and_status_match_the_documented_db_layout(s7_server: S7Peer) -> None:
    link = await started(s7_server.port)
    try:
        assert (await link.write_decision(REC, dl(200))).outcome is WriteOutcome.ACKED
        r = await link.write_status(0x1234, Alarm.MODEL_DOWN | Alarm.FAILSAFE_ACTIVE, dl(200))
        assert r.outcome is WriteOutcome.ACKED
        s7_server.put(520 + 2 * 4, bytes.fromhex("0badcafe"))  # the PLC announces camera 2's part
        assert await link.read_part_id(2, dl(200)) == 0x0BADCAFE
        back = await link.read_record(1, dl(200))
        assert back is not None and back.sequence == 0x12345 and back.latency_ms == 349
    finally:
        await link.close()
    assert s7_server.dump(32, 24) == REC_BYTES
    assert s7_server.dump(0, 32) == bytes(32)  # camera 0 untouched
    assert s7_server.dump(512, 4) == bytes.fromhex("12340006")


async def test_write_outside_the_db_is_refused_not_unknown(s7_server: S7Peer) -> None:
    link = await started(s7_server.port, record_offset=2030)  # DB has 2048 bytes
    try:
        r = await link.write_decision(DecisionRecord(0, 1, 1, Verdict.OK, 0, 1, 1, 1), dl(200))
        assert r.outcome is WriteOutcome.FAILED, r
        assert link.stats.unknown == 0 and link.health().unconfirmed_writes == 0
    finally:
        await link.close()


@pytest.mark.parametrize("kind", ["python", "native"])
async def test_s7_server_restart_and_hang(kind: str) -> None:
    port = free_port()
    peer = S7Peer(s7_python(kind), port)
    link = await started(port)
    try:
        assert (await link.write_decision(REC, dl(100))).outcome is WriteOutcome.ACKED
        # hung PLC: every write gives up inside its budget
        lag = LoopLag().start()
        hang(peer.proc.pid)
        for seq in range(2, 6):
            d = dl(30)
            r = await link.write_decision(DecisionRecord(1, seq, seq, Verdict.OK, 0, 1, 1, 1), d)
            assert r.outcome is not WriteOutcome.ACKED
            assert time.monotonic_ns() <= d + lag.slack_ns(), r
        await lag.close()
        # power-cycled PLC (fresh memory) on the same port
        peer.kill()
        peer = await asyncio.to_thread(S7Peer, s7_python(kind), port)
        up = time.monotonic()
        seq = 10
        while True:
            seq += 1
            r = await link.write_decision(
                DecisionRecord(1, seq, seq, Verdict.OK, 0, 1, 1, 1), dl(50)
            )
            if r.outcome is WriteOutcome.ACKED:
                break
            assert time.monotonic() - up < 1.0, "writes must resume within 1 s of the PLC's return"
            await asyncio.sleep(0.005)
        assert link.stats.confirmed_not_applied == 1  # the hung write never landed
        await link.close()
        assert int.from_bytes(peer.dump(32 + 16, 4), "big") == seq
    finally:
        await link.close()
        peer.stop()
