"""Applying camera settings to GenICam nodes: a fixed order, range checks, clear errors.

Order matters because each node's valid range depends on earlier ones: PixelFormat changes the
Width increment, offsets must drop to 0 before the ROI can grow, and AcquisitionFrameRate is
often locked while a trigger is on. The order (see :func:`plan`) is the same for every backend.

Nodes the device lacks are reported (cameras differ: ExposureTime vs ExposureTimeAbs, no Gain on
a simulator) and fatal only when the line lists them in ``required_nodes``: a line that depends on
a fixed exposure must not start with whatever the camera powered up with. A value out of range is
always fatal: silently clamping an exposure would change what the model sees.

Backends adapt their node maps to :class:`NodeAccess`; the logic here is backend-free and
unit-testable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from camera.config import FreeRunTrigger, NodeSettings, TriggeredMode
from camera.source import CameraConfigError

Kind = Literal["int", "float", "enum", "bool", "command", "string", "other"]
Value = int | float | bool | str


class NodeAccess(Protocol):
    def has(self, name: str) -> bool: ...
    def kind(self, name: str) -> Kind: ...
    def writable(self, name: str) -> bool: ...
    def bounds(self, name: str) -> tuple[float, float, float | None]:
        """(min, max, increment or None) of a numeric node."""
        ...
    def choices(self, name: str) -> list[str]: ...
    def get(self, name: str) -> Value: ...
    def set(self, name: str, value: Value) -> None: ...


@dataclass(frozen=True)
class Step:
    key: str
    """The config key that asked for it (for error messages)."""
    names: tuple[str, ...]
    """Node names tried in order (ExposureTime, then the GigE-era ExposureTimeAbs)."""
    value: Value
    implicit: bool = False
    """A helper step (offsets to 0, ExposureAuto Off): silently skipped if the node is absent."""
    required: bool = False


@dataclass
class NodeReport:
    applied: dict[str, Value] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"applied": self.applied, "missing": self.missing, "warnings": self.warnings}


def plan(
    nodes: NodeSettings, trigger: FreeRunTrigger | TriggeredMode, required: Sequence[str] = ()
) -> list[Step]:
    """The ordered steps for one camera's settings (pure: no device needed)."""
    req = set(required)
    steps: list[Step] = []

    def add(key: str, names: tuple[str, ...], value: Value | None, implicit: bool = False) -> None:
        if value is None:
            return
        must = key in req or any(n in req for n in names)
        steps.append(Step(key, names, value, implicit, must and not implicit))

    add("pixel_format", ("PixelFormat",), nodes.pixel_format)
    if nodes.width is not None or nodes.height is not None:
        add("offset_x", ("OffsetX",), 0, implicit=True)
        add("offset_y", ("OffsetY",), 0, implicit=True)
    add("width", ("Width",), nodes.width)
    add("height", ("Height",), nodes.height)
    add("offset_x", ("OffsetX",), nodes.offset_x)
    add("offset_y", ("OffsetY",), nodes.offset_y)
    if nodes.exposure_us is not None:
        add("exposure_us", ("ExposureAuto",), "Off", implicit=True)
        add("exposure_us", ("ExposureTime", "ExposureTimeAbs"), nodes.exposure_us)
    if nodes.gain is not None:
        add("gain", ("GainAuto",), "Off", implicit=True)
        add("gain", ("Gain", "GainRaw"), nodes.gain)
    add("trigger", ("TriggerSelector",), "FrameStart", implicit=True)
    if isinstance(trigger, TriggeredMode):
        # Frame rate is left alone: in triggered mode the trigger sets the pace.
        src = "Software" if trigger.fires_software else trigger.line
        steps.append(Step("trigger.mode", ("TriggerMode",), "On", required=True))
        steps.append(Step("trigger.source", ("TriggerSource",), src, required=True))
        if trigger.source == "hardware":
            add("trigger.activation", ("TriggerActivation",), trigger.activation)
    else:
        add("trigger.mode", ("TriggerMode",), "Off")
        if trigger.fps is not None:
            add("trigger.fps", ("AcquisitionFrameRateEnable",), True, implicit=True)
            add("trigger.fps", ("AcquisitionFrameRate", "AcquisitionFrameRateAbs"), trigger.fps)
    for name, value in nodes.extra.items():
        add(f"nodes.extra.{name}", (name,), value)
    return steps


