"""Real peers for the uplink tests: a Kafka-wire broker (noida-db) and an S3 server (SeaweedFS).

Both run on 127.0.0.1 on free ports, persist to tmp_path (so a stop/start keeps their data), and
are stopped by PID. Each can be stopped and restarted mid-test to simulate an outage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import noida_db
import pytest

from tests.support import free_port, port_open, stop_pid, wait_until

S3_KEY = "EDGEUPLINKKEY"
S3_SECRET = "edge-uplink-secret-0123456789"
BUCKET = "edge-images"


class Peer:
    """A restartable server process (same port, same data dir)."""

    def __init__(self, cmd: list[str], ready_port: int, what: str, log: Path,
                 health_url: str | None = None) -> None:
        self.cmd = cmd
        self.port = ready_port
        self.what = what
        self.log = log
        self.health_url = health_url
        self.proc: subprocess.Popen[bytes] | None = None

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} exited with {self.proc.returncode}: "
                               f"{self.log.read_text(errors='replace')[-2000:]}")
        if not port_open(self.port):
            return False
        if self.health_url is None:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            out.close()
        wait_until(self._ready, 30, f"{self.what} ready", poll_s=0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        wait_until(lambda: not port_open(self.port), 10, f"{self.what} port closed")


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[Peer]:
    binary = Path(noida_db.__file__).with_name("noida-db")
    port = free_port()
    data = tmp_path / "noida"
    data.mkdir()
    peer = Peer([str(binary), "start", "--data-dir", str(data), "--host", "127.0.0.1",
                 "--only", "kafka", "--kafka-port", str(port)], port, "noida-db",
                tmp_path / "noida.log")
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


def weed_port() -> int:
    """SeaweedFS also binds port+10000 (gRPC): both must be free and valid."""
    while True:
        port = free_port()
        if port < 50000 and not port_open(port + 10000):
            return port


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    return found


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Peer]:
    d = tmp_path / "weed"
    d.mkdir()
    ids = d / "identities.json"
    ids.write_text(json.dumps({"identities": [{
        "name": "edge",
        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {name: weed_port() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        weed_binary(), "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        f"-s3.config={ids}", f"-filer.localSocket={d / 'filer.sock'}",
        f"-s3.localSocket={d / 's3.sock'}",
    ]
    (d / "data").mkdir()
    peer = Peer(cmd, ports["s3"], "seaweedfs", tmp_path / "weed.log",
                health_url=f"http://127.0.0.1:{ports['s3']}/healthz")
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()
