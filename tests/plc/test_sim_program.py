"""The simulator playing a PLC program (plc.sim_program): triggers parts, switches recipes, scans
the results like a PLC task, acknowledges, and counts what a PLC would see.

The "daemon" side here is the real ModbusLink driven by a small loop (poll the trigger counters,
answer each new part): the counters must tell a correct answerer from a faulty one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from plc.config import ModbusSettings, SimProgramSettings
from plc.modbus import ModbusLink
from plc.record import DecisionRecord, FailsafeReason, Verdict, WriteOutcome, next_sequence
from plc.sim import ModbusPlcSimulator, ProgramCounters
from tests.support import free_port, stop_pid, wait_until

MS = 1_000_000


def counters(sim: ModbusPlcSimulator) -> ProgramCounters:
    pc = sim.program_counters()
    assert pc is not None, "no program is playing"
    return pc


@dataclass
class Tally:
    """What the answering side did, to predict the PLC program's counters exactly."""

    seen: int = 0
    """Parts whose trigger the answerer saw (the others it missed: a counter jump)."""
    matched: int = 0
    """Records written for a part the PLC announced."""
    wrong_recipe: int = 0
    bogus: int = 0
    last_sequence: int = 0


async def wait_acked(link: ModbusLink, seq: int) -> None:
    """Acknowledged mode: wait until the PLC consumed `seq` (so no record is ever overwritten
    unread, whatever the load: the counters then must add up exactly)."""
    end = time.monotonic() + 5
    while time.monotonic() < end:
        got = await link.read_inputs(time.monotonic_ns() + 50 * MS, triggers=False, acks=True)
        if got and got.acked_sequences and got.acked_sequences[0] == seq:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"the PLC program never acknowledged sequence {seq}")


async def answer_parts(link: ModbusLink, parts: int, *, skip: int = 0, bad_recipe: int = 0,
                       bogus_after: int = 0) -> Tally:
    """Poll slot 0's trigger counter like the daemon; one record per new part echoing its id and
    recipe. Faults on purpose: `skip` gets no record, `bad_recipe` the wrong recipe, and after
    part `bogus_after` one extra record for a part id the PLC never announced. A starved answerer
    may see the counter jump (missed parts get no record here): the tally says what happened."""
    held = await link.read_sequences(time.monotonic_ns() + 200 * MS)
    assert held is not None
    t = Tally(last_sequence=held[0])
    last_count = 0
    end = time.monotonic() + 10
    while last_count < parts and time.monotonic() < end:
        got = await link.read_inputs(time.monotonic_ns() + 50 * MS, recipe=True)
        assert got is not None and got.trigger_counts and got.part_ids and got.recipe is not None
        if got.trigger_counts[0] == last_count:
            await asyncio.sleep(0.002)
            continue
        last_count = got.trigger_counts[0]
        t.seen += 1
        part, recipe = got.part_ids[0], got.recipe
        todo = [] if part == skip else [(part, recipe + (1 if part == bad_recipe else 0))]
        t.wrong_recipe += part == bad_recipe
        if part == bogus_after:
            todo.append((0xDEAD, recipe))
        for pid, rcp in todo:
            t.last_sequence = next_sequence(t.last_sequence)
            r = await link.write_decision(
                DecisionRecord(0, t.last_sequence, pid, Verdict.OK, 0, 950, 12, 1, recipe=rcp),
                time.monotonic_ns() + 300 * MS)
            assert r.outcome is WriteOutcome.ACKED, r
            t.bogus += pid == 0xDEAD
            t.matched += pid != 0xDEAD
            await wait_acked(link, t.last_sequence)
    return t


