"""Real PLC peers for tests, each in its own process on a 127.0.0.1 free port, stopped by PID.

Reusable outside tests/plc (the daemon's end-to-end tests use them as "the PLC"):

    from tests.plc.plcpeers import OpcUaPeer, PyModbusTcpPeer, S7Peer, s7_python

    with PyModbusTcpPeer.running() as plc:      # pyModbusTCP's server (not pymodbus)
        plc.set_u32(1008, 5000)                 # camera 0 holds sequence 5000 (record words 8-9)
        plc.trigger(part_id_addr=200, counter_addr=300, part_id=77)
        plc.get(1000, 12)                       # registers as the server holds them

    peer = S7Peer(s7_python("native"), free_port(), size=2048)   # or "python" (snap7 3.x)
    peer.put(520, (77).to_bytes(4, "big")); peer.dump(0, 24); peer.stop()

    peer = OpcUaPeer(free_port(), slots=2, settings={"results": {"mode": "ring"}})
    peer.set("Camera0.PlcPartId", 77); peer.get("Camera0.Sequence"); peer.stop()

Every peer has a stdin side channel to its memory (what the PLC program itself reads and
writes), so what the code wrote is checked without going through the code's own client.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import free_port, port_open, stop_pid, wait_until

PEERS = Path(__file__).parent / "peers"
ROOT = Path(__file__).resolve().parents[2]
NATIVE_SNAP7_PY = ROOT / ".venv-snap7-native" / "bin" / "python"


@dataclass
class Peer:
    port: int
    proc: subprocess.Popen[bytes] | None = None


class _LinePeer:
    """A process answering one line per stdin command."""

    proc: subprocess.Popen[str]

    def _start(self, cmd: list[str], what: str) -> str:
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True, cwd=ROOT,
        )
        self._io = threading.Lock()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY"):
            stop_pid(self.proc)  # type: ignore[arg-type]
            raise RuntimeError(f"{what} did not start: {line!r}")
        return line

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._io:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        stop_pid(self.proc)  # type: ignore[arg-type]

    def kill(self) -> None:
        """Power cut: SIGKILL, nothing flushed or closed politely."""
        self.proc.kill()
        self.proc.wait(10)


class PyModbusTcpPeer(_LinePeer):
    """pyModbusTCP's Modbus TCP server (65536 holding registers, any unit id)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._start([sys.executable, str(PEERS / "pymodbustcp_server.py"), str(self.port)],
                    "pyModbusTCP server")
        wait_until(lambda: port_open(self.port), 20, "pyModbusTCP server port")

    @classmethod
    @contextlib.contextmanager
    def running(cls, port: int | None = None) -> Iterator[PyModbusTcpPeer]:
        peer = cls(port)
        try:
            yield peer
        finally:
            peer.stop()

    def get(self, address: int, count: int) -> list[int]:
        return [int(x) for x in self._ask(f"get {address} {count}").split()]

    def set(self, address: int, values: list[int]) -> None:
        assert self._ask(f"set {address} {' '.join(map(str, values))}") == "OK"

    def get_u32(self, address: int) -> int:
        hi, lo = self.get(address, 2)
        return hi << 16 | lo

    def set_u32(self, address: int, value: int) -> None:
        self.set(address, [value >> 16 & 0xFFFF, value & 0xFFFF])

    def trigger(self, part_id_addr: int, counter_addr: int, part_id: int) -> int:
        """Part id first, then counter + 1 (as the documented PLC program does)."""
        return int(self._ask(f"trigger {part_id_addr} {counter_addr} {part_id}"))

    def play(self, part_id_addr: int, counter_addr: int, parts: int) -> None:
        """Announce parts 1..N back to back in the server process (id 0x10001 * n)."""
        assert self._ask(f"play {part_id_addr} {counter_addr} {parts}") == "OK"

    def wait_played(self) -> None:
        assert self._ask("wait") == "DONE"


def s7_python(kind: str) -> str:
    """'python' = python-snap7 3.x (pure Python); 'native' = Snap7 C++ (python-snap7 2.1)."""
    if kind == "python":
        return sys.executable
    if not NATIVE_SNAP7_PY.exists():
        raise RuntimeError(
            f"native Snap7 peer missing ({NATIVE_SNAP7_PY}): run scripts/install_snap7_native.sh"
        )
    return str(NATIVE_SNAP7_PY)


class S7Peer(_LinePeer):
    """An S7 server process with a side channel to its DB (stdin/stdout), stopped by PID."""

    def __init__(self, python: str, port: int, db_number: int = 100, size: int = 1024) -> None:
        self.port, self.db_number, self.python = port, db_number, python
        self.banner = self._start(
            [python, str(PEERS / "s7_server.py"), str(port), str(db_number), str(size)],
            f"S7 server ({python})")

    def dump(self, offset: int, size: int) -> bytes:
        return bytes.fromhex(self._ask(f"dump {offset} {size}"))

    def put(self, offset: int, data: bytes) -> None:
        assert self._ask(f"set {offset} {data.hex()}") == "OK"


class OpcUaPeer(_LinePeer):
    """asyncua server process with the documented address space and a stdin side channel.

    `settings`: extra OpcUaSettings fields (e.g. {"results": {"mode": "ring"}}) that shape the
    address space, as plc.opcua.populate_server builds it."""

    def __init__(self, port: int, slots: int = 4, settings: dict[str, Any] | None = None) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self._start([sys.executable, str(PEERS / "opcua_server.py"), str(port), str(slots),
                     json.dumps(settings or {})], "OPC UA server")

    def get(self, node: str) -> int:
        return int(self._ask(f"get Inspection.{node}"))

    def set(self, node: str, value: int) -> None:
        assert self._ask(f"set Inspection.{node} {value}") == "OK"


@dataclass
class Scan:
    """What the emulated PLC task (peers/ring_scanner.py) consumed."""

    records: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(sequence, part_id, verdict, recipe) in the order consumed."""
    lost: list[int] = field(default_factory=list)
    scans_ns: list[int] = field(default_factory=list)


class RingScanner:
    """A PLC task scanning one camera's results every `scan_ms` over pyModbusTCP's client."""

    def __init__(self, port: int, mode: str, base: int, ring_size: int, scan_ms: float,
                 ack_address: int = -1) -> None:
        self.scan = Scan()
        self.proc = subprocess.Popen(
            [sys.executable, str(PEERS / "ring_scanner.py"), str(port), mode, str(base),
             str(ring_size), str(scan_ms), str(ack_address)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )
        self._ready = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        if not self._ready.wait(20):
            self.stop()
            raise RuntimeError("ring scanner did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, *v = line.split()
            if kind == "READY":
                self._ready.set()
            elif kind == "SCAN":
                self.scan.scans_ns.append(int(v[0]))
            elif kind == "REC":
                self.scan.records.append((int(v[0]), int(v[1]), int(v[2]), int(v[3])))
            elif kind == "LOST":
                self.scan.lost.append(int(v[0]))

    def stop(self) -> None:
        stop_pid(self.proc)  # type: ignore[arg-type]
        self._pump.join(5)
