"""The spool on a real filesystem and real SQLite: durability, images, quota, corruption."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support import wait_until
from tests.uplink.helpers import make_event, make_image
from uplink.config import UplinkSettings
from uplink.spool import DB_NAME, Spool, SpoolBusy, keep_ok_image

ROOT = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, **kw: object) -> UplinkSettings:
    base: dict[str, object] = {"spool_dir": tmp_path / "spool", "batch_max_delay_ms": 5}
    base.update(kw)
    return UplinkSettings.model_validate(base)


def rows(spool_dir: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(spool_dir / DB_NAME)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY id")]
    finally:
        conn.close()


def test_commit_images_and_sampling(tmp_path: Path) -> None:
    s = settings(tmp_path, ok_image_sample_rate=0.25, image={"format": "png"})
    spool = Spool(s, "L1")
    spool.open()
    events = []
    for part in range(400):
        ev = make_event("L1", "cam0", part, "DEFECT" if part % 10 == 0 else "OK")
        events.append(ev)
        assert spool.submit(ev, make_image(part))
    assert spool.flush(20)
    spool.close()

    stored = {r["event_id"]: r for r in rows(s.spool_dir)}
    assert len(stored) == 400
    for ev in events:
        r = stored[ev.event_id]
        want_image = ev.verdict != "OK" or keep_ok_image("L1", "cam0", ev.part_id, 0.25)
        assert (r["image_state"] == "pending") == want_image
        payload = json.loads(str(r["payload"]))
        assert payload["event_id"] == ev.event_id and payload["verdict"] == ev.verdict
        if want_image:
            assert ev.image_ref == payload["image_ref"] == r["image_key"]
            assert str(ev.image_ref).startswith("L1/") and "/cam0/" in str(ev.image_ref)
            data = (s.spool_dir / "images" / str(r["image_file"])).read_bytes()
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert decoded is not None
            assert np.array_equal(decoded, make_image(ev.part_id))  # PNG is lossless
        else:
            assert payload["image_ref"] is None
    ok_kept = sum(1 for r in stored.values() if r["verdict"] == "OK" and r["image_file"])
    assert 0 < ok_kept < 360 * 0.5  # sampled, not all


def test_ok_sampling_is_deterministic_and_near_rate() -> None:
    picks = [keep_ok_image("L1", "cam3", p, 0.002) for p in range(200_000)]
    assert picks == [keep_ok_image("L1", "cam3", p, 0.002) for p in range(200_000)]
    assert 0.0015 < sum(picks) / len(picks) < 0.0025
    assert not keep_ok_image("L1", "cam3", 5, 0.0) and keep_ok_image("L1", "cam3", 5, 1.0)


def test_submit_never_blocks_and_counts_refusals(tmp_path: Path) -> None:
    spool = Spool(settings(tmp_path, queue_max=3), "L1")
    spool.open(start_writer=False)  # nothing drains the queue
    results = [spool.submit(make_event("L1", "c", i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert spool.stats()["refused"] == 2
    assert not spool.healthy
    spool.close()


def test_unusable_directory_leaves_spool_unhealthy_not_crashing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = Spool(settings(tmp_path, spool_dir=blocker / "spool"), "L1")
    spool.open()
    assert not spool.healthy
    assert spool.submit(make_event("L1", "c", 1)) is False
    assert "cannot be opened" in str(spool.stats()["last_error"])
    spool.close()


def test_second_writer_is_refused(tmp_path: Path) -> None:
    s = settings(tmp_path)
    first = Spool(s, "L1")
    first.open()
    with pytest.raises(SpoolBusy, match="in use by another process"):
        Spool(s, "L1").open()
    first.close()
    again = Spool(s, "L1")
    again.open()
    again.close()


def test_corrupt_spool_is_moved_aside_and_submitting_continues(tmp_path: Path) -> None:
    s = settings(tmp_path)
    spool = Spool(s, "L1")
    spool.open()
    assert spool.submit(make_event("L1", "c", 1, "DEFECT"), make_image(1))
    assert spool.flush(10)
    spool.close()
    db = s.spool_dir / DB_NAME
    with open(db, "r+b") as fh:  # clobber the header and the first pages
        fh.write(os.urandom(8192))

    spool = Spool(s, "L1")
    spool.open()
    st = spool.stats()
    assert spool.healthy
    assert len(st["quarantined"]) == 1
    quarantined = Path(st["quarantined"][0])
    assert (quarantined / DB_NAME).exists() and (quarantined / "images").is_dir()
    assert "corrupt" in str(st["last_error"]) and str(quarantined) in str(st["last_error"])
    ev = make_event("L1", "c", 2, "DEFECT")
    assert spool.submit(ev, make_image(2))
    assert spool.flush(10)
    spool.close()
    assert [r["event_id"] for r in rows(s.spool_dir)] == [ev.event_id]


def run_and_kill(spool_dir: Path, at_least: int, *extra: str) -> list[str]:
    """Run the child until it reported `at_least` committed ids, SIGKILL it, return the ids."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.uplink.spool_child", str(spool_dir), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    committed: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            committed.append(line.decode().strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(committed) >= at_least or proc.poll() is not None, 60,
                   f"{at_least} committed events from the child")
        assert proc.poll() is None, f"child exited early with {proc.returncode}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    reader.join(10)
    return committed


