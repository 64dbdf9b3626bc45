"""Forwarding to real Kafka-wire brokers (noida-db and Tansu) and a real S3 server, through outages.

Checks use independent clients: kcat (noida-db) or aiokafka's consumer (Tansu) for what reached
Kafka, and the MinIO SDK (a separate S3 implementation from aiobotocore) against SeaweedFS, which
verifies signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from minio import Minio

from tests.support import free_port
from tests.uplink.conftest import BUCKET, S3_KEY, S3_SECRET, Peer, Record, read_topic
from tests.uplink.helpers import make_event, make_image
from uplink import forwarder as forwarder_mod
from uplink.config import UplinkSettings
from uplink.event import PartEvent
from uplink.forwarder import Forwarder, _Rate
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
        await asyncio.to_thread(kafka.stop, 1.0)  # SIGTERM, SIGKILL after 1 s (Tansu lingers)
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


def log_s3_clients(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every S3 client the forwarder opens and closes, in order ("open", "closed")."""
    log: list[str] = []
    real = forwarder_mod.s3_client

    @contextlib.asynccontextmanager
    async def logged(cfg: Any) -> AsyncIterator[Any]:
        log.append("open")
        async with real(cfg) as client:
            yield client
        log.append("closed")

    monkeypatch.setattr(forwarder_mod, "s3_client", logged)
    return log


