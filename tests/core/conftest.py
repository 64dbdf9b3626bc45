"""Daemon-core fixtures: a Modbus PLC in its own process, mbpoll read-back, the demo model."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, mbpoll_read, stop_pid

ROOT = Path(__file__).resolve().parents[2]
DEMO_PACKAGE = ROOT / "models" / "demo" / "package"
DEMO_SAMPLES = ROOT / "models" / "demo" / "samples"
RECORD_BASE, RECORD_STRIDE = 1000, 16


@dataclass
class PlcProcess:
    """The simulator in a separate process; it prints one line per record it receives."""

    port: int
    proc: subprocess.Popen[bytes]
    records: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(camera, sequence, part_id, verdict) in arrival order, as the server saw them."""
    full: list[dict[str, int]] = field(default_factory=list)
    """The same records with every field the simulator prints (recipe, reason)."""
    _pump: threading.Thread | None = None

    @classmethod
    def start(cls, port: int, cmd: list[str] | None = None) -> PlcProcess:
        """`python -m plc.sim --log-records` (or `cmd`) on `port`, ready, its log collected."""
        cmd = cmd or [sys.executable, "-u", "-m", "plc.sim", "--port", str(port),
                      "--camera-slots", "4", "--log-records"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
        plc = cls(port, proc)
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode().split()
                if line[:1] == ["READY"]:
                    ready.set()
                elif line[:1] == ["REC"]:
                    values = [int(x) for x in line[1:]]
                    plc.records.append(tuple(values[:4]))  # type: ignore[arg-type]
                    keys = ("camera", "sequence", "part_id", "verdict", "recipe", "reason")
                    plc.full.append(dict(zip(keys, values, strict=False)))

        plc._pump = threading.Thread(target=pump, daemon=True)
        plc._pump.start()
        if not ready.wait(20):
            plc.stop()
            raise RuntimeError("PLC simulator did not print READY")
        return plc

    def stop(self) -> None:
        stop_pid(self.proc)
        if self._pump is not None:
            self._pump.join(5)

    def read_record(self, slot: int) -> dict[str, int]:
        return mbpoll_record(self.port, slot)


def mbpoll_record(port: int, slot: int) -> dict[str, int]:
    """Decode a v2 record by hand per docs/plc-register-map.md (big-endian words, high word
    first; v1's words 0-9, then the recipe), from registers read by mbpoll: independent of the
    project's own decoder."""
    w = mbpoll_read(port, RECORD_BASE + slot * RECORD_STRIDE, 12)
    return {
        "part_id": w[0] << 16 | w[1],
        "verdict": w[2],
        "defect_class": w[3],
        "score_permille": w[4],
        "latency_ms": w[5],
        "model_id": w[6],
        "reason": w[7],
        "sequence": w[8] << 16 | w[9],
        "recipe": w[10],
    }


@pytest.fixture
def plc() -> Iterator[PlcProcess]:
    """A Modbus PLC simulator process; collects its per-record lines (independent accounting)."""
    proc = PlcProcess.start(free_port())
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def demo_package() -> Path:
    assert (DEMO_PACKAGE / "manifest.json").is_file(), (
        f"the bundled demo model is missing at {DEMO_PACKAGE}; scripts/make_demo_model.sh makes it"
    )
    return DEMO_PACKAGE


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Any]:
    """A stand-in for systemd's notify socket (tests.core.harness.NotifySocket)."""
    from tests.core.harness import NotifySocket  # harness imports this module's paths

    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()