def test_kill_9_loses_no_committed_event(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    committed = run_and_kill(spool_dir, 3000)

    spool = Spool(UplinkSettings(spool_dir=spool_dir), "L1")
    spool.open()
    assert spool.healthy and spool.stats()["quarantined"] == []
    stored = {r["event_id"]: r for r in rows(spool_dir)}
    missing = [i for i in committed if i not in stored]
    assert missing == [], f"{len(missing)} committed events lost"
    for r in stored.values():
        if r["image_file"]:
            assert (spool_dir / "images" / str(r["image_file"])).stat().st_size == r["image_bytes"]
    leftovers = [p.name for p in (spool_dir / "images").iterdir()
                 if p.name not in {r["image_file"] for r in stored.values()}]
    assert leftovers == []  # temp files and uncommitted images were swept
    spool.close()


NO_EVICTIONS = {"ok_images": 0, "sent": 0, "defect_images": 0, "unsent_ok": 0, "defect": 0}


def test_quota_evicts_images_in_documented_order_and_never_an_event_for_an_image(
    tmp_path: Path,
) -> None:
    # Big incompressible images make the order observable with a small quota.
    s = settings(tmp_path, quota_mb=3.0, evict_to_fraction=0.9, ok_image_sample_rate=1.0,
                 image={"format": "png", "png_compression": 0})
    spool = Spool(s, "L1")
    spool.open()
    img = make_image(7, 200, 250)  # ~50 KB each as uncompressed PNG

    def put(part: int, verdict: str) -> str:
        ev = make_event("L1", "c", part, verdict)
        assert spool.submit(ev, img)
        assert spool.flush(10)
        return ev.event_id

    defects = [put(i, "DEFECT") for i in range(10)]  # ~0.5 MB
    oks = [put(100 + i, "OK") for i in range(10)]  # ~0.5 MB of OK samples
    # Mark the first 5 defects as sent (event and image).
    first = [r for r in rows(s.spool_dir) if r["event_id"] in defects[:5]]
    spool.mark_events_sent([int(str(r["id"])) for r in first])
    spool.mark_images_sent([int(str(r["id"])) for r in first])
    assert spool.stats()["evicted"] == NO_EVICTIONS

    # Fill up with more defects until eviction kicks in repeatedly.
    more = [put(200 + i, "DEFECT") for i in range(60)]  # ~3 MB more: well over the quota
    st = spool.stats()
    ev = st["evicted"]
    assert st["bytes_used"] <= s.quota_bytes
    assert ev["ok_images"] == 10  # 1. every OK sample image went first
    assert ev["sent"] >= 5  # 2. then the sent defects
    assert ev["defect_images"] > 0  # 3. then unsent defect images, oldest first
    assert ev["unsent_ok"] == 0 and ev["defect"] == 0  # never an event to make room for images
    stored = {r["event_id"]: r for r in rows(s.spool_dir)}
    assert all(d not in stored for d in defects[:5])
    assert set(oks + defects[5:] + more) <= set(stored)  # every unsent event is still there
    assert all(stored[o]["image_state"] == "evicted" for o in oks)
    assert stored[defects[5]]["image_state"] == "evicted"  # the oldest unsent image went first
    assert stored[more[-1]]["image_state"] == "pending"  # the newest defect image is kept
    assert not st["alarms"] or all("evicted" not in a for a in st["alarms"])
    spool.close()


def test_events_alone_over_quota_evict_unsent_ok_before_defects(tmp_path: Path) -> None:
    s = settings(tmp_path, quota_mb=0.25, evict_to_fraction=0.9, batch_max_events=100)
    spool = Spool(s, "L1")
    spool.open()
    defects = [make_event("L1", "c", i, "DEFECT") for i in range(60)]
    oks = [make_event("L1", "c", 1000 + i) for i in range(900)]
    for ev in defects + oks:
        assert spool.submit(ev)
    assert spool.flush(20)
    st = spool.stats()
    assert st["bytes_used"] <= s.quota_bytes
    assert st["evicted"]["unsent_ok"] > 0 and st["evicted"]["defect"] == 0
    stored = {r["event_id"] for r in rows(s.spool_dir)}
    assert {d.event_id for d in defects} <= stored
    assert any("evicted" in a for a in st["alarms"])  # losing unsent events is an alarm
    spool.close()


def test_alarm_rises_on_unsent_data_long_before_eviction(tmp_path: Path) -> None:
    s = settings(tmp_path, quota_mb=2.0, alarm_fraction=0.25,
                 image={"format": "png", "png_compression": 0})
    spool = Spool(s, "L1")
    spool.open()
    img = make_image(3, 200, 250)  # ~50 KB
    for i in range(6):  # ~300 KB unsent: below the alarm
        assert spool.submit(make_event("L1", "c", i, "DEFECT"), img)
    assert spool.flush(10)
    assert spool.alarms() == []
    for i in range(6, 14):  # ~700 KB unsent: 1/3 of the quota, nowhere near eviction
        assert spool.submit(make_event("L1", "c", i, "DEFECT"), img)
    assert spool.flush(10)
    st = spool.stats()
    assert any("unsent data fills" in a for a in st["alarms"]), st["alarms"]
    assert st["evicted"] == NO_EVICTIONS
    # Once delivered, the same bytes are expendable: the alarm clears.
    ids = [int(str(r["id"])) for r in rows(s.spool_dir)]
    spool.mark_events_sent(ids)
    spool.mark_images_sent(ids)
    assert spool.alarms() == []
    spool.close()


def test_sent_data_is_evicted_before_unsent_at_steady_state(tmp_path: Path) -> None:
    s = settings(tmp_path, quota_mb=0.5, batch_max_events=100)
    spool = Spool(s, "L1")
    spool.open()
    sent_ids: list[str] = []
    for round_ in range(8):  # each round ~100 KB of events, the first 6 get delivered
        batch = [make_event("L1", "c", round_ * 200 + i) for i in range(200)]
        for ev in batch:
            assert spool.submit(ev)
        assert spool.flush(10)
        if round_ < 6:
            spool.mark_events_sent([int(str(r["id"])) for r in rows(s.spool_dir)
                                    if r["sent_at"] is None])
            sent_ids += [ev.event_id for ev in batch]
        else:
            unsent = [ev.event_id for ev in batch]
            stored = {r["event_id"] for r in rows(s.spool_dir)}
            assert set(unsent) <= stored  # nothing unsent was evicted
    st = spool.stats()
    assert st["bytes_used"] <= s.quota_bytes
    assert st["evicted"]["sent"] > 0 and st["evicted"]["unsent_ok"] == 0
    spool.close()


def test_corruption_found_while_running_is_quarantined_and_batch_kept(tmp_path: Path) -> None:
    s = settings(tmp_path)
    spool = Spool(s, "L1")
    spool.open()
    for i in range(300):
        assert spool.submit(make_event("L1", "c", i, "DEFECT"), make_image(i, 16, 16))
    assert spool.flush(10)
    # Move everything into the main file, then damage its b-tree pages behind the writer's back
    # (what a failing disk or a stray write does). A new write transaction must notice.
    other = sqlite3.connect(s.spool_dir / DB_NAME)

    def checkpointed() -> bool:  # complete, WAL reset: the writer's page cache becomes stale
        busy, log_frames, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return bool(busy == 0 and log_frames == 0)

    wait_until(checkpointed, 10, "a complete WAL checkpoint")
    other.close()
    with open(s.spool_dir / DB_NAME, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xa5" * 4096 * 8)
    later = [make_event("L1", "c", 1000 + i, "DEFECT") for i in range(20)]
    for ev in later:
        assert spool.submit(ev, make_image(7, 16, 16))
    assert spool.flush(20)
    st = spool.stats()
    assert len(st["quarantined"]) == 1 and "corrupt" in str(st["last_error"])
    assert spool.healthy
    spool.close()
    stored = {r["event_id"]: r for r in rows(s.spool_dir)}
    assert {ev.event_id for ev in later} <= set(stored)
    for ev in later:  # the batch's images were re-homed into the fresh spool
        assert (s.spool_dir / "images" / str(stored[ev.event_id]["image_file"])).exists()


# --------------------------------------------------------------------- bounded memory (issue 9.4)
def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hold_write_lock(spool_dir: Path) -> sqlite3.Connection:
    """A second connection holding the database's write lock: every commit of the writer now
    waits (as on a stalled disk) until it is released."""
    conn = sqlite3.connect(spool_dir / DB_NAME, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_disk_stall_holds_no_frames_beyond_the_image_byte_bound(tmp_path: Path) -> None:
    # Before: every part's full frame sat in the writer queue, sampled or not: +2.6 GB for 2,000
    # queued 1280x1024 frames while commits were stuck. Now only kept images are referenced, under
    # image_queue_mb; events (no pixels) wait in their own bounded queue.
    s = settings(tmp_path, ok_image_sample_rate=1.0, image_queue_mb=24, batch_max_events=50)
    spool = Spool(s, "L1")
    spool.open()
    lock = hold_write_lock(s.spool_dir)
    base = rss_bytes()
    peak_held = 0
    events = []
    try:
        with spool.store.images_guard.exclusive():  # and image files cannot be written either
            for i in range(2000):
                frame = np.full((1024, 1280), i % 251, dtype=np.uint8)  # 1.3 MB, pages touched
                ev = make_event("L1", "cam0", i)
                assert spool.submit(ev, frame)  # the event is never refused for its image
                events.append(ev)
                del frame
                peak_held = max(peak_held, spool.counters()["image_bytes_held"])
            grown = rss_bytes() - base
            st = spool.counters()
            assert st["pending"] == 2000 and st["committed"] == 0
            assert peak_held <= s.image_queue_bytes
            assert st["images_dropped"] == 2000 - st["images_accepted"] > 1900
            assert grown < s.image_queue_bytes + 150 * 2**20, f"RSS grew {grown / 2**20:.0f} MB"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert spool.flush(60)
    st = spool.stats()
    assert st["committed"] == 2000 and st["image_bytes_held"] == 0
    stored = {r["event_id"]: r for r in rows(s.spool_dir)}
    kept = [e for e in events if not e.image_dropped]
    assert len(kept) == st["images_accepted"] == st["images_written"]
    for ev in events:
        payload = json.loads(str(stored[ev.event_id]["payload"]))
        assert payload["image_dropped"] is ev.image_dropped
        assert (payload["image_ref"] is None) is ev.image_dropped
        assert stored[ev.event_id]["image_state"] == ("none" if ev.image_dropped else "pending")
    spool.close()


def test_events_never_wait_behind_images(tmp_path: Path) -> None:
    committed: list[str] = []
    spool = Spool(settings(tmp_path), "L1", on_commit=committed.extend)
    spool.open()
    defect = make_event("L1", "cam0", 0, "DEFECT")
    with spool.store.images_guard.exclusive():  # the image path is stuck (slow disk for files)
        assert spool.submit(defect, make_image(0))
        later = [make_event("L1", "cam0", i) for i in range(1, 101)]
        for ev in later:
            assert spool.submit(ev, make_image(ev.part_id))  # OK, not sampled: never held
        wait_until(lambda: len(committed) == 101, 20, "events committed while the image waits")
        assert spool.counters()["image_bytes_held"] > 0
        assert rows(tmp_path / "spool")[0]["image_state"] == "writing"
    assert spool.flush(10)
    first = rows(tmp_path / "spool")[0]
    assert first["event_id"] == defect.event_id and first["image_state"] == "pending"
    assert (tmp_path / "spool" / "images" / str(first["image_file"])).stat().st_size == \
        first["image_bytes"]
    spool.close()


def test_failing_commits_back_off_show_in_stats_and_recover(tmp_path: Path) -> None:
    s = settings(tmp_path, commit_timeout_s=0.1, backoff_initial_s=0.1, backoff_max_s=0.4)
    spool = Spool(s, "L1")
    spool.open()
    lock = hold_write_lock(s.spool_dir)
    t0 = time.monotonic()
    try:
        assert spool.submit(make_event("L1", "c", 1))
        wait_until(lambda: spool.counters()["commit_failures"] >= 4, 30, "4 failed commits")
        elapsed = time.monotonic() - t0
        st = spool.stats()
        # Backoff, not a spin: 4 attempts take at least the first 3 pauses + 4 lock timeouts.
        assert elapsed >= 0.1 + 0.2 + 0.4 + 4 * 0.1
        assert st["commit_failing"] and not st["healthy"] and not spool.healthy
        assert "database is locked" in str(st["last_error"])
        assert any("unhealthy" in a for a in st["alarms"])
        assert spool.submit(make_event("L1", "c", 2))  # still accepting, up to queue_max
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert spool.flush(10)
    wait_until(lambda: spool.healthy, 10, "the spool healthy again")
    assert spool.stats()["committed"] == 2
    spool.close()


def test_image_write_failure_keeps_the_event_and_marks_the_image_lost(tmp_path: Path) -> None:
    spool = Spool(settings(tmp_path, image={"format": "jpeg"}), "L1")
    spool.open()
    ev = make_event("L1", "c", 1, "DEFECT")
    assert spool.submit(ev, np.zeros((8, 8), dtype=np.float32))  # JPEG cannot encode floats
    assert spool.flush(10)
    st = spool.stats()
    assert st["image_errors"] == 1 and "JPEG needs uint8" in str(st["last_error"])
    [row] = rows(tmp_path / "spool")
    assert row["event_id"] == ev.event_id and row["image_state"] == "lost"
    spool.close()


# --------------------------------------------------------------------- schema migrations
V1_DDL = """
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
PRAGMA user_version = 1;
"""


def make_v1_spool(spool_dir: Path) -> list[str]:
    """A spool as the v1 code left it: one sent event, two unsent (one with a pending image)."""
    (spool_dir / "images").mkdir(parents=True)
    conn = sqlite3.connect(spool_dir / DB_NAME)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(V1_DDL)
    ids = []
    for i, (verdict, sent) in enumerate([("OK", True), ("OK", False), ("DEFECT", False)]):
        ev = make_event("L1", "cam0", i, verdict)
        doc = ev.to_dict()
        for k in ("recipe", "model_digest", "kind", "canary", "amends", "changes",
                  "image_dropped"):
            doc.pop(k)
        doc["schema_version"] = 1
        image = (f"{ev.event_id}.png", f"L1/x/cam0/{ev.event_id}.png") if verdict != "OK" \
            else (None, None)
        if image[0]:
            (spool_dir / "images" / image[0]).write_bytes(b"\x89PNG fake" * 10)
            doc["image_ref"] = image[1]
        conn.execute(
            "INSERT INTO events (event_id, line, camera, part_id, sequence, verdict, defect, "
            "spooled_at, payload, sent_at, image_state, image_kind, image_file, image_key, "
            "image_bytes) VALUES (?, 'L1', 'cam0', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ev.event_id, i, i, verdict, int(verdict != "OK"), time.time(),
             json.dumps(doc, separators=(",", ":")), time.time() if sent else None,
             "pending" if image[0] else "none", "defect" if image[0] else None, image[0],
             image[1], 90 if image[0] else 0),
        )
        ids.append(ev.event_id)
    conn.commit()
    conn.close()
    return ids


def test_v1_spool_is_migrated_in_place_and_its_unsent_data_forwardable(tmp_path: Path) -> None:
    s = settings(tmp_path)
    sent_id, ok_id, defect_id = make_v1_spool(s.spool_dir)
    before = {r["event_id"]: r for r in rows(s.spool_dir)}
    spool = Spool(s, "L1")
    spool.open()
    assert spool.healthy
    st = spool.stats()
    assert st["quarantined"] == [] and st["schema_version"] == 2
    assert not (s.spool_dir / "quarantine").exists()
    conn = sqlite3.connect(s.spool_dir / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    after = {r["event_id"]: r for r in rows(s.spool_dir)}
    for eid, old in before.items():  # every row kept as it was (ids, payload bytes, states)
        assert {k: after[eid][k] for k in old} == old
        assert after[eid]["kind"] == "part"
    unsent = spool.unsent_events(10)
    assert [e.event_id for e in unsent] == [ok_id, defect_id]
    assert json.loads(unsent[0].payload)["schema_version"] == 1  # forwarded as stored
    [img] = spool.unsent_images(10)
    assert img.event_id == defect_id and img.path.exists()
    # The migrated spool takes v2 events (sequence may now be None) after the old rows.
    ev = make_event("L1", "cam0", 9)
    ev.sequence = None
    assert spool.submit(ev)
    assert spool.flush(10)
    new = rows(s.spool_dir)[-1]
    assert new["event_id"] == ev.event_id and new["sequence"] is None
    assert int(str(new["id"])) > max(int(str(r["id"])) for r in before.values())
    assert sent_id in after
    spool.close()


def test_spool_of_a_newer_version_is_left_untouched(tmp_path: Path) -> None:
    s = settings(tmp_path)
    make_v1_spool(s.spool_dir)
    conn = sqlite3.connect(s.spool_dir / DB_NAME)
    conn.execute("PRAGMA user_version = 9")
    conn.close()
    snapshot = (s.spool_dir / DB_NAME).read_bytes()
    spool = Spool(s, "L1")
    spool.open()
    assert not spool.healthy and spool.submit(make_event("L1", "c", 1)) is False
    assert "newer than this software" in str(spool.stats()["last_error"])
    spool.close()
    assert (s.spool_dir / DB_NAME).read_bytes() == snapshot
    assert not (s.spool_dir / "quarantine").exists()


# --------------------------------------------------------------------- amendments
def test_amend_patches_an_unsent_original_and_always_spools_an_amendment(tmp_path: Path) -> None:
    s = settings(tmp_path)
    spool = Spool(s, "L1")
    spool.open()
    first, second = make_event("L1", "cam0", 1), make_event("L1", "cam0", 2, "DEFECT")
    first.plc_outcome = second.plc_outcome = "unknown"
    assert spool.submit(first) and spool.submit(second)
    assert spool.amend(first.event_id, {"plc_outcome": "confirmed_applied"})  # same batch
    assert spool.flush(10)
    [r2] = [r for r in rows(s.spool_dir) if r["event_id"] == second.event_id]
    spool.mark_events_sent([int(str(r2["id"]))])
    assert spool.amend(second.event_id, {"plc_outcome": "confirmed_applied", "sequence": 77})
    assert spool.amend("01ZZZZZZZZZZZZZZZZZZZZZZZZ", {"plc_outcome": "x"})  # never spooled
    with pytest.raises(ValueError, match="cannot change"):
        spool.amend(first.event_id, {"camera": "other"})
    assert spool.flush(10)
    stored = rows(s.spool_dir)
    by_id = {r["event_id"]: json.loads(str(r["payload"])) for r in stored}
    assert by_id[first.event_id]["plc_outcome"] == "confirmed_applied"  # patched: not yet sent
    assert by_id[second.event_id]["plc_outcome"] == "unknown"  # already sent: left as sent
    amendments = [json.loads(str(r["payload"])) for r in stored if r["kind"] == "amendment"]
    assert [(a["amends"], a["changes"]) for a in amendments] == [
        (first.event_id, {"plc_outcome": "confirmed_applied"}),
        (second.event_id, {"plc_outcome": "confirmed_applied", "sequence": 77}),
    ]
    for a in amendments:
        assert a["kind"] == "amendment" and a["plc_outcome"] == "confirmed_applied"
        assert a["detections"] == [] and a["event_id"] not in (first.event_id, second.event_id)
        assert len(json.dumps(a)) < 1000
    assert amendments[1]["sequence"] == 77 and amendments[1]["verdict"] == "DEFECT"
    st = spool.stats()
    assert st["amendments"] == 2 and st["amended_in_place"] == 1
    assert st["amendments_orphaned"] == 1
    spool.close()


def test_images_queued_behind_a_slow_disk_are_made_durable_in_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer, group commit: 40 images that waited behind a stalled directory reach disk with
    a handful of directory fsyncs (one per image before), and a bad image in a group loses only
    its own file."""
    import uplink.images as images
    from uplink.config import ImageSettings

    dir_syncs: list[Path] = []
    real_fsync_dir = images.fsync_dir
    monkeypatch.setattr(images, "fsync_dir", lambda p: (dir_syncs.append(p), real_fsync_dir(p)))
    notes: list[images.ImageNote] = []
    folder = tmp_path / "images"
    folder.mkdir()
    pipe = images.ImagePipeline(folder, ImageSettings(format="jpeg"), 2**30, 1, notes.append)
    pipe.start()
    with pipe.guard.exclusive():
        for i in range(40):
            bad = i == 20
            assert pipe.offer(f"e{i}", np.zeros((8, 8), np.float32) if bad else make_image(i))
    assert pipe.wait_idle(20)
    assert len(notes) == 40 and pipe.written == 39 and pipe.errors == 1
    assert 1 <= len(dir_syncs) <= 3, dir_syncs
    for n in notes:
        if n.event_id == "e20":
            assert n.error is not None and "JPEG needs uint8" in n.error and n.size == 0
        else:
            assert n.error is None and (folder / n.file).stat().st_size == n.size > 0
    assert not list(folder.glob(".*.tmp"))
    assert pipe.alive
    assert pipe.stop(5)
    assert not pipe.alive and not pipe.offer("late", make_image(41))
