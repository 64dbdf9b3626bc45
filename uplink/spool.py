"""The durable spool: events in SQLite (WAL) and images as files beside it.

Why this shape: the critical path must never wait on disk, so `submit()` only enqueues and one
writer thread owns every insert, batching many events per fsync'd commit. A committed row is the
durability line: images are written and fsynced (tmp + fsync + rename + dir fsync) BEFORE the row
that references them commits, so a committed event never points at a missing file, and `kill -9`
can only lose what was not yet committed. A corrupt database is moved aside (with its images) and a
fresh spool is created so the line keeps deciding; the fault shows on `healthy`, `stats()` and logs.

Eviction order under quota pressure (docs/uplink.md):
  1. OK sample images (sent ones first, then oldest unsent);
  2. sent data (events acknowledged by Kafka whose image, if any, is uploaded);
  3. the oldest unsent OK events;
  4. defect / fail-safe events and their images, oldest first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import sqlite_utils
import structlog

from uplink.config import UplinkSettings
from uplink.event import PartEvent

log = structlog.get_logger(__name__)

SPOOL_SCHEMA_VERSION = 1
DB_NAME = "spool.db"
IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
SPOOL_STATUS = "spool.status.json"
FORWARDER_STATUS = "forwarder.status.json"

EVICTION_CLASSES = ("ok_images", "sent", "unsent_ok", "defect")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    line TEXT NOT NULL,
    camera TEXT NOT NULL,
    part_id INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    defect INTEGER NOT NULL,
    spooled_at REAL NOT NULL,
    payload TEXT NOT NULL,
    sent_at REAL,
    image_state TEXT NOT NULL DEFAULT 'none',
    image_kind TEXT,
    image_file TEXT,
    image_key TEXT,
    image_bytes INTEGER NOT NULL DEFAULT 0,
    image_sent_at REAL
);
CREATE INDEX IF NOT EXISTS events_unsent ON events(id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS events_img_pending ON events(id) WHERE image_state = 'pending';
CREATE INDEX IF NOT EXISTS events_sent ON events(sent_at) WHERE sent_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
PRAGMA user_version = {SPOOL_SCHEMA_VERSION};
"""


class SpoolCorrupt(sqlite3.DatabaseError):
    """The database file cannot be used as a spool (corrupt or of another schema)."""


class SpoolBusy(RuntimeError):
    """Another process holds this spool's writer lock (a second daemon, or a drain running)."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One committed event as the forwarder sees it."""

    id: int
    event_id: str
    line: str
    camera: str
    payload: str


@dataclass(frozen=True, slots=True)
class SpooledImage:
    id: int
    event_id: str
    line: str
    camera: str
    verdict: str
    part_id: int
    image_kind: str
    path: Path
    key: str
    payload: str


