"""The spool's writer thread: batching, commits, retries, image notes and amendments.

Why one thread owns every write: SQLite has one writer at a time anyway, and batching many events
into one fsync'd commit is what makes ~10k events/s durable on a line PC's SSD. The caller's
thread (the asyncio loop) only appends to a bounded deque under a short lock; JSON encoding, row
building and all disk I/O happen here.

Why images arrive as "notes": the image pipeline (uplink/images.py) writes files on its own
threads and reports back; the writer attaches a durable file to its event row in a later commit
(state 'writing' -> 'pending'). Events therefore never wait for an encode or an fsync, and a crash
between the two is repaired at the next open (file names are deterministic).

A commit that fails (disk stall, disk full, database locked) is retried with exponential backoff,
never in a tight loop; while it fails the deque fills up to `queue_max` and further submits are
refused and counted, so memory stays bounded, and `healthy`/`stats()` say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from uplink import quota
from uplink.config import UplinkSettings
from uplink.event import PartEvent, new_event_id
from uplink.images import (
    ImageNote,
    background_priority,
    fsync_dir,
    image_file_name,
    object_key,
    write_atomic,
)
from uplink.store import Store, is_corruption

log = structlog.get_logger(__name__)

AMEND_FORBIDDEN = frozenset({
    "event_id", "line", "camera", "part_id", "frame_id", "captured_at", "schema_version", "kind",
    "amends", "changes", "image_ref",
})
"""Fields that identify a part (or the amendment mechanism itself): an amendment cannot change
them. Every other PartEvent field can be corrected."""

_ROW_COLUMNS = (
    "event_id", "line", "camera", "part_id", "sequence", "verdict", "defect", "kind",
    "spooled_at", "payload", "sent_at", "image_state", "image_kind", "image_file", "image_key",
    "image_bytes", "image_sent_at",
)
_INSERT = (
    f"INSERT OR IGNORE INTO events ({', '.join(_ROW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ROW_COLUMNS))})"
)


@dataclass(slots=True)
class PartItem:
    event: PartEvent
    image: bool
    """An image for this event was accepted by the image pipeline (a note will follow)."""
    row: dict[str, Any] | None = None


@dataclass(slots=True)
class AmendItem:
    event_id: str
    changes: dict[str, Any]


Item = PartItem | AmendItem


class LastError:
    """The spool's last error: logged once per state change by the caller's choice (`quiet`)."""

    def __init__(self) -> None:
        self.text: str | None = None
        self.at: float | None = None

    def report(self, text: str, *, quiet: bool = False) -> None:
        self.text = text
        self.at = time.time()
        if not quiet:
            log.error("uplink_spool_error", error=text)


@dataclass(slots=True)
class WriterCounters:
    submitted: int = 0
    done: int = 0
    refused: int = 0
    committed: int = 0
    amendments: int = 0
    amended_in_place: int = 0
    malformed: int = 0
    commit_failures: int = 0
    notes_in: int = 0
    notes_out: int = 0
    images_lost: int = 0
    evicted_now: dict[str, int] = field(default_factory=dict)


class Writer:
    """Owns the store's write connection from `start()` until the thread returns."""

    def __init__(
        self,
        store: Store,
        settings: UplinkSettings,
        *,
        on_commit: Callable[[list[str]], None] | None,
        errors: LastError,
        on_housekeeping: Callable[[], None],
        recover: Callable[[str], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self._on_commit = on_commit
        self.errors = errors
        self._on_housekeeping = on_housekeeping
        self._recover = recover
        self.cv = threading.Condition()
        self.items: deque[Item] = deque()
        self.in_batch = 0
        self.awaiting: set[str] = set()
        """Event ids whose image was accepted but whose row is not committed (guarded by cv)."""
        self._incoming: deque[ImageNote] = deque()
        self._notes: dict[str, ImageNote] = {}
        self._committed_writing: set[str] = set()
        self.counts = WriterCounters()
        self.failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self._last_eviction_log = -1e9
        self._evicted_unlogged: dict[str, int] = {}

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="uplink-spool-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        self._stop.set()
        with self.cv:
            self.cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        if not alive:
            self._thread = None
        return not alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ producer side (any thread)
    def note(self, n: ImageNote) -> None:
        """Called by the image pipeline's threads when a file is durable (or failed)."""
        with self.cv:
            self._incoming.append(n)
            self.counts.notes_in += 1
            self.cv.notify_all()

    def settled(self) -> bool:
        """Everything accepted so far is committed and every image note is resolved (cv held)."""
        c = self.counts
        return c.done >= c.submitted and c.notes_out >= c.notes_in

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        background_priority()
        batch: list[Item] = []
        backoff = self.settings.backoff_initial_s
        attempts = 0
        while True:
            if not batch:
                batch = self._take_batch()
            self._drain_notes()
            if batch or self._notes:
                try:
                    self._commit(batch)
                except sqlite3.DatabaseError as exc:
                    attempts += 1
                    if is_corruption(exc) and attempts <= 3:
                        self._recover_batch(str(exc), batch)
                        continue
                    self.counts.commit_failures += 1
                    text = f"spool commit failed (attempt {attempts}), retrying: {exc}"
                    # Logged once when the failing state starts; the text stays current.
                    self.errors.report(text, quiet=self.failing_since is not None)
                    if self.failing_since is None:
                        self.failing_since = time.time()
                    if self._stop.is_set() and attempts >= 3:
                        self.errors.report(f"spool gave up on {self._count_parts(batch)} "
                                       "uncommitted events at shutdown")
                        self._finish(batch, committed=False)
                        batch = []
                        continue
                    self._stop.wait(min(backoff, 0.5) if self._stop.is_set() else backoff)
                    backoff = min(backoff * 2, self.settings.backoff_max_s)
                    continue
                except Exception as exc:  # the writer must survive anything to keep the line
                    self.errors.report(f"uplink writer failed on a batch of {len(batch)}: {exc!r}")
                    self._finish(batch, committed=False)
                    batch = []
                    continue
                if self.failing_since is not None:
                    log.info("uplink_spool_commit_recovered", attempts=attempts,
                             failed_for_s=round(time.time() - self.failing_since, 1))
                    self.failing_since = None
                self._finish(batch, committed=True)
                batch = []
                attempts = 0
                backoff = self.settings.backoff_initial_s
            self._housekeeping()
            if self._stop.is_set():
                with self.cv:
                    idle = not self.items and not self._incoming
                if idle and not any(e in self._committed_writing for e in self._notes):
                    return

    def _drain_notes(self) -> None:
        with self.cv:
            incoming = list(self._incoming)
            self._incoming.clear()
        for n in incoming:
            if n.error is None and not (self.store.images_dir / n.file).is_file():
                # Written just before a quarantine moved the directory away.
                n = ImageNote(n.event_id, n.file, 0, "file vanished before it was attached")
            self._notes[n.event_id] = n

    def _take_batch(self) -> list[Item]:
        delay = self.settings.batch_max_delay_ms / 1000.0
        cap = self.settings.batch_max_events
        with self.cv:
            if not self.items and not self._incoming:
                self.cv.wait(0.25)
            if not self.items:
                return []
            deadline = time.monotonic() + delay
            while len(self.items) < cap and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.cv.wait(remaining):
                    break
            batch = [self.items.popleft() for _ in range(min(cap, len(self.items)))]
            self.in_batch = len(batch)
        return batch

    @staticmethod
    def _count_parts(batch: list[Item]) -> int:
        return sum(1 for i in batch if isinstance(i, PartItem))

    def _finish(self, batch: list[Item], committed: bool) -> None:
        if committed:
            # Evict before reporting done: flush() then sees a spool within its quota.
            try:
                evicted = quota.enforce(self.store, self.settings.quota_bytes,
                                        self.settings.evict_to_fraction)
            except sqlite3.DatabaseError as exc:
                self.errors.report(f"spool eviction failed (will retry on the next commit): {exc}")
            else:
                self._report_eviction(evicted)
        with self.cv:
            for item in batch:
                if isinstance(item, PartItem) and item.image:
                    self.awaiting.discard(item.event.event_id)
                    row = item.row
                    if committed and row is not None and row["image_state"] == "writing":
                        self._committed_writing.add(item.event.event_id)
            self.in_batch = 0
            self.counts.done += len(batch)
            self.cv.notify_all()
        if committed:
            ids = [i.event.event_id for i in batch if isinstance(i, PartItem) and i.row]
            if self._on_commit is not None and ids:
                try:
                    self._on_commit(ids)
                except Exception as exc:
                    log.warning("uplink_on_commit_hook_failed", error=repr(exc))
        # Notes of events that will never be committed: their files are useless.
        self._resolve_orphans()

    def _report_eviction(self, evicted: dict[str, int]) -> None:
        """Counted always; logged at most once a minute (with the totals since the last line),
        so a spool that runs at its quota does not write a line per commit."""
        if not evicted:
            return
        for k, v in evicted.items():
            self.counts.evicted_now[k] = self.counts.evicted_now.get(k, 0) + v
            self._evicted_unlogged[k] = self._evicted_unlogged.get(k, 0) + v
        now = time.monotonic()
        unsent = {k: v for k, v in evicted.items() if k in ("unsent_ok", "defect")}
        if unsent:
            self.errors.report(f"spool quota exceeded: evicted UNSENT events {unsent}",
                               quiet=now - self._last_eviction_log < 60.0)
        if now - self._last_eviction_log >= 60.0:
            self._last_eviction_log = now
            log.warning("uplink_spool_over_quota_evicted", quota_bytes=self.settings.quota_bytes,
                        used_bytes=self.store.bytes_used(), **self._evicted_unlogged)
            self._evicted_unlogged = {}

    # ------------------------------------------------------------------ building and committing
    def _row(self, item: PartItem, now: float) -> dict[str, Any] | None:
        """Build (once) the row of a part; None when the event cannot be serialised."""
        if item.row is not None:
            return item.row
        ev = item.event
        defect = ev.verdict != "OK"
        row: dict[str, Any] = {
            "event_id": ev.event_id, "line": ev.line, "camera": ev.camera,
            "part_id": int(ev.part_id),
            "sequence": None if ev.sequence is None else int(ev.sequence),
            "verdict": ev.verdict, "defect": int(defect), "kind": ev.kind, "spooled_at": now,
            "sent_at": None, "image_state": "none", "image_kind": None, "image_file": None,
            "image_key": None, "image_bytes": 0, "image_sent_at": None,
        }
        if item.image:
            ext = self.settings.image.extension
            key = object_key(self.settings.s3.key_prefix if self.settings.s3 else "",
                             ev.line, ev.camera, ev.event_id, ev.captured_at, ext)
            ev.image_ref = key
            row.update(image_state="writing", image_kind="defect" if defect else "ok_sample",
                       image_file=image_file_name(ev.event_id, ext), image_key=key)
        try:
            row["payload"] = ev.to_json()
        except (TypeError, ValueError) as exc:
            self.counts.malformed += 1
            self.errors.report(f"event {getattr(ev, 'event_id', '?')} is malformed, dropped: {exc}")
            return None
        item.row = row
        return row

    def _commit(self, batch: list[Item]) -> None:
        conn = self.store.wconn
        if conn is None:
            raise sqlite3.OperationalError("spool database is not open")
        now = time.time()
        parts: list[dict[str, Any]] = []
        for item in batch:
            if isinstance(item, PartItem):
                row = self._row(item, now)
                if row is not None:
                    parts.append(row)
        attach: list[tuple[str, ImageNote]] = []
        with conn:
            for row in parts:
                note = self._notes.get(row["event_id"])
                values = dict(row)
                if note is not None and row["image_state"] == "writing":
                    values.update(self._note_columns(note))
                    attach.append((row["event_id"], note))
                conn.execute(_INSERT, [values[c] for c in _ROW_COLUMNS])
            amended = [self._amend(conn, i, now) for i in batch if isinstance(i, AmendItem)]
            applied = self._apply_notes(conn)
        # Committed: account for it (nothing above may be half-applied if the commit raised).
        for event_id, note in attach:
            self._notes.pop(event_id, None)
            self._account_note(note)
            for item in batch:
                if isinstance(item, PartItem) and item.event.event_id == event_id and item.row:
                    item.row = {**item.row, **self._note_columns(note)}
        for note in applied:
            self._notes.pop(note.event_id, None)
            self._committed_writing.discard(note.event_id)
            self._account_note(note)
        self.counts.committed += len(parts)
        self.counts.amendments += sum(1 for a in amended if a is not None)
        self.counts.amended_in_place += sum(1 for a in amended if a)

    @staticmethod
    def _note_columns(note: ImageNote) -> dict[str, Any]:
        if note.error is None:
            return {"image_state": "pending", "image_bytes": note.size}
        return {"image_state": "lost", "image_file": None, "image_bytes": 0}

    def _account_note(self, note: ImageNote) -> None:
        if note.error is None:
            self.store.add_image_bytes(note.size)
        else:
            self.counts.images_lost += 1
            self.errors.report(f"image of event {note.event_id} not stored: {note.error}")
        with self.cv:
            self.counts.notes_out += 1
            self.cv.notify_all()

    def _apply_notes(self, conn: sqlite3.Connection) -> list[ImageNote]:
        """UPDATE rows committed earlier in state 'writing' (inside the caller's transaction)."""
        applied = []
        for event_id, note in self._notes.items():
            if event_id not in self._committed_writing:
                continue
            if note.error is None:
                conn.execute("UPDATE events SET image_state = 'pending', image_bytes = ? "
                             "WHERE event_id = ? AND image_state = 'writing'",
                             (note.size, event_id))
            else:
                conn.execute("UPDATE events SET image_state = 'lost', image_file = NULL "
                             "WHERE event_id = ? AND image_state = 'writing'", (event_id,))
            applied.append(note)
        return applied

    def _resolve_orphans(self) -> None:
        """A note whose event is neither committed-and-waiting nor still on its way will never be
        attached (the event was malformed, given up at shutdown, or its database quarantined)."""
        self._drain_notes()
        with self.cv:
            orphans = [n for e, n in self._notes.items()
                       if e not in self._committed_writing and e not in self.awaiting]
        for n in orphans:
            del self._notes[n.event_id]
            if n.error is None:
                with contextlib.suppress(OSError):
                    os.unlink(self.store.images_dir / n.file)
            with self.cv:
                self.counts.notes_out += 1
                self.cv.notify_all()

    def _amend(self, conn: sqlite3.Connection, item: AmendItem, now: float) -> bool | None:
        """Patch the original if unsent, and spool a kind='amendment' event in any case.
        Returns True (patched in place too), False (amendment only) or None (original gone)."""
        row = conn.execute(
            "SELECT id, CAST(payload AS BLOB), sent_at, line, camera, part_id, sequence, verdict "
            "FROM events WHERE event_id = ?", (item.event_id,),
        ).fetchone()
        doc: dict[str, Any] | None = None
        if row is not None:
            try:
                loaded = json.loads(bytes(row[1]).decode("utf-8"))
                doc = loaded if isinstance(loaded, dict) else None
            except (ValueError, UnicodeDecodeError):
                doc = None
        if row is None or doc is None:
            self.store.bump(conn, "amendments_orphaned", 1)
            log.warning("uplink_amendment_orphaned", event_id=item.event_id,
                        reason="original event not in the spool (evicted, retired or corrupt)")
            return None
        changes = item.changes
        amendment = PartEvent(
            event_id=new_event_id(),
            line=str(row[3]), camera=str(row[4]), part_id=int(row[5]),
            sequence=doc.get("sequence"), frame_id=int(doc.get("frame_id", 0) or 0),
            captured_at=str(doc.get("captured_at", "")), decided_at=str(doc.get("decided_at", "")),
            plc_acked_at=doc.get("plc_acked_at"), verdict=str(doc.get("verdict", row[7])),
            reason=str(doc.get("reason", "")), model_id=str(doc.get("model_id", "")),
            plc_outcome=str(doc.get("plc_outcome", "")), recipe=doc.get("recipe"),
            model_digest=doc.get("model_digest"), canary=bool(doc.get("canary", False)),
            kind="amendment", amends=item.event_id, changes=dict(changes),
        )
        for k, v in changes.items():
            setattr(amendment, k, v)
        unsent = row[2] is None
        try:  # serialise both before touching anything: a bad value must not fail the batch
            payload = amendment.to_json()
            patched_doc = json.dumps({**doc, **changes}, separators=(",", ":"),
                                     ensure_ascii=False) if unsent else None
        except (TypeError, ValueError) as exc:
            self.counts.malformed += 1
            self.errors.report(f"amendment of {item.event_id} is malformed, dropped: {exc}")
            return None
        if patched_doc is not None:  # not sent yet: consumers will get the corrected original
            sets = ["payload = ?"]
            args: list[Any] = [patched_doc]
            if "sequence" in changes:
                sets.append("sequence = ?")
                args.append(changes["sequence"])
            if "verdict" in changes:
                sets += ["verdict = ?", "defect = ?"]
                args += [changes["verdict"], int(changes["verdict"] != "OK")]
            conn.execute(f"UPDATE events SET {', '.join(sets)} WHERE id = ?", [*args, row[0]])
        verdict = amendment.verdict
        conn.execute(_INSERT, [
            amendment.event_id, amendment.line, amendment.camera, amendment.part_id,
            amendment.sequence, verdict, int(verdict != "OK"), "amendment", now, payload, None,
            "none", None, None, None, 0, None,
        ])
        return unsent

    def _recover_batch(self, reason: str, batch: list[Item]) -> None:
        """Mid-run corruption: quarantine, start fresh, re-home the durable images of this batch
        and of every other accepted event not yet committed (their notes are attached when they
        commit). File names are deterministic, so a file whose note is on its way is kept too."""
        ext = self.settings.image.extension
        with self.cv:  # every event not yet committed whose image was accepted (batch included)
            ids = set(self.awaiting)
        with self.store.images_guard.exclusive():  # no image write is half-way meanwhile
            keep: dict[str, bytes] = {}
            for event_id in ids:
                name = image_file_name(event_id, ext)
                with contextlib.suppress(OSError):
                    keep[name] = (self.store.images_dir / name).read_bytes()
            self._recover(reason)
            for name, data in keep.items():
                write_atomic(self.store.images_dir / name, data)
            if keep:
                fsync_dir(self.store.images_dir)
        # Rows committed in the quarantined database that still waited for their file are gone;
        # their notes become orphans (files already moved with the quarantine).
        with self.cv:
            self._committed_writing.clear()
        for event_id, note in list(self._notes.items()):
            if note.error is None and not (self.store.images_dir / note.file).is_file():
                self._notes[event_id] = ImageNote(event_id, note.file, 0, "lost in quarantine")

    # ------------------------------------------------------------------ housekeeping
    def _housekeeping(self) -> None:
        """Every few seconds: drop sent data past retention, checkpoint the WAL, re-check quota."""
        now = time.monotonic()
        conn = self.store.wconn
        if now - self._last_housekeeping < 5.0 or conn is None or self.failing_since is not None:
            return
        self._last_housekeeping = now
        cutoff = time.time() - self.settings.sent_retention_h * 3600
        try:
            rows = conn.execute(
                "SELECT id, image_file, image_bytes, image_state FROM events "
                "WHERE sent_at IS NOT NULL AND sent_at < ? "
                "AND image_state NOT IN ('pending', 'writing') LIMIT 5000",
                (cutoff,),
            ).fetchall()
            if rows:
                ids = [r[0] for r in rows]
                with conn:
                    conn.execute(
                        f"DELETE FROM events WHERE id IN ({','.join('?' * len(ids))})", ids
                    )
                for _id, name, size, state in rows:
                    if name and state == "sent":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.store.images_dir / name)
                        self.store.add_image_bytes(-int(size or 0))
                conn.execute("PRAGMA incremental_vacuum").fetchall()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._report_eviction(quota.enforce(self.store, self.settings.quota_bytes,
                                                self.settings.evict_to_fraction))
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                self._recover_batch(str(exc), [])
            else:
                self.errors.report(f"spool housekeeping failed: {exc}")
        self._on_housekeeping()


def build_amend_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate an amendment's changes on the caller's thread (O(len(changes)), no I/O)."""
    if not isinstance(changes, dict) or not changes:
        raise ValueError("amend() needs a non-empty dict of field -> new value")
    known = set(PartEvent.__dataclass_fields__)
    bad = sorted(k for k in changes if k not in known or k in AMEND_FORBIDDEN)
    if bad:
        raise ValueError(
            f"amend() cannot change {bad}: allowed are the PartEvent fields except "
            f"{sorted(AMEND_FORBIDDEN)}"
        )
    return dict(changes)


__all__ = ["AmendItem", "LastError", "PartItem", "Writer", "build_amend_changes"]
