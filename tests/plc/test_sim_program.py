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


async def answer_parts(link: ModbusLink, parts: int, *, skip: int = 0, bad_recipe: int = 0,
                       bogus_after: int = 0) -> None:
    """Poll slot 0's trigger counter like the daemon; one record per new part echoing its id and
    recipe. Faults on purpose: `skip` gets no record, `bad_recipe` the wrong recipe, and after
    part `bogus_after` one extra record for a part id the PLC never announced."""
    held = await link.read_sequences(time.monotonic_ns() + 200 * MS)
    assert held is not None
    seq, last_count, answered = held[0], 0, 0
    end = time.monotonic() + 10
    while answered < parts and time.monotonic() < end:
        got = await link.read_inputs(time.monotonic_ns() + 50 * MS, recipe=True)
        assert got is not None and got.trigger_counts and got.part_ids and got.recipe is not None
        if got.trigger_counts[0] == last_count:
            await asyncio.sleep(0.002)
            continue
        assert got.trigger_counts[0] == (last_count + 1) & 0xFFFF, "a trigger was missed"
        last_count = got.trigger_counts[0]
        answered += 1
        part, recipe = got.part_ids[0], got.recipe
        todo = [] if part == skip else [(part, recipe + (1 if part == bad_recipe else 0))]
        if part == bogus_after:
            todo.append((0xDEAD, recipe))
        for n, (pid, rcp) in enumerate(todo):
            if n:  # slot mode: let the PLC consume the previous record first (it acknowledges)
                while True:
                    acks = await link.read_inputs(time.monotonic_ns() + 50 * MS, triggers=False,
                                                  acks=True)
                    if acks and acks.acked_sequences and acks.acked_sequences[0] == seq:
                        break
                    await asyncio.sleep(0.002)
            seq = next_sequence(seq)
            r = await link.write_decision(
                DecisionRecord(0, seq, pid, Verdict.OK, 0, 950, 12, 1, recipe=rcp),
                time.monotonic_ns() + 300 * MS)
            assert r.outcome is WriteOutcome.ACKED, r


@pytest.mark.parametrize("mode", ["slot", "ring"])
async def test_program_counts_what_a_plc_would(mode: str) -> None:
    program = {"trigger_rate_hz": 100, "slots": [0], "max_parts": 20, "part_id_start": 1001,
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
            await answer_parts(link, 20, skip=1005, bad_recipe=1010, bogus_after=1015)
            await asyncio.to_thread(
                wait_until,
                lambda: (pc := sim.program_counters()) is not None
                and sum(pc.records_consumed) == 20 and sum(pc.parts_unanswered) == 1,
                5, "the program to consume every record and time out the skipped part")
            pc = sim.program_counters()
            acks = await link.read_inputs(time.monotonic_ns() + 200 * MS, triggers=False,
                                          acks=True)
        finally:
            await link.close()
    assert pc is not None and acks is not None
    assert pc.parts_triggered == [20, 0]
    assert pc.records_consumed == [20, 0]  # 19 answers + 1 bogus
    assert pc.records_lost == [0, 0]
    assert pc.part_id_matches == [19, 0] and pc.part_id_mismatches == [1, 0]
    assert pc.recipe_mismatches == [1, 0] and pc.parts_unanswered == [1, 0]
    assert pc.verdicts["ok"] == 20 and pc.recipe_switches == 4
    assert pc.last_consumed[0] == 5020  # continued from the 5000 the PLC held
    assert acks.acked_sequences == (5020, 0) and pc.acks_written >= 1


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
