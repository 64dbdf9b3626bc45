"""The spool's SQLite database: schema, versioned migrations, connections and queries.

Why migrations and not "quarantine what does not match": a line PC that is updated with unsent
events on disk must forward them after the update. Each schema change is a function from version N
to N+1, run in one transaction at `open()`; a spool written by a NEWER version is left untouched
(unhealthy, with an error naming both versions) rather than moved aside, because it is not corrupt.
Quarantine is only for a database SQLite itself says is damaged.

Why every forwarder read is defensive: a row can pass `PRAGMA quick_check` and still hold bytes that
are not UTF-8, not JSON, or a NUL-filled payload (a bad disk block, a hand edit). Such rows are
moved to `dead_letter` with the reason, so one bad row can never stop the forwarding of the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from uplink.images import DirGuard, fsync_dir

log = structlog.get_logger(__name__)

SPOOL_SCHEMA_VERSION = 2
DB_NAME = "spool.db"
IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
DEAD_LETTER_DIR = "dead_letter"

# image_state: none | writing (accepted, file not yet durable) | pending (file durable, not
# uploaded) | sent | evicted | lost (file vanished or its write failed)
_EVENTS_V2 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    line TEXT NOT NULL,
    camera TEXT NOT NULL,
    part_id INTEGER NOT NULL,
    sequence INTEGER,
    verdict TEXT NOT NULL,
    defect INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'part',
    spooled_at REAL NOT NULL,
    payload TEXT NOT NULL,
    sent_at REAL,
    image_state TEXT NOT NULL DEFAULT 'none',
    image_kind TEXT,
    image_file TEXT,
    image_key TEXT,
    image_bytes INTEGER NOT NULL DEFAULT 0,
    image_sent_at REAL
)"""
_EVENTS_V2_COLUMNS = (
    "id, event_id, line, camera, part_id, sequence, verdict, defect, kind, spooled_at, payload, "
    "sent_at, image_state, image_kind, image_file, image_key, image_bytes, image_sent_at"
)
_V2_EXTRAS = """
CREATE INDEX IF NOT EXISTS events_unsent ON events(id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS events_img_pending ON events(id) WHERE image_state = 'pending';
CREATE INDEX IF NOT EXISTS events_img_writing ON events(id) WHERE image_state = 'writing';
CREATE INDEX IF NOT EXISTS events_sent ON events(sent_at) WHERE sent_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_rowid INTEGER,
    event_id BLOB,
    line BLOB,
    camera BLOB,
    payload BLOB,
    image_file TEXT,
    image_key BLOB,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """v2: nullable sequence (a record that never went on the wire has none), `kind`, the
    'writing' image state, and the dead-letter table. SQLite cannot drop NOT NULL in place, so
    the table is rebuilt; ids are kept (AUTOINCREMENT continues above them)."""
    conn.execute(_EVENTS_V2.replace("CREATE TABLE events", "CREATE TABLE events_v2"))
    conn.execute(
        f"INSERT INTO events_v2 ({_EVENTS_V2_COLUMNS}) SELECT id, event_id, line, camera, "
        "part_id, sequence, verdict, defect, 'part', spooled_at, payload, sent_at, image_state, "
        "image_kind, image_file, image_key, image_bytes, image_sent_at FROM events"
    )
    conn.execute("DROP TABLE events")
    conn.execute("ALTER TABLE events_v2 RENAME TO events")
    for stmt in _V2_EXTRAS.split(";"):
        if stmt.strip():
            conn.execute(stmt)


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2}
"""from-version -> step to the next version; each step runs inside the upgrade transaction."""


class SpoolCorrupt(sqlite3.DatabaseError):
    """The database file cannot be used as a spool (SQLite reports it damaged)."""


class SpoolTooNew(sqlite3.DatabaseError):
    """The spool was written by a newer version of this software; it is left as it is."""


class SpoolOutdated(sqlite3.DatabaseError):
    """Opened for inspection only, and the spool still needs a migration (done by a writer)."""


class SpoolBusy(RuntimeError):
    """Another process holds this spool's writer lock (a second daemon, or a drain running)."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One committed event as the forwarder sees it (already validated)."""

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


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, SpoolCorrupt):
        return True
    if isinstance(exc, SpoolTooNew):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _text(value: Any, what: str) -> str:
    """A column read as bytes -> str, or ValueError naming what is wrong with it."""
    if value is None:
        raise ValueError(f"{what} is NULL")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    if "\x00" in value:
        raise ValueError(f"{what} contains NUL bytes")
    return value


