"""Forwarding to real Kafka-wire brokers (noida-db and Tansu) and a real S3 server, through outages.

Checks use independent clients: kcat (noida-db) or aiokafka's consumer (Tansu) for what reached
Kafka, and the MinIO SDK (a separate S3 implementation from aiobotocore) against SeaweedFS, which
verifies signatures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
from minio import Minio

from tests.uplink.conftest import BUCKET, S3_KEY, S3_SECRET, Peer, Record, read_topic
from tests.uplink.helpers import make_event, make_image
from uplink.config import UplinkSettings
from uplink.event import PartEvent
from uplink.forwarder import Forwarder
from uplink.spool import Spool

TOPIC = "edge.events"
SCHEMA = json.loads((Path(__file__).parents[2] / "uplink" / "event.schema.json").read_text())


def uplink_settings(tmp_path: Path, kafka: Peer | None, s3: Peer | None,
                    secret: str = S3_SECRET) -> UplinkSettings:
    cfg: dict[str, Any] = {
        "spool_dir": tmp_path / "spool", "batch_max_delay_ms": 5, "forward_batch": 200,
        "backoff_initial_s": 0.1, "backoff_max_s": 1.0, "ok_image_sample_rate": 0.0,
        "image": {"format": "png"},
    }
    if kafka is not None:
        cfg["kafka"] = {"bootstrap_servers": [f"127.0.0.1:{kafka.port}"], "events_topic": TOPIC,
                        "request_timeout_ms": 3000, "linger_ms": 5}
    if s3 is not None:
        cfg["s3"] = {"bucket": BUCKET, "endpoint_url": f"http://127.0.0.1:{s3.port}",
                     "key_prefix": "edge/", "timeout_s": 3.0,
                     "credentials": {"access_key_id": {"value": S3_KEY},
                                     "secret_access_key": {"value": secret}}}
    return UplinkSettings.model_validate(cfg)


def minio(s3: Peer) -> Minio:
    return Minio(f"127.0.0.1:{s3.port}", access_key=S3_KEY, secret_key=S3_SECRET, secure=False,
                 region="us-east-1")


async def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


async def consume_all(broker: Peer, expect: int, timeout_s: float = 30.0) -> list[Record]:
    """Read the whole topic from offset 0 with an independent consumer (no group)."""
    return await asyncio.to_thread(read_topic, broker, TOPIC, expect, timeout_s)


def backlog(spool: Spool) -> dict[str, Any]:
    return spool.backlog()


async def test_broker_outage_delivers_every_event_in_camera_order(
    tmp_path: Path, broker: Peer
) -> None:
    kafka = broker
    spool = Spool(uplink_settings(tmp_path, kafka, None), "L1")
    spool.open()
    fwd = Forwarder(spool)
    task = asyncio.create_task(fwd.run())
    sent: list[str] = []
    part = 0

    def submit(n: int) -> None:
        nonlocal part
        for _ in range(n):
            ev = make_event("L1", f"cam{part % 4}", part, "DEFECT" if part % 9 == 0 else "OK")
            assert spool.submit(ev)
            sent.append(ev.event_id)
            part += 1

    try:
        submit(300)
        await wait_for(lambda: fwd.events_sent >= 300, 30, "first 300 events acknowledged")
        await asyncio.to_thread(kafka.stop)
        submit(300)  # produced while the broker is down
        await wait_for(lambda: fwd.last_error is not None and not fwd.kafka_up, 30,
                       "forwarder noticing the outage")
        assert await asyncio.to_thread(spool.flush, 10)
        assert (await asyncio.to_thread(backlog, spool))["unsent_events"] >= 300
        await asyncio.to_thread(kafka.start)
        submit(300)
        assert await asyncio.to_thread(spool.flush, 10)
        await wait_for(lambda: spool.backlog()["unsent_events"] == 0, 60,
                       "backlog drained after the broker came back")
        assert spool.stats()["committed"] == 900
    finally:
        fwd.stop()
        await task
        spool.close()

    msgs = await consume_all(kafka, expect=900)
    first: dict[str, Any] = {}
    for m in msgs:
        ev = json.loads(m.value)
        assert m.key == f"L1/{ev['camera']}".encode()
        assert m.headers["event_id"] == ev["event_id"].encode()
        first.setdefault(ev["event_id"], (m.partition, m.offset, ev))
    assert set(first) == set(sent), f"missing {len(set(sent) - set(first))}"
    jsonschema.validate(next(iter(first.values()))[2], SCHEMA)
    per_camera: dict[str, list[int]] = {}
    for _p, _o, ev in sorted(first.values(), key=lambda t: (t[0], t[1])):
        per_camera.setdefault(ev["camera"], []).append(ev["sequence"])
    for cam, seqs in per_camera.items():
        assert seqs == sorted(seqs), f"{cam} out of order"


async def test_s3_outage_delivers_every_image(tmp_path: Path, s3: Peer) -> None:
    client = minio(s3)
    client.make_bucket(BUCKET)
    spool = Spool(uplink_settings(tmp_path, None, s3), "L1")
    spool.open()
    fwd = Forwarder(spool)
    task = asyncio.create_task(fwd.run())
    events: list[PartEvent] = []

    def submit(n: int) -> None:
        for _ in range(n):
            i = len(events)
            ev = make_event("L1", f"cam{i % 2}", i, "DEFECT")
            assert spool.submit(ev, make_image(i))
            events.append(ev)

    try:
        submit(40)
        await wait_for(lambda: fwd.images_sent >= 40, 30, "first 40 images uploaded")
        await asyncio.to_thread(s3.stop)
        submit(40)
        await wait_for(lambda: fwd.image_errors > 0, 30, "forwarder noticing the S3 outage")
        assert spool.backlog()["unsent_images"] > 0
        await asyncio.to_thread(s3.start)
        assert await asyncio.to_thread(spool.flush, 10)
        await wait_for(lambda: spool.backlog()["unsent_images"] == 0, 60, "images drained")
    finally:
        fwd.stop()
        await task
        spool.close()

    objects = {o.object_name: o for o in client.list_objects(BUCKET, recursive=True)}
    assert len(objects) == 80
    for ev in events:
        assert ev.image_ref in objects, ev.image_ref
        assert str(ev.image_ref).startswith(f"edge/L1/{ev.captured_at[:10]}/{ev.camera}/")
    ev = events[-1]
    resp = client.get_object(BUCKET, str(ev.image_ref))
    try:
        body = resp.read()
        meta = {k.lower(): v for k, v in resp.headers.items()}
    finally:
        resp.close()
        resp.release_conn()
    assert meta["x-amz-meta-event-id"] == ev.event_id
    assert meta["x-amz-meta-sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["content-type"] == "image/png"


async def test_s3_wrong_secret_is_rejected_and_nothing_marked_sent(
    tmp_path: Path, s3: Peer
) -> None:
    minio(s3).make_bucket(BUCKET)
    spool = Spool(uplink_settings(tmp_path, None, s3, secret="not-the-secret"), "L1")
    spool.open()
    fwd = Forwarder(spool)
    task = asyncio.create_task(fwd.run())
    try:
        assert spool.submit(make_event("L1", "cam0", 1, "DEFECT"), make_image(1))
        await wait_for(lambda: fwd.image_errors > 0, 30, "a rejected upload")
    finally:
        fwd.stop()
        await task
    assert "SignatureDoesNotMatch" in str(fwd.last_error) or "AccessDenied" in str(fwd.last_error)
    assert S3_SECRET not in str(fwd.last_error)
    assert spool.backlog()["unsent_images"] == 1
    assert list(minio(s3).list_objects(BUCKET, recursive=True)) == []
    spool.close()


async def test_drain_sends_events_that_reference_uploaded_images(
    tmp_path: Path, kafka: Peer, s3: Peer
) -> None:
    minio(s3).make_bucket(BUCKET)
    spool = Spool(uplink_settings(tmp_path, kafka, s3), "L1")
    spool.open()
    for i in range(50):
        assert spool.submit(make_event("L1", "cam0", i, "DEFECT" if i % 5 == 0 else "OK"),
                            make_image(i))
    assert spool.flush(10)
    assert await Forwarder(spool).drain(60)
    spool.close()
    msgs = await consume_all(kafka, expect=50)
    refs = {json.loads(m.value)["image_ref"] for m in msgs} - {None}
    keys = {o.object_name for o in minio(s3).list_objects(BUCKET, recursive=True)}
    assert len(refs) == 10 and refs == keys


async def test_daemon_killed_mid_run_then_restarted_delivers_every_committed_event(
    tmp_path: Path, kafka: Peer
) -> None:
    from tests.uplink.test_spool import run_and_kill

    spool_dir = tmp_path / "spool"
    # The child spools AND forwards (the daemon's shape); SIGKILL lands mid-send.
    committed = await asyncio.to_thread(run_and_kill, spool_dir, 4000, str(kafka.port))
    spool = Spool(uplink_settings(tmp_path, kafka, None), "L1")
    spool.open()
    before = spool.backlog()["unsent_events"]
    assert await Forwarder(spool).drain(60)
    spool.close()
    msgs = await consume_all(kafka, expect=len(set(committed)))
    delivered = {json.loads(m.value)["event_id"] for m in msgs}
    missing = set(committed) - delivered
    assert not missing, f"{len(missing)} committed events never reached Kafka"
    assert before < len(committed)  # the child had forwarded part of it before dying
