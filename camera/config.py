"""Camera settings: one typed model per backend, selected by ``type`` in the line's YAML.

Unknown keys are errors everywhere (``extra="forbid"``): a misspelt node name in a config must fail
``edge config check``, not silently leave the camera at its power-on default on the line.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FreeRunTrigger(_Strict):
    """The camera exposes continuously; every frame is its own part (part_id = frame_id)."""

    mode: Literal["free_run"] = "free_run"
    fps: float | None = Field(
        default=None, gt=0, description="AcquisitionFrameRate to request; None = device default."
    )


class TriggeredMode(_Strict):
    """One trigger = one part.

    ``source`` says who fires the trigger and where the part id comes from:

    * ``software``: whoever calls ``CameraWorker.trigger()`` (or the worker itself at ``rate_hz``);
      part id = trigger count.
    * ``plc``: a software trigger the daemon fires when the PLC's trigger counter moves; part id
      = the id the PLC announced (passed to ``CameraWorker.trigger(part_id)``).
    * ``hardware``: the camera's trigger line (``line``, ``activation``); part id = trigger count
      from the device frame counter (``part_id: count``), or read from the PLC by the daemon when
      the frame arrives (``part_id: plc``).
    """

    mode: Literal["triggered"]
    source: Literal["software", "hardware", "plc"] = "software"
    line: str = Field(default="Line0", description="TriggerSource for hardware triggers.")
    activation: Literal["RisingEdge", "FallingEdge", "AnyEdge", "LevelHigh", "LevelLow"] = (
        "RisingEdge"
    )
    rate_hz: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="Software triggers only: the worker fires triggers itself at this rate (a "
        "stand-in for the PLC's part-present signal on a bench or with a simulator).",
    )
    part_id: Literal["plc", "count"] | None = Field(
        default=None,
        description="Hardware triggers only: 'count' (default) = the trigger count; 'plc' = the "
        "daemon reads the part id from the PLC when the frame arrives.",
    )

    @model_validator(mode="after")
    def _source_rules(self) -> TriggeredMode:
        if self.rate_hz is not None and self.source != "software":
            why = (
                "the PLC fires the triggers (remove rate_hz, or use source: software)"
                if self.source == "plc"
                else "hardware triggers come from the trigger line"
            )
            raise ValueError(f"trigger.rate_hz applies to source: software only: {why}")
        if self.part_id is not None and self.source != "hardware":
            raise ValueError(
                "trigger.part_id applies to source: hardware only (software triggers number "
                "their parts by count; source: plc takes the id the daemon passes with the trigger)"
            )
        return self

    @property
    def fires_software(self) -> bool:
        """Someone on the host fires each trigger (the worker, the daemon for the PLC)."""
        return self.source != "hardware"

    @property
    def part_id_from_plc(self) -> bool:
        """Hardware trigger whose part id the daemon reads from the PLC when the frame arrives."""
        return self.source == "hardware" and self.part_id == "plc"


TriggerSettings = Annotated[FreeRunTrigger | TriggeredMode, Field(discriminator="mode")]


class MaxFrameSettings(_Strict):
    """The largest frame a camera may hand on, and what happens to a bigger one.

    One 8000x8000 frame (a wrong ROI, a replay folder with a stray photo) cost so much to copy,
    preprocess and infer that admission control fail-safed 1030 of the next 1112 frames on the
    whole line. A frame above the limit is either ``refuse``d (handed on marked with a
    ``problem``, its pixels dropped, so the daemon writes a fail-safe REJECT for that one part)
    or ``downscale``d in the camera thread (cv2.INTER_AREA, aspect kept) before it is handed on.
    ``refuse`` is the default because a downscaled frame no longer matches ROIs and
    ``min_area_px`` given in camera pixels.
    """

    width: int = Field(default=4096, ge=8, le=65535)
    height: int = Field(default=4096, ge=8, le=65535)
    action: Literal["refuse", "downscale"] = "refuse"


class _CameraCommon(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    plc_slot: int = Field(ge=0, description="Which PLC verdict slot this camera's parts write to.")
    trigger: TriggerSettings = Field(default_factory=FreeRunTrigger)
    stall_timeout_s: float = Field(
        default=2.0, gt=0, description="No frame for this long while running = camera down."
    )
    reopen_backoff_min_s: float = Field(default=0.5, gt=0)
    reopen_backoff_max_s: float = Field(default=30.0, gt=0)
    max_frame: MaxFrameSettings = Field(default_factory=MaxFrameSettings)

    @model_validator(mode="after")
    def _backoff_order(self) -> _CameraCommon:
        if self.reopen_backoff_max_s < self.reopen_backoff_min_s:
            raise ValueError("reopen_backoff_max_s must be >= reopen_backoff_min_s")
        return self


class ReplayCameraSettings(_CameraCommon):
    """A folder of images or a video file played as a camera (demo, bench, re-inspection)."""

    type: Literal["replay"]
    path: Path

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: name a folder of images or a video file")
        return v

    fps: float = Field(default=30.0, ge=0, description="0 = as fast as the consumer reads.")
    loop: bool = True
    grayscale: bool = False
    max_lag_frames: int = Field(
        default=16,
        ge=1,
        description="How far behind schedule frames may queue (like a camera's buffer count) "
        "before overdue frames are dropped and counted as missed.",
    )


class NodeSettings(_Strict):
    """GenICam feature values, applied in a fixed order (geometry, format, exposure, gain, rate,
    trigger, then ``extra``) because each node's valid range depends on those before it."""

    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    offset_x: int | None = Field(default=None, ge=0)
    offset_y: int | None = Field(default=None, ge=0)
    pixel_format: str | None = None
    exposure_us: float | None = Field(default=None, gt=0)
    gain: float | None = None
    extra: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="Further nodes by GenICam name, applied last, in order."
    )


