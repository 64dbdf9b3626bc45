"""Why the uplink produces with librdkafka (confluent-kafka) and not aiokafka: the evidence.

Tansu 0.6 implements current Kafka protocol versions. aiokafka 0.14's idempotent producer fails
InitProducerId against it (`UnknownError [Error -1]`, nothing sent), while librdkafka's idempotent
producer with the very settings the forwarder uses delivers to the same broker. If a future
aiokafka or Tansu fixes this, the first test fails and the choice can be revisited on evidence.
aiokafka stays in the `test` extra only (this test, and as Tansu's read-back consumer).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AIOKafkaError

from tests.uplink.conftest import Peer, read_topic, tansu_peer
from tests.uplink.helpers import make_event
from uplink.config import KafkaSettings
from uplink.kafka_sink import KafkaSink
from uplink.store import SpooledEvent


@pytest.fixture
def tansu_mem(tmp_path: Path) -> Iterator[Peer]:
    peer = tansu_peer(tmp_path, "memory://tansu/")  # no restart here: memory is enough
    peer.start()
    try:
        yield peer
    finally:
        peer.kill()


async def test_aiokafka_idempotent_producer_fails_against_tansu(tansu_mem: Peer) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{tansu_mem.port}", acks="all",
                                enable_idempotence=True, request_timeout_ms=5000)
    try:
        with pytest.raises(AIOKafkaError) as failure:
            await asyncio.wait_for(producer.start(), 20)
            await asyncio.wait_for(producer.send_and_wait("evidence", b"{}", key=b"k"), 20)
    finally:
        await asyncio.wait_for(producer.stop(), 10)
    assert "UnknownError" in repr(failure.value)


def test_librdkafka_idempotent_producer_delivers_to_tansu(tansu_mem: Peer) -> None:
    cfg = KafkaSettings(bootstrap_servers=[f"127.0.0.1:{tansu_mem.port}"],
                        events_topic="evidence", linger_ms=5)
    events = [make_event("L1", f"cam{i % 2}", i) for i in range(50)]
    rows = [SpooledEvent(i, ev.event_id, ev.line, ev.camera, ev.to_json())
            for i, ev in enumerate(events)]
    sink = KafkaSink(cfg)
    try:
        result = sink.send("evidence", rows, threading.Event(), 10.0, lambda _s: None)
    finally:
        sink.close()
    assert result.errors == [] and result.acked == [r.id for r in rows]
    got = read_topic(tansu_mem, "evidence", expect=50)
    assert {json.loads(r.value)["event_id"] for r in got} == {ev.event_id for ev in events}
