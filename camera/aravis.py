"""GigE Vision cameras through Aravis (PyGObject), for cameras without a GenTL producer.

The camera is opened by IP address with ``ArvGvDevice.new(interface, device)``: GVCP unicast to
that one address. Aravis' device-list update (and ``arv_camera_new(name)``, which falls back to
it) broadcasts discovery on every interface, which a plant network must never see from an
inspection PC; nothing here calls it.

GigE Vision block ids are 16 bits and skip 0 (65535 -> 1), so they are unwrapped before the
worker counts gaps. Incomplete buffers (lost packets) are requeued and counted; their ids show
up as missed frames.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import gi
import numpy as np
import structlog

gi.require_version("Aravis", "0.8")
from gi.repository import Aravis, Gio, GLib  # noqa: E402

from camera.config import AravisCameraSettings, TriggeredMode  # noqa: E402
from camera.counters import FrameIdUnwrapper, part_id_of  # noqa: E402
from camera.frame import Frame  # noqa: E402
from camera.guard import PLACEHOLDER  # noqa: E402
from camera.nodes import Kind, NodeReport, Step, Value, apply, describe, plan  # noqa: E402
from camera.pixels import convert  # noqa: E402
from camera.source import CameraConfigError, CameraError  # noqa: E402

log = structlog.get_logger(__name__)

# PFNC codes (GenICam Pixel Format Naming Convention) of the formats camera.pixels converts.
PFNC = {
    0x01080001: "Mono8", 0x01100003: "Mono10", 0x01100005: "Mono12", 0x01100025: "Mono14",
    0x01100007: "Mono16",
    0x01080008: "BayerGR8", 0x01080009: "BayerRG8", 0x0108000A: "BayerGB8", 0x0108000B: "BayerBG8",
    0x0110000C: "BayerGR10", 0x0110000D: "BayerRG10", 0x0110000E: "BayerGB10",
    0x0110000F: "BayerBG10", 0x01100010: "BayerGR12", 0x01100011: "BayerRG12",
    0x01100012: "BayerGB12", 0x01100013: "BayerBG12", 0x0110002E: "BayerGR16",
    0x0110002F: "BayerRG16", 0x01100030: "BayerGB16", 0x01100031: "BayerBG16",
    0x02180014: "RGB8", 0x02180015: "BGR8", 0x02200016: "RGBa8", 0x02200017: "BGRa8",
}


def local_address_for(device: str) -> str:
    """The host address the kernel would use to reach ``device``: a UDP connect() only consults
    the routing table, it sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((device, 3956))
        return str(s.getsockname()[0])


class AravisNodes:
    """camera.nodes.NodeAccess over an Aravis GenICam document."""

    def __init__(self, genicam: Any) -> None:
        self._g = genicam

    def _node(self, name: str) -> Any:
        node = self._g.get_node(name)
        if node is None:
            raise KeyError(name)
        return node

    def has(self, name: str) -> bool:
        node = self._g.get_node(name)
        if node is None:
            return False
        try:
            return bool(node.is_implemented() and node.is_available())
        except (GLib.Error, AttributeError):
            return False

    def kind(self, name: str) -> Kind:
        node = self._node(name)
        # Enumerations also implement GcInteger: the specific kinds are checked first.
        for iface, k in (
            (Aravis.GcEnumeration, "enum"), (Aravis.GcBoolean, "bool"),
            (Aravis.GcCommand, "command"), (Aravis.GcString, "string"),
            (Aravis.GcFloat, "float"), (Aravis.GcInteger, "int"),
        ):
            if isinstance(node, iface):
                return k  # type: ignore[return-value]
        return "other"

    def writable(self, name: str) -> bool:
        mode = self._node(name).get_actual_access_mode()
        return bool(mode in (Aravis.GcAccessMode.RW, Aravis.GcAccessMode.WO))

    def bounds(self, name: str) -> tuple[float, float, float | None]:
        node = self._node(name)
        inc: float | None
        try:
            inc = node.get_inc()
        except (GLib.Error, AttributeError):
            inc = None
        return node.get_min(), node.get_max(), inc

    def choices(self, name: str) -> list[str]:
        return list(self._node(name).dup_available_string_values())

    def get(self, name: str) -> Value:
        node = self._node(name)
        value: Value = (
            node.get_string_value() if isinstance(node, Aravis.GcEnumeration) else node.get_value()
        )
        return value

    def set(self, name: str, value: Value) -> None:
        node = self._node(name)
        if isinstance(node, Aravis.GcEnumeration):
            node.set_string_value(str(value))
        else:
            node.set_value(value)

    def execute(self, name: str) -> None:
        self._node(name).execute()


