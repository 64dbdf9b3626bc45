"""GenICam through harvesters against a real GenTL producer: TLSimu.cti from genicam 1.5.0.

TLSimu lists 4 devices (2 mono, 2 colour, all user_defined_name 'Center'), free-runs at
~150-190 fps, honours TriggerMode/TriggerSoftware, lacks exposure/gain/frame-rate nodes, and its
timestamp is only the sub-second part of the host's wall clock (it wraps every 1e9 ns).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camera.config import GenicamCameraSettings
from camera.frame import Frame
from camera.genicam import GenicamSource, default_cti, release_producers
from camera.source import CameraConfigError, CameraError
from camera.worker import CameraWorker
from tests.support import wait_until

CTI = default_cti()
assert CTI is not None, "genicam==1.5.0 (test extra) provides TLSimu.cti"
MONO_A, COLOUR_A, MONO_B = "SN_InterfaceA_0", "SN_InterfaceA_1", "SN_InterfaceB_0"


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    yield
    release_producers()


def cam(serial: str | None = MONO_A, **kw: Any) -> GenicamCameraSettings:
    base: dict[str, Any] = {
        "type": "genicam", "id": "g0", "plc_slot": 0, "cti": [CTI],
        "device": {"serial_number": serial} if serial else {},
        "nodes": {"width": 640, "height": 480},
    }
    base.update(kw)
    return GenicamCameraSettings.model_validate(base)


class Rec:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def on_frame(self, f: Frame) -> None:
        with self.lock:
            self.frames.append(f)

    def on_state(self, _cam: str, state: str, reason: str | None) -> None:
        with self.lock:
            self.states.append((state, reason))

    def has(self, n: int) -> bool:
        return self.count() == n

    def count(self) -> int:
        with self.lock:
            return len(self.frames)


def test_software_trigger_n_times_gives_exactly_n_parts() -> None:
    rec = Rec()
    w = CameraWorker.from_settings(
        cam(trigger={"mode": "triggered", "source": "software"}),
        on_frame=rec.on_frame, on_state=rec.on_state,
    )
    w.start()
    try:
        wait_until(lambda: w.state == "up", 10, "camera up")
        n = 25
        for i in range(n):
            assert w.trigger()
            wait_until(partial(rec.has, i + 1), 5, f"frame for trigger {i + 1}")
        idle = w.stats()["idle_reads"]
        wait_until(lambda: w.stats()["idle_reads"] >= idle + 5, 10, "idle reads with no trigger")
        assert rec.count() == n  # no frame without a trigger
    finally:
        assert w.stop(5)
    assert [f.part_id for f in rec.frames] == list(range(1, n + 1))
    assert all(f.image.shape == (480, 640) and f.pixel_format == "Mono8" for f in rec.frames)
    st = w.stats()
    assert st["triggers"] == n and st["missed"] == 0 and st["lost_triggers"] == 0


def test_burst_of_triggers_keeps_one_part_per_trigger() -> None:
    rec = Rec()
    w = CameraWorker.from_settings(
        cam(trigger={"mode": "triggered"}), on_frame=rec.on_frame, on_state=rec.on_state
    )
    w.start()
    try:
        wait_until(lambda: w.state == "up", 10, "camera up")
        for _ in range(20):  # back to back: TLSimu alone would drop triggers < ~5 ms apart
            assert w.trigger()
        wait_until(lambda: rec.count() == 20, 10, "20 parts")
    finally:
        w.stop(5)
    assert [f.part_id for f in rec.frames] == list(range(1, 21))
    assert w.stats()["missed"] == 0


def test_free_run_delivers_at_rate_with_unwrapped_timestamps() -> None:
    rec = Rec()
    w = CameraWorker.from_settings(
        cam(timestamp_wrap_ns=1_000_000_000), on_frame=rec.on_frame, on_state=rec.on_state
    )
    w.start()
    try:
        wait_until(lambda: rec.count() >= 1, 10, "first frame")
        with rec.lock:
            t0 = rec.frames[0].captured_ns
        # > 1 s of frames, so TLSimu's sub-second timestamp wraps at least once
        wait_until(
            lambda: rec.frames[-1].captured_ns - t0 > 1_300_000_000, 10, "1.3 s of frames"
        )
    finally:
        w.stop(5)
    frames = rec.frames
    span_s = (frames[-1].captured_ns - frames[0].captured_ns) / 1e9
    assert len(frames) / span_s > 30  # TLSimu free-runs at 150+ fps; a loose floor, not a benchmark
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids))
    assert w.stats()["missed"] == ids[-1] - ids[0] + 1 - len(ids)
    ts = [f.device_timestamp_ns for f in frames]
    assert all(t is not None for t in ts)
    assert all(b > a for a, b in itertools.pairwise(ts))  # type: ignore[operator]
    dev_span = (ts[-1] - ts[0]) / 1e9  # type: ignore[operator]
    assert dev_span == pytest.approx(span_s, abs=0.05)  # unwrapped across the 1 s wrap
    assert frames[-1].part_id == frames[-1].frame_id


def test_acquirer_destroyed_goes_down_then_recovers() -> None:
    rec = Rec()
    settings = cam(stall_timeout_s=1.0, reopen_backoff_min_s=0.05)
    src = GenicamSource(settings)
    w = CameraWorker.from_settings(
        settings, on_frame=rec.on_frame, on_state=rec.on_state, source=src
    )
    w.start()
    try:
        wait_until(lambda: rec.count() >= 10, 10, "frames before the fault")
        src.destroy_acquirer()
        wait_until(lambda: [s for s, _ in rec.states] == ["up", "down", "up"], 10, "down, up")
        before = rec.count()
        wait_until(lambda: rec.count() >= before + 10, 10, "frames after recovery")
    finally:
        w.stop(5)
    down_reason = rec.states[1][1]
    assert down_reason is not None and "destroyed" in down_reason
    assert w.stats()["reopens"] == 1


def test_rejected_settings_give_clear_errors() -> None:
    bad = cam(
        nodes={"width": 99999, "height": 10, "pixel_format": "Foo", "extra": {"Bogus": 1}},
        required_nodes=["ExposureTime"],
        max_frame={"action": "downscale"},  # the device, not the frame-size check, rejects it
    )
    with pytest.raises(CameraConfigError) as ei:
        GenicamSource(bad).open()
    msg = str(ei.value)
    assert "Width (from width): 99999 is out of range [8, 4096]" in msg
    assert "Height (from height): 10 is not on the increment grid" in msg
    assert "'Foo' is not one of Mono8" in msg
    assert "required node ExposureTime does not exist" in msg
    # The device is released after a failed configure: a good config opens it right away.
    ok = GenicamSource(cam(nodes={"exposure_us": 500.0, "gain": 2.0}))
    ok.open()
    try:
        assert ok.node_report is not None
        assert ok.node_report.missing == ["ExposureTime or ExposureTimeAbs", "Gain or GainRaw"]
    finally:
        ok.close()
    with pytest.raises(CameraConfigError, match="below the device minimum 5"):
        GenicamSource(cam(buffer_count=2)).open()


def test_rejected_settings_reported_through_worker() -> None:
    rec = Rec()
    w = CameraWorker.from_settings(
        cam(nodes={"width": 5000}, reopen_backoff_min_s=5, max_frame={"action": "downscale"}),
        on_frame=rec.on_frame, on_state=rec.on_state,
    )
    w.start()
    wait_until(lambda: bool(rec.states), 10, "state report")
    w.stop(5)
    assert rec.states[0][0] == "down"
    assert "config failed" in str(rec.states[0][1]) and "Width" in str(rec.states[0][1])


def test_device_selection_errors_list_candidates() -> None:
    s = cam(serial=None, device={"user_defined_name": "Center"})
    with pytest.raises(CameraConfigError, match="ambiguous: 4 devices match") as ei:
        GenicamSource(s).open()
    assert "SN_InterfaceB_1" in str(ei.value)
    with pytest.raises(CameraError, match="no device matches") as ei2:
        GenicamSource(cam(serial="NOPE")).open()
    assert "SN_InterfaceA_0" in str(ei2.value)
    sel = {"model": "TLSimuColor", "serial_number": COLOUR_A}
    one = GenicamSource(cam(serial=None, device=sel))
    one.open()
    one.close()
    with pytest.raises(CameraConfigError, match="does not exist"):
        GenicamSource(cam(cti=[Path("/nonexistent/x.cti")])).open()


def test_colour_device_to_bgr_and_two_cameras_share_a_producer() -> None:
    colour = GenicamSource(cam(serial=COLOUR_A, id="c", nodes={}, output="bgr8"))
    mono = GenicamSource(cam(serial=MONO_B, id="m", output="mono8"))
    colour.open()
    mono.open()
    try:
        fc = fm = None
        for _ in range(50):
            fc = fc or colour.read(0.5)
            fm = fm or mono.read(0.5)
            if fc and fm:
                break
        assert fc is not None and fm is not None
        assert fc.pixel_format == "BGR8" and fc.image.ndim == 3 and fc.image.shape[2] == 3
        assert fc.source_meta["device_pixel_format"] == "RGB8"
        assert fm.image.shape == (480, 640)
        assert (fc.image.flags.c_contiguous and fc.image.flags.owndata) or fc.image.base is not None
        arr = np.asarray(fc.image)
        assert arr.dtype == np.uint8
    finally:
        colour.close()
        mono.close()


def test_worker_fires_software_triggers_at_a_rate() -> None:
    rec = Rec()
    w = CameraWorker.from_settings(
        cam(trigger={"mode": "triggered", "source": "software", "rate_hz": 40.0}),
        on_frame=rec.on_frame, on_state=rec.on_state,
    )
    w.start()
    try:
        wait_until(lambda: rec.count() >= 30, 10, "30 triggered parts")
    finally:
        w.stop(5)
    frames = rec.frames
    assert [f.part_id for f in frames] == list(range(1, len(frames) + 1))
    span_s = (frames[-1].captured_ns - frames[0].captured_ns) / 1e9
    assert (len(frames) - 1) / span_s == pytest.approx(40.0, rel=0.25)


class Lost:
    def __init__(self) -> None:
        self.parts: list[int] = []
        self.reasons: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, _cam: str, part: int, reason: str) -> None:
        with self.lock:
            self.parts.append(part)
            self.reasons.append(reason)

    def count(self) -> int:
        with self.lock:
            return len(self.parts)


def test_plc_triggers_give_frames_with_exactly_those_part_ids() -> None:
    """source: plc on a real GenTL producer: TriggerSoftware per part, the PLC's ids, in order,
    even when the daemon fires them back to back (TLSimu alone drops triggers < ~5 ms apart)."""
    rec = Rec()
    lost = Lost()
    w = CameraWorker.from_settings(
        cam(trigger={"mode": "triggered", "source": "plc"}),
        on_frame=rec.on_frame, on_state=rec.on_state, on_trigger_lost=lost,
    )
    assert w.triggered_by_plc
    w.start()
    try:
        wait_until(lambda: w.state == "up", 10, "camera up")
        parts = [70_000 + 13 * i for i in range(15)] + [5, 4_000_000_000]
        for p in parts:
            assert w.trigger(p)
        wait_until(lambda: rec.count() == len(parts), 10, "one frame per trigger")
        idle = w.stats()["idle_reads"]
        wait_until(lambda: w.stats()["idle_reads"] >= idle + 3, 10, "idle reads, no trigger")
    finally:
        assert w.stop(5)
    assert [f.part_id for f in rec.frames] == parts  # and no frame without a trigger
    st = w.stats()
    assert st["triggers"] == len(parts) and st["missed"] == 0 and st["unsolicited"] == 0
    assert st["lost_triggers"] == 0 and not lost.parts


def test_plc_trigger_while_down_refused_and_reopen_reports_lost_ids() -> None:
    rec = Rec()
    lost = Lost()
    gate = threading.Event()

    def consumer(f: Frame) -> None:
        rec.on_frame(f)
        if f.part_id == 500:
            gate.wait(10)  # the consumer is busy while the PLC announces more parts

    down = CameraWorker.from_settings(
        cam(serial="SN_NOPE", trigger={"mode": "triggered", "source": "plc"}),
        on_frame=rec.on_frame, on_state=rec.on_state,
    )
    down.start()
    try:
        wait_until(lambda: down.state == "down", 10, "missing camera down")
        assert not down.trigger(1)
    finally:
        down.stop(5)

    settings = cam(trigger={"mode": "triggered", "source": "plc"}, reopen_backoff_min_s=0.05)
    src = GenicamSource(settings)
    w = CameraWorker.from_settings(settings, on_frame=consumer, on_state=rec.on_state,
                                   source=src, on_trigger_lost=lost)
    w.start()
    try:
        wait_until(lambda: w.state == "up", 10, "camera up")
        assert w.trigger(500)
        wait_until(lambda: rec.count() == 1, 10, "frame 500 in the consumer")
        for p in (501, 502, 503):
            assert w.trigger(p)
        src.destroy_acquirer()  # the device is lost while those triggers wait
        gate.set()
        wait_until(lambda: lost.count() == 3, 10, "lost parts reported")
        wait_until(lambda: [s for s, _ in rec.states] == ["down", "up", "down", "up"], 10,
                   "reopened")
        assert w.trigger(504)
        wait_until(lambda: rec.count() == 2, 10, "frame after reopen")
    finally:
        assert w.stop(5)
    assert [f.part_id for f in rec.frames] == [500, 504]
    assert lost.parts == [501, 502, 503]
    # Whoever meets the dead acquirer first says so: the fetch, or the trigger thread firing 501.
    assert all("destroyed" in r or "closed source" in r for r in lost.reasons)
    st = w.stats()
    assert st["triggers"] == 5 and st["lost_triggers"] == 3 and st["unsolicited"] == 0


def test_unknown_device_pixel_format_marks_the_frame_instead_of_raising() -> None:
    """TLSimu cannot be switched to a format we lack (its PixelFormat writes are ignored), so
    the buffer is a stand-in here: a YUV422 buffer used to raise out of read() and put the
    camera into a reopen loop; now that part gets a frame with a problem (one fail-safe)."""
    from types import SimpleNamespace

    from camera.counters import FrameIdUnwrapper, TimestampUnwrapper
    from camera.genicam import _Session
    from camera.guard import PLACEHOLDER

    src = GenicamSource(cam())
    session = _Session(ia=None, nodes=None, frame_ids=FrameIdUnwrapper(),  # type: ignore[arg-type]
                       stamps=TimestampUnwrapper(None), part_base=0)

    def buf(fmt: str, nbytes: int) -> Any:
        comp = SimpleNamespace(data_format=fmt, data=np.zeros(nbytes, np.uint8), width=8,
                               height=4)
        return SimpleNamespace(payload=SimpleNamespace(components=[comp]), frame_id=3,
                               timestamp_ns=5)

    yuv = src._frame(session, buf("YUV422_8", 64), 1, 2)
    assert yuv.problem is not None and yuv.problem.startswith("unsupported pixel format")
    assert "Mono8" in yuv.problem and yuv.image is PLACEHOLDER
    short = src._frame(session, buf("Mono8", 10), 1, 2)  # 10 bytes for an 8x4 Mono8 frame
    assert short.problem is not None and short.problem.startswith("corrupt buffer (8x4 Mono8)")
    good = src._frame(session, buf("Mono8", 32), 1, 2)
    assert good.problem is None and good.image.shape == (4, 8)
