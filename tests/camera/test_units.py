"""Pure logic: counter unwrapping, pixel conversion, node plans, settings validation."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from camera.config import (
    CameraSettings,
    FreeRunTrigger,
    GenicamCameraSettings,
    NodeSettings,
    ReplayCameraSettings,
    TriggeredMode,
)
from camera.counters import FrameIdUnwrapper, TimestampUnwrapper
from camera.nodes import Kind, Value, apply, plan
from camera.pixels import convert
from camera.source import CameraConfigError

# -- counters ---------------------------------------------------------------------------------


def test_gige_block_id_wraps_65535_to_1_without_a_gap() -> None:
    u = FrameIdUnwrapper(modulus=1 << 16, skip_zero=True)
    ids = [u(r) for r in (65533, 65534, 65535, 1, 2)]
    assert ids == [65533, 65534, 65535, 65536, 65537]
    assert u.wraps == 1


def test_wrap_with_loss_counts_the_lost_ids() -> None:
    u = FrameIdUnwrapper(modulus=1 << 16, skip_zero=True)
    assert [u(r) for r in (65534, 3)] == [65534, 65534 + 4]  # 65535, 1, 2 lost
    plain = FrameIdUnwrapper(modulus=1 << 16)
    assert [plain(r) for r in (65535, 0, 1)] == [65535, 65536, 65537]


def test_device_restart_is_rebased_not_a_huge_gap() -> None:
    u = FrameIdUnwrapper(modulus=1 << 16)
    assert [u(r) for r in (500, 501, 0, 1)] == [500, 501, 502, 503]
    assert u.restarts == 1 and u.wraps == 0


def test_timestamp_unwrap_uses_host_clock_for_long_gaps() -> None:
    p = 1_000_000_000
    u = TimestampUnwrapper(p)
    host = 10_000_000_000
    assert u(900_000_000, host) == 900_000_000
    assert u(950_000_000, host + 50_000_000) == 950_000_000
    assert u(10_000_000, host + 110_000_000) == 1_010_000_000  # one wrap
    # 2.5 s later (a slow trigger): raw alone cannot tell how many wraps; the host clock can
    assert u(510_000_000, host + 2_610_000_000) == 3_510_000_000
    assert u(None, host) is None
    assert TimestampUnwrapper(None)(123, host) == 123


# -- pixels -----------------------------------------------------------------------------------


def test_bayer_rg_red_becomes_red_in_bgr() -> None:
    m = np.zeros((8, 8), np.uint8)
    m[0::2, 0::2] = 255  # GenICam BayerRG8: R at (0, 0)
    out, fmt = convert(m.ravel(), 8, 8, "BayerRG8", "bgr8")
    assert fmt == "BGR8" and tuple(out[4, 4]) == (0, 0, 255)
    m2 = np.zeros((8, 8), np.uint8)
    m2[1::2, 1::2] = 255  # BayerBG8: B at (0, 0), R at (1, 1)
    out2, _ = convert(m2.ravel(), 8, 8, "BayerBG8", "bgr8")
    assert tuple(out2[4, 4]) == (0, 0, 255)


def test_colour_and_mono_conversions_copy_and_swap() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 200  # red
    flat = rgb.ravel()
    bgr, fmt = convert(flat, 3, 2, "RGB8", "bgr8")
    assert fmt == "BGR8" and tuple(bgr[0, 0]) == (0, 0, 200)
    assert not np.shares_memory(bgr, flat)
    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)]).ravel()
    assert tuple(convert(rgba, 3, 2, "RGBa8", "bgr8")[0][1, 1]) == (0, 0, 200)
    gray, gfmt = convert(flat, 3, 2, "RGB8", "mono8")
    assert gfmt == "Mono8" and gray.shape == (2, 3)
    assert gray[0, 0] == round(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[0, 0])
    mono = np.arange(6, dtype=np.uint8)
    m8, _ = convert(mono, 3, 2, "Mono8", "mono8")
    assert m8.shape == (2, 3) and not np.shares_memory(m8, mono) and m8.flags.c_contiguous
    m16 = np.array([0, 4095, 2048, 16, 0, 0], np.uint16)
    assert convert(m16, 3, 2, "Mono12", "mono8")[0][0].tolist() == [0, 255, 128]
    with pytest.raises(CameraConfigError, match=r"YUV422Packed.*not supported.*Mono8"):
        convert(mono, 3, 2, "YUV422Packed", "mono8")


# -- node plans -------------------------------------------------------------------------------


class FakeNodes:
    """A device node map in a dict (unit test of the ordering/checking logic only)."""

    def __init__(self, spec: dict[str, dict[str, Any]]) -> None:
        self.spec = spec
        self.writes: list[tuple[str, Value]] = []

    def has(self, name: str) -> bool:
        return name in self.spec

    def kind(self, name: str) -> Kind:
        k: Kind = self.spec[name]["kind"]
        return k

    def writable(self, name: str) -> bool:
        return bool(self.spec[name].get("rw", True))

    def bounds(self, name: str) -> tuple[float, float, float | None]:
        s = self.spec[name]
        return s["min"], s["max"], s.get("inc")

    def choices(self, name: str) -> list[str]:
        return list(self.spec[name]["choices"])

    def get(self, name: str) -> Value:
        v: Value = self.spec[name]["value"]
        return v

    def set(self, name: str, value: Value) -> None:
        self.writes.append((name, value))
        if not self.spec[name].get("sticky"):
            self.spec[name]["value"] = value


def device() -> FakeNodes:
    return FakeNodes({
        "PixelFormat": {"kind": "enum", "choices": ["Mono8", "BayerRG8"], "value": "Mono8"},
        "OffsetX": {"kind": "int", "min": 0, "max": 100, "inc": 2, "value": 50},
        "Width": {"kind": "int", "min": 16, "max": 1280, "inc": 16, "value": 640},
        "Height": {"kind": "int", "min": 8, "max": 1024, "inc": 2, "value": 480},
        "ExposureTimeAbs": {"kind": "float", "min": 10.0, "max": 1e6, "value": 5000.0},
        "TriggerMode": {"kind": "enum", "choices": ["Off", "On"], "value": "Off"},
        "TriggerSource": {"kind": "enum", "choices": ["Software", "Line1"], "value": "Line1"},
        "AcquisitionFrameRate": {"kind": "float", "min": 1, "max": 100, "value": 30.0,
                                 "sticky": True},
    })


def test_plan_order_and_alternative_names() -> None:
    d = device()
    nodes = NodeSettings(width=1280, height=1024, offset_x=0, pixel_format="BayerRG8",
                         exposure_us=800.0)
    rep = apply(d, plan(nodes, TriggeredMode(mode="triggered")))
    assert [n for n, _ in d.writes] == [
        "PixelFormat", "OffsetX", "Width", "Height", "OffsetX", "ExposureTimeAbs",
        "TriggerMode", "TriggerSource",
    ]
    assert rep.applied["ExposureTimeAbs"] == 800.0 and rep.applied["TriggerSource"] == "Software"
    assert rep.missing == []


def test_missing_nodes_reported_unless_required_and_readback_checked() -> None:
    d = device()
    rep = apply(d, plan(NodeSettings(gain=3.0), FreeRunTrigger(fps=50)))
    assert rep.missing == ["Gain or GainRaw"]
    assert any("AcquisitionFrameRate" in w and "reports 30.0" in w for w in rep.warnings)
    with pytest.raises(CameraConfigError, match=r"Gain or GainRaw .* does not exist"):
        apply(device(), plan(NodeSettings(gain=3.0), FreeRunTrigger(), ["gain"]), ["gain"])


def test_range_and_type_errors_are_all_listed() -> None:
    d = device()
    d.spec["Height"]["rw"] = False
    with pytest.raises(CameraConfigError) as ei:
        apply(d, plan(NodeSettings(width=1300, height=100, exposure_us=1.0,
                                   extra={"TriggerSource": "Line9"}), FreeRunTrigger()),
              camera_id="cam7")
    msg = str(ei.value)
    assert msg.startswith("camera cam7: settings rejected")
    assert "Width (from width): 1300 is out of range [16, 1280]" in msg
    assert "Height (from height): is not writable" in msg
    assert "ExposureTimeAbs (from exposure_us): 1.0 is out of range [10, 1000000]" in msg
    assert "'Line9' is not one of Software, Line1" in msg
    with pytest.raises(CameraConfigError, match="increment grid: min 16"):
        apply(device(), plan(NodeSettings(width=100), FreeRunTrigger()))


# -- settings ---------------------------------------------------------------------------------


def test_settings_union_and_unknown_keys(tmp_path: Any) -> None:
    ta: TypeAdapter[Any] = TypeAdapter(CameraSettings)
    r = ta.validate_python({"type": "replay", "id": "a", "plc_slot": 0, "path": str(tmp_path)})
    assert isinstance(r, ReplayCameraSettings) and isinstance(r.trigger, FreeRunTrigger)
    g = ta.validate_python({"type": "genicam", "id": "b", "plc_slot": 1, "cti": ["/x.cti"],
                            "trigger": {"mode": "triggered", "source": "hardware"}})
    assert isinstance(g, GenicamCameraSettings) and isinstance(g.trigger, TriggeredMode)
    for bad in (
        {"type": "usb", "id": "a", "plc_slot": 0},
        {"type": "genicam", "id": "a", "plc_slot": 0, "cti": ["/x"], "nodes": {"widht": 3}},
        {"type": "genicam", "id": "a", "plc_slot": -1, "cti": ["/x"]},
        {"type": "aravis", "id": "a", "plc_slot": 0},
        {"type": "replay", "id": "a b", "plc_slot": 0, "path": "."},
        {"type": "replay", "id": "a", "plc_slot": 0, "path": ".",
         "reopen_backoff_min_s": 5, "reopen_backoff_max_s": 1},
    ):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)