def describe_camera(address: str, interface_address: str | None = None) -> dict[str, Any]:
    """Key nodes of the camera at ``address`` (unicast GVCP only, no discovery)."""
    iface = interface_address or local_address_for(address)
    try:
        device = Aravis.GvDevice.new(
            Gio.InetAddress.new_from_string(iface), Gio.InetAddress.new_from_string(address)
        )
    except GLib.Error as exc:
        return {"address": address, "error": f"no answer from {address}: {exc.message}"}
    return {"address": address, "nodes": describe(AravisNodes(device.get_genicam()))}


class AravisSource:
    """A FrameSource over one GigE Vision camera, opened by IP address."""

    def __init__(self, settings: AravisCameraSettings) -> None:
        self.camera_id = settings.id
        self.settings = settings
        trig = settings.trigger
        self._triggered = isinstance(trig, TriggeredMode)
        self._software_trigger = isinstance(trig, TriggeredMode) and trig.fires_software
        self._lock = threading.Lock()
        self._cam: Any = None
        self._stream: Any = None
        self._nodes: AravisNodes | None = None
        self._lost = threading.Event()
        self._ids = FrameIdUnwrapper(modulus=1 << 16, skip_zero=True)
        self._part_base = 0
        self._first_id: int | None = None
        self._last_part = 0
        self.incomplete = 0
        self.node_report: NodeReport | None = None
        self.device: dict[str, Any] | None = None

    def open(self) -> None:
        st = self.settings
        iface = st.interface_address or local_address_for(st.address)
        try:
            device = Aravis.GvDevice.new(
                Gio.InetAddress.new_from_string(iface), Gio.InetAddress.new_from_string(st.address)
            )
            cam = Aravis.Camera.new_with_device(device)
        except GLib.Error as exc:
            raise CameraError(
                f"camera {st.id}: no GigE Vision camera answers at {st.address} "
                f"(from {iface}): {exc.message}"
            ) from exc
        nodes = AravisNodes(device.get_genicam())
        lost = threading.Event()
        # Emitted by Aravis' heartbeat thread when the camera stops answering: the only sign of
        # a vanished camera in hardware-trigger mode, where silence is normal.
        device.connect("control-lost", lambda *_a: lost.set())
        try:
            self.node_report = self._configure(cam, nodes)
            stream = cam.create_stream(None, None)
            payload = cam.get_payload()
            for _ in range(st.buffer_count):
                stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            cam.start_acquisition()
        except GLib.Error as exc:
            raise CameraError(f"camera {st.id}: acquisition start failed: {exc.message}") from exc
        self.device = {
            "address": st.address, "model": cam.get_model_name(),
            "serial_number": cam.get_device_serial_number(), "vendor": cam.get_vendor_name(),
        }
        with self._lock:
            self._cam, self._stream, self._nodes = cam, stream, nodes
            self._lost = lost
            self._ids = FrameIdUnwrapper(modulus=1 << 16, skip_zero=True)
            self._part_base = self._last_part
            self._first_id = None

    def _configure(self, cam: Any, nodes: AravisNodes) -> NodeReport:
        st = self.settings
        steps = plan(st.nodes, st.trigger, st.required_nodes)
        if st.packet_size is not None:
            # Set before the stream exists: the stream sizes its packets from this register.
            steps.append(Step("packet_size", ("GevSCPSPacketSize",), st.packet_size, required=True))
        report = apply(nodes, steps, st.required_nodes, st.id)
        if st.packet_size is not None and cam.gv_get_packet_size() != st.packet_size:
            raise CameraConfigError(
                f"camera {st.id}: packet_size {st.packet_size} not in effect (camera reports "
                f"{cam.gv_get_packet_size()})"
            )
        if self._software_trigger and not nodes.has("TriggerSoftware"):
            raise CameraConfigError(f"camera {st.id}: the device has no TriggerSoftware")
        if report.missing or report.warnings:
            log.warning("camera_nodes", camera=st.id, **report.as_dict())
        return report

    def read(self, timeout_s: float) -> Frame | None:
        stream = self._stream
        if stream is None:
            raise CameraError(f"camera {self.camera_id}: read on a closed source")
        if self._lost.is_set():
            raise CameraError(f"camera {self.camera_id}: control lost (no heartbeat answer)")
        timeout_us = int(min(timeout_s, self.settings.fetch_timeout_s) * 1e6)
        buf = stream.timeout_pop_buffer(timeout_us)
        if buf is None:
            return None
        arrived_ns = time.monotonic_ns()
        wall_ns = time.time_ns()
        try:
            if buf.get_status() != Aravis.BufferStatus.SUCCESS:
                self.incomplete += 1
                return None
            return self._frame(buf, arrived_ns, wall_ns)
        finally:
            stream.push_buffer(buf)

    def _frame(self, buf: Any, arrived_ns: int, wall_ns: int) -> Frame:
        code = buf.get_image_pixel_format()
        fmt = PFNC.get(code)
        w, h = buf.get_image_width(), buf.get_image_height()
        problem: str | None = None
        image: np.ndarray = PLACEHOLDER
        out_fmt = "Mono8"
        if fmt is None:  # the frame is still a part: mark it (fail-safe), never raise
            problem = (
                f"unsupported pixel format 0x{code:08x}; set the camera's PixelFormat to one "
                f"of {', '.join(sorted(set(PFNC.values())))}"
            )
        else:
            raw = buf.get_image_data()  # PyGObject copies into a bytes object we own
            dtype = np.uint16 if fmt.endswith(("10", "12", "14", "16")) else np.uint8
            try:
                data = np.frombuffer(raw, dtype=dtype)
                image, out_fmt = convert(data, w, h, fmt, self.settings.output, copy=False)
            except (ValueError, CameraConfigError) as exc:
                image, out_fmt = PLACEHOLDER, "Mono8"
                problem = f"corrupt buffer ({w}x{h} {fmt}, {len(raw)} bytes): {exc}"
        raw_id = int(buf.get_frame_id())
        frame_id = self._ids(raw_id)
        if self._first_id is None:
            self._first_id = frame_id
        # Software triggers: the worker replaces this count with the id it queued the trigger
        # under (camera.triggerq); used standalone (CLI snapshot) the count is all there is.
        part_id = part_id_of(frame_id, self._first_id, self._part_base, self._triggered)
        self._last_part = max(self._last_part, part_id)
        ts = int(buf.get_timestamp())
        return Frame(
            camera_id=self.camera_id,
            frame_id=frame_id,
            part_id=part_id,
            captured_ns=arrived_ns,
            captured_wall_ns=wall_ns,
            image=image,
            pixel_format=out_fmt,
            device_timestamp_ns=ts or None,
            source_meta={"device_pixel_format": fmt or f"0x{code:08x}", "raw_frame_id": raw_id,
                         "ready_ns": time.monotonic_ns()},
            problem=problem,
        )

    def trigger(self) -> None:
        """Fire one software trigger; CameraError when it cannot (the worker serialises)."""
        if self._software_trigger:
            self._fire()

    def _fire(self) -> None:
        cam = self._cam
        if cam is None:
            raise CameraError(f"camera {self.camera_id}: trigger on a closed source")
        try:
            cam.software_trigger()
        except GLib.Error as exc:
            raise CameraError(f"camera {self.camera_id}: software trigger failed: {exc}") from exc

    def node_access(self) -> AravisNodes | None:
        return self._nodes

    def close(self) -> None:
        with self._lock:
            cam, self._cam, self._stream, self._nodes = self._cam, None, None, None
        if cam is not None:
            try:
                cam.stop_acquisition()
            except GLib.Error as exc:
                log.warning("camera_stop_failed", camera=self.camera_id, error=exc.message)
