"""Fixtures that start real PLC peers on 127.0.0.1 free ports and stop them by PID."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plc.config import ModbusSettings
from plc.sim import ModbusPlcSimulator
from tests.support import free_port, port_open, spawned, stop_pid

PEERS = Path(__file__).parent / "peers"


@dataclass
class Peer:
    port: int
    proc: subprocess.Popen[bytes] | None = None


@pytest.fixture
def sim() -> Iterator[ModbusPlcSimulator]:
    """The project's simulator, in-process (own thread + loop), on a free port."""
    s = ModbusPlcSimulator(ModbusSettings(port=0, simulator=True), camera_slots=4)
    s.start()
    yield s
    s.stop()


def sim_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "plc.sim", "--port", str(port), "--camera-slots", "4"]


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Peer]:
    """The simulator as its own process, so tests can kill or SIGSTOP it."""
    port = free_port()
    with spawned(sim_cmd(port), ready=lambda: port_open(port), what="plc.sim",
                 log=tmp_path / "sim.log") as proc:
        yield Peer(port, proc)


@pytest.fixture(scope="session")
def libmodbus_server_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("libmodbus") / "libmodbus_server"
    subprocess.run(
        ["gcc", "-O1", "-o", str(out), str(PEERS / "libmodbus_server.c"),
         "-I/usr/include/modbus", "-lmodbus"],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture
def libmodbus_server(libmodbus_server_bin: Path, tmp_path: Path) -> Iterator[Peer]:
    port = free_port()
    with spawned([str(libmodbus_server_bin), str(port)], ready=lambda: port_open(port),
                 what="libmodbus server", log=tmp_path / "libmodbus.log") as proc:
        yield Peer(port, proc)


@pytest.fixture
def pymodbustcp_server(tmp_path: Path) -> Iterator[Peer]:
    port = free_port()
    cmd = [sys.executable, str(PEERS / "pymodbustcp_server.py"), str(port)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from tests.support import wait_until

        wait_until(lambda: port_open(port), 20, "pyModbusTCP server")
        yield Peer(port, proc)
    finally:
        stop_pid(proc)  # type: ignore[arg-type]


_MBPOLL_LINE = re.compile(r"^\[(\d+)\]:\s+0x([0-9A-Fa-f]{4})\s*$")


def mbpoll_read(port: int, address: int, count: int, unit: int = 1) -> list[int]:
    """Holding registers read by Debian's mbpoll (libmodbus), an independent Modbus client."""
    exe = shutil.which("mbpoll")
    assert exe, "mbpoll missing: apt-get install mbpoll"
    out = subprocess.run(
        [exe, "-m", "tcp", "-p", str(port), "-a", str(unit), "-0", "-r", str(address),
         "-c", str(count), "-t", "4:hex", "-1", "-o", "2", "127.0.0.1"],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout
    regs = {int(m.group(1)): int(m.group(2), 16)
            for line in out.splitlines() if (m := _MBPOLL_LINE.match(line.strip()))}
    assert sorted(regs) == list(range(address, address + count)), out
    return [regs[a] for a in range(address, address + count)]
