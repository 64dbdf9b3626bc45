"""Kafka producer (confluent-kafka / librdkafka) and one acknowledged batch send.

Why librdkafka and not aiokafka (evidence in tests/uplink/test_kafka_interop.py): aiokafka 0.14's
idempotent producer fails InitProducerId against Tansu (a Kafka-wire broker implementing current
protocol versions: `UnknownError [Error -1]`, 0 events sent), Apache Kafka 4.x removed the old API
versions it relies on (KIP-896) and its tracker does not confirm 4.x support. librdkafka is the
field's reference client; its idempotent producer works against Tansu and noida-db here.

Why these settings are not configurable: acks=all + enable.idempotence=true is what makes "mark
sent only after the broker acknowledged" meaningful and keeps one camera's events in order
(librdkafka retries in order, without duplicates, within a producer session). Messages never time
out locally (message.timeout.ms=0): a broker outage stalls a partition instead of reordering it,
and the spool, not the producer's memory, is what survives a restart.

Threading: librdkafka runs its own I/O threads; delivery reports and log lines are served by
`poll()`, which `send()` calls on the worker thread it runs on (`asyncio.to_thread`), so the event
loop never blocks. librdkafka's log lines go to the stdlib logger `uplink.kafka` (the daemon routes
stdlib logging into structlog).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from uplink.config import KafkaSettings
from uplink.store import SpooledEvent

KAFKA_LOGGER = "uplink.kafka"
# Errors that belong to one record, not to the link: retrying the record can never succeed.
_POISON = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
                     KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG})
_LINK_DOWN = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                        KafkaError._RESOLVE})


class RepeatFilter(logging.Filter):
    """librdkafka logs a FAIL line per reconnect attempt (every few seconds during an outage):
    let the same line (timings stripped) through at most once per `every_s`."""

    _TIMINGS = re.compile(r"\(after \d+ms[^)]*\)|#producer-\d+")

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = self._TIMINGS.sub("", record.getMessage())
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.every_s:
                return False
            if len(self._seen) > 256:
                self._seen.clear()
            self._seen[key] = now
        return True


def kafka_logger() -> logging.Logger:
    logger = logging.getLogger(KAFKA_LOGGER)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


class KafkaConfigError(ValueError):
    """The Kafka section cannot work on this machine (librdkafka refused the configuration)."""


def event_key(line: str, camera: str) -> bytes:
    """One partition per (line, camera): that camera's events stay ordered."""
    return f"{line}/{camera}".encode()


def producer_config(cfg: KafkaSettings) -> dict[str, Any]:
    """librdkafka properties; secrets are resolved here (never logged)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(cfg.bootstrap_servers),
        "client.id": cfg.client_id,
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": cfg.compression,
        "linger.ms": cfg.linger_ms,
        "batch.size": cfg.max_batch_bytes,
        "request.timeout.ms": cfg.request_timeout_ms,
        "message.timeout.ms": 0,  # never expire: see module docstring
        "retry.backoff.ms": 200,
        "retry.backoff.max.ms": 5000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 5000,
        "socket.keepalive.enable": True,
        # Java's default: a key lands on the same partition as with the plant's Java producers.
        "partitioner": "murmur2_random",
        "security.protocol": cfg.security_protocol,
    }
    if cfg.tls is not None:
        tls = cfg.tls
        if tls.ca_file:
            conf["ssl.ca.location"] = str(tls.ca_file)
        if tls.cert_file:
            conf["ssl.certificate.location"] = str(tls.cert_file)
        if tls.key_file:
            conf["ssl.key.location"] = str(tls.key_file)
        if tls.key_password is not None:
            conf["ssl.key.password"] = tls.key_password.resolve().get_secret_value()
        conf["ssl.endpoint.identification.algorithm"] = "https" if tls.check_hostname else "none"
    if cfg.sasl is not None:
        conf["sasl.mechanism"] = cfg.sasl.mechanism
        conf["sasl.username"] = cfg.sasl.username
        conf["sasl.password"] = cfg.sasl.password.resolve().get_secret_value()
    return conf


class SendResult:
    """Outcome of one batch: spool ids acknowledged, rows the broker refused for good, errors."""

    __slots__ = ("acked", "errors", "poison")

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.poison: list[tuple[int, str]] = []
        self.errors: list[str] = []


class KafkaSink:
    """One idempotent producer. Every method blocks: call it from a worker thread."""

    def __init__(self, cfg: KafkaSettings) -> None:
        self.cfg = cfg
        self.fatal: str | None = None
        self.last_error: str | None = None
        self.link_down = False
        conf = producer_config(cfg)
        conf["logger"] = kafka_logger()
        conf["error_cb"] = self._on_error
        try:
            self._producer: Producer | None = Producer(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise KafkaConfigError(f"kafka producer configuration refused: {exc}") from exc

    def _on_error(self, err: KafkaError) -> None:
        """Client-level errors (served by poll on the worker thread)."""
        self.last_error = f"{err.name()}: {err.str()}"
        if err.fatal():
            self.fatal = self.last_error
        if err.code() in _LINK_DOWN:
            self.link_down = True

    def _p(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("kafka producer is closed")
        return self._producer

    def probe(self, timeout_s: float) -> None:
        """Cluster metadata round trip: raises KafkaException when no broker answers."""
        self._p().list_topics(timeout=timeout_s)
        self.link_down = False

    def send(
        self,
        topic: str,
        rows: Sequence[SpooledEvent],
        stop: threading.Event,
        slow_s: float,
        on_slow: Callable[[float], None],
    ) -> SendResult:
        """Produce rows in spool order and wait for every delivery report (or stop / a fatal
        error). Only rows whose report says OK are in `acked`."""
        producer = self._p()
        out = SendResult()
        reports: dict[int, KafkaError | None] = {}

        def report(rid: int) -> Callable[[KafkaError | None, Any], None]:
            def cb(err: KafkaError | None, _msg: Any) -> None:
                reports[rid] = err
            return cb

        produced: list[int] = []
        for row in rows:
            while not stop.is_set():
                try:
                    producer.produce(
                        topic, value=row.payload.encode(), key=event_key(row.line, row.camera),
                        headers=[("event_id", row.event_id.encode()),
                                 ("content-type", b"application/json")],
                        on_delivery=report(row.id),
                    )
                    produced.append(row.id)
                    break
                except BufferError:  # local queue full: serve reports, then try again
                    producer.poll(0.05)
                except KafkaException as exc:
                    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                    if err is not None and err.code() in _POISON:
                        out.poison.append((row.id, f"kafka refused the record: {err.str()}"))
                        break
                    out.errors.append(f"produce: {exc}")
                    break
            if out.errors or stop.is_set():
                break
        started = time.monotonic()
        next_slow = started + slow_s
        while len(reports) < len(produced) and not stop.is_set() and self.fatal is None:
            producer.poll(0.1)
            now = time.monotonic()
            if now >= next_slow and len(reports) < len(produced):
                on_slow(now - started)
                next_slow = now + slow_s
        producer.poll(0)
        for rid in produced:
            if rid not in reports:
                continue
            err = reports[rid]
            if err is None:
                out.acked.append(rid)
            elif err.code() in _POISON:
                out.poison.append((rid, f"kafka refused the record: {err.str()}"))
            else:
                out.errors.append(f"{err.name()}: {err.str()}")
        if self.fatal is not None:
            out.errors.append(f"fatal producer error: {self.fatal}")
        if out.acked:
            self.link_down = False
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush briefly, then drop what is still queued: the spool still has those rows."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.flush(timeout_s)
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.poll(0)
        except (KafkaException, RuntimeError):
            pass
