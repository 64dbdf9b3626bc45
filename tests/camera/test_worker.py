"""CameraWorker: frames flow, stalls and faults take the camera down and it comes back up.

The fault-injecting sources below are fakes (unit tests of the recovery logic); the same paths are
exercised against a real GenTL producer in test_genicam.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from camera.config import ReplayCameraSettings, TriggeredMode
from camera.frame import Frame
from camera.guard import PLACEHOLDER
from camera.replay import ReplaySource
from camera.source import CameraConfigError, CameraError
from camera.worker import CameraWorker
from tests.camera.conftest import write_images
from tests.support import wait_until


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def on_frame(self, f: Frame) -> None:
        with self.lock:
            self.frames.append(f)

    def on_state(self, cam: str, state: str, reason: str | None) -> None:
        with self.lock:
            self.states.append((cam, state, reason))

    def state_seq(self) -> list[str]:
        with self.lock:
            return [s for _, s, _ in self.states]


def _frame(fid: int) -> Frame:
    return Frame("fake", fid, fid, time.monotonic_ns(), time.time_ns(), np.zeros((2, 2), np.uint8))


class FaultySource:
    """Delivers frame ids from a script; ``None`` entries = silence; 'raise' = a fault."""

    camera_id = "fake"

    def __init__(self, script: list[object], fail_opens: int = 0, config_error: bool = False):
        self.script = list(script)
        self.fail_opens = fail_opens
        self.config_error = config_error
        self.opens = 0
        self.closes = 0
        self.triggers = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens <= self.fail_opens:
            if self.config_error:
                raise CameraConfigError("Width 99999 out of range [8, 4096]")
            raise CameraError("device not found")

    def read(self, timeout_s: float) -> Frame | None:
        if not self.script:
            time.sleep(timeout_s)
            return None
        item = self.script.pop(0)
        if item == "raise":
            raise RuntimeError("GenTL error -1011: device lost")
        if item == "eof":
            raise EOFError("done")
        if item is None:
            time.sleep(timeout_s)
            return None
        assert isinstance(item, int)
        return _frame(item)

    def trigger(self) -> None:
        self.triggers += 1

    def close(self) -> None:
        self.closes += 1


def test_frames_missed_gaps_and_stop() -> None:
    rec = Recorder()
    src = FaultySource([0, 1, 2, 5, 6, 10])
    w = CameraWorker(src, on_frame=rec.on_frame, on_state=rec.on_state, stall_timeout_s=5)
    w.start()
    wait_until(lambda: len(rec.frames) == 6, 5, "6 frames")
    assert w.stop(5)
    st = w.stats()
    assert st["frames"] == 6 and st["missed"] == 2 + 3 and st["reopens"] == 0
    assert rec.state_seq() == ["up"]
    assert src.closes >= 1 and w.finished.is_set()


def test_fault_then_reopen_goes_down_then_up() -> None:
    rec = Recorder()
    src = FaultySource([0, 1, "raise", 0, 1, 2])
    w = CameraWorker(src, on_frame=rec.on_frame, on_state=rec.on_state, backoff_min_s=0.05)
    w.start()
    wait_until(lambda: len(rec.frames) == 5, 5, "frames after reopen")
    w.stop(5)
    assert rec.state_seq() == ["up", "down", "up"]
    assert "device lost" in str(rec.states[1][2])
    st = w.stats()
    assert st["reopens"] == 1 and st["errors"] == 1 and st["missed"] == 0  # ids restart: no gap
    assert src.opens == 2


def test_stall_detected_within_timeout() -> None:
    rec = Recorder()
    src = FaultySource([0, 1] + [None] * 50)
    w = CameraWorker(
        src, on_frame=rec.on_frame, on_state=rec.on_state, stall_timeout_s=0.3,
        read_timeout_s=0.05, backoff_min_s=10,
    )
    t0 = time.monotonic()
    w.start()
    wait_until(lambda: "down" in rec.state_seq(), 5, "stall reported")
    took = time.monotonic() - t0
    w.stop(5)
    assert 0.3 <= took < 2.0
    assert "stalled" in str(rec.states[-1][2])
    assert w.stats()["stalls"] == 1


def test_open_failures_back_off_and_report_once() -> None:
    rec = Recorder()
    src = FaultySource([0, 1], fail_opens=3, config_error=True)
    w = CameraWorker(
        src, on_frame=rec.on_frame, on_state=rec.on_state, backoff_min_s=0.02, backoff_max_s=0.05
    )
    w.start()
    wait_until(lambda: len(rec.frames) == 2, 5, "frames after failed opens")
    w.stop(5)
    assert rec.state_seq() == ["down", "up"]
    assert "config failed: Width 99999" in str(rec.states[0][2])
    assert w.stats()["reopens"] == 3


def test_triggered_stall_only_when_a_trigger_is_unanswered() -> None:
    rec = Recorder()
    src = FaultySource([None] * 200)
    w = CameraWorker(
        src, on_frame=rec.on_frame, on_state=rec.on_state, stall_timeout_s=0.2,
        read_timeout_s=0.02, triggered=True, backoff_min_s=10,
    )
    w.start()
    wait_until(lambda: src.opens == 1 and w.state == "up", 5, "open")
    # 20 empty reads of 20 ms: silence well past the 0.2 s stall limit
    wait_until(lambda: len(src.script) <= 180, 5, "silence longer than the stall limit")
    assert w.state == "up"  # silence without triggers is normal
    assert w.trigger()
    wait_until(lambda: w.state == "down", 5, "unanswered trigger detected")
    w.stop(5)
    st = w.stats()
    assert st["triggers"] == 1 and st["lost_triggers"] == 1 and src.triggers == 1


def test_replay_eof_ends_worker(image_dir: Path) -> None:
    rec = Recorder()
    s = ReplayCameraSettings(type="replay", id="r", plc_slot=0, path=image_dir, fps=0, loop=False)
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    w.start()
    assert w.finished.wait(5)
    assert [f.frame_id for f in rec.frames] == [0, 1, 2, 3, 4]
    assert rec.state_seq() == ["up", "down"] and "finished" in str(rec.states[-1][2])
    assert w.stop(1)


def test_replay_triggered_through_worker(image_dir: Path) -> None:
    rec = Recorder()
    s = ReplayCameraSettings(
        type="replay", id="r", plc_slot=0, path=image_dir, trigger=TriggeredMode(mode="triggered")
    )
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    w.start()
    wait_until(lambda: w.state == "up", 5, "up")
    for _ in range(7):
        assert w.trigger()
    wait_until(lambda: len(rec.frames) == 7, 5, "7 parts")
    w.stop(5)
    assert [f.part_id for f in rec.frames] == list(range(1, 8))
    assert w.stats()["lost_triggers"] == 0


# -- issue 9.8: bad input never disables a camera -----------------------------------------------
def test_zero_byte_png_does_not_disable_a_replay_camera(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, 4)
    (folder / "img_000a.png").write_bytes(b"")
    rec = Recorder()
    s = ReplayCameraSettings(type="replay", id="r", plc_slot=0, path=folder, fps=0, loop=False)
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    w.start()
    assert w.finished.wait(10)
    st = w.stats()
    assert [int(f.image[0, 0, 0]) for f in rec.frames] == [0, 1, 2, 3]
    assert st["frames"] == 4 and st["bad_files"] == 1 and st["errors"] == 0
    assert rec.state_seq() == ["up", "down"]


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 8000x8000 image among small ones: the frame that dragged a whole line down."""
    folder = tmp_path_factory.mktemp("huge")
    write_images(folder, 3)
    big = np.zeros((8000, 8000), np.uint8)
    big[::100] = 255
    assert cv2.imwrite(str(folder / "img_001x.png"), big, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return folder


@pytest.mark.parametrize("action", ["refuse", "downscale"])
def test_8000x8000_frame_refused_or_downscaled_each_part_handed_on(
    huge_png: Path, action: str
) -> None:
    rec = Recorder()
    s = ReplayCameraSettings(type="replay", id="r", plc_slot=0, path=huge_png, fps=0,
                             loop=False, max_frame={"action": action})
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    w.start()
    assert w.finished.wait(20)
    st = w.stats()
    assert [f.frame_id for f in rec.frames] == [0, 1, 2, 3]  # every part handed on, once
    big = rec.frames[2]
    assert Path(str(big.source_meta["file"])).name == "img_001x.png"
    others = [f for f in rec.frames if f is not big]
    assert all(f.problem is None and f.image.shape == (48, 64, 3) for f in others)
    if action == "refuse":
        assert big.problem == "oversized 8000x8000 > 4096x4096 (max_frame)"
        assert big.image is PLACEHOLDER
        assert (st["refused"], st["downscaled"]) == (1, 0)
    else:
        assert big.problem is None and big.image.shape == (4096, 4096, 3)
        assert big.source_meta["downscaled_from"] == [8000, 8000]
        assert (st["refused"], st["downscaled"]) == (0, 1)
    assert st["frames"] == 4 and st["errors"] == 0


class OddSource(FaultySource):
    """Frames whose pixels the model cannot take (what a misconfigured device sends)."""

    def read(self, timeout_s: float) -> Frame | None:
        item = self.script.pop(0) if self.script else None
        if item is None:
            time.sleep(timeout_s)
            return None
        assert isinstance(item, np.ndarray)
        fid = self.opens * 100 + len(self.script)
        return Frame("fake", fid, fid, time.monotonic_ns(), time.time_ns(), item)


def test_unsupported_images_are_marked_not_raised() -> None:
    rec = Recorder()
    imgs = [np.zeros((4, 4), np.uint16), np.zeros((0, 4), np.uint8),
            np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint8)]
    w = CameraWorker(OddSource(list(imgs)), on_frame=rec.on_frame, on_state=rec.on_state)
    w.start()
    wait_until(lambda: len(rec.frames) == 4, 5, "4 frames")
    w.stop(5)
    problems = [f.problem for f in rec.frames]
    assert problems[3] is None and all(p is not None for p in problems[:3])
    assert "uint16" in str(problems[0]) and "empty" in str(problems[1])
    st = w.stats()
    assert st["refused"] == 3 and st["frames"] == 4 and st["errors"] == 0
    assert rec.state_seq() == ["up"]  # never taken down for a bad frame