def check_payload(payload_raw: Any, event_id: str) -> str:
    """The payload as the exact text to forward, or ValueError saying why it cannot be."""
    payload = _text(payload_raw, "payload")
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"payload is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"payload is JSON {type(doc).__name__}, not an object")
    if doc.get("event_id") != event_id:
        raise ValueError(f"payload event_id {doc.get('event_id')!r} does not match the row")
    return payload


class Store:
    """Connections to one spool database: `wconn` for the writer thread, `rconn` (under a lock)
    for the forwarder and stats. `image_bytes` mirrors SUM(image_bytes) of live files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.db_path = directory / DB_NAME
        self.images_dir = directory / IMAGES_DIR
        self.wconn: sqlite3.Connection | None = None
        self.rconn: sqlite3.Connection | None = None
        self.rlock = threading.RLock()
        self.image_bytes = 0
        """Guarded by `_bytes_lock`: the writer and the forwarder threads both adjust it."""
        self._bytes_lock = threading.Lock()
        self.migrated_from: int | None = None
        self.busy_timeout_s = 10.0
        self.images_guard = DirGuard()

    def add_image_bytes(self, delta: int) -> None:
        with self._bytes_lock:
            self.image_bytes = max(self.image_bytes + delta, 0)

    # ------------------------------------------------------------------ connections
    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        return conn

    def open(self, *, migrate: bool = True) -> None:
        """Connect, check, create or migrate. Raises SpoolCorrupt / SpoolTooNew / sqlite3.Error,
        and SpoolOutdated when migrate=False (inspection) and the schema is older."""
        fresh = not self.db_path.exists() or self.db_path.stat().st_size == 0
        conn = self.connect()
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
            self._create_or_migrate(conn, migrate)
        except BaseException:
            conn.close()
            raise
        self.wconn = conn
        rconn = self.connect()
        rconn.execute("PRAGMA synchronous = FULL")
        with self.rlock:
            old, self.rconn = self.rconn, rconn
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        row = conn.execute(
            "SELECT COALESCE(SUM(image_bytes), 0) FROM events "
            "WHERE image_state IN ('pending', 'sent')"
        ).fetchone()
        self.image_bytes = int(row[0])

    def _create_or_migrate(self, conn: sqlite3.Connection, migrate: bool) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables.discard("sqlite_sequence")
        if version > SPOOL_SCHEMA_VERSION:
            raise SpoolTooNew(
                f"spool {self.db_path} has schema version {version}, newer than this software's "
                f"{SPOOL_SCHEMA_VERSION}: it was left untouched. Run the newer version (or its "
                "`edge uplink drain`) on it, or move it away to start an empty spool."
            )
        if not tables:
            version = 0
        elif version == 0 and "events" in tables:
            version = 1  # v1 wrote its tables, then user_version: a crash between the two
        known = version in MIGRATIONS or version == SPOOL_SCHEMA_VERSION
        if tables and ("events" not in tables or not known):
            raise SpoolCorrupt(f"not a spool database (tables {sorted(tables)}, version {version})")
        if tables and version < SPOOL_SCHEMA_VERSION and not migrate:
            raise SpoolOutdated(
                f"spool {self.db_path} has schema version {version}; the daemon (or `edge uplink "
                f"drain`) migrates it to {SPOOL_SCHEMA_VERSION} in place when it next opens it"
            )
        if version == SPOOL_SCHEMA_VERSION:
            conn.executescript(_V2_EXTRAS)  # idempotent: indexes/tables a crash may have missed
            return
        level = conn.isolation_level
        conn.isolation_level = None  # explicit transaction: DDL + user_version commit together
        try:
            conn.execute("BEGIN IMMEDIATE")
            if version == 0:
                conn.execute(_EVENTS_V2)
                for stmt in _V2_EXTRAS.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
            else:
                start = version
                while version < SPOOL_SCHEMA_VERSION:
                    MIGRATIONS[version](conn)
                    version += 1
                self.migrated_from = start
            conn.execute(f"PRAGMA user_version = {SPOOL_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.isolation_level = level
        if self.migrated_from is not None:
            log.info("uplink_spool_migrated", path=str(self.db_path),
                     from_version=self.migrated_from, to_version=SPOOL_SCHEMA_VERSION)

    def close(self) -> None:
        with self.rlock:
            for conn in (self.wconn, self.rconn):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self.wconn = self.rconn = None

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        with self.rlock:
            if self.rconn is None:
                raise sqlite3.OperationalError("spool is not open")
            yield self.rconn

    def quarantine(self) -> Path:
        """Move the database and its images aside (corrupt); returns where to."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.dir / QUARANTINE_DIR / stamp
        dest.mkdir(parents=True, exist_ok=True)
        self.close()
        for suffix in ("", "-wal", "-shm"):
            src = self.db_path.with_name(DB_NAME + suffix)
            if src.exists():
                os.replace(src, dest / src.name)
        if self.images_dir.exists():
            os.replace(self.images_dir, dest / IMAGES_DIR)
        self.images_dir.mkdir(exist_ok=True)
        fsync_dir(self.dir)
        return dest

    # ------------------------------------------------------------------ start-up repair
    def reconcile_images(self, ext_files: set[str]) -> tuple[int, int, int]:
        """After a restart: attach durable files of 'writing' rows (the note never committed),
        mark the rest lost, and return (attached, lost, swept) where swept = files with no row."""
        conn = self.wconn
        assert conn is not None
        writing = conn.execute(
            "SELECT id, image_file FROM events WHERE image_state = 'writing'"
        ).fetchall()
        attached = lost = 0
        with conn:
            for rid, name in writing:
                path = self.images_dir / str(name)
                if name and str(name) in ext_files and path.is_file():
                    size = path.stat().st_size
                    conn.execute("UPDATE events SET image_state = 'pending', image_bytes = ? "
                                 "WHERE id = ?", (size, rid))
                    self.add_image_bytes(size)
                    attached += 1
                else:
                    conn.execute("UPDATE events SET image_state = 'lost', image_file = NULL "
                                 "WHERE id = ?", (rid,))
                    lost += 1
        known = {r[0] for r in conn.execute(
            "SELECT image_file FROM events WHERE image_file IS NOT NULL "
            "AND image_state IN ('pending', 'sent')"
        )}
        swept = 0
        for name in ext_files - known:
            with contextlib.suppress(OSError):
                os.unlink(self.images_dir / name)
                swept += 1
        return attached, lost, swept

    # ------------------------------------------------------------------ writer side
    def bump(self, conn: sqlite3.Connection, name: str, n: int) -> None:
        if n:
            conn.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    def counters(self) -> dict[str, int]:
        with self.reader() as conn:
            return {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}

    def bytes_used(self, conn: sqlite3.Connection | None = None) -> int:
        """What the quota counts: live database pages + image files. Free pages are reused before
        the file grows and are returned by incremental vacuum; the WAL is bounded separately by
        SQLite's auto-checkpoint and journal_size_limit (a few MB), see `wal_bytes` in stats."""
        conn = conn or self.wconn
        db_bytes = 0
        if conn is not None:
            try:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                db_bytes = (pages - free) * page_size
            except sqlite3.Error:
                db_bytes = self.db_path.stat().st_size if self.db_path.exists() else 0
        return db_bytes + max(self.image_bytes, 0)

    # ------------------------------------------------------------------ forwarder side
    def dead_letter(self, conn: sqlite3.Connection, rid: int, reason: str) -> None:
        """Move one row out of `events` (inside the caller's transaction); its image file, if
        any, goes to spool_dir/dead_letter/ (outside the quota, like quarantine)."""
        row = conn.execute(
            "SELECT CAST(event_id AS BLOB), CAST(line AS BLOB), CAST(camera AS BLOB), "
            "CAST(payload AS BLOB), image_file, CAST(image_key AS BLOB), image_bytes, "
            "image_state FROM events WHERE id = ?", (rid,),
        ).fetchone()
        if row is None:
            return
        ev_id, line, camera, payload, image_file, image_key, size, state = row
        name = image_file if isinstance(image_file, str) else None
        if name and state in ("pending", "sent"):
            dest = self.dir / DEAD_LETTER_DIR
            dest.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                os.replace(self.images_dir / name, dest / name)
            self.add_image_bytes(-int(size or 0))
        conn.execute(
            "INSERT INTO dead_letter (event_rowid, event_id, line, camera, payload, image_file, "
            "image_key, reason, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rid, ev_id, line, camera, payload, name, image_key, reason, time.time()),
        )
        conn.execute("DELETE FROM events WHERE id = ?", (rid,))
        self.bump(conn, "dead_lettered", 1)
        log.error("uplink_row_dead_lettered", row=rid, reason=reason,
                  event_id=ev_id.decode(errors="replace") if isinstance(ev_id, bytes) else None)

    def _validated(
        self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]],
        build: Callable[[tuple[Any, ...]], Any],
    ) -> tuple[list[Any], int]:
        good: list[Any] = []
        bad: list[tuple[int, str]] = []
        for r in rows:
            try:
                good.append(build(r))
            except (ValueError, TypeError) as exc:
                bad.append((int(r[0]), str(exc)))
        if bad:
            with conn:
                for rid, reason in bad:
                    self.dead_letter(conn, rid, reason)
        return good, len(bad)

    def unsent_events(self, limit: int) -> tuple[list[SpooledEvent], int]:
        """Oldest unsent events in spool order, and how many corrupt rows were dead-lettered."""

        def build(r: tuple[Any, ...]) -> SpooledEvent:
            event_id = _text(r[1], "event_id")
            return SpooledEvent(int(r[0]), event_id, _text(r[2], "line"), _text(r[3], "camera"),
                                check_payload(r[4], event_id))

        with self.reader() as conn:
            rows = conn.execute(
                "SELECT id, CAST(event_id AS BLOB), CAST(line AS BLOB), CAST(camera AS BLOB), "
                "CAST(payload AS BLOB) FROM events WHERE sent_at IS NULL ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return self._validated(conn, rows, build)

    def unsent_images(self, limit: int) -> tuple[list[SpooledImage], int]:
        def build(r: tuple[Any, ...]) -> SpooledImage:
            event_id = _text(r[1], "event_id")
            name = _text(r[7], "image_file")
            if "/" in name or name.startswith("."):
                raise ValueError(f"image_file {name!r} is not a spool file name")
            return SpooledImage(
                int(r[0]), event_id, _text(r[2], "line"), _text(r[3], "camera"),
                _text(r[4], "verdict"), int(r[5]), _text(r[6], "image_kind"),
                self.images_dir / name, _text(r[8], "image_key"), check_payload(r[9], event_id),
            )

        with self.reader() as conn:
            rows = conn.execute(
                "SELECT id, CAST(event_id AS BLOB), CAST(line AS BLOB), CAST(camera AS BLOB), "
                "CAST(verdict AS BLOB), part_id, CAST(image_kind AS BLOB), "
                "CAST(image_file AS BLOB), CAST(image_key AS BLOB), CAST(payload AS BLOB) "
                "FROM events WHERE image_state = 'pending' ORDER BY id LIMIT ?", (limit,),
            ).fetchall()
            return self._validated(conn, rows, build)

    def mark(self, column: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self.reader() as conn, conn:
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

    def mark_image_lost(self, image_id: int) -> None:
        with self.reader() as conn, conn:
            row = conn.execute("SELECT image_bytes FROM events WHERE id = ? AND "
                               "image_state = 'pending'", (image_id,)).fetchone()
            conn.execute("UPDATE events SET image_state = 'lost', image_bytes = 0 WHERE id = ? "
                         "AND image_state = 'pending'", (image_id,))
        if row is not None:
            self.add_image_bytes(-int(row[0] or 0))

    # ------------------------------------------------------------------ observability
    def backlog(self) -> dict[str, Any]:
        """Unsent counts and the oldest unsent ages, straight from the database."""
        with self.reader() as conn:
            unsent, oldest = conn.execute(
                "SELECT COUNT(*), MIN(spooled_at) FROM events WHERE sent_at IS NULL"
            ).fetchone()
            unsent_images, oldest_img, img_bytes = conn.execute(
                "SELECT COUNT(*), MIN(spooled_at), COALESCE(SUM(image_bytes), 0) FROM events "
                "WHERE image_state = 'pending'"
            ).fetchone()
            writing = conn.execute(
                "SELECT COUNT(*) FROM events WHERE image_state = 'writing'"
            ).fetchone()[0]
            ev_bytes = conn.execute(
                "SELECT COALESCE(SUM(LENGTH(CAST(payload AS BLOB))), 0) FROM events "
                "WHERE sent_at IS NULL"
            ).fetchone()[0]
            total = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0]
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        now = time.time()
        ev_age = now - oldest if oldest is not None else 0.0
        img_age = now - oldest_img if oldest_img is not None else 0.0
        from uplink.quota import EVICTION_CLASSES

        return {
            "events_stored": int(total),
            "unsent_events": int(unsent),
            "unsent_images": int(unsent_images),
            "images_writing": int(writing),
            "oldest_unsent_event_age_s": round(ev_age, 3),
            "oldest_unsent_image_age_s": round(img_age, 3),
            "oldest_unsent_age_s": round(max(ev_age, img_age), 3),
            # What eviction could not take without losing undelivered data (approximate for
            # events: payload bytes, not pages); the disk alarm is based on this, because sent
            # data filling the quota is normal and is evicted first.
            "unsent_bytes": int(img_bytes) + int(ev_bytes),
            "evicted": {c: int(counters.get(f"evicted_{c}", 0)) for c in EVICTION_CLASSES},
            "dead_lettered": int(dead),
            "amendments_orphaned": int(counters.get("amendments_orphaned", 0)),
        }

    def rates(self, window_s: float = 60.0) -> dict[str, float]:
        """Spooled / sent per second over the last window, from the database (any process)."""
        since = time.time() - window_s
        with self.reader() as conn:
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
