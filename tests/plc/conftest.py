"""Fixtures that start real PLC peers on 127.0.0.1 free ports and stop them by PID.

The peer classes live in tests/plc/plcpeers.py so other test packages can use them too.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plc import native_peer
from plc.config import ModbusSettings
from plc.sim import ModbusPlcSimulator
from tests.plc.plcpeers import (
    NATIVE_SNAP7_PY,
    ROOT,
    OpcUaPeer,
    Peer,
    PyModbusTcpPeer,
    S7Peer,
)
from tests.plc.plcpeers import s7_python as _s7_python
from tests.support import free_port, port_open, spawned, wait_until

__all__ = ["NATIVE_SNAP7_PY", "ROOT", "OpcUaPeer", "Peer", "PyModbusTcpPeer", "S7Peer", "hang",
           "s7_python"]


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
    with spawned(
        sim_cmd(port), ready=lambda: port_open(port), what="plc.sim", log=tmp_path / "sim.log"
    ) as proc:
        yield Peer(port, proc)


@pytest.fixture(scope="session")
def libmodbus_server_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native_peer.build(tmp_path_factory.mktemp("libmodbus"))


@pytest.fixture
def libmodbus_server(libmodbus_server_bin: Path, tmp_path: Path) -> Iterator[Peer]:
    port = free_port()
    with spawned(
        [str(libmodbus_server_bin), str(port)],
        ready=lambda: port_open(port),
        what="libmodbus server",
        log=tmp_path / "libmodbus.log",
    ) as proc:
        yield Peer(port, proc)


@pytest.fixture
def pymodbustcp_server() -> Iterator[PyModbusTcpPeer]:
    """pyModbusTCP's server: an independent Modbus implementation playing the PLC."""
    with PyModbusTcpPeer.running() as peer:
        yield peer


def s7_python(kind: str) -> str:
    try:
        return _s7_python(kind)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["python", "native"])
def s7_server(request: pytest.FixtureRequest) -> Iterator[S7Peer]:
    """python-snap7 3.x's pure-Python server, and the native Snap7 server (python-snap7 2.1).

    A fresh port every time: the 3.x server sets SO_REUSEPORT, so a stale server on a reused port
    would silently share it.
    """
    peer = S7Peer(s7_python(request.param), free_port(), size=2048)
    yield peer
    peer.stop()


@pytest.fixture
def opcua_server() -> Iterator[OpcUaPeer]:
    peer = OpcUaPeer(free_port())
    yield peer
    peer.stop()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def hang(pid: int) -> None:
    """SIGSTOP a peer we started and wait until the kernel has really stopped it (kill() returns
    before the target stops, and a request may still be served in between)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _state(pid) == "T", 5, f"pid {pid} to stop")