# -- issue 9.9: frames lost at the camera are visible ------------------------------------------
def test_lagging_consumer_missed_equals_the_gaps_in_delivered_ids(image_dir: Path) -> None:
    """A replay camera whose consumer blocks loses overdue frames; ``missed`` must count
    exactly the ids that never arrived, and every snapshot read meanwhile from another thread
    must be consistent (frames + missed = ids played so far)."""
    rec = Recorder()

    def slow_consumer(f: Frame) -> None:
        rec.on_frame(f)
        if f.frame_id % 20 == 5:  # the consumer stalls now and then: the behaviour under test
            threading.Event().wait(0.06)

    s = ReplayCameraSettings(type="replay", id="r", plc_slot=0, path=image_dir, fps=200,
                             max_lag_frames=2)
    src = ReplaySource(s)
    w = CameraWorker.from_settings(s, on_frame=slow_consumer, on_state=rec.on_state, source=src)
    bad_snapshots: list[dict[str, object]] = []
    snapshots = 0
    done = threading.Event()

    def reader() -> None:  # the daemon's supervisor reads stats() at any moment
        nonlocal snapshots
        while not done.is_set():
            st = w.stats()
            snapshots += 1
            if st["last_frame_id"] is not None and (
                st["frames"] + st["missed"] != st["last_frame_id"] + 1
            ):
                bad_snapshots.append(st)

    t = threading.Thread(target=reader)
    w.start()
    t.start()
    wait_until(lambda: len(rec.frames) >= 120, 20, "120 frames")
    assert w.stop(5)
    done.set()
    t.join(5)
    ids = [f.frame_id for f in rec.frames]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(ids))
    st = w.stats()
    assert ids == sorted(set(ids)) and ids[0] == 0
    assert gaps > 0  # the stalls did lose frames
    assert st["missed"] == gaps == src.dropped
    assert st["frames"] == len(ids)
    assert not bad_snapshots and snapshots > 10


