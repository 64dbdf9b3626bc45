"""Fixtures that start real PLC peers on 127.0.0.1 free ports and stop them by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plc.config import ModbusSettings
from plc.sim import ModbusPlcSimulator
from tests.support import free_port, port_open, spawned, stop_pid, wait_until

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
    with spawned(
        sim_cmd(port), ready=lambda: port_open(port), what="plc.sim", log=tmp_path / "sim.log"
    ) as proc:
        yield Peer(port, proc)


@pytest.fixture(scope="session")
def libmodbus_server_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("libmodbus") / "libmodbus_server"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-o",
            str(out),
            str(PEERS / "libmodbus_server.c"),
            "-I/usr/include/modbus",
            "-lmodbus",
        ],
        check=True,
        capture_output=True,
    )
    return out


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
def pymodbustcp_server(tmp_path: Path) -> Iterator[Peer]:
    port = free_port()
    cmd = [sys.executable, str(PEERS / "pymodbustcp_server.py"), str(port)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_open(port), 20, "pyModbusTCP server")
        yield Peer(port, proc)
    finally:
        stop_pid(proc)




ROOT = Path(__file__).resolve().parents[2]
NATIVE_SNAP7_PY = ROOT / ".venv-snap7-native" / "bin" / "python"


class S7Peer:
    """An S7 server process with a side channel to its memory (stdin/stdout), stopped by PID."""

    def __init__(self, python: str, port: int, db_number: int = 100, size: int = 1024) -> None:
        self.port, self.db_number, self.python = port, db_number, python
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [python, str(PEERS / "s7_server.py"), str(port), str(db_number), str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline().strip()
        if not self.banner.startswith("READY"):
            stop_pid(self.proc)  # type: ignore[arg-type]
            raise RuntimeError(f"S7 server did not start ({python}): {self.banner!r}")

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def dump(self, offset: int, size: int) -> bytes:
        return bytes.fromhex(self._ask(f"dump {offset} {size}"))

    def put(self, offset: int, data: bytes) -> None:
        assert self._ask(f"set {offset} {data.hex()}") == "OK"

    def stop(self) -> None:
        stop_pid(self.proc)  # type: ignore[arg-type]

    def kill(self) -> None:
        """Power cut: SIGKILL, nothing flushed or closed politely."""
        self.proc.kill()
        self.proc.wait(10)


def s7_python(kind: str) -> str:
    if kind == "python":
        return sys.executable
    if not NATIVE_SNAP7_PY.exists():
        pytest.fail(
            f"native Snap7 peer missing ({NATIVE_SNAP7_PY}): run scripts/install_snap7_native.sh"
        )
    return str(NATIVE_SNAP7_PY)


@pytest.fixture(params=["python", "native"])
def s7_server(request: pytest.FixtureRequest) -> Iterator[S7Peer]:
    """python-snap7 3.x's pure-Python server, and the native Snap7 server (python-snap7 2.1).

    A fresh port every time: the 3.x server sets SO_REUSEPORT, so a stale server on a reused port
    would silently share it.
    """
    peer = S7Peer(s7_python(request.param), free_port())
    yield peer
    peer.stop()


class OpcUaPeer:
    """asyncua server process with the documented address space and a stdin side channel."""

    def __init__(self, port: int, slots: int = 4) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, str(PEERS / "opcua_server.py"), str(port), str(slots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY"):
            stop_pid(self.proc)  # type: ignore[arg-type]
            raise RuntimeError(f"OPC UA server did not start: {line!r}")

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def get(self, node: str) -> int:
        return int(self._ask(f"get Inspection.{node}"))

    def set(self, node: str, value: int) -> None:
        assert self._ask(f"set Inspection.{node} {value}") == "OK"

    def stop(self) -> None:
        stop_pid(self.proc)  # type: ignore[arg-type]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


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
