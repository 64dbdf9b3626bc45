"""Disk quota: what goes first when the spool is full.

Why this order: an event is ~0.6-1.5 KB and is the record of a decision; an image is 50 KB-1 MB
and is evidence. Seen before this order (S3 down, Kafka healthy): pending images filled the quota
and OK events were evicted before Kafka got them (195/1786 lost). So images always go before any
event, and unsent events go only when the events alone exceed the quota:

  1. ok_images      OK sample image files (uploaded first, then not yet uploaded); the event stays;
  2. sent           rows Kafka acknowledged whose image is not waiting for S3 (file removed too);
  3. defect_images  defect / fail-safe image files (uploaded first, then oldest pending); the event
                    stays and its image_ref then never appears in S3;
  4. unsent_ok      the oldest unsent OK events;
  5. defect         the oldest unsent defect / fail-safe events (last resort).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3

from uplink.store import Store

EVICTION_CLASSES = ("ok_images", "sent", "defect_images", "unsent_ok", "defect")
IMAGE_CLASSES = ("ok_images", "defect_images")

_WHERE = {
    "ok_images": "WHERE image_kind = 'ok_sample' AND image_state IN ('pending', 'sent') "
                 "AND image_file IS NOT NULL ORDER BY image_state = 'pending', id",
    "sent": "WHERE sent_at IS NOT NULL AND image_state NOT IN ('pending', 'writing') ORDER BY id",
    "defect_images": "WHERE image_state IN ('pending', 'sent') AND image_file IS NOT NULL "
                     "ORDER BY image_state = 'pending', id",
    "unsent_ok": "WHERE sent_at IS NULL AND defect = 0 ORDER BY id",
    "defect": "WHERE sent_at IS NULL ORDER BY id",
}


def evict_chunk(store: Store, cls: str, need: int) -> int:
    """Evict the oldest items of one class until about `need` bytes are freed (one transaction,
    at most 2000 rows); returns how many."""
    conn = store.wconn
    assert conn is not None
    sel = ("SELECT id, image_file, image_bytes, LENGTH(CAST(payload AS BLOB)) FROM events "
           + _WHERE[cls] + " LIMIT ?")
    candidates = conn.execute(sel, (2000,)).fetchall()
    if not candidates:
        return 0
    rows, freed = [], 0
    images_only = cls in IMAGE_CLASSES
    for r in candidates:  # a byte-sized prefix: never evict far more than needed
        rows.append(r)
        freed += int(r[2] or 0) + (0 if images_only else int(r[3] or 0) + 100)
        if freed >= need:
            break
    ids = [r[0] for r in rows]
    marks = ",".join("?" * len(ids))
    with conn:
        if images_only:
            conn.execute(
                "UPDATE events SET image_state = 'evicted', image_bytes = 0, image_file = NULL "
                f"WHERE id IN ({marks})",
                ids,
            )
        else:
            conn.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
        store.bump(conn, f"evicted_{cls}", len(ids))
    for _id, name, size, _len in rows:
        if name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.images_dir / name)
            store.add_image_bytes(-int(size or 0))
    return len(ids)


def enforce(store: Store, quota_bytes: int, evict_to_fraction: float) -> dict[str, int]:
    """Bring usage under evict_to_fraction x quota when it is over the quota; counts per class."""
    if store.wconn is None or store.bytes_used() <= quota_bytes:
        return {}
    target = int(quota_bytes * evict_to_fraction)
    evicted: dict[str, int] = {}
    for cls in EVICTION_CLASSES:
        while (used := store.bytes_used()) > target:
            n = evict_chunk(store, cls, used - target)
            if n == 0:
                break
            evicted[cls] = evicted.get(cls, 0) + n
        if store.bytes_used() <= target:
            break
    with contextlib.suppress(sqlite3.Error):
        store.wconn.execute("PRAGMA incremental_vacuum").fetchall()
    return evicted