class DeviceSelector(_Strict):
    """How to pick one device among those a producer lists; every given field must match."""

    serial_number: str | None = None
    user_defined_name: str | None = None
    model: str | None = None


def _nodes_fit_max_frame(cam_nodes: NodeSettings, limit: MaxFrameSettings) -> None:
    """A configured ROI above ``max_frame`` with ``refuse`` would fail-safe every part: say so
    at ``edge config check`` instead of on the line."""
    if limit.action != "refuse":
        return
    for axis, value, cap in (
        ("width", cam_nodes.width, limit.width),
        ("height", cam_nodes.height, limit.height),
    ):
        if value is not None and value > cap:
            raise ValueError(
                f"nodes.{axis} {value} > max_frame.{axis} {cap} with max_frame.action: refuse: "
                f"every frame would be refused; raise max_frame.{axis} or set action: downscale"
            )


class GenicamCameraSettings(_CameraCommon):
    """A GenTL producer (.cti) driven through harvesters."""

    type: Literal["genicam"]
    cti: list[Path] = Field(min_length=1)
    device: DeviceSelector = Field(default_factory=DeviceSelector)
    nodes: NodeSettings = Field(default_factory=NodeSettings)
    required_nodes: list[str] = Field(
        default_factory=list,
        description="Node names whose absence or rejection is fatal (others are only reported).",
    )
    fetch_timeout_s: float = Field(default=0.2, gt=0)
    buffer_count: int = Field(default=8, ge=1, le=256)
    output: Literal["mono8", "bgr8"] = "mono8"
    timestamp_wrap_ns: int | None = Field(
        default=None,
        gt=0,
        description="Period after which the device timestamp wraps (TLSimu: 1_000_000_000).",
    )

    @model_validator(mode="after")
    def _fits(self) -> GenicamCameraSettings:
        _nodes_fit_max_frame(self.nodes, self.max_frame)
        return self


class AravisCameraSettings(_CameraCommon):
    """A GigE Vision camera through Aravis, opened by IP address (never by discovery)."""

    type: Literal["aravis"]
    address: str = Field(description="The camera's IPv4 address; no broadcast discovery is done.")
    interface_address: str | None = Field(
        default=None, description="Host address to talk from; None = the route to ``address``."
    )
    nodes: NodeSettings = Field(default_factory=NodeSettings)
    required_nodes: list[str] = Field(default_factory=list)
    packet_size: int | None = Field(default=None, ge=576, le=65535)

    @field_validator("address", "interface_address")
    @classmethod
    def _ipv4(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.IPv4Address(v)  # ValueError names the bad value
        return v

    fetch_timeout_s: float = Field(default=0.2, gt=0)
    buffer_count: int = Field(default=8, ge=1, le=256)
    output: Literal["mono8", "bgr8"] = "mono8"

    @model_validator(mode="after")
    def _fits(self) -> AravisCameraSettings:
        _nodes_fit_max_frame(self.nodes, self.max_frame)
        return self


CameraSettings = Annotated[
    ReplayCameraSettings | GenicamCameraSettings | AravisCameraSettings,
    Field(discriminator="type"),
]