@pytest.mark.parametrize("mode", ["slot", "ring"])
async def test_program_counts_what_a_plc_would(mode: str) -> None:
    program = {"trigger_rate_hz": 50, "slots": [0], "max_parts": 20, "part_id_start": 1001,
               "recipes": [1, 2], "recipe_switch_every_parts": 4, "scan_ms": 5,
               "acknowledge": True, "answer_timeout_ms": 200}
    settings = ModbusSettings(port=0, simulator=True,
                              results={"mode": mode, "acknowledged": True})  # type: ignore[arg-type]
    with ModbusPlcSimulator(settings, 2) as sim:
        sim.hold_sequence(0, 5000)  # what a previous daemon run left: continue from it
        sim.start_program(SimProgramSettings(**program))  # type: ignore[arg-type]
        link = ModbusLink(settings.model_copy(update={"port": sim.port}), 2)
        await link.start()
        assert await link.wait_connected(5)
        try:
            t = await answer_parts(link, 20, skip=1005, bad_recipe=1010, bogus_after=1015)
            await asyncio.to_thread(
                wait_until,
                lambda: sum(counters(sim).parts_unanswered) == 20 - t.matched,
                5, "the program to time out the parts left without a record")
            pc = counters(sim)
            acks = await link.read_inputs(time.monotonic_ns() + 200 * MS, triggers=False,
                                          acks=True)
        finally:
            await link.close()
    assert acks is not None
    assert t.seen >= 5, "the answerer missed most triggers: the box is too loaded to say much"
    written = t.matched + t.bogus
    assert pc.parts_triggered == [20, 0]
    assert pc.records_consumed == [written, 0] and pc.records_lost == [0, 0]
    assert pc.part_id_matches == [t.matched, 0] and pc.part_id_mismatches == [t.bogus, 0]
    assert pc.recipe_mismatches == [t.wrong_recipe, 0]
    assert pc.parts_unanswered == [20 - t.matched, 0]  # the skipped part and any missed ones
    assert pc.verdicts["ok"] == written and pc.recipe_switches == 4
    assert pc.last_consumed[0] == 5000 + written  # continued from the 5000 the PLC held
    assert acks.acked_sequences == (5000 + written, 0) and pc.acks_written == written


async def test_program_counts_lost_records_and_failsafe_reasons() -> None:
    """Slot mode, a slow PLC scan (60 ms) and records written back to back: the program sees
    sequence gaps (lost), and counts fail-safe reasons."""
    settings = ModbusSettings(port=0, simulator=True,
                              sim_program={"trigger_rate_hz": 0, "scan_ms": 60})  # type: ignore[arg-type]
    with ModbusPlcSimulator(settings, 1) as sim:
        link = ModbusLink(settings.model_copy(update={"port": sim.port}), 1)
        await link.start()
        assert await link.wait_connected(5)
        try:
            await asyncio.to_thread(wait_until, lambda: counters(sim).scans >= 1, 5, "a scan")
            t0 = time.monotonic_ns()
            for seq in range(1, 11):
                r = await link.write_decision(
                    DecisionRecord(0, seq, seq, Verdict.FAILSAFE_REJECT, 0, 0, 1, 1,
                                   reason=FailsafeReason.TRIGGER_MISSED), t0 + 300 * MS)
                assert r.outcome is WriteOutcome.ACKED
            await asyncio.to_thread(
                wait_until, lambda: counters(sim).last_consumed == [10], 5,
                "the last record to be read")
        finally:
            await link.close()
        pc = sim.program_counters()
    assert pc is not None
    assert pc.records_consumed[0] + pc.records_lost[0] == 10
    assert pc.records_lost[0] >= 1  # 10 records in ~2 ms, one scan per 60 ms
    assert pc.failsafe_reasons == {int(FailsafeReason.TRIGGER_MISSED): pc.records_consumed[0]}


def test_sim_process_plays_a_program_and_prints_its_counters() -> None:
    """`python -m plc.sim --program JSON`: counters on SIGUSR1 and at exit, as one JSON line."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "plc.sim", "--port", str(port), "--camera-slots", "2",
         "--settings", json.dumps({"results": {"mode": "ring", "ring_size": 4}}),
         "--program", json.dumps({"trigger_rate_hz": 200, "max_parts": 10, "recipes": [5]})],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("READY")
        os.kill(proc.pid, signal.SIGUSR1)
        first = json.loads(proc.stdout.readline().removeprefix("COUNTERS "))
        assert first["program"]["recipe"] == 5
        deadline = time.monotonic() + 5
        while True:
            os.kill(proc.pid, signal.SIGUSR1)
            c = json.loads(proc.stdout.readline().removeprefix("COUNTERS "))
            if c["program"]["parts_triggered"] == [10, 10] or time.monotonic() > deadline:
                break
        assert c["program"]["parts_triggered"] == [10, 10]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        last = json.loads(out.strip().splitlines()[-1].removeprefix("COUNTERS "))
        assert last["program"]["parts_triggered"] == [10, 10]  # max_parts: then it stops
        assert last["program"]["records_consumed"] == [0, 0]  # nobody answered
        assert last["sim"]["records_received"] == [0, 0]
    finally:
        stop_pid(proc)  # type: ignore[arg-type]
