"""Real peers for the operations tests: a demo daemon as a process, a Kafka-wire broker, promtool
and headless Chromium.

One daemon serves every test of the folder (session scope: starting one costs seconds on a
2-core box). It is the demo line of configs/demo.yaml with the features switched on whose
metrics the rules and the dashboard use: PLC-triggered parts with acknowledged ring results (the
embedded simulator plays the PLC program) and an uplink to a real noida-db broker. The operator
view is attached by tests/ops/operator_daemon.py when the daemon has not wired one itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import noida_db
import pytest
from ruamel.yaml import YAML

from tests.support import free_port, port_open, spawned, wait_until

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "configs" / "monitoring"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


@dataclass
class DemoDaemon:
    port: int
    line: str
    log: Path
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return bytes(r.read())

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/api/status")))

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def _demo_config(tmp: Path, kafka_port: int) -> Path:
    """configs/demo.yaml with absolute paths, a free observability port and the extra features."""
    cfg = YAML(typ="safe").load(DEMO_CONFIG.read_text())
    base = DEMO_CONFIG.parent
    for cam in cfg["cameras"]:
        cam["path"] = str((base / cam["path"]).resolve())
        cam["trigger"] = {"mode": "triggered", "source": "plc"}
    cfg["model"]["package"] = str((base / cfg["model"]["package"]).resolve())
    cfg["uplink"]["spool_dir"] = str(tmp / "spool")
    cfg["uplink"]["kafka"] = {"bootstrap_servers": [f"127.0.0.1:{kafka_port}"]}
    cfg["state_dir"] = str(tmp / "state")
    cfg["observability"] = {"host": "127.0.0.1", "port": 0}
    cfg["logging"] = {"level": "info", "format": "json"}
    cfg["plc"]["results"] = {"mode": "ring", "acknowledged": True}
    cfg["plc"]["sim_program"] = {"trigger_rate_hz": 30, "acknowledge": True, "scan_ms": 10}
    path = tmp / "line.yaml"
    with path.open("w") as f:
        YAML().dump(cfg, f)
    return path


def _http_port(log: Path) -> int | None:
    m = re.search(r'"http_port": (\d+)', log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoDaemon]:
    tmp = tmp_path_factory.mktemp("ops-demo")
    kafka_port = free_port()
    (tmp / "noida").mkdir()
    broker = [
        str(Path(noida_db.__file__).with_name("noida-db")), "start", "--data-dir",
        str(tmp / "noida"), "--host", "127.0.0.1", "--only", "kafka", "--kafka-port",
        str(kafka_port),
    ]
    config = _demo_config(tmp, kafka_port)
    log = tmp / "daemon.log"
    with spawned(broker, ready=lambda: port_open(kafka_port), what="noida-db",
                 log=tmp / "noida.log"):
        cmd = [sys.executable, str(ROOT / "tests" / "ops" / "operator_daemon.py"), str(config)]
        # Readiness = the daemon_ready line (it carries the HTTP port) on stderr.
        proc_log = log
        with spawned(cmd, ready=lambda: _http_port(proc_log) is not None, what="edge daemon",
                      timeout_s=120, log=log) as proc:
            port = _http_port(log)
            assert port is not None
            d = DemoDaemon(port, YAML(typ="safe").load(config.read_text())["line"], log, config)
            try:
                # Everything the checks read: defects in the view, acked records, Kafka up.
                wait_until(lambda: _warm(d), 90, "the demo daemon to show defects, acks and "
                           "Kafka", poll_s=0.2)
                yield d
            finally:
                # SIGTERM to the main process only, as systemd does (KillMode=mixed): it stops
                # its own inference workers; spawned() then clears whatever is left by group.
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)


def _warm(d: DemoDaemon) -> bool:
    s = d.status()
    view = s.get("view") or {}
    m = d.metrics()
    return (
        len(view.get("defects") or []) >= 3
        and "edge_plc_unacked_records{" in m
        and 'edge_uplink_peer_up{peer="kafka"} 1.0' in m
    )


@pytest.fixture(scope="session")
def promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: apt-get install prometheus (scripts/setup.sh test does)"
    return exe


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium missing: apt-get install chromium (scripts/setup.sh test does)"
    return exe


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          cwd=MONITORING)
