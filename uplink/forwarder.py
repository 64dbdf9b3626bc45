"""Store-and-forward: drain the spool to Kafka (events) and S3 (images), independently.

Why two independent loops: an S3 outage must not hold back the event stream (and vice versa). An
event row is marked sent only after Kafka's delivery report said OK (acks=all, idempotent
producer), an image only after S3 answered the PUT; anything else is retried from the spool with
exponential backoff, so delivery is at-least-once and consumers dedupe on event_id. All SQLite and
librdkafka calls run in worker threads.

Why each loop is supervised: a loop that dies (an unexpected exception, a database error) would
otherwise stop forwarding silently while the line runs on. Each is restarted with backoff, the
crash is logged with its traceback and counted in `stats()["loop_restarts"]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from confluent_kafka import KafkaException

from uplink.config import UplinkSettings
from uplink.kafka_sink import KafkaConfigError, KafkaSink
from uplink.s3_sink import s3_client, upload
from uplink.spool import FORWARDER_STATUS, Spool, SpooledImage, write_status

log = structlog.get_logger(__name__)

IDLE_POLL_S = 0.1
PROBE_EVERY_S = 10.0


class _Rate:
    """Items per second over a sliding window (for status lines and metrics). Thread-safe: the
    forwarder adds on the loop, status readers call per_s() from other threads."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        while self._points and now - self._points[0][0] > self.window_s:
            self._points.popleft()

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._points.append((now, n))
            self._trim(now)

    def per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
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
        self._stop_thread = threading.Event()
        self._lock = threading.Lock()
        self.events_sent = 0
        self.images_sent = 0
        self.event_errors = 0
        self.image_errors = 0
        self.dead_lettered = 0
        self.kafka_up = False
        self.s3_up = False
        self.running = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.loop_restarts = {"events": 0, "images": 0}
        self._event_rate = _Rate()
        self._image_rate = _Rate()
        self._s3_opened: tuple[contextlib.AsyncExitStack, Any] | None = None
        """The S3 client open_s3() built, until the images loop takes it over."""

    # ------------------------------------------------------------------ public
    def stop(self) -> None:
        self._stop.set()
        self._stop_thread.set()

    async def open_s3(self) -> None:
        """Build the S3 client now instead of on the images loop's first pass. The daemon calls
        this before it freezes its startup heap (edge/gcpause.py): an aiobotocore client is
        ~35,000 Python objects (service model, endpoint rules) that live as long as the
        forwarder, and outside the freeze every later full collection walks them (20-22 ms on
        the bench VM, against 2 ms without them). Built on the first pass, the client fell
        before or after the freeze depending on task scheduling. No network call is made; a
        failure here is retried by the loop."""
        cfg = self.settings.s3
        if cfg is None or self._s3_opened is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(s3_client(cfg))
        except Exception as exc:  # the images loop tries again, with backoff
            await stack.aclose()
            self._fail("s3 client", exc)
            return
        self._s3_opened = (stack, client)

    async def aclose(self) -> None:
        """Close the client open_s3() built if no images loop took it over (the forwarder was
        stopped, or its task cancelled, before it ran)."""
        opened, self._s3_opened = self._s3_opened, None
        if opened is not None:
            await opened[0].aclose()

    async def run(self) -> None:
        """Forward until stop(); never raises for peer trouble (it backs off and retries)."""
        self._stop.clear()
        self._stop_thread.clear()
        loops = []
        if self.settings.kafka is not None:
            loops.append(self._supervise("events", self._events_loop))
        if self.settings.s3 is not None:
            loops.append(self._supervise("images", self._images_loop))
        if not loops:
            log.info("uplink_forwarder_idle", reason="no kafka or s3 configured: data stays in "
                     "the spool")
            await self._stop.wait()
            return
        reporter = asyncio.create_task(self._report_loop())
        self.running = True
        try:
            await asyncio.gather(*loops)
        finally:
            self.running = False
            await self.aclose()
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await asyncio.to_thread(self._write_status)

    def _write_status(self) -> None:
        write_status(self.spool.dir / FORWARDER_STATUS,
                     {"written_at": time.time(), "pid": os.getpid(), **self.stats()})

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
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

    @property
    def healthy(self) -> bool:
        """Running, and every configured peer reachable."""
        return self.running and (self.settings.kafka is None or self.kafka_up) and (
            self.settings.s3 is None or self.s3_up)

    def stats(self) -> dict[str, Any]:
        """Documented keys (docs/uplink.md); plain values, safe to call from any thread."""
        with self._lock:
            return {
                "events_sent": self.events_sent,
                "images_sent": self.images_sent,
                "events_per_s": round(self._event_rate.per_s(), 1),
                "images_per_s": round(self._image_rate.per_s(), 2),
                "event_errors": self.event_errors,
                "image_errors": self.image_errors,
                "dead_lettered": self.dead_lettered,
                "kafka_up": self.kafka_up if self.settings.kafka else None,
                "s3_up": self.s3_up if self.settings.s3 else None,
                "running": self.running,
                "healthy": self.healthy,
                "loop_restarts": dict(self.loop_restarts),
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
            }

    # ------------------------------------------------------------------ internals
    def _nothing_left(self) -> bool:
        b = self.spool.backlog()
        events_left = self.settings.kafka is not None and b["unsent_events"] > 0
        images_left = self.settings.s3 is not None and (
            b["unsent_images"] > 0 or b["images_writing"] > 0)
        return not events_left and not images_left

    def _fail(self, what: str, exc: BaseException | str, *, quiet: bool = False) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            changed = self.last_error != f"{what}: {text}"
            self.last_error = f"{what}: {text}"
            self.last_error_at = time.time()
        if changed and not quiet:
            log.warning("uplink_forwarding_error", sink=what, error=text)

    def _count(self, attr: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    async def _pause(self, seconds: float) -> None:
        """Sleep that ends early on stop()."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _backoff(self, current: float) -> float:
        return min(current * 2, self.settings.backoff_max_s)

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one forwarding loop until stop(); restart it with backoff if it ever raises."""
        backoff = self.settings.backoff_initial_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                with self._lock:
                    self.loop_restarts[name] += 1
                self._fail(f"{name} loop", exc, quiet=True)
                log.exception("uplink_forwarder_loop_crashed", loop=name,
                              restarts=self.loop_restarts[name], retry_in_s=backoff)
                if time.monotonic() - started > self.settings.backoff_max_s:
                    backoff = self.settings.backoff_initial_s  # it had been fine for a while
                await self._pause(backoff)
                backoff = self._backoff(backoff)

    # ------------------------------------------------------------------ events -> Kafka
    async def _events_loop(self) -> None:
        cfg = self.settings.kafka
        assert cfg is not None
        backoff = self.settings.backoff_initial_s
        sink: KafkaSink | None = None
        last_probe = 0.0
        probe_s = max(min(cfg.request_timeout_ms / 1000.0, 5.0), 1.0)
        loop = asyncio.get_running_loop()

        def on_slow(waited_s: float) -> None:  # called on the sender's worker thread
            loop.call_soon_threadsafe(self._kafka_stalled, waited_s)

        try:
            while not self._stop.is_set():
                if sink is None:
                    try:
                        sink = await asyncio.to_thread(KafkaSink, cfg)
                    except (KafkaConfigError, ValueError) as exc:  # bad config or secret
                        self.kafka_up = False
                        self._count("event_errors")
                        self._fail("kafka config", exc)
                        await self._pause(backoff)
                        backoff = self._backoff(backoff)
                        continue
                    last_probe = 0.0
                if not self.kafka_up and time.monotonic() - last_probe >= min(backoff,
                                                                               PROBE_EVERY_S):
                    last_probe = time.monotonic()
                    try:
                        await asyncio.to_thread(sink.probe, probe_s)
                    except KafkaException as exc:
                        self._count("event_errors")
                        self._fail("kafka connect", str(exc.args[0]) if exc.args else exc)
                        await self._pause(backoff)
                        backoff = self._backoff(backoff)
                        continue
                    self.kafka_up = True
                    log.info("uplink_kafka_connected", servers=cfg.bootstrap_servers)
                rows = await asyncio.to_thread(self.spool.unsent_events,
                                               self.settings.forward_batch)
                if not rows:
                    await self._pause(IDLE_POLL_S)
                    if sink.link_down:
                        self.kafka_up = False
                    continue
                result = await asyncio.to_thread(
                    sink.send, cfg.events_topic, rows, self._stop_thread,
                    cfg.request_timeout_ms / 1000.0, on_slow,
                )
                if result.acked:
                    await asyncio.to_thread(self.spool.mark_events_sent, result.acked)
                    self._count("events_sent", len(result.acked))
                    self._event_rate.add(len(result.acked))
                if result.poison:
                    await asyncio.to_thread(self.spool.dead_letter_rows, result.poison)
                    self._count("dead_lettered", len(result.poison))
                if result.errors:
                    self.kafka_up = False
                    self._count("event_errors", len(result.errors))
                    self._fail("kafka send", result.errors[0])
                    if sink.fatal is not None:  # a new idempotent session resends from the spool
                        await asyncio.to_thread(sink.close, 1.0)
                        sink = None
                    await self._pause(backoff)
                    backoff = self._backoff(backoff)
                elif result.acked:
                    if not self.kafka_up:
                        log.info("uplink_kafka_delivering", servers=cfg.bootstrap_servers)
                    self.kafka_up = True
                    backoff = self.settings.backoff_initial_s
        finally:
            self.kafka_up = False
            if sink is not None:
                await asyncio.to_thread(sink.close, 5.0)

    def _kafka_stalled(self, waited_s: float) -> None:
        # The idempotent producer keeps retrying in order (that is what keeps each camera's
        # order); we only make the outage visible and let it carry on.
        self.kafka_up = False
        self._count("event_errors")
        self._fail("kafka send", f"no acknowledgement for {waited_s:.0f}s (broker unreachable?), "
                                 "still retrying")

    # ------------------------------------------------------------------ images -> S3
    async def _images_loop(self) -> None:
        cfg = self.settings.s3
        assert cfg is not None
        backoff = self.settings.backoff_initial_s
        sem = asyncio.Semaphore(cfg.concurrency)
        while not self._stop.is_set():
            async with contextlib.AsyncExitStack() as stack:
                try:
                    opened, self._s3_opened = self._s3_opened, None
                    if opened is not None:  # built at startup: this pass owns it from here
                        client = opened[1]
                        await stack.enter_async_context(opened[0])
                    else:
                        client = await stack.enter_async_context(s3_client(cfg))
                except Exception as exc:  # credentials / endpoint trouble: peer, not a crash
                    self.s3_up = False
                    self._count("image_errors")
                    self._fail("s3 client", exc)
                    await self._pause(backoff)
                    backoff = self._backoff(backoff)
                    continue
                while not self._stop.is_set():
                    rows = await asyncio.to_thread(
                        self.spool.unsent_images, max(cfg.concurrency * 8, 16)
                    )
                    if not rows:
                        await self._pause(IDLE_POLL_S)
                        continue
                    results = await self._until_stopped(
                        asyncio.gather(*(self._upload_one(client, sem, r) for r in rows))
                    )
                    if results is None:
                        return
                    ok = [r.id for r, res in zip(rows, results, strict=True) if res is None]
                    errs = [res for res in results if res is not None]
                    if ok:
                        await asyncio.to_thread(self.spool.mark_images_sent, ok)
                        self._count("images_sent", len(ok))
                        self._image_rate.add(len(ok))
                    if errs:
                        self.s3_up = False
                        self._count("image_errors", len(errs))
                        self._fail("s3 put", errs[0])
                        await self._pause(backoff)
                        backoff = self._backoff(backoff)
                    else:
                        if not self.s3_up:
                            log.info("uplink_s3_delivering", endpoint=cfg.endpoint_url)
                        self.s3_up = True
                        backoff = self.settings.backoff_initial_s
        self.s3_up = False

    async def _upload_one(
        self, client: Any, sem: asyncio.Semaphore, img: SpooledImage
    ) -> BaseException | None:
        cfg = self.settings.s3
        assert cfg is not None
        async with sem:
            try:
                await upload(client, cfg, img)
            except FileNotFoundError as exc:
                await asyncio.to_thread(self.spool.mark_image_lost, img.id, str(exc))
                return None
            except Exception as exc:  # the peer's answer: counted, retried from the spool
                return exc
            return None

    async def _until_stopped(self, aw: Awaitable[Any]) -> Any | None:
        """Await `aw` unless stop() comes first (then cancel it and return None)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # our own task is cancelled (daemon stop): take `aw` along
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # retrieved: no "exception was never retrieved" at loop shutdown
            raise
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None
