"""Kafka producer construction and one acknowledged batch send.

Why these settings are not configurable: acks=all + enable_idempotence=True is what makes "mark sent
only after the broker acknowledged" meaningful and keeps one camera's events in order. With
idempotence, aiokafka retries a batch in order and never expires it, and only one request per
partition is in flight, so a broker outage stalls a partition instead of reordering it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4, has_snappy, has_zstd
from aiokafka.helpers import create_ssl_context

from uplink.config import KafkaSettings
from uplink.spool import SpooledEvent


class KafkaConfigError(ValueError):
    """The Kafka section cannot work on this machine (e.g. a codec library is missing)."""


def event_key(line: str, camera: str) -> bytes:
    """One partition per (line, camera): that camera's events stay ordered."""
    return f"{line}/{camera}".encode()


def producer_kwargs(cfg: KafkaSettings) -> dict[str, Any]:
    """Everything AIOKafkaProducer needs; secrets are resolved here, never logged."""
    codec = None if cfg.compression == "none" else cfg.compression
    available = {"lz4": has_lz4, "zstd": has_zstd, "snappy": has_snappy}
    if codec in available and not available[codec]():
        raise KafkaConfigError(
            f"kafka.compression={codec} needs the 'cramjam' package; install it or use gzip"
        )
    kw: dict[str, Any] = {
        "bootstrap_servers": list(cfg.bootstrap_servers),
        "client_id": cfg.client_id,
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": codec,
        "linger_ms": cfg.linger_ms,
        "max_batch_size": cfg.max_batch_bytes,
        "request_timeout_ms": cfg.request_timeout_ms,
        "retry_backoff_ms": 200,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.tls is not None:
        pw = cfg.tls.key_password
        password = pw.resolve().get_secret_value() if pw is not None else None
        ctx = create_ssl_context(
            cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            password=password,
        )
        ctx.check_hostname = cfg.tls.check_hostname
        kw["ssl_context"] = ctx
    if cfg.sasl is not None:
        kw["sasl_mechanism"] = cfg.sasl.mechanism
        kw["sasl_plain_username"] = cfg.sasl.username
        kw["sasl_plain_password"] = cfg.sasl.password.resolve().get_secret_value()
    return kw


def build_producer(cfg: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_kwargs(cfg))


async def send_batch(
    producer: AIOKafkaProducer, topic: str, rows: Sequence[SpooledEvent]
) -> tuple[list[int], list[BaseException]]:
    """Send rows in spool order; return the spool ids the broker acknowledged, and the errors."""
    futures: list[asyncio.Future[Any]] = []
    errors: list[BaseException] = []
    for row in rows:
        try:
            fut = await producer.send(
                topic,
                value=row.payload.encode(),
                key=event_key(row.line, row.camera),
                headers=[("event_id", row.event_id.encode()),
                         ("content-type", b"application/json")],
            )
        except Exception as exc:  # e.g. no metadata yet: keep what is already queued
            errors.append(exc)
            break
        futures.append(fut)
    results = await asyncio.gather(*futures, return_exceptions=True)
    acked: list[int] = []
    for row, res in zip(rows, results, strict=False):
        if isinstance(res, BaseException):
            errors.append(res)
        else:
            acked.append(row.id)
    return acked, errors