def _check(acc: NodeAccess, name: str, value: Value) -> Value:
    """Validate (and coerce) one value against the node; raise ValueError with the reason."""
    kind = acc.kind(name)
    if not acc.writable(name):
        raise ValueError("is not writable now (read-only, or locked by another setting)")
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"needs a number, got {value!r}")
        lo, hi, inc = acc.bounds(name)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range [{_fmt(lo)}, {_fmt(hi)}]")
        if kind == "int":
            if value != int(value):
                raise ValueError(f"needs an integer, got {value}")
            value = int(value)
            if inc and (value - lo) % inc:
                raise ValueError(
                    f"{value} is not on the increment grid: min {_fmt(lo)} + k*{_fmt(inc)}"
                )
        return value
    if kind == "enum":
        options = acc.choices(name)
        if str(value) not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"needs true/false, got {value!r}")
        return value
    if kind == "string":
        return str(value)
    raise ValueError(f"has type {kind} and cannot be set from a config value")


check_value = _check


KEY_NODES = (
    "DeviceModelName", "DeviceSerialNumber", "Width", "Height", "OffsetX", "OffsetY",
    "PixelFormat", "ExposureTime", "ExposureTimeAbs", "Gain", "GainRaw", "AcquisitionFrameRate",
    "TriggerMode", "TriggerSource", "TriggerActivation", "GevSCPSPacketSize",
)


def describe(acc: NodeAccess, names: Sequence[str] = KEY_NODES) -> dict[str, str]:
    """'value [range or choices]' for each node the device has (for ``edge camera list``)."""
    out: dict[str, str] = {}
    for name in names:
        if not acc.has(name):
            continue
        try:
            kind = acc.kind(name)
            text = str(acc.get(name)) if kind != "command" else "(command)"
            if kind in ("int", "float"):
                lo, hi, inc = acc.bounds(name)
                text += f"  [{_fmt(lo)}..{_fmt(hi)}" + (f" step {_fmt(inc)}]" if inc else "]")
            elif kind == "enum":
                text += f"  {{{', '.join(acc.choices(name))}}}"
            if not acc.writable(name):
                text += "  (read-only)"
        except Exception as exc:  # a node that fails to read is reported, not fatal
            text = f"(unreadable: {exc})"
        out[name] = text
    return out


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _same(kind: Kind, a: Value, b: Value) -> bool:
    if kind == "float" and isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-3, abs_tol=1e-6)
    return str(a) == str(b)


def apply(
    acc: NodeAccess, steps: Sequence[Step], required: Sequence[str] = (), camera_id: str = ""
) -> NodeReport:
    """Apply ``steps`` in order; return the report, or raise one error listing every fatal issue."""
    report = NodeReport()
    fatal: list[str] = []
    for req in required:
        if not acc.has(req) and not any(req == s.key or req in s.names for s in steps):
            fatal.append(f"required node {req} does not exist on this device")
    for step in steps:
        name = next((n for n in step.names if acc.has(n)), None)
        label = " or ".join(step.names)
        if name is None:
            if step.implicit:
                continue
            msg = f"{label} (from {step.key}) does not exist on this device"
            (fatal.append(msg) if step.required else report.missing.append(label))
            continue
        try:
            value = _check(acc, name, step.value)
        except ValueError as exc:
            if step.implicit:
                continue
            fatal.append(f"{name} (from {step.key}): {exc}")
            continue
        kind = acc.kind(name)
        try:
            acc.set(name, value)
            got = acc.get(name)
        except Exception as exc:  # the device's own refusal, in its words
            if step.implicit:
                continue
            fatal.append(f"{name} (from {step.key}) = {value!r} rejected by the device: {exc}")
            continue
        if not _same(kind, got, value):
            msg = f"{name} (from {step.key}): wrote {value!r} but the device reports {got!r}"
            (fatal.append(msg) if step.required else report.warnings.append(msg))
            continue
        report.applied[name] = got
    if fatal:
        prefix = f"camera {camera_id}: " if camera_id else ""
        raise CameraConfigError(
            prefix + "settings rejected:\n  - " + "\n  - ".join(fatal)
        )
    return report
