"""The durable spool: events in SQLite (WAL) and images as files beside it. This is the facade.

Why this shape: the critical path must never wait on disk, so `submit()` only decides (is the image
kept? does it fit the image byte bound?) and appends to a bounded deque; everything else happens on
other threads, split by role like a Kafka producer:

  store.py   SQLite schema, versioned migrations, queries, dead-letter;
  writer.py  the writer thread: batches, fsync'd commits, retries with backoff, amendments;
  images.py  which images are kept, encode + durable file writes on their own threads;
  quota.py   the disk quota and what is evicted first.

A committed row is the durability line: `kill -9` can only lose what was not yet committed. An
image is attached to its (already committed) event once its file is durable; a restart re-attaches
files whose note never committed. A database SQLite reports damaged is moved aside (with its
images) and a fresh spool is created so the line keeps deciding; an older schema is migrated in
place; a newer one is left untouched. Every fault shows on `healthy`, `stats()` and the log.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from uplink.config import UplinkSettings
from uplink.event import PartEvent
from uplink.images import ImagePipeline, keep_ok_image, object_key
from uplink.quota import EVICTION_CLASSES
from uplink.store import (
    DB_NAME,
    IMAGES_DIR,
    QUARANTINE_DIR,
    SPOOL_SCHEMA_VERSION,
    SpoolBusy,
    SpoolCorrupt,
    SpooledEvent,
    SpooledImage,
    SpoolOutdated,
    SpoolTooNew,
    Store,
    is_corruption,
)
from uplink.writer import AmendItem, LastError, PartItem, Writer, build_amend_changes

log = structlog.get_logger(__name__)

SPOOL_STATUS = "spool.status.json"
FORWARDER_STATUS = "forwarder.status.json"

__all__ = [
    "DB_NAME",
    "EVICTION_CLASSES",
    "FORWARDER_STATUS",
    "IMAGES_DIR",
    "QUARANTINE_DIR",
    "SPOOL_SCHEMA_VERSION",
    "SPOOL_STATUS",
    "Spool",
    "SpoolBusy",
    "SpoolCorrupt",
    "SpoolOutdated",
    "SpoolTooNew",
    "SpooledEvent",
    "SpooledImage",
    "keep_ok_image",
    "object_key",
    "read_payload",
    "read_status",
    "write_status",
]


class Spool:
    """Durable store of events and images for one line (thread-safe; see module docstring).

    `on_commit` (optional) is called from the writer thread with the event ids of each committed
    batch: metrics, and tests that must know exactly what became durable.
    """

    def __init__(
        self,
        settings: UplinkSettings,
        line: str,
        *,
        on_commit: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.line = line
        self.dir = Path(settings.spool_dir)
        self.store = Store(self.dir)
        self.store.busy_timeout_s = settings.commit_timeout_s
        self.db_path = self.store.db_path
        self.images_dir = self.store.images_dir
        self._on_commit = on_commit
        self._errors = LastError()
        self._writer: Writer | None = None
        self._images = self._new_pipeline()
        self._lock = threading.Lock()
        self._refused_closed = 0
        self._lost_unlogged = 0
        self._lost_logged_at = -1e9
        self._opened = False
        self._closing = False
        self._broken = False
        self._quarantined: list[str] = []
        self._lock_fd: int | None = None

    def _new_pipeline(self) -> ImagePipeline:
        return ImagePipeline(
            self.images_dir, self.settings.image, self.settings.image_queue_bytes,
            self.settings.image_writers, self._image_done, self.store.images_guard,
        )

    def _image_done(self, note: Any) -> None:
        w = self._writer
        if w is not None:
            w.note(note)

    # ------------------------------------------------------------------ lifecycle
    def open(self, *, start_writer: bool = True) -> None:
        """Create, migrate or validate the spool. Never raises for a bad disk or database, so the
        line keeps deciding: a corrupt database is quarantined and replaced; an unusable directory
        or a spool of a newer version leaves the spool unhealthy (submit() returns False,
        `last_error` says why).

        start_writer=False opens for inspection only (CLI status): no writer lock, no cleanup, no
        quarantine, no migration; corruption raises SpoolCorrupt, an older or newer schema
        SpoolOutdated / SpoolTooNew. Raises SpoolBusy when another process writes this spool.
        """
        self._closing = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if start_writer:
                self._take_lock()
            self.images_dir.mkdir(exist_ok=True)
            try:
                self.store.open(migrate=start_writer)
            except sqlite3.DatabaseError as exc:
                if not start_writer or not is_corruption(exc):
                    raise
                self._quarantine(str(exc))
                self.store.open()
            if start_writer:
                attached, lost, swept = self.store.reconcile_images(
                    {e.name for e in os.scandir(self.images_dir) if e.is_file()}
                )
                if attached or lost or swept:
                    log.info("uplink_spool_images_reconciled", attached=attached, lost=lost,
                             removed_uncommitted=swept)
        except SpoolBusy:
            raise
        except (SpoolCorrupt, SpoolTooNew, SpoolOutdated) as exc:
            if not start_writer:
                raise
            self._broken = True
            self._errors.report(str(exc) if isinstance(exc, SpoolTooNew)
                                else f"spool at {self.dir} is unusable: {exc}")
            return
        except (OSError, sqlite3.Error) as exc:
            self._broken = True
            self._errors.report(f"spool at {self.dir} cannot be opened: {exc}")
            if not start_writer:
                raise
            return
        self._broken = False
        self._opened = True
        self._writer = Writer(
            self.store, self.settings, on_commit=self._on_commit, errors=self._errors,
            on_housekeeping=self._write_status_file, recover=self._recover,
        )
        if start_writer:
            self._images = self._new_pipeline()
            self._images.start()
            self._writer.start()

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolBusy(
                f"spool {self.dir} is in use by another process (pid {holder}); stop the daemon "
                "for this line before running a second writer (e.g. `edge uplink drain`)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the images in flight, commit what is queued (up to timeout_s), stop the writer,
        close the database."""
        self._closing = True
        end = time.monotonic() + timeout_s
        if not self._images.stop(max(end - time.monotonic(), 0.1)):
            log.error("uplink_spool_images_not_finished", timeout_s=timeout_s,
                      in_flight=self._images.in_flight)
        if self._writer is not None:
            if not self._writer.stop(max(end - time.monotonic(), 0.1)):
                log.error("uplink_spool_writer_did_not_stop", timeout_s=timeout_s,
                          pending=self.pending)
            else:
                self._write_status_file()
        self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._opened = False

    def _quarantine(self, reason: str) -> None:
        dest = self.store.quarantine()
        self._quarantined.append(str(dest))
        self._errors.report(
            f"spool database {self.db_path} is corrupt or unusable ({reason}); moved it and its "
            f"images to {dest} and started a fresh spool. Inspect or delete {dest}: it is not "
            "forwarded and does not count against the quota."
        )

    def _recover(self, reason: str) -> None:
        """Mid-run corruption (called by the writer thread): quarantine and reopen."""
        self._quarantine(reason)
        self.store.open()

    # ------------------------------------------------------------------ producer side
    def _refuse(self) -> bool:
        w = self._writer
        if w is not None:
            with w.cv:
                w.counts.refused += 1
        else:
            with self._lock:
                self._refused_closed += 1
        return False

    def submit(self, event: PartEvent, image: np.ndarray | None = None) -> bool:
        """Enqueue for the writer; O(1), never blocks, no encoding and no I/O on this thread.

        The image is referenced only if it will be stored (every non-OK verdict, OK parts sampled
        by `keep_ok_image`) and only while the image queue holds less than `image_queue_mb`;
        past that the image is dropped and counted, the event is still accepted and says
        `image_dropped: true`. False (and counted) when the event queue is full or the spool is
        broken or closed: the caller's verdict is unaffected either way.
        """
        w = self._writer
        if self._broken or not self._opened or self._closing or w is None or w.stopping:
            return self._refuse()
        want = image is not None and (
            event.verdict != "OK"
            or keep_ok_image(event.line, event.camera, event.part_id,
                             self.settings.ok_image_sample_rate)
        )
        with w.cv:
            n = len(w.items)
            if n >= self.settings.queue_max:
                w.counts.refused += 1
                return False
            kept = False
            if want:
                assert image is not None
                kept = self._images.offer(event.event_id, image)
                if kept:
                    w.awaiting.add(event.event_id)
                else:
                    event.image_dropped = True
            w.items.append(PartItem(event, kept))
            w.counts.submitted += 1
            # Wake the writer for the first item, or when a batch is full; otherwise it is
            # already collecting for up to batch_max_delay_ms (saves a context switch per part).
            if n == 0 or n + 1 >= self.settings.batch_max_events:
                w.cv.notify()
        return True

    def amend(self, event_id: str, changes: dict[str, Any]) -> bool:
        """Record a correction of an already-submitted event; non-blocking like submit().

        The writer patches the original row's payload if it has not been sent yet, AND spools a
        small `kind="amendment"` event (`amends=event_id`, `changes`) so consumers that already
        got the original can apply it. Raises ValueError for fields that cannot be amended (the
        identity of the part); returns False (counted as refused) when the queue is full or the
        spool is broken or closed.
        """
        changes = build_amend_changes(changes)
        w = self._writer
        if self._broken or not self._opened or self._closing or w is None or w.stopping:
            return self._refuse()
        with w.cv:
            n = len(w.items)
            if n >= self.settings.queue_max:
                w.counts.refused += 1
                return False
            w.items.append(AmendItem(event_id, changes))
            w.counts.submitted += 1
            if n == 0:
                w.cv.notify()
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event accepted so far is committed and every accepted image is
        written and attached to its event (or given up); True if so."""
        w = self._writer
        if w is None:
            return True
        end = time.monotonic() + timeout_s
        with w.cv:
            target = w.counts.submitted
            if not w.cv.wait_for(lambda: w.counts.done >= target, timeout_s):
                return False
        if not self._images.wait_idle(max(end - time.monotonic(), 0.0)):
            return False
        with w.cv:
            w.cv.notify_all()
            return w.cv.wait_for(w.settled, max(end - time.monotonic(), 0.0))

    @property
    def pending(self) -> int:
        """Events accepted but not yet committed (cheap: no SQL; fine for a per-frame gauge)."""
        w = self._writer
        return 0 if w is None else len(w.items) + w.in_batch

    @property
    def healthy(self) -> bool:
        w = self._writer
        return (
            self._opened
            and not self._broken
            and w is not None
            and w.alive
            and w.failing_since is None
            and self._images.alive
        )

    # ------------------------------------------------------------------ forwarder side (blocking)
    def unsent_events(self, limit: int) -> list[SpooledEvent]:
        """Oldest unsent events in spool order (call from a worker thread). Rows whose bytes
        cannot be forwarded are moved to the dead-letter table on the way (counted, logged)."""
        rows, _dead = self.store.unsent_events(limit)
        return rows

    def mark_events_sent(self, ids: Sequence[int]) -> None:
        self.store.mark("sent_at", ids)

    def unsent_images(self, limit: int) -> list[SpooledImage]:
        rows, _dead = self.store.unsent_images(limit)
        return rows

    def mark_images_sent(self, ids: Sequence[int]) -> None:
        self.store.mark("image_sent_at", ids)

    def dead_letter_rows(self, rows: Sequence[tuple[int, str]]) -> None:
        """Move rows the broker refused for good (e.g. too large) to the dead-letter table."""
        if rows:
            with self.store.reader() as conn, conn:
                for rid, reason in rows:
                    self.store.dead_letter(conn, rid, reason)

    def mark_image_lost(self, image_id: int, reason: str) -> None:
        """The file vanished (evicted meanwhile or removed by hand): stop retrying it. Logged at
        most once a minute with the count: under quota pressure this happens per image."""
        self.store.mark_image_lost(image_id)
        with self._lock:
            self._lost_unlogged += 1
            now = time.monotonic()
            if now - self._lost_logged_at < 60.0:
                return
            count, self._lost_unlogged, self._lost_logged_at = self._lost_unlogged, 0, now
        log.warning("uplink_images_lost", count=count, last_id=image_id, last_reason=reason)

    # ------------------------------------------------------------------ observability
    def bytes_used(self, conn: sqlite3.Connection | None = None) -> int:
        return self.store.bytes_used(conn)

    def backlog(self) -> dict[str, Any]:
        """Unsent counts, oldest unsent ages, evictions and dead letters, from the database."""
        return self.store.backlog()

    def rates(self, window_s: float = 60.0) -> dict[str, float]:
        return self.store.rates(window_s)

    def alarms(self, stats: dict[str, Any] | None = None) -> list[str]:
        """Reasons to raise the uplink alarm (health, metrics, PLC), empty when all is well."""
        s = stats if stats is not None else self.stats()
        out: list[str] = []
        if not self.healthy:
            out.append("spool unhealthy: " + (self._errors.text or "not running"))
        unsent_fraction = s.get("unsent_bytes", 0) / self.settings.quota_bytes
        if unsent_fraction >= self.settings.alarm_fraction:
            out.append(f"unsent data fills {unsent_fraction:.0%} of the spool quota")
        if s.get("unsent_events", 0) >= self.settings.alarm_backlog_events:
            out.append(f"{s['unsent_events']} unsent events")
        if s.get("oldest_unsent_age_s", 0.0) >= self.settings.alarm_oldest_unsent_s:
            out.append(f"oldest unsent data is {s['oldest_unsent_age_s']:.0f}s old")
        evicted = s.get("evicted", {})
        if evicted.get("unsent_ok", 0) or evicted.get("defect", 0):
            out.append("unsent events were evicted for lack of disk")
        if s.get("dead_lettered", 0):
            out.append(f"{s['dead_lettered']} corrupt rows in the dead-letter table")
        return out

    def counters(self) -> dict[str, Any]:
        """The in-memory counters (no SQL): cheap enough for a per-second status line."""
        w = self._writer
        img = self._images
        with self._lock:
            refused_closed = self._refused_closed
        if w is None:
            return {"pending": 0, "submitted": 0, "committed": 0, "refused": refused_closed,
                    "healthy": self.healthy}
        with w.cv:
            c = w.counts
            return {
                "pending": len(w.items) + w.in_batch,
                "submitted": c.submitted,
                "committed": c.committed,
                "refused": c.refused + refused_closed,
                "amendments": c.amendments,
                "amended_in_place": c.amended_in_place,
                "malformed": c.malformed,
                "images_accepted": img.accepted,
                "images_written": img.written,
                "images_dropped": img.dropped,
                "image_errors": img.errors,
                "image_bytes_held": img.held_bytes,
                "image_queue_bytes": img.bound_bytes,
                "commit_failing": w.failing_since is not None,
                "commit_failing_since": w.failing_since,
                "commit_failures": c.commit_failures,
                "healthy": self.healthy,
            }

    def stats(self) -> dict[str, Any]:
        """Counters + database backlog + disk use (runs SQL: call from a worker thread)."""
        out: dict[str, Any] = self.counters()
        try:
            out.update(self.backlog())
        except sqlite3.Error as exc:
            out.update(unsent_events=-1, unsent_images=-1, oldest_unsent_age_s=0.0,
                       backlog_error=str(exc))
        try:
            with self.store.reader() as conn:
                used = self.bytes_used(conn)
        except (OSError, sqlite3.Error):
            used = -1
        wal = self.db_path.with_name(DB_NAME + "-wal")
        try:
            out["wal_bytes"] = wal.stat().st_size
        except OSError:
            out["wal_bytes"] = 0
        out.update(
            bytes_used=used,
            quota_bytes=self.settings.quota_bytes,
            usage_fraction=round(used / self.settings.quota_bytes, 4) if used >= 0 else 0.0,
            last_error=self._errors.text,
            last_error_at=self._errors.at,
            quarantined=list(self._quarantined),
            spool_dir=str(self.dir),
            schema_version=SPOOL_SCHEMA_VERSION,
        )
        out["alarms"] = self.alarms(out)
        return out

    def _write_status_file(self) -> None:
        """What another process (`edge uplink status`) cannot read from the database."""
        doc = {"written_at": time.time(), "pid": os.getpid(), "line": self.line,
               **self.counters(), "last_error": self._errors.text,
               "last_error_at": self._errors.at, "quarantined": self._quarantined}
        write_status(self.dir / SPOOL_STATUS, doc)


def write_status(path: Path, doc: dict[str, Any]) -> None:
    """Small JSON status beside the spool, replaced atomically (no fsync: it is advisory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("uplink_status_file_not_written", path=str(path), error=str(exc))


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def read_payload(payload: str) -> dict[str, Any]:
    """Decode a stored event (helper for tools and tests)."""
    result: dict[str, Any] = json.loads(payload)
    return result
