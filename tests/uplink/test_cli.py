"""`edge uplink status|drain` on real spool files, draining into real peers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from minio import Minio
from typer.testing import CliRunner

from edge.cli.uplink import app
from tests.uplink.conftest import BUCKET, S3_KEY, S3_SECRET, Peer, read_topic
from tests.uplink.helpers import make_event, make_image
from uplink.config import UplinkSettings
from uplink.spool import Spool

runner = CliRunner()


def fill(spool_dir: Path, n: int, line: str = "L7") -> list[str]:
    spool = Spool(UplinkSettings(spool_dir=spool_dir, batch_max_delay_ms=5), line)
    spool.open()
    ids = []
    for i in range(n):
        ev = make_event(line, f"cam{i % 2}", i, "DEFECT" if i % 4 == 0 else "OK")
        assert spool.submit(ev, make_image(i))
        ids.append(ev.event_id)
    assert spool.flush(10)
    spool.close()
    return ids


def test_status_reports_backlog(tmp_path: Path) -> None:
    fill(tmp_path / "spool", 20)
    res = runner.invoke(app, ["status", "--spool-dir", str(tmp_path / "spool"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["spool"]["unsent_events"] == 20
    assert doc["spool"]["unsent_images"] == 5
    assert doc["spool"]["spooled_per_s"] > 0
    res = runner.invoke(app, ["status", "--spool-dir", str(tmp_path / "spool")])
    assert res.exit_code == 0 and "unsent events    20" in res.output


def test_status_without_spool_and_bad_config_fail_clearly(tmp_path: Path) -> None:
    res = runner.invoke(app, ["status", "--spool-dir", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no spool" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("uplink:\n  quota_mb: -1\n  colour: blue\n")
    res = runner.invoke(app, ["status", "-c", str(bad)])
    assert res.exit_code == 2
    assert "uplink.quota_mb" in res.output and "uplink.colour" in res.output


def test_drain_refuses_while_a_writer_holds_the_spool(tmp_path: Path, kafka: Peer) -> None:
    holder = Spool(UplinkSettings(spool_dir=tmp_path / "spool"), "L7")
    holder.open()
    try:
        res = runner.invoke(app, ["drain", "--spool-dir", str(tmp_path / "spool"), "-c",
                                  str(write_config(tmp_path, kafka, None))])
    finally:
        holder.close()
    assert res.exit_code == 2 and "in use by another process" in res.output


def write_config(tmp_path: Path, kafka: Peer | None, s3: Peer | None) -> Path:
    lines = ["line: L7", "uplink:", f"  spool_dir: {tmp_path / 'spool'}",
             "  backoff_max_s: 1.0"]
    if kafka:
        lines += ["  kafka:", f"    bootstrap_servers: ['127.0.0.1:{kafka.port}']",
                  "    events_topic: edge.events"]
    if s3:
        secret_file = tmp_path / "s3.secret"
        secret_file.write_text(S3_SECRET + "\n")
        lines += ["  s3:", f"    bucket: {BUCKET}", f"    endpoint_url: http://127.0.0.1:{s3.port}",
                  "    credentials:", "      access_key_id: {env: TEST_S3_KEY}",
                  f"      secret_access_key: {{file: {secret_file}}}"]
    path = tmp_path / "line.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_drain_empties_the_spool_into_kafka_and_s3(
    tmp_path: Path, kafka: Peer, s3: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_S3_KEY", S3_KEY)
    ids = fill(tmp_path / "spool", 40)
    client = Minio(f"127.0.0.1:{s3.port}", access_key=S3_KEY, secret_key=S3_SECRET,
                   secure=False, region="us-east-1")
    client.make_bucket(BUCKET)
    res = runner.invoke(app, ["drain", "-c", str(write_config(tmp_path, kafka, s3)),
                              "--timeout", "60"])
    assert res.exit_code == 0, res.output
    assert "sent 40 events and 10 images" in res.output
    assert S3_SECRET not in res.output
    got = {json.loads(m.value)["event_id"] for m in read_topic(kafka, "edge.events", 40)}
    assert got == set(ids)
    assert len(list(client.list_objects(BUCKET, recursive=True))) == 10
    res = runner.invoke(app, ["status", "-c", str(tmp_path / "line.yaml"), "--json"])
    doc = json.loads(res.output)
    assert doc["spool"]["unsent_events"] == 0 and doc["spool"]["unsent_images"] == 0
    assert doc["forwarder"]["events_sent"] == 40



def test_drain_dead_letters_corrupt_rows_instead_of_a_traceback(
    tmp_path: Path, kafka: Peer
) -> None:
    from tests.uplink.test_forward import corrupt_rows

    ids = fill(tmp_path / "spool", 12)
    bad = corrupt_rows(tmp_path / "spool")
    res = runner.invoke(app, ["drain", "-c", str(write_config(tmp_path, kafka, None)),
                              "--timeout", "60"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert "moved 4 corrupt rows to the dead-letter table" in res.output
    got = {json.loads(m.value)["event_id"] for m in read_topic(kafka, "edge.events", 8)}
    assert got == set(ids) - set(bad)
    res = runner.invoke(app, ["status", "--spool-dir", str(tmp_path / "spool")])
    assert res.exit_code == 0 and "dead-lettered    4" in res.output


def test_status_of_an_old_spool_says_it_will_be_migrated(tmp_path: Path) -> None:
    from tests.uplink.test_spool import make_v1_spool

    make_v1_spool(tmp_path / "spool")
    res = runner.invoke(app, ["status", "--spool-dir", str(tmp_path / "spool")])
    assert res.exit_code == 1 and "schema version 1" in res.output and "migrates" in res.output
