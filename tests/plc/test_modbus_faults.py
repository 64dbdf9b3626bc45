"""Fault behaviour of ModbusLink against a real server process: killed, restarted, hung, slow.

Durations asserted here are the link's contract (a write returns by its deadline; writes resume
within 1 s of the PLC's return), not speed targets: a small slack covers scheduling on a loaded
2-core runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import structlog.testing

from plc.config import ModbusSettings
from plc.modbus import ModbusLink
from plc.record import DecisionRecord, Verdict, WriteOutcome, WriteResult
from plc.sim import ModbusPlcSimulator
from tests.plc.conftest import Peer, hang
from tests.plc.looplag import LoopLag
from tests.support import free_port, mbpoll_read, port_open, stop_pid, wait_until

MS = 1_000_000
SLACK_S = 0.010
BUDGET_MS = 30.0


def rec(seq: int, cam: int = 0) -> DecisionRecord:
    return DecisionRecord(cam, seq, 100_000 + seq, Verdict.OK, 0, 990, 5, 1)


@dataclass
class Attempt:
    seq: int
    outcome: WriteOutcome
    started: float
    returned: float
    deadline: float


class Writer:
    """Writes one record every `period_s` like a camera would, keeping every outcome."""

    def __init__(self, link: ModbusLink, period_s: float = 0.005) -> None:
        self.link, self.period_s = link, period_s
        self.attempts: list[Attempt] = []
        self.seq = 0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            self.seq += 1
            t0 = time.monotonic()
            dl = time.monotonic_ns() + int(BUDGET_MS * MS)
            r = await self.link.write_decision(rec(self.seq), dl)
            self.attempts.append(Attempt(self.seq, r.outcome, t0, time.monotonic(), dl / 1e9))
            await asyncio.sleep(self.period_s)  # pacing of the simulated camera

    def acked_after(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.outcome is WriteOutcome.ACKED and a.started >= t]


def start_sim(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "plc.sim", "--port", str(port), "--log-records"],
        stdout=open(log, "wb"),  # noqa: SIM115 (the child owns it; closed when it exits)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until(lambda: port_open(port), 20, "plc.sim process")
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_pid(p)


def received(log: Path) -> list[int]:
    return [
        int(line.split()[2]) for line in log.read_text().splitlines() if line.startswith("REC ")
    ]


async def test_server_killed_and_restarted(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    procs.append(start_sim(port, tmp_path / "before.log"))
    link = ModbusLink(ModbusSettings(port=port), 1)  # default backoff: 50..250 ms
    await link.start()
    assert await link.wait_connected(5)
    w = Writer(link)
    task = asyncio.create_task(w.run())
    lag = LoopLag().start()
    try:
        await asyncio.to_thread(wait_until, lambda: len(w.acked_after(0)) >= 20, 5, "20 acks")
        procs[0].kill()
        await asyncio.to_thread(procs[0].wait)
        killed_at = time.monotonic()
        last_seq_before_restart = w.seq
        await asyncio.sleep(0.3)  # the PLC stays down for a while; frames keep coming
        restart_at = time.monotonic()  # (the link may be back before the test sees the port)
        restarted = await asyncio.to_thread(start_sim, port, tmp_path / "after.log")
        procs.append(restarted)
        up_at = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: len(w.acked_after(up_at)) >= 20, 5, "20 acks after the restart"
        )
    finally:
        w.stop = True
        await task
        await lag.close()
        await link.close()
    first_ack = w.acked_after(restart_at)[0]
    assert first_ack.returned - up_at < 1.0, "writes must resume within 1 s of the PLC's return"
    down = [a for a in w.attempts if killed_at <= a.started and a.returned < restart_at]
    assert len(down) > 10
    assert all(a.outcome is not WriteOutcome.ACKED for a in down)
    for a in w.attempts:  # every frame got its outcome by its deadline, whatever happened
        assert a.returned <= a.deadline + lag.slack_ns(SLACK_S) / 1e9, a
    # Nothing stale after the return: the new PLC received exactly the writes acknowledged
    # after it came up, in order, all issued after it came back.
    stop_pid(restarted)
    after = received(tmp_path / "after.log")
    assert after == [a.seq for a in w.acked_after(killed_at)]
    assert min(after) > last_seq_before_restart


async def test_hung_server_each_write_gives_up_in_budget_and_loop_stays_free(
    sim_process: Peer,
) -> None:
    assert sim_process.proc is not None
    link = ModbusLink(ModbusSettings(port=sim_process.port), 1)
    await link.start()
    assert await link.wait_connected(5)
    lag = LoopLag().start()
    outcomes: list[WriteOutcome] = []
    try:
        assert (
            await link.write_decision(rec(1), time.monotonic_ns() + 200 * MS)
        ).outcome is WriteOutcome.ACKED
        hang(sim_process.proc.pid)
        for seq in range(2, 12):
            dl = time.monotonic_ns() + int(BUDGET_MS * MS)
            res = await link.write_decision(rec(seq), dl)
            assert time.monotonic_ns() <= dl + lag.slack_ns(SLACK_S), (seq, res)
            outcomes.append(res.outcome)
        assert WriteOutcome.UNKNOWN in outcomes  # the first one on the wire (a starved loop
        # may drop the very first before it is sent)
        assert WriteOutcome.ACKED not in outcomes
        assert lag.max_s < BUDGET_MS / 1e3, f"event loop blocked {lag.max_s * 1e3:.1f} ms"
        os.kill(sim_process.proc.pid, signal.SIGCONT)
        # after the PLC resumes, the link recovers and first settles the unknown write
        r: WriteResult | None = None
        for seq in range(12, 200):
            r = await link.write_decision(rec(seq), time.monotonic_ns() + 200 * MS)
            if r.outcome is WriteOutcome.ACKED:
                break
            await asyncio.sleep(0.01)
        assert r is not None and r.outcome is WriteOutcome.ACKED
        st = link.health().stats
        assert st.confirmed_applied + st.confirmed_not_applied == 1
        assert link.health().unconfirmed_writes == 0
    finally:
        await lag.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(sim_process.proc.pid, signal.SIGCONT)
        await link.close()
    assert mbpoll_read(sim_process.port, 1008, 2) == [0, seq]


async def test_unknown_write_is_confirmed_by_read_back(sim: ModbusPlcSimulator) -> None:
    link = ModbusLink(ModbusSettings(port=sim.port or 0, simulator=True), 4)
    confirmed: list[tuple[int, int, bool]] = []
    link.on_write_confirmed = lambda cam, seq, applied: confirmed.append((cam, seq, applied))
    await link.start()
    assert await link.wait_connected(5)
    try:
        sim.response_delay_s = 0.08  # the PLC applies the write, but answers too late
        r = await link.write_decision(rec(7, cam=1), time.monotonic_ns() + 20 * MS)
        assert r.outcome is WriteOutcome.UNKNOWN
        await asyncio.to_thread(
            wait_until, lambda: sim.counters().records_received[1] == 1, 5, "the late write to land"
        )
        sim.response_delay_s = 0.0
        assert await link.wait_connected(5)
        r = await link.write_decision(rec(8, cam=1), time.monotonic_ns() + 200 * MS)
        assert r.outcome is WriteOutcome.ACKED
        assert link.stats.confirmed_applied == 1 and link.stats.confirmed_not_applied == 0
        assert confirmed == [(1, 7, True)]  # the daemon learns the final outcome of seq 7
        assert sim.read_record(1)["sequence"] == 8
    finally:
        await link.close()


async def test_unknown_write_that_never_landed_is_confirmed_not_applied(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    procs.append(start_sim(port, tmp_path / "a.log"))
    link = ModbusLink(ModbusSettings(port=port), 1)
    await link.start()
    assert await link.wait_connected(5)
    try:
        hang(procs[0].pid)
        r = await link.write_decision(rec(1), time.monotonic_ns() + 20 * MS)
        assert r.outcome is WriteOutcome.UNKNOWN
        procs[0].kill()  # the hung PLC is power-cycled: the pending request dies with it
        await asyncio.to_thread(procs[0].wait)
        procs.append(await asyncio.to_thread(start_sim, port, tmp_path / "b.log"))
        assert await link.wait_connected(5)
        r = await link.write_decision(rec(2), time.monotonic_ns() + 200 * MS)
        assert r.outcome is WriteOutcome.ACKED
        assert link.stats.confirmed_not_applied == 1
    finally:
        await link.close()
    assert received(tmp_path / "b.log") == [2]


async def test_outage_is_logged_once_and_recovery_once() -> None:
    port = free_port()
    settings = ModbusSettings(port=port, simulator=True)
    sim = ModbusPlcSimulator(settings, 1)
    sim.start()
    link = ModbusLink(settings, 1)
    with structlog.testing.capture_logs() as logs:
        await link.start()
        try:
            assert await link.wait_connected(5)
            assert (await link.write_decision(rec(1), time.monotonic_ns() + 1000 * MS)).outcome \
                is WriteOutcome.ACKED
            await asyncio.to_thread(sim.stop)
            outcomes = []
            for seq in range(2, 40):  # a whole outage's worth of frames
                r = await link.write_decision(rec(seq), time.monotonic_ns() + 20 * MS)
                outcomes.append(r.outcome)
                await asyncio.sleep(0.01)
            assert WriteOutcome.ACKED not in outcomes
            sim = ModbusPlcSimulator(settings, 1)
            await asyncio.to_thread(sim.start)
            for seq in range(40, 400):
                r = await link.write_decision(rec(seq), time.monotonic_ns() + 1000 * MS)
                if r.outcome is WriteOutcome.ACKED:
                    break
                await asyncio.sleep(0.01)
            assert r.outcome is WriteOutcome.ACKED
        finally:
            await link.close()
            sim.stop()
    events = [e["event"] for e in logs if e["event"].startswith("plc_")]
    assert events.count("plc_unavailable") == 1, events
    assert events.count("plc_back") == 1, events
    assert events.index("plc_unavailable") < events.index("plc_back")


async def test_hung_plc_is_not_reported_up_and_the_unknown_write_settles_by_itself(
    sim_process: Peer,
) -> None:
    """A SIGSTOPped server's kernel still accepts connects: the link must not call that "up"
    (writes would burn their budgets); once the server resumes, the link settles the
    outcome-unknown write with its own read-back budget, without waiting for a next write."""
    assert sim_process.proc is not None
    link = ModbusLink(ModbusSettings(port=sim_process.port), 1)
    await link.start()
    assert await link.wait_connected(5)
    try:
        ok = await link.write_decision(rec(1), time.monotonic_ns() + 200 * MS)
        assert ok.outcome is WriteOutcome.ACKED
        hang(sim_process.proc.pid)
        r = await link.write_decision(rec(2), time.monotonic_ns() + 200 * MS)
        assert r.outcome is WriteOutcome.UNKNOWN
        await asyncio.to_thread(
            wait_until, lambda: link.stats.probes_failed >= 2, 5, "reconnects to the hung PLC"
        )
        for seq in range(3, 6):
            r = await link.write_decision(rec(seq), time.monotonic_ns() + 20 * MS)
            assert r.outcome is WriteOutcome.FAILED and "not connected" in r.detail, r
        assert not link.connected and link.health().unconfirmed_writes == 1
        os.kill(sim_process.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(
            wait_until,
            lambda: link.connected and link.health().unconfirmed_writes == 0,
            5,
            "the link to settle the unknown write on its own",
        )
        st = link.stats
        assert st.confirmed_applied + st.confirmed_not_applied == 1
        assert link.stats.acked == 1  # no write was needed to get there
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sim_process.proc.pid, signal.SIGCONT)
        await link.close()


def test_min_status_period_is_what_the_link_can_honour() -> None:
    assert ModbusLink(ModbusSettings(), 1).min_status_period_ms == 50.0  # readback budget
    fast = ModbusLink(ModbusSettings(readback_timeout_ms=5), 1)
    assert fast.min_status_period_ms == 20.0  # never below the floor