def test_every_stats_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "camera.md").read_text()
    w = CameraWorker(FaultySource([]), on_frame=lambda f: None, on_state=lambda *a: None)
    missing = [k for k in w.stats() if f"`{k}`" not in doc]
    assert not missing, f"stats() keys not in docs/camera.md: {missing}"


# -- issue 10: PLC-triggered parts --------------------------------------------------------------
def plc_replay(path: Path, **kw: object) -> ReplayCameraSettings:
    base: dict[str, object] = {"type": "replay", "id": "r", "plc_slot": 0, "path": path,
                               "trigger": {"mode": "triggered", "source": "plc"},
                               "reopen_backoff_min_s": 0.05}
    base.update(kw)
    return ReplayCameraSettings.model_validate(base)


class Lost:
    def __init__(self) -> None:
        self.items: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()

    def __call__(self, cam: str, part: int, reason: str) -> None:
        with self.lock:
            self.items.append((cam, part, reason))

    def parts(self) -> list[int]:
        with self.lock:
            return [p for _, p, _ in self.items]


def test_plc_triggers_replay_frames_carry_the_plc_part_ids(image_dir: Path) -> None:
    rec = Recorder()
    lost = Lost()
    w = CameraWorker.from_settings(plc_replay(image_dir), on_frame=rec.on_frame,
                                   on_state=rec.on_state, on_trigger_lost=lost)
    assert w.triggered_by_plc and w.software_triggered and not w.plc_part_id_on_frame
    assert not w.trigger(1)  # not started: down, refused
    w.start()
    wait_until(lambda: w.state == "up", 5, "up")
    parts = [0x0001FFFF + 977 * i for i in range(12)] + [4_294_967_295, 3]  # any uint32, any order
    for p in parts:
        assert w.trigger(p)
    wait_until(lambda: len(rec.frames) == len(parts), 10, "one frame per trigger")
    w.stop(5)
    assert [f.part_id for f in rec.frames] == parts
    assert [f.frame_id for f in rec.frames] == list(range(len(parts)))
    assert not w.trigger(99)  # stopped: refused
    st = w.stats()
    assert st["triggers"] == len(parts) and st["lost_triggers"] == 0
    assert st["refused_triggers"] == 2 and st["pending_triggers"] == 0 and not lost.items


