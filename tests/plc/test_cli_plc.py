"""`edge plc test|watch|map` against real PLC peers; results checked by independent readers."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edge.cli.plc import TEST_REASON, app
from plc.sim import ModbusPlcSimulator
from tests.plc.conftest import Peer, S7Peer
from tests.support import mbpoll_read

runner = CliRunner()


def test_plc_test_against_libmodbus_reads_back_a_safe_test_record(libmodbus_server: Peer) -> None:
    res = runner.invoke(app, ["test", "--modbus", f"127.0.0.1:{libmodbus_server.port}",
                              "--camera", "1", "--count", "5", "--recipe", "7"])
    assert res.exit_code == 0, res.output
    assert "5 record(s) written and read back" in res.output and "p50 ms" in res.output
    words = mbpoll_read(libmodbus_server.port, 1016, 12)  # record v2: 12 registers
    assert words[2] == 3  # FAIL-SAFE REJECT: a PLC acting on a test record rejects the part
    assert words[7] == TEST_REASON
    assert words[8:10] == [0, 5]  # sequence (v1 words 8-9) continued from what the PLC held (0)
    assert words[10:12] == [7, 0]  # recipe (appended in v2), reserved


def test_plc_test_against_native_s7(s7_server: S7Peer) -> None:
    res = runner.invoke(app, ["test", "--s7", f"127.0.0.1:{s7_server.port}", "--count", "3"])
    assert res.exit_code == 0, res.output
    assert s7_server.dump(16, 4) == (3).to_bytes(4, "big")  # sequence at DBD16


def test_plc_test_reports_an_unreachable_plc(unused_tcp_port: int) -> None:
    res = runner.invoke(app, ["test", "--modbus", f"127.0.0.1:{unused_tcp_port}",
                              "--connect-s", "0.3"])
    assert res.exit_code == 3
    assert "cannot reach the PLC" in res.output


def test_plc_test_without_arguments_uses_the_embedded_simulator() -> None:
    res = runner.invoke(app, ["test", "--count", "3"])
    assert res.exit_code == 0, res.output
    assert "embedded Modbus PLC simulator" in res.output


def test_watch_shows_both_directions(sim: ModbusPlcSimulator) -> None:
    # camera 1's record as the daemon would write it (v2: sequence at +8..9, recipe 3 at +10)
    sim.write_registers(1016, [0, 77, 2, 4, 912, 31, 5, 0, 0, 42, 3, 0])
    sim.write_registers(100, [9, 0b1_0000_0101])
    sim.trigger_part(1, 0x00BC614E)  # the PLC announces part 12345678, counter 1 -> 1
    sim.set_recipe(4321)
    sim.write_registers(402, [0, 41])  # camera 1 acknowledged sequence 41
    res = runner.invoke(app, ["watch", "--modbus", f"127.0.0.1:{sim.port}", "--cameras", "2",
                              "--duration", "0.3"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "heartbeat 9" in res.output and "recipe 4321" in res.output
    assert "CAMERA_DOWN, FAILSAFE_ACTIVE, DRIFT" in res.output
    row = next(line for line in res.output.splitlines() if " 42 " in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    # slot, trigger, PLC part id, ack, sequence, rec/s, part id, verdict, class, score, latency,
    # model, recipe, reason
    assert cells[:5] == ["1", "1", "12345678", "41", "42"], cells
    assert cells[6:] == ["77", "DEFECT", "4", "912", "31", "5", "3", "0"], cells


def test_watch_shows_the_ring(tmp_path: Path) -> None:
    from plc.config import ModbusSettings

    s = ModbusSettings(port=0, simulator=True, results={"mode": "ring", "ring_size": 4})  # type: ignore[arg-type]
    with ModbusPlcSimulator(s, 1) as sim:
        for seq in (5, 6):  # slots (5-1)%4 = 0 and 1, then the head
            sim.write_registers(1000 + 2 + 12 * ((seq - 1) % 4),
                                [0, 100 + seq, 1, 0, 990, 3, 1, 0, 0, seq, 2, 0])
        sim.hold_sequence(0, 6)
        cfg = tmp_path / "line.yaml"
        cfg.write_text(f"plc:\n  type: modbus\n  port: {sim.port}\n"
                       "  results: {mode: ring, ring_size: 4}\n")
        res = runner.invoke(app, ["watch", "-c", str(cfg), "--duration", "0.3"],
                            env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "head 6 @slot 1: 6 5 0" in res.output
    row = next(line for line in res.output.splitlines() if "head 6" in line)
    assert " 106 " in row and "OK" in row


def test_map_names_the_bad_key(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text("plc:\n  type: modbus\n  host: 10.0.0.5\n  record_stride: 3\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)])
    assert res.exit_code == 2
    assert "plc.modbus.record_stride" in res.output or "plc.record_stride" in res.output
    cfg.write_text("plc:\n  type: modbus\n  record_base: 95\ncameras:\n  - {plc_slot: 0}\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)])
    assert res.exit_code == 2 and "overlap" in res.output
    cfg.write_text("plc:\n  type: s7\n  db_number: 7\ncameras:\n  - {plc_slot: 0}\n"
                   "  - {plc_slot: 2}\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "DB7.DBB64..87" in res.output  # slot 2 at 2 * 32, 24 bytes
    assert "sequence DB7.DBD80, recipe DB7.DBW84" in res.output  # v1's DBD+16; recipe at +20
    assert "DB7.DBW588" in res.output  # slot 2's trigger counter: 584 + 2 * 2
    assert "DB7.DBW616" in res.output and "DB7.DBD628" in res.output  # recipe; slot 2's ack
    cfg.write_text("plc:\n  type: modbus\ncameras:\n  - {plc_slot: 0}\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "sequence 1008..1009, recipe 1010" in res.output  # the v1 strobe position
    cfg.write_text("plc:\n  type: modbus\n  trigger_base: 201\ncameras:\n  - {plc_slot: 0}\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)])
    assert res.exit_code == 2 and "trigger counters (trigger_base, trigger_stride)" in res.output


def test_map_lists_every_modbus_address(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text("plc:\n  type: modbus\n  results: {mode: ring, acknowledged: true}\n"
                   "cameras:\n  - {plc_slot: 0}\n  - {plc_slot: 1}\n")
    res = runner.invoke(app, ["map", "-c", str(cfg)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    for where in ("holding register 299", "holding registers 202..203", "holding register 301",
                  "holding registers 402..403", "holding registers 1112..1113",
                  "holding registers 1114..1209"):
        assert where in out, (where, out)
    assert "ring of 8" in out and "acknowledged" in out
