"""CameraWorker: frames flow, stalls and faults take the camera down and it comes back up.

The fault-injecting sources below are fakes (unit tests of the recovery logic); the same paths are
exercised against a real GenTL producer in test_genicam.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from camera.config import ReplayCameraSettings, TriggeredMode
from camera.frame import Frame
from camera.source import CameraConfigError, CameraError
from camera.worker import CameraWorker
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
