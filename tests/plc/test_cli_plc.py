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
                              "--camera", "1", "--count", "5"])
    assert res.exit_code == 0, res.output
    assert "5 record(s) written and read back" in res.output and "p50 ms" in res.output
    words = mbpoll_read(libmodbus_server.port, 1016, 10)
    assert words[2] == 3  # FAIL-SAFE REJECT: a PLC acting on a test record rejects the part
    assert words[7] == TEST_REASON
    assert words[8:10] == [0, 5]  # sequence continued from what the PLC held (0) by one per record


def test_plc_test_against_native_s7(s7_server: S7Peer) -> None:
    res = runner.invoke(app, ["test", "--s7", f"127.0.0.1:{s7_server.port}", "--count", "3"])
    assert res.exit_code == 0, res.output
    assert s7_server.dump(16, 4) == (3).to_bytes(4, "big")


def test_plc_test_reports_an_unreachable_plc(unused_tcp_port: int) -> None:
    res = runner.invoke(app, ["test", "--modbus", f"127.0.0.1:{unused_tcp_port}",
                              "--connect-s", "0.3"])
    assert res.exit_code == 3
    assert "cannot reach the PLC" in res.output


def test_plc_test_without_arguments_uses_the_embedded_simulator() -> None:
    res = runner.invoke(app, ["test", "--count", "3"])
    assert res.exit_code == 0, res.output
    assert "embedded Modbus PLC simulator" in res.output


def test_watch_shows_record_heartbeat_and_alarms(sim: ModbusPlcSimulator) -> None:
    sim.write_registers(1016, [0, 77, 2, 4, 912, 31, 5, 0, 0, 42])  # camera 1, as the daemon would
    sim.write_registers(100, [9, 0b101])
    res = runner.invoke(app, ["watch", "--modbus", f"127.0.0.1:{sim.port}", "--cameras", "2",
                              "--duration", "0.3"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "heartbeat 9" in res.output
    assert "CAMERA_DOWN, FAILSAFE_ACTIVE" in res.output
    row = next(line for line in res.output.splitlines() if " 42 " in line)
    assert "77" in row and "DEFECT" in row and "912" in row


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
    assert "DB7.DBB64..83" in res.output  # slot 2 at 2 * 32