def keep_ok_image(line: str, camera: str, part_id: int, rate: float) -> bool:
    """Deterministic per part: replays and restarts sample the same OK parts (no RNG state)."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.blake2b(f"{line}/{camera}/{part_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in part) or "_"


def object_key(
    prefix: str, line: str, camera: str, event_id: str, captured_at: str, ext: str
) -> str:
    """S3 key layout: <prefix><line>/<YYYY-MM-DD>/<camera>/<event_id>.<ext> (UTC capture date)."""
    try:
        day = datetime.fromisoformat(captured_at.replace("Z", "+00:00"))
        if day.tzinfo is not None:
            day = day.astimezone(timezone.utc)
        date = day.strftime("%Y-%m-%d")
    except ValueError:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return f"{prefix}{_safe(line)}/{date}/{_safe(camera)}/{_safe(event_id)}.{ext}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, SpoolCorrupt):
        return True
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


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
        self.db_path = self.dir / DB_NAME
        self.images_dir = self.dir / IMAGES_DIR
        self._on_commit = on_commit
        self._queue: queue.Queue[tuple[PartEvent, np.ndarray | None]] = queue.Queue(
            maxsize=settings.queue_max
        )
        self._count_lock = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._refused = 0
        self._committed = 0
        self._image_errors = 0
        self._images_written = 0
        self._in_batch = 0
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.RLock()
        self._image_bytes = 0
        self._opened = False
        self._broken = False
        self._failing = False
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._quarantined: list[str] = []
        self._last_housekeeping = 0.0
        self._writer_mode = True
        self._images = ThreadPoolExecutor(settings.image_writers, "uplink-image")
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self, *, start_writer: bool = True) -> None:
        """Create or validate the spool. Never raises for a bad disk or database, so the line
        keeps deciding: a corrupt database is quarantined and replaced; an unusable directory
        leaves the spool unhealthy (submit() returns False, `last_error` says why).

        start_writer=False opens for inspection only (CLI status): no writer lock, no cleanup,
        no quarantine; corruption then raises SpoolCorrupt. Raises SpoolBusy when another
        process already writes this spool.
        """
        self._writer_mode = start_writer
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if start_writer:
                self._take_lock()
            self.images_dir.mkdir(exist_ok=True)
            try:
                self._connect_and_check()
            except sqlite3.DatabaseError as exc:
                if not start_writer or not _is_corruption(exc):
                    raise
                self._quarantine(str(exc))
                self._connect_and_check()
            if start_writer:
                self._sweep_images()
        except SpoolBusy:
            raise
        except SpoolCorrupt:
            if not start_writer:
                raise
            self._broken = True
            self._error(f"spool at {self.dir} is unusable")
            return
        except (OSError, sqlite3.Error) as exc:
            self._broken = True
            self._error(f"spool at {self.dir} cannot be opened: {exc}")
            if not start_writer:
                raise
            return
        self._broken = False
        self._opened = True
        if start_writer:
            self._stop.clear()
            self._writer = threading.Thread(target=self._run_writer, name="uplink-spool-writer",
                                            daemon=True)
            self._writer.start()

    def _take_lock(self) -> None:
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
        """Commit what is queued (up to timeout_s), stop the writer, close the database."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout_s)
            if self._writer.is_alive():
                log.error("uplink spool writer did not stop in time", timeout_s=timeout_s,
                          pending=self._queue.qsize())
            self._writer = None
        self._images.shutdown(wait=True)
        self._images = ThreadPoolExecutor(self.settings.image_writers, "uplink-image")
        with self._rlock:
            for conn in (self._wconn, self._rconn):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._wconn = self._rconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._opened = False

    # ------------------------------------------------------------------ producer side
    def submit(self, event: PartEvent, image: np.ndarray | None = None) -> bool:
        """Enqueue for the writer; never blocks. False (and counted) when full or broken."""
        if self._broken or not self._opened or self._stop.is_set():
            with self._count_lock:
                self._refused += 1
            return False
        try:
            self._queue.put_nowait((event, image))
        except queue.Full:
            with self._count_lock:
                self._refused += 1
            return False
        with self._count_lock:
            self._submitted += 1
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event accepted so far is committed (or given up); True if so."""
        with self._count_lock:
            target = self._submitted
            return self._count_lock.wait_for(lambda: self._done >= target, timeout_s)

    @property
    def pending(self) -> int:
        """Events accepted but not yet committed (cheap: no SQL; fine for a per-frame gauge)."""
        return self._queue.qsize() + self._in_batch

    @property
    def healthy(self) -> bool:
        return (
            self._opened
            and not self._broken
            and not self._failing
            and self._writer is not None
            and self._writer.is_alive()
        )

    # ------------------------------------------------------------------ database plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def _connect_and_check(self) -> None:
        fresh = not self.db_path.exists() or self.db_path.stat().st_size == 0
        conn = self._connect()
        try:
            if fresh:
                # Must precede the first table: lets evicted pages go back to the filesystem.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL on {self.db_path} (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA journal_size_limit = 16777216")
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise SpoolCorrupt(f"quick_check failed: {check[:3]}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if tables - {"sqlite_sequence"} and version != SPOOL_SCHEMA_VERSION:
                raise SpoolCorrupt(
                    f"spool schema version {version} is not {SPOOL_SCHEMA_VERSION}"
                )
            conn.executescript(_SCHEMA)
            db = sqlite_utils.Database(conn)
            if "events" not in db.table_names():
                raise SpoolCorrupt("events table missing after creation")
        except BaseException:
            conn.close()
            raise
        self._wconn = conn
        rconn = self._connect()
        rconn.execute("PRAGMA synchronous = FULL")
        with self._rlock:
            old = self._rconn
            self._rconn = rconn
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        row = conn.execute(
            "SELECT COALESCE(SUM(image_bytes), 0) FROM events "
            "WHERE image_state IN ('pending', 'sent')"
        ).fetchone()
        self._image_bytes = int(row[0])

    def _quarantine(self, reason: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.dir / QUARANTINE_DIR / stamp
        dest.mkdir(parents=True, exist_ok=True)
        with self._rlock:
            for conn in (self._wconn, self._rconn):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._wconn = None
            self._rconn = None
        for suffix in ("", "-wal", "-shm"):
            src = self.db_path.with_name(DB_NAME + suffix)
            if src.exists():
                os.replace(src, dest / src.name)
        if self.images_dir.exists():
            os.replace(self.images_dir, dest / IMAGES_DIR)
        self.images_dir.mkdir(exist_ok=True)
        _fsync_dir(self.dir)
        self._quarantined.append(str(dest))
        self._error(
            f"spool database {self.db_path} is corrupt or unusable ({reason}); moved it and its "
            f"images to {dest} and started a fresh spool. Inspect or delete {dest}: it is not "
            "forwarded and does not count against the quota."
        )

    def _sweep_images(self) -> None:
        """Drop temp files and images whose event never committed (a kill -9 between the two)."""
        assert self._wconn is not None
        known = {r[0] for r in self._wconn.execute(
            "SELECT image_file FROM events WHERE image_file IS NOT NULL "
            "AND image_state IN ('pending', 'sent')"
        )}
        removed = 0
        for entry in os.scandir(self.images_dir):
            if entry.name not in known:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            log.info("uplink spool removed uncommitted image files", count=removed)

    def _error(self, message: str) -> None:
        self._last_error = message
        self._last_error_at = time.time()
        log.error("uplink spool error", error=message)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._rlock:
            if self._rconn is None:
                raise sqlite3.OperationalError("spool is not open")
            yield self._rconn

    # ------------------------------------------------------------------ writer thread
    def _run_writer(self) -> None:
        delay = self.settings.batch_max_delay_ms / 1000.0
        while True:
            try:
                first = self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._housekeeping()
                continue
            batch = [first]
            deadline = time.monotonic() + delay
            while len(batch) < self.settings.batch_max_events:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(
                        self._queue.get(timeout=remaining) if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            self._in_batch = len(batch)
            try:
                self._write_batch(batch)
            except Exception as exc:  # the writer must survive anything to keep the line alive
                self._error(f"uplink writer failed on a batch of {len(batch)}: {exc!r}")
            finally:
                self._in_batch = 0
                self._mark_done(len(batch))  # after eviction too: flush() sees a settled spool
            self._housekeeping()

    def _mark_done(self, n: int) -> None:
        with self._count_lock:
            self._done += n
            self._count_lock.notify_all()

    def _wants_image(self, event: PartEvent, image: np.ndarray | None) -> bool:
        if image is None:
            return False
        return event.verdict != "OK" or keep_ok_image(
            event.line, event.camera, event.part_id, self.settings.ok_image_sample_rate
        )

    def _store_image(self, event: PartEvent, image: np.ndarray) -> tuple[str, int] | None:
        """Encode and write one image durably (runs in the image pool: encode and fsync release
        the GIL, so several images of a batch overlap their fsyncs)."""
        try:
            data = self._encode(image)
            name = f"{_safe(event.event_id)}.{self.settings.image.extension}"
            _write_atomic(self.images_dir / name, data)
        except (OSError, ValueError, cv2.error) as exc:
            with self._count_lock:
                self._image_errors += 1
            self._error(f"image of event {event.event_id} not stored: {exc}")
            return None
        return name, len(data)

    def _prepare(self, event: PartEvent, stored: tuple[str, int] | None, now: float
                 ) -> dict[str, Any]:
        defect = event.verdict != "OK"
        row: dict[str, Any] = {
            "event_id": event.event_id, "line": event.line, "camera": event.camera,
            "part_id": int(event.part_id), "sequence": int(event.sequence),
            "verdict": event.verdict, "defect": int(defect), "spooled_at": now,
            "sent_at": None, "image_state": "none", "image_kind": None, "image_file": None,
            "image_key": None, "image_bytes": 0, "image_sent_at": None,
        }
        if stored is not None:
            name, size = stored
            key = object_key(
                self.settings.s3.key_prefix if self.settings.s3 else "",
                event.line, event.camera, event.event_id, event.captured_at,
                self.settings.image.extension,
            )
            event.image_ref = key
            row.update(image_state="pending", image_kind="defect" if defect else "ok_sample",
                       image_file=name, image_key=key, image_bytes=size)
        try:
            row["payload"] = event.to_json()
        except (TypeError, ValueError):
            if row["image_file"]:
                with contextlib.suppress(OSError):
                    os.unlink(self.images_dir / row["image_file"])
            raise
        return row

    def _encode(self, image: np.ndarray) -> bytes:
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(
                f"image must be a non-empty HxW or HxWxC numpy array, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        img = self.settings.image
        if img.format == "png":
            params = [cv2.IMWRITE_PNG_COMPRESSION, img.png_compression]
            ok, buf = cv2.imencode(".png", image, params)
        else:
            if image.dtype != np.uint8:
                raise ValueError(f"JPEG needs uint8 pixels, got {image.dtype}")
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, img.jpeg_quality])
        if not ok:
            raise ValueError("OpenCV could not encode the image")
        return bytes(buf.tobytes())

    def _write_batch(self, batch: list[tuple[PartEvent, np.ndarray | None]]) -> None:
        now = time.time()
        rows: list[dict[str, Any]] = []
        jobs = {
            i: self._images.submit(self._store_image, ev, img)
            for i, (ev, img) in enumerate(batch)
            if img is not None and self._wants_image(ev, img)
        }
        for i, (event, _image) in enumerate(batch):
            stored = jobs[i].result() if i in jobs else None
            try:
                rows.append(self._prepare(event, stored, now))
            except (TypeError, ValueError) as exc:
                self._error(f"event {getattr(event, 'event_id', '?')} is malformed, dropped: {exc}")
        if any(r["image_file"] for r in rows):
            _fsync_dir(self.images_dir)
        backoff = self.settings.backoff_initial_s
        attempts = 0
        while True:
            try:
                self._insert(rows)
                break
            except sqlite3.DatabaseError as exc:
                attempts += 1
                if _is_corruption(exc) and attempts <= 3:
                    self._recover_from_corruption(str(exc), rows)
                    continue
                self._failing = True
                self._error(f"spool commit failed (attempt {attempts}), retrying: {exc}")
                if self._stop.is_set() and attempts >= 3:
                    # Shutting down and still failing: give up on this batch, loudly.
                    self._error(f"spool gave up on {len(rows)} uncommitted events at shutdown")
                    return
                time.sleep(min(backoff, 0.5) if self._stop.is_set() else backoff)
                backoff = min(backoff * 2, self.settings.backoff_max_s)
        self._failing = False
        with self._count_lock:
            self._committed += len(rows)
            self._images_written += sum(1 for r in rows if r["image_file"])
        self._image_bytes += sum(r["image_bytes"] for r in rows)
        if self._on_commit is not None and rows:
            try:
                self._on_commit([r["event_id"] for r in rows])
            except Exception as exc:
                log.warning("uplink on_commit hook failed", error=repr(exc))
        try:
            self._enforce_quota()
        except sqlite3.DatabaseError as exc:
            self._error(f"spool eviction failed (will retry on the next commit): {exc}")

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        if self._wconn is None:
            raise SpoolCorrupt("no database connection")
        db = sqlite_utils.Database(self._wconn)
        with self._wconn:
            db.table("events").insert_all(rows, ignore=True, batch_size=len(rows) or 1)

    def _recover_from_corruption(self, reason: str, rows: list[dict[str, Any]]) -> None:
        """Mid-run corruption: move the DB aside, start fresh, re-home this batch's images."""
        keep: dict[str, bytes] = {}
        for r in rows:
            if r["image_file"]:
                with contextlib.suppress(OSError):
                    keep[r["image_file"]] = (self.images_dir / r["image_file"]).read_bytes()
        self._quarantine(reason)
        self._connect_and_check()
        for name, data in keep.items():
            _write_atomic(self.images_dir / name, data)
        for r in rows:
            if r["image_file"] and r["image_file"] not in keep:
                r.update(image_state="none", image_kind=None, image_file=None, image_bytes=0)
        if keep:
            _fsync_dir(self.images_dir)

    # ------------------------------------------------------------------ quota / housekeeping
    def bytes_used(self, conn: sqlite3.Connection | None = None) -> int:
        """What the quota counts: live database pages + image files. Free pages are reused before
        the file grows and are returned by incremental vacuum; the WAL is bounded separately by
        SQLite's auto-checkpoint and journal_size_limit (a few MB), see `wal_bytes` in stats."""
        conn = conn or self._wconn
        db_bytes = 0
        if conn is not None:
            try:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                db_bytes = (pages - free) * page_size
            except sqlite3.Error:
                db_bytes = self.db_path.stat().st_size if self.db_path.exists() else 0
        return db_bytes + self._image_bytes

    def _enforce_quota(self) -> None:
        quota = self.settings.quota_bytes
        if self._wconn is None or self.bytes_used() <= quota:
            return
        target = int(quota * self.settings.evict_to_fraction)
        evicted: dict[str, int] = {}
        for cls in EVICTION_CLASSES:
            while (used := self.bytes_used()) > target:
                n = self._evict_chunk(cls, used - target)
                if n == 0:
                    break
                evicted[cls] = evicted.get(cls, 0) + n
            if self.bytes_used() <= target:
                break
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA incremental_vacuum").fetchall()
        if evicted:
            log.warning("uplink spool over quota: evicted", quota_bytes=quota,
                        used_bytes=self.bytes_used(), **evicted)
            if any(k in evicted for k in ("unsent_ok", "defect")):
                self._error(f"spool quota exceeded: evicted UNSENT data {evicted}")

    def _evict_chunk(self, cls: str, need: int) -> int:
        """Evict the oldest items of one class until about `need` bytes are freed (one
        transaction, at most 2000 rows); returns how many."""
        conn = self._wconn
        assert conn is not None
        cols = "SELECT id, image_file, image_bytes, LENGTH(payload) FROM events "
        where = {
            "ok_images": "WHERE image_kind = 'ok_sample' AND image_state IN ('pending', 'sent') "
                         "ORDER BY image_state = 'pending', id",
            "sent": "WHERE sent_at IS NOT NULL AND image_state != 'pending' ORDER BY id",
            "unsent_ok": "WHERE sent_at IS NULL AND defect = 0 ORDER BY id",
            "defect": "ORDER BY id",
        }[cls]
        sel = cols + where + " LIMIT ?"
        candidates = conn.execute(sel, (2000,)).fetchall()
        if not candidates:
            return 0
        rows, freed = [], 0
        for r in candidates:  # a byte-sized prefix: never evict far more than needed
            rows.append(r)
            freed += int(r[2] or 0) + (0 if cls == "ok_images" else int(r[3] or 0) + 100)
            if freed >= need:
                break
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        with conn:
            if cls == "ok_images":
                conn.execute(
                    "UPDATE events SET image_state = 'evicted', image_bytes = 0 "
                    f"WHERE id IN ({marks})",
                    ids,
                )
            else:
                conn.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
            conn.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (f"evicted_{cls}", len(ids)),
            )
        for _id, name, size, _len in rows:
            if name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.images_dir / name)
                self._image_bytes -= int(size or 0)
        self._image_bytes = max(self._image_bytes, 0)
        return len(ids)

    def _housekeeping(self) -> None:
        """Every few seconds: drop sent data past retention, checkpoint the WAL, re-check quota."""
        now = time.monotonic()
        if now - self._last_housekeeping < 5.0 or self._wconn is None:
            return
        self._last_housekeeping = now
        cutoff = time.time() - self.settings.sent_retention_h * 3600
        try:
            rows = self._wconn.execute(
                "SELECT id, image_file, image_bytes, image_state FROM events "
                "WHERE sent_at IS NOT NULL AND sent_at < ? AND image_state != 'pending' LIMIT 5000",
                (cutoff,),
            ).fetchall()
            if rows:
                ids = [r[0] for r in rows]
                with self._wconn:
                    self._wconn.execute(
                        f"DELETE FROM events WHERE id IN ({','.join('?' * len(ids))})", ids
                    )
                for _id, name, size, state in rows:
                    if name and state == "sent":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.images_dir / name)
                        self._image_bytes -= int(size or 0)
                self._wconn.execute("PRAGMA incremental_vacuum").fetchall()
            self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._enforce_quota()
            self._write_status_file()
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                self._recover_from_corruption(str(exc), [])
            else:
                self._error(f"spool housekeeping failed: {exc}")

    def _write_status_file(self) -> None:
        """What another process (`edge uplink status`) cannot read from the database."""
        with self._count_lock:
            doc = {
                "written_at": time.time(), "pid": os.getpid(), "line": self.line,
                "healthy": self.healthy, "submitted": self._submitted,
                "committed": self._committed, "refused": self._refused,
                "image_errors": self._image_errors, "last_error": self._last_error,
                "last_error_at": self._last_error_at, "quarantined": self._quarantined,
            }
        write_status(self.dir / SPOOL_STATUS, doc)

    # ------------------------------------------------------------------ forwarder side (blocking)
    def unsent_events(self, limit: int) -> list[SpooledEvent]:
        """Oldest unsent events in spool order (call from a worker thread)."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id, event_id, line, camera, payload FROM events WHERE sent_at IS NULL "
                "ORDER BY id LIMIT ?", (limit,),
            ).fetchall()
        return [SpooledEvent(*r) for r in rows]

    def mark_events_sent(self, ids: Sequence[int]) -> None:
        self._mark("sent_at", ids)

    def unsent_images(self, limit: int) -> list[SpooledImage]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id, event_id, line, camera, verdict, part_id, image_kind, image_file, "
                "image_key, payload FROM events WHERE image_state = 'pending' ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            SpooledImage(r[0], r[1], r[2], r[3], r[4], r[5], r[6], self.images_dir / r[7], r[8],
                         r[9])
            for r in rows
        ]

    def mark_images_sent(self, ids: Sequence[int]) -> None:
        self._mark("image_sent_at", ids)

    def mark_image_lost(self, image_id: int, reason: str) -> None:
        """The file vanished (evicted meanwhile or removed by hand): stop retrying it."""
        with self._reader() as conn, conn:
            conn.execute("UPDATE events SET image_state = 'lost', image_bytes = 0 WHERE id = ? "
                         "AND image_state = 'pending'", (image_id,))
        log.warning("uplink image lost", id=image_id, reason=reason)

    def _mark(self, column: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self._reader() as conn, conn:
            for start in range(0, len(ids), 500):
                part = list(ids[start:start + 500])
                marks = ",".join("?" * len(part))
                if column == "sent_at":
                    conn.execute(
                        f"UPDATE events SET sent_at = ? WHERE id IN ({marks}) AND sent_at IS NULL",
                        [now, *part],
                    )
                else:
                    conn.execute(
                        f"UPDATE events SET image_sent_at = ?, image_state = 'sent' "
                        f"WHERE id IN ({marks}) AND image_state = 'pending'",
                        [now, *part],
                    )

    # ------------------------------------------------------------------ observability
    def backlog(self) -> dict[str, Any]:
        """Unsent counts and the oldest unsent age, straight from the database."""
        with self._reader() as conn:
            unsent, oldest = conn.execute(
                "SELECT COUNT(*), MIN(spooled_at) FROM events WHERE sent_at IS NULL"
            ).fetchone()
            unsent_images, oldest_img, img_bytes = conn.execute(
                "SELECT COUNT(*), MIN(spooled_at), COALESCE(SUM(image_bytes), 0) FROM events "
                "WHERE image_state = 'pending'"
            ).fetchone()
            ev_bytes = conn.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM events WHERE sent_at IS NULL"
            ).fetchone()[0]
            total = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        now = time.time()
        ages = [now - t for t in (oldest, oldest_img) if t is not None]
        return {
            "events_stored": int(total),
            "unsent_events": int(unsent),
            "unsent_images": int(unsent_images),
            "oldest_unsent_age_s": round(max(ages), 3) if ages else 0.0,
            # What eviction could not take without losing undelivered data (approximate for
            # events: payload bytes, not pages); the disk alarm is based on this, because sent
            # data filling the quota is normal and is evicted first.
            "unsent_bytes": int(img_bytes) + int(ev_bytes),
            "evicted": {c: int(counters.get(f"evicted_{c}", 0)) for c in EVICTION_CLASSES},
        }

    def rates(self, window_s: float = 60.0) -> dict[str, float]:
        """Spooled / sent per second over the last window, from the database (any process)."""
        since = time.time() - window_s
        with self._reader() as conn:
            spooled = conn.execute(
                "SELECT COUNT(*) FROM events WHERE spooled_at > ?", (since,)
            ).fetchone()[0]
            sent = conn.execute(
                "SELECT COUNT(*) FROM events WHERE sent_at > ?", (since,)
            ).fetchone()[0]
            images = conn.execute(
                "SELECT COUNT(*) FROM events WHERE image_sent_at > ?", (since,)
            ).fetchone()[0]
        return {
            "spooled_per_s": round(spooled / window_s, 2),
            "sent_per_s": round(sent / window_s, 2),
            "images_sent_per_s": round(images / window_s, 3),
        }

    def alarms(self, stats: dict[str, Any] | None = None) -> list[str]:
        """Reasons to raise the uplink alarm (health, metrics, PLC), empty when all is well."""
        s = stats if stats is not None else self.stats()
        out: list[str] = []
        if not self.healthy:
            out.append("spool unhealthy: " + (self._last_error or "not running"))
        unsent_fraction = s.get("unsent_bytes", 0) / self.settings.quota_bytes
        if unsent_fraction >= self.settings.alarm_fraction:
            out.append(f"unsent data fills {unsent_fraction:.0%} of the spool quota")
        if s.get("unsent_events", 0) >= self.settings.alarm_backlog_events:
            out.append(f"{s['unsent_events']} unsent events")
        if s.get("oldest_unsent_age_s", 0.0) >= self.settings.alarm_oldest_unsent_s:
            out.append(f"oldest unsent data is {s['oldest_unsent_age_s']:.0f}s old")
        if s.get("evicted", {}).get("unsent_ok", 0) or s.get("evicted", {}).get("defect", 0):
            out.append("unsent events were evicted for lack of disk")
        return out

    def stats(self) -> dict[str, Any]:
        with self._count_lock:
            counts = {
                "pending": self.pending,
                "submitted": self._submitted,
                "committed": self._committed,
                "refused": self._refused,
                "images_written": self._images_written,
                "image_errors": self._image_errors,
            }
        out: dict[str, Any] = {**counts, "healthy": self.healthy}
        try:
            out.update(self.backlog())
        except sqlite3.Error as exc:
            out.update(unsent_events=-1, unsent_images=-1, oldest_unsent_age_s=0.0,
                       backlog_error=str(exc))
        try:
            with self._reader() as conn:
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
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            quarantined=list(self._quarantined),
            spool_dir=str(self.dir),
        )
        out["alarms"] = self.alarms(out)
        return out


def write_status(path: Path, doc: dict[str, Any]) -> None:
    """Small JSON status beside the spool, replaced atomically (no fsync: it is advisory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("uplink status file not written", path=str(path), error=str(exc))


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