def test_plc_trigger_while_down_is_refused(tmp_path: Path) -> None:
    rec = Recorder()
    w = CameraWorker.from_settings(plc_replay(tmp_path / "missing"), on_frame=rec.on_frame,
                                   on_state=rec.on_state)
    w.start()
    wait_until(lambda: w.state == "down", 5, "down")
    assert not w.trigger(7)
    w.stop(5)
    assert w.stats()["refused_triggers"] == 1 and w.stats()["triggers"] == 0


def test_reopen_mid_stream_reports_each_lost_part_once(image_dir: Path) -> None:
    """Triggers queued behind a busy consumer when the device goes away: each is reported to
    on_trigger_lost (the daemon fail-safes it now), none is answered by a later frame."""
    rec = Recorder()
    lost = Lost()
    gate = threading.Event()

    def consumer(f: Frame) -> None:
        rec.on_frame(f)
        if f.part_id == 101:
            gate.wait(10)

    s = plc_replay(image_dir)
    src = ReplaySource(s)
    w = CameraWorker.from_settings(s, on_frame=consumer, on_state=rec.on_state, source=src,
                                   on_trigger_lost=lost)
    w.start()
    wait_until(lambda: w.state == "up", 5, "up")
    assert w.trigger(101)
    wait_until(lambda: len(rec.frames) == 1, 5, "frame 101 in the consumer")
    for p in (102, 103, 104, 105):
        assert w.trigger(p)
    assert w.stats()["pending_triggers"] == 4
    src.close()  # the device goes away under the worker (as a pulled cable would)
    gate.set()
    wait_until(lambda: len(lost.items) == 4, 5, "lost triggers reported")
    wait_until(lambda: rec.state_seq() == ["up", "down", "up"], 5, "reopened")
    assert w.trigger(106)
    wait_until(lambda: len(rec.frames) == 2, 5, "frame after reopen")
    w.stop(5)
    assert [f.part_id for f in rec.frames] == [101, 106]
    assert lost.parts() == [102, 103, 104, 105]
    assert all(c == "r" and r.startswith("read failed") for c, _p, r in lost.items)
    st = w.stats()
    assert st["triggers"] == 6 and st["lost_triggers"] == 4 and st["frames"] == 2
    assert st["unsolicited"] == 0 and st["reopens"] == 1
    # the books of software triggers always balance
    assert st["triggers"] == st["frames"] + st["lost_triggers"] + st["pending_triggers"]


