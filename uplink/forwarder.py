"""Store-and-forward: drain the spool to Kafka (events) and S3 (images), independently.

Why two independent loops: an S3 outage must not hold back the event stream (and vice versa). An
event row is marked sent only after Kafka acknowledged it (acks=all), an image only after S3
answered the PUT; anything else is retried from the spool with exponential backoff, so delivery is
at-least-once and consumers dedupe on event_id. All SQLite access runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from uplink.config import UplinkSettings
from uplink.kafka_sink import build_producer, send_batch
from uplink.s3_sink import s3_client, upload
from uplink.spool import FORWARDER_STATUS, Spool, SpooledImage, write_status

log = structlog.get_logger(__name__)

IDLE_POLL_S = 0.1


class _Rate:
    """Items per second over a sliding window (for status lines and metrics)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._points.append((now, n))
        while self._points and now - self._points[0][0] > self.window_s:
            self._points.popleft()

    def per_s(self) -> float:
        now = time.monotonic()
        while self._points and now - self._points[0][0] > self.window_s:
            self._points.popleft()
        if not self._points:
            return 0.0
        span = max(now - self._points[0][0], 1.0)
        return sum(n for _, n in self._points) / span


class Forwarder:
    """Runs as an asyncio task in the daemon: `await forwarder.run()` until `stop()`."""

    def __init__(self, spool: Spool, settings: UplinkSettings | None = None) -> None:
        self.spool = spool
        self.settings = settings or spool.settings
        self._stop = asyncio.Event()
        self.events_sent = 0
        self.images_sent = 0
        self.event_errors = 0
        self.image_errors = 0
        self.kafka_up = False
        self.s3_up = False
        self.last_error: str | None = None
        self._event_rate = _Rate()
        self._image_rate = _Rate()

    # ------------------------------------------------------------------ public
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Forward until stop(); never raises for peer trouble (it backs off and retries)."""
        self._stop.clear()
        loops = []
        if self.settings.kafka is not None:
            loops.append(self._events_loop())
        if self.settings.s3 is not None:
            loops.append(self._images_loop())
        if not loops:
            log.info("uplink forwarder has no kafka or s3 configured: data stays in the spool")
            await self._stop.wait()
            return
        reporter = asyncio.create_task(self._report_loop())
        try:
            await asyncio.gather(*loops)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await asyncio.to_thread(self._write_status)

    def _write_status(self) -> None:
        write_status(self.spool.dir / FORWARDER_STATUS,
                     {"written_at": time.time(), "pid": os.getpid(), **self.stats()})

    async def _report_loop(self) -> None:
        while True:
            await asyncio.to_thread(self._write_status)
            await asyncio.sleep(2.0)

    async def drain(self, timeout_s: float) -> bool:
        """Forward until nothing configured is left unsent, or timeout; True when drained."""
        task = asyncio.create_task(self.run())
        end = time.monotonic() + timeout_s
        drained = False
        try:
            while time.monotonic() < end and not task.done():
                if await asyncio.to_thread(self._nothing_left):
                    drained = True
                    break
                await asyncio.sleep(0.1)
        finally:
            self.stop()
            await task
        return drained

    def stats(self) -> dict[str, Any]:
        return {
            "events_sent": self.events_sent,
            "images_sent": self.images_sent,
            "events_per_s": round(self._event_rate.per_s(), 1),
            "images_per_s": round(self._image_rate.per_s(), 2),
            "event_errors": self.event_errors,
            "image_errors": self.image_errors,
            "kafka_up": self.kafka_up if self.settings.kafka else None,
            "s3_up": self.s3_up if self.settings.s3 else None,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ internals
    def _nothing_left(self) -> bool:
        b = self.spool.backlog()
        events_left = self.settings.kafka is not None and b["unsent_events"] > 0
        images_left = self.settings.s3 is not None and b["unsent_images"] > 0
        return not events_left and not images_left

    def _fail(self, what: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.last_error = f"{what}: {text}"
        log.warning("uplink forwarding error", sink=what, error=text)

    async def _pause(self, seconds: float) -> None:
        """Sleep that ends early on stop()."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _until_stopped(
        self, aw: Any, slow_s: float | None = None, on_slow: Any = None
    ) -> tuple[bool, Any]:
        """Await `aw` unless stop() comes first: (finished, result). `on_slow(waited_s)` is
        called every `slow_s` while it is still pending (a stalled peer is reported, not hidden)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop.wait())
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait(
                    {task, stopper}, timeout=slow_s, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                if on_slow is not None:
                    on_slow(time.monotonic() - started)
        finally:
            stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False, None

    def _backoff(self, current: float) -> float:
        return min(current * 2, self.settings.backoff_max_s)

    async def _events_loop(self) -> None:
        cfg = self.settings.kafka
        assert cfg is not None
        backoff = self.settings.backoff_initial_s
        producer: AIOKafkaProducer | None = None
        try:
            while not self._stop.is_set():
                if producer is None:
                    try:
                        producer = build_producer(cfg)
                        done, _ = await self._until_stopped(producer.start())
                        if not done:
                            break
                    except Exception as exc:
                        self.kafka_up = False
                        self.event_errors += 1
                        self._fail("kafka connect", exc)
                        await self._close_producer(producer)
                        producer = None
                        await self._pause(backoff)
                        backoff = self._backoff(backoff)
                        continue
                    self.kafka_up = True
                    log.info("uplink kafka producer connected", servers=cfg.bootstrap_servers)
                rows = await asyncio.to_thread(
                    self.spool.unsent_events, self.settings.forward_batch
                )
                if not rows:
                    await self._pause(IDLE_POLL_S)
                    continue
                done, result = await self._until_stopped(
                    send_batch(producer, cfg.events_topic, rows),
                    slow_s=cfg.request_timeout_ms / 1000.0, on_slow=self._kafka_stalled,
                )
                if not done:
                    break
                acked, errors = result
                if acked:
                    await asyncio.to_thread(self.spool.mark_events_sent, acked)
                    self.events_sent += len(acked)
                    self._event_rate.add(len(acked))
                if errors:
                    self.kafka_up = False
                    self.event_errors += len(errors)
                    self._fail("kafka send", errors[0])
                    # A fresh producer (new idempotent session) resends from the oldest unsent.
                    await self._close_producer(producer)
                    producer = None
                    await self._pause(backoff)
                    backoff = self._backoff(backoff)
                else:
                    self.kafka_up = True
                    backoff = self.settings.backoff_initial_s
        finally:
            await self._close_producer(producer)
            self.kafka_up = False

    def _kafka_stalled(self, waited_s: float) -> None:
        # The idempotent producer keeps retrying in order (that is what keeps each camera's
        # order); we only make the outage visible and let it carry on.
        self.kafka_up = False
        self.event_errors += 1
        self._fail("kafka send", f"no acknowledgement for {waited_s:.0f}s (broker unreachable?), "
                                 "still retrying")

    async def _close_producer(self, producer: AIOKafkaProducer | None) -> None:
        # stop() flushes; with the broker down that never ends, and the spool still has the rows.
        if producer is None:
            return
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(producer.stop(), 5.0)

    async def _images_loop(self) -> None:
        cfg = self.settings.s3
        assert cfg is not None
        backoff = self.settings.backoff_initial_s
        sem = asyncio.Semaphore(cfg.concurrency)
        while not self._stop.is_set():
            try:
                async with s3_client(cfg) as client:
                    while not self._stop.is_set():
                        rows = await asyncio.to_thread(
                            self.spool.unsent_images, max(cfg.concurrency * 8, 16)
                        )
                        if not rows:
                            await self._pause(IDLE_POLL_S)
                            continue

                        async def one(img: SpooledImage) -> BaseException | None:
                            async with sem:
                                try:
                                    await upload(client, cfg, img)
                                except FileNotFoundError as exc:
                                    await asyncio.to_thread(
                                        self.spool.mark_image_lost, img.id, str(exc)
                                    )
                                    return None
                                except Exception as exc:
                                    return exc
                                return None

                        done, results = await self._until_stopped(
                            asyncio.gather(*(one(r) for r in rows))
                        )
                        if not done:
                            return
                        ok = [r.id for r, res in zip(rows, results, strict=True) if res is None]
                        errs = [res for res in results if res is not None]
                        if ok:
                            await asyncio.to_thread(self.spool.mark_images_sent, ok)
                            self.images_sent += len(ok)
                            self._image_rate.add(len(ok))
                        if errs:
                            self.s3_up = False
                            self.image_errors += len(errs)
                            self._fail("s3 put", errs[0])
                            await self._pause(backoff)
                            backoff = self._backoff(backoff)
                        else:
                            self.s3_up = True
                            backoff = self.settings.backoff_initial_s
            except Exception as exc:  # client creation / credentials / endpoint trouble
                self.s3_up = False
                self.image_errors += 1
                self._fail("s3 client", exc)
                await self._pause(backoff)
                backoff = self._backoff(backoff)
        self.s3_up = False
