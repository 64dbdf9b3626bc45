"""Pure logic of the frame guard (max_frame, image format) and the trigger FIFO with part ids."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

from camera.config import GenicamCameraSettings, MaxFrameSettings, TriggeredMode
from camera.frame import Frame
from camera.guard import PLACEHOLDER, FrameGuard
from camera.triggerq import TriggerQueue


def frame(img: object, **kw: object) -> Frame:
    return Frame("c", 7, 7, time.monotonic_ns(), time.time_ns(), img, **kw)  # type: ignore[arg-type]


def test_oversized_refused_by_default_with_placeholder_and_shape_kept() -> None:
    big = np.ones((5000, 4100), np.uint8)
    out, verdict = FrameGuard().check(frame(big, source_meta={"file": "x.png"}))
    assert verdict == "refused"
    assert out.problem == "oversized 4100x5000 > 4096x4096 (max_frame)"
    assert out.image is PLACEHOLDER and out.image.nbytes == 64
    assert out.source_meta == {"file": "x.png", "original_shape": [5000, 4100],
                               "original_dtype": "uint8"}
    assert (out.frame_id, out.part_id) == (7, 7)
    at_limit = np.ones((4096, 4096), np.uint8)
    ok, verdict = FrameGuard().check(frame(at_limit))
    assert verdict == "ok" and ok.image is at_limit and ok.problem is None


def test_downscale_keeps_aspect_and_fits_both_limits() -> None:
    g = FrameGuard(MaxFrameSettings(width=400, height=300, action="downscale"))
    img = np.zeros((1000, 2000, 3), np.uint8)
    img[:, 1000:] = 200  # right half bright: survives INTER_AREA as a right half
    out, verdict = g.check(frame(img))
    assert verdict == "downscaled" and out.problem is None
    assert out.image.shape == (200, 400, 3) and out.image.dtype == np.uint8
    assert out.image[:, :190].max() == 0 and out.image[:, 210:].min() == 200
    assert out.source_meta["downscaled_from"] == [2000, 1000]
    tall, _ = g.check(frame(np.zeros((3000, 500), np.uint8)))
    assert tall.image.shape == (300, 50)


@pytest.mark.parametrize(
    ("img", "expect"),
    [
        (np.zeros((10, 10), np.uint16), "unsupported pixel format: uint16"),
        (np.zeros((10, 10, 4), np.uint8), "unsupported pixel format: uint8 array of shape (10,"),
        (np.zeros((10, 10), np.float32), "unsupported pixel format: float32"),
        (np.zeros((0, 10), np.uint8), "empty image"),
        (np.zeros((4, 4, 4, 3), np.uint8), "unsupported pixel format"),
        (b"raw bytes", "unsupported image type bytes"),
    ],
)
def test_unusable_images_are_marked_never_raised(img: object, expect: str) -> None:
    out, verdict = FrameGuard().check(frame(img))
    assert verdict == "refused"
    assert out.problem is not None and out.problem.startswith(expect)
    assert out.image is PLACEHOLDER


def test_backend_problem_kept_and_noncontiguous_fixed() -> None:
    out, verdict = FrameGuard().check(frame(np.ones((4, 4), np.uint8), problem="corrupt buffer"))
    assert verdict == "refused" and out.problem == "corrupt buffer" and out.image is PLACEHOLDER
    view = np.arange(200, dtype=np.uint8).reshape(10, 20)[:, ::2]
    fixed, verdict = FrameGuard().check(frame(view))
    assert verdict == "ok" and fixed.image.flags.c_contiguous
    assert np.array_equal(fixed.image, view)


def test_max_frame_settings_validated() -> None:
    with pytest.raises(ValidationError):
        MaxFrameSettings(width=0)
    with pytest.raises(ValidationError):
        MaxFrameSettings.model_validate({"width": 100, "action": "crop"})
    base = {"type": "genicam", "id": "g", "plc_slot": 0, "cti": ["/x.cti"]}
    with pytest.raises(ValidationError, match=r"nodes\.width 5000 > max_frame\.width 4096"):
        GenicamCameraSettings.model_validate({**base, "nodes": {"width": 5000}})
    ok = GenicamCameraSettings.model_validate(
        {**base, "nodes": {"width": 5000}, "max_frame": {"action": "downscale"}}
    )
    assert ok.max_frame.width == 4096 and ok.max_frame.action == "downscale"


def test_trigger_modes_validated() -> None:
    plc = TriggeredMode.model_validate({"mode": "triggered", "source": "plc"})
    assert plc.fires_software and not plc.part_id_from_plc
    with pytest.raises(ValidationError, match="the PLC fires the triggers"):
        TriggeredMode.model_validate({"mode": "triggered", "source": "plc", "rate_hz": 10})
    with pytest.raises(ValidationError, match="part_id applies to source: hardware only"):
        TriggeredMode.model_validate({"mode": "triggered", "source": "plc", "part_id": "plc"})
    hw = TriggeredMode.model_validate({"mode": "triggered", "source": "hardware", "part_id": "plc"})
    assert hw.part_id_from_plc and not hw.fires_software
    hw_count = TriggeredMode.model_validate({"mode": "triggered", "source": "hardware"})
    assert not hw_count.part_id_from_plc


def test_trigger_queue_one_in_flight_ids_in_order_and_every_id_ends_once() -> None:
    q = TriggerQueue(max_pending=3)
    assert q.request(5) is None  # closed: refused
    q.open()
    assert [q.request(p) for p in (10, 11)] == [10, 11]
    assert q.request(None) == 3  # no id given: the trigger count (3rd accepted)
    assert q.request(12) is None  # max_pending waiting
    assert q.take_next() == 10 and q.take_next() is None  # one in flight
    assert q.in_flight_since() is not None and q.pending() == 3
    assert q.answered() == 10 and q.answered() is None  # a second frame answers nothing
    assert q.take_next() == 11
    assert q.fire_failed(11) and not q.fire_failed(11)  # reported once
    assert q.take_next() == 3
    assert q.answered() == 3
    assert q.fire_failed(3) is False  # already answered: not lost
    assert q.request(20) == 20 and q.take_next() == 20 and q.request(21) == 21
    assert q.close() == [20, 21] and q.close() == []
    assert q.request(22) is None and q.pending() == 0