class TriggerFaultSource(FaultySource):
    """Answers each trigger with a frame; the nth trigger raises (a lost GVCP ack)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__([])
        self.fail_at = fail_at
        self.fired = 0
        self.ready = 0
        self.fid = 0

    def trigger(self) -> None:
        self.fired += 1
        if self.fired == self.fail_at:
            self.ready += 1  # the device took it anyway; its frame will still come
            raise RuntimeError("GVCP ack timeout")
        self.ready += 1

    def read(self, timeout_s: float) -> Frame | None:
        if self.ready == 0:
            time.sleep(timeout_s / 4)
            return None
        self.ready -= 1
        self.fid += 1
        return _frame(self.fid)


def test_failed_fire_loses_the_queue_and_reopens_so_ids_cannot_shift() -> None:
    rec = Recorder()
    lost = Lost()
    src = TriggerFaultSource(fail_at=3)
    w = CameraWorker(src, on_frame=rec.on_frame, on_state=rec.on_state, triggered=True,
                     plc_trigger=True, on_trigger_lost=lost, backoff_min_s=0.05,
                     read_timeout_s=0.02)
    w.start()
    wait_until(lambda: w.state == "up", 5, "up")
    for p in (1, 2):
        assert w.trigger(p)
        wait_until(lambda n=p: len(rec.frames) == n, 5, f"frame {p}")  # type: ignore[misc]
    assert w.trigger(3)
    wait_until(lambda: lost.parts() == [3], 5, "part 3 lost")
    wait_until(lambda: rec.state_seq() == ["up", "down", "up"], 5, "reopened")
    assert w.trigger(4)
    wait_until(lambda: len(rec.frames) == 3, 5, "frame 4")
    w.stop(5)
    # The late frame of trigger 3 was not handed on as part 4 (or at all): only a reopen
    # could make the sequence certain again.
    assert [f.part_id for f in rec.frames] == [1, 2, 4]
    assert "trigger failed" in lost.items[0][2] and "trigger failed" in str(rec.states[1][2])
    st = w.stats()
    assert st["lost_triggers"] == 1 and st["triggers"] == 4 and st["frames"] == 3


def test_unsolicited_frame_is_counted_never_given_a_part_id() -> None:
    rec = Recorder()
    src = FaultySource([7, None, None])
    w = CameraWorker(src, on_frame=rec.on_frame, on_state=rec.on_state, triggered=True,
                     plc_trigger=True, read_timeout_s=0.02)
    w.start()
    wait_until(lambda: w.stats()["unsolicited"] == 1, 5, "unsolicited frame counted")
    w.stop(5)
    assert rec.frames == [] and w.stats()["frames"] == 0


def test_pending_triggers_are_bounded_and_non_software_cameras_refuse() -> None:
    rec = Recorder()
    w = CameraWorker(FaultySource([None] * 100), on_frame=rec.on_frame, on_state=rec.on_state,
                     triggered=True, plc_trigger=True, max_pending_triggers=3,
                     read_timeout_s=0.02, stall_timeout_s=30)
    w.start()
    wait_until(lambda: w.state == "up", 5, "up")
    assert [w.trigger(p) for p in range(5)] == [True, True, True, False, False]
    w.stop(5)
    st = w.stats()
    assert st["refused_triggers"] == 2 and st["lost_triggers"] == 3  # lost at stop
    hw = CameraWorker(FaultySource([]), on_frame=rec.on_frame, on_state=rec.on_state,
                      triggered=True, hardware_trigger=True, plc_part_id=True)
    assert hw.plc_part_id_on_frame and not hw.triggered_by_plc and not hw.trigger(1)