async def test_s3_client_opened_at_startup_is_the_one_that_uploads_then_closed(
    tmp_path: Path, s3: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_s3() (called by the daemon before it freezes its heap) makes no network call, and
    the images loop uploads with that very client rather than building a second one."""
    built = log_s3_clients(monkeypatch)
    minio(s3).make_bucket(BUCKET)
    spool = Spool(uplink_settings(tmp_path, None, s3), "L1")
    spool.open()
    fwd = Forwarder(spool)
    await asyncio.to_thread(s3.stop)
    await fwd.open_s3()  # S3 is down: building the client must not need it
    assert built == ["open"] and fwd.last_error is None
    await asyncio.to_thread(s3.start)
    task = asyncio.create_task(fwd.run())
    try:
        for i in range(5):
            assert spool.submit(make_event("L1", "cam0", i, "DEFECT"), make_image(i))
        await wait_for(lambda: fwd.images_sent >= 5, 30, "5 images uploaded")
    finally:
        fwd.stop()
        await task
        spool.close()
    assert built == ["open", "closed"]
    assert len(list(minio(s3).list_objects(BUCKET, recursive=True))) == 5


async def test_s3_client_opened_but_never_used_is_closed_by_aclose(
    tmp_path: Path, s3: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = log_s3_clients(monkeypatch)
    spool = Spool(uplink_settings(tmp_path, None, s3), "L1")
    spool.open()
    fwd = Forwarder(spool)
    await fwd.open_s3()
    await fwd.aclose()  # the daemon stopped before the forwarder's task ever ran
    await fwd.aclose()
    spool.close()
    assert built == ["open", "closed"]  # closed once, by the first aclose()


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


# --------------------------------------------------------------------- issue 9.12
async def test_s3_down_and_small_quota_lose_no_event_to_images(tmp_path: Path, kafka: Peer) -> None:
    # Before: pending images filled the quota and OK events were evicted before Kafka had them
    # (195/1786 lost with Kafka healthy). Events are tiny: only images may go.
    dead_s3 = free_port()  # nothing listens there: S3 is down for the whole test
    cfg = uplink_settings(tmp_path, kafka, None).model_dump()
    cfg.update(quota_mb=1.0, ok_image_sample_rate=1.0,
               image={"format": "png", "png_compression": 0},
               s3={"bucket": BUCKET, "endpoint_url": f"http://127.0.0.1:{dead_s3}",
                   "timeout_s": 1.0, "credentials": {"access_key_id": {"value": S3_KEY},
                                                     "secret_access_key": {"value": S3_SECRET}}})
    spool = Spool(UplinkSettings.model_validate(cfg), "L1")
    spool.open()
    fwd = Forwarder(spool)
    task = asyncio.create_task(fwd.run())
    ids = []
    try:
        for i in range(240):  # ~50 KB image each: 12 MB of images for a 1 MB quota
            ev = make_event("L1", f"cam{i % 3}", i, "DEFECT" if i % 2 else "OK")
            assert spool.submit(ev, make_image(i, 200, 250))
            ids.append(ev.event_id)
        assert await asyncio.to_thread(spool.flush, 30)
        await wait_for(lambda: spool.backlog()["unsent_events"] == 0, 60, "every event sent")
        await wait_for(lambda: fwd.image_errors > 0, 30, "the S3 outage noticed")
        st = await asyncio.to_thread(spool.stats)
        assert fwd.s3_up is False and spool.backlog()["unsent_images"] > 0
    finally:
        fwd.stop()
        await task
        spool.close()
    ev_counts = st["evicted"]
    assert ev_counts["ok_images"] > 0 and ev_counts["defect_images"] > 0
    assert ev_counts["unsent_ok"] == 0 and ev_counts["defect"] == 0
    got = {json.loads(m.value)["event_id"] for m in await consume_all(kafka, expect=240)}
    assert got == set(ids)


def corrupt_rows(spool_dir: Path) -> dict[str, str]:
    """Damage four committed rows the way a bad block or a hand edit does; PRAGMA quick_check
    still passes. Returns event_id -> the reason expected in the dead-letter table."""
    conn = sqlite3.connect(spool_dir / "spool.db")
    ids = [r[0] for r in conn.execute("SELECT event_id FROM events ORDER BY id LIMIT 4 OFFSET 3")]
    damage = [
        ("CAST(X'7B2280FF22' AS TEXT)", "not UTF-8"),
        ("CAST(X'7B00000000' AS TEXT)", "NUL bytes"),
        ("'{\"event_id\": \"trunc'", "not JSON"),
        ("'null'", "not an object"),
    ]
    with conn:
        for eid, (expr, _) in zip(ids, damage, strict=True):
            conn.execute(f"UPDATE events SET payload = {expr} WHERE event_id = ?", (eid,))
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()
    return {eid: why for eid, (_, why) in zip(ids, damage, strict=True)}


async def test_corrupt_rows_are_dead_lettered_and_forwarding_goes_on(
    tmp_path: Path, kafka: Peer, s3: Peer
) -> None:
    minio(s3).make_bucket(BUCKET)
    s = uplink_settings(tmp_path, kafka, s3)
    spool = Spool(s, "L1")
    spool.open()
    events = [make_event("L1", "cam0", i, "DEFECT") for i in range(12)]
    for ev in events:
        assert spool.submit(ev, make_image(ev.part_id))
    assert spool.flush(10)
    spool.close()
    bad = corrupt_rows(s.spool_dir)

    spool = Spool(s, "L1")
    spool.open()  # quick_check passes: nothing is quarantined
    fwd = Forwarder(spool)
    assert await fwd.drain(60), fwd.stats()
    st = spool.stats()
    spool.close()
    good = [ev.event_id for ev in events if ev.event_id not in bad]
    got = {json.loads(m.value)["event_id"] for m in await consume_all(kafka, expect=8)}
    assert got == set(good)
    keys = {o.object_name for o in minio(s3).list_objects(BUCKET, recursive=True)}
    assert keys == {ev.image_ref for ev in events if ev.event_id in good}
    assert st["dead_lettered"] == 4 and st["quarantined"] == []
    assert any("dead-letter" in a for a in st["alarms"])
    conn = sqlite3.connect(s.spool_dir / "spool.db")
    dead = {bytes(r[0]).decode(): r[1] for r in conn.execute(
        "SELECT event_id, reason FROM dead_letter")}
    conn.close()
    assert set(dead) == set(bad)
    for eid, why in bad.items():
        assert why in dead[eid], dead[eid]
        assert (s.spool_dir / "dead_letter" / f"{eid}.png").exists()  # kept for inspection


async def test_a_crashing_forwarder_loop_is_logged_restarted_and_delivers(
    tmp_path: Path, kafka: Peer, monkeypatch: Any
) -> None:
    spool = Spool(uplink_settings(tmp_path, kafka, None), "L1")
    spool.open()
    real = spool.unsent_events
    calls = {"n": 0}

    def flaky(limit: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault in the events loop")
        return real(limit)

    monkeypatch.setattr(spool, "unsent_events", flaky)
    ids = []
    for i in range(20):
        ev = make_event("L1", "cam0", i)
        assert spool.submit(ev)
        ids.append(ev.event_id)
    assert spool.flush(10)
    fwd = Forwarder(spool)
    assert await fwd.drain(30)
    st = fwd.stats()
    spool.close()
    assert st["loop_restarts"] == {"events": 1, "images": 0}
    assert "injected fault" in str(st["last_error"])
    assert st["events_sent"] == 20
    got = {json.loads(m.value)["event_id"] for m in await consume_all(kafka, expect=20)}
    assert got == set(ids)


def test_forwarder_rates_can_be_read_from_another_thread() -> None:
    # Before: per_s() iterated the deque while the loop appended: "deque mutated during
    # iteration", and the status froze.
    rate = _Rate(window_s=0.05)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                rate.per_s()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(200_000):
        rate.add(1)
    done.set()
    for t in threads:
        t.join(10)
    assert errors == []


async def test_amendment_reaches_kafka_after_its_original(tmp_path: Path, kafka: Peer) -> None:
    spool = Spool(uplink_settings(tmp_path, kafka, None), "L1")
    spool.open()
    ev = make_event("L1", "cam0", 1)
    ev.plc_outcome = "unknown"
    assert spool.submit(ev)
    assert spool.flush(10)
    fwd = Forwarder(spool)
    assert await fwd.drain(30)  # the original is sent as it was
    assert fwd.events_sent == 1
    assert spool.amend(ev.event_id, {"plc_outcome": "confirmed_applied"})
    assert await asyncio.to_thread(spool.flush, 10)
    assert await Forwarder(spool).drain(30)
    spool.close()
    docs = [json.loads(m.value) for m in await consume_all(kafka, expect=2)]
    assert [d["kind"] for d in docs] == ["part", "amendment"]
    original, amendment = docs
    assert original["plc_outcome"] == "unknown"
    assert amendment["amends"] == ev.event_id and amendment["plc_outcome"] == "confirmed_applied"
    assert amendment["changes"] == {"plc_outcome": "confirmed_applied"}
    for d in docs:
        jsonschema.validate(d, SCHEMA)


async def test_cancelling_the_forwarder_cancels_its_uploads_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's stop cancels the forwarder's task: the uploads it was awaiting must end
    with it (before, they ran on and their gather's CancelledError was logged as "never
    retrieved" when the loop closed)."""
    s3 = Peer(["true"], free_port(), "nobody (never started)", tmp_path / "s3.log")
    spool = Spool(uplink_settings(tmp_path, None, s3), "L1")
    spool.open()
    fwd = Forwarder(spool)
    started, cancelled = asyncio.Event(), []

    async def stuck(_client: Any, _sem: asyncio.Semaphore, _img: Any) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    monkeypatch.setattr(fwd, "_upload_one", stuck)
    assert spool.submit(make_event("L1", "cam0", 1, "DEFECT"), make_image(1))
    task = asyncio.create_task(fwd.run())
    try:
        await asyncio.wait_for(started.wait(), 30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        spool.close()
    assert cancelled == [True]
