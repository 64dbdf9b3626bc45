"""GenICam cameras through harvesters and a GenTL producer (.cti).

Two facts about harvesters shape this module:

* A process can hold only one live Harvester per producer (a second one sees no devices), and
  ``Harvester.update()`` destroys every ImageAcquirer it created. So producers are shared through a
  process-wide pool, and a rescan happens only when no other camera on that producer is live.
* Destroying an ImageAcquirer while another thread is inside ``fetch`` segfaults the process
  (seen with TLSimu). Every fetch, and every destroy, holds the source's fetch lock, so an acquirer
  can only disappear *between* fetches; the next read then sees it invalid and raises CameraError,
  and the worker reopens it.

Buffers are requeued as soon as their pixels are converted into a frame-owned array (see
:mod:`camera.pixels`): a frame never points into driver memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from harvesters.core import Harvester, ImageAcquirer

from camera.config import DeviceSelector, GenicamCameraSettings, TriggeredMode
from camera.counters import FrameIdUnwrapper, TimestampUnwrapper, part_id_of
from camera.frame import Frame
from camera.guard import PLACEHOLDER
from camera.nodes import Kind, NodeReport, Value, apply, describe, plan
from camera.pixels import convert
from camera.source import CameraConfigError, CameraError

log = structlog.get_logger(__name__)

DEVICE_FIELDS = ("serial_number", "user_defined_name", "model", "vendor", "id_", "display_name")


# -- producers ----------------------------------------------------------------------------------
class Producer:
    """One Harvester over a set of .cti files, shared by every camera that names the same set."""

    def __init__(self, cti: tuple[str, ...]) -> None:
        self.cti = cti
        self.lock = threading.RLock()
        self.users: set[GenicamSource] = set()
        self.harvester = Harvester()
        for path in cti:
            try:
                self.harvester.add_file(path, check_validity=True)
            except OSError as exc:
                self.harvester.reset()
                raise CameraConfigError(
                    f"GenTL producer {path} cannot be loaded ({exc}); a .cti needs its companion "
                    "libraries in the same folder (TLSimu.cti needs libVirtualFG.so)"
                ) from exc
        self.scanned = False

    def rescan(self) -> None:
        """Refresh the device list; only safe when no acquirer is live (update destroys them)."""
        with self.lock:
            self.harvester.update()
            self.scanned = True

    def devices(self) -> list[dict[str, Any]]:
        with self.lock:
            if not self.scanned:
                self.rescan()
            return [_info_dict(d) for d in self.harvester.device_info_list]


_pool_lock = threading.Lock()
_pool: dict[tuple[str, ...], Producer] = {}


def get_producer(paths: list[Path]) -> Producer:
    resolved = []
    for p in paths:
        if not p.is_file():
            raise CameraConfigError(f"GenTL producer file {p} does not exist")
        resolved.append(str(p.resolve()))
    key = tuple(resolved)
    with _pool_lock:
        prod = _pool.get(key)
        if prod is None:
            prod = _pool[key] = Producer(key)
        return prod


def release_producers() -> None:
    """Drop every producer with no live camera (tests, CLI exit)."""
    with _pool_lock:
        for key, prod in list(_pool.items()):
            with prod.lock:
                if not prod.users:
                    prod.harvester.reset()
                    del _pool[key]


def default_cti() -> Path | None:
    """TLSimu.cti from the ``genicam`` wheel, when installed (simulator for tests and demos)."""
    try:
        import genicam
    except ImportError:
        return None
    p = Path(genicam.__file__).parent / "TLSimu.cti"
    return p if p.is_file() else None


def describe_devices(cti: list[Path], with_nodes: bool = True) -> list[dict[str, Any]]:
    """Devices of a producer, each with its key nodes (opened briefly, read only)."""
    prod = get_producer(cti)
    with prod.lock:
        if not prod.users:
            prod.rescan()
        devices = prod.devices()
        for i, d in enumerate(devices):
            d["nodes"] = {}
            if not with_nodes:
                continue
            try:
                ia = prod.harvester.create(i)
            except Exception as exc:
                d["error"] = f"cannot open ({type(exc).__name__}: {exc}); in use?"
                continue
            try:
                d["nodes"] = describe(HarvestersNodes(ia.remote_device.node_map))
            finally:
                ia.destroy()
    return devices


def _info_dict(info: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in DEVICE_FIELDS:
        try:
            out[name] = getattr(info, name)
        except Exception:  # producers leave fields unimplemented
            out[name] = None
    return out


def select_device(devices: list[dict[str, Any]], sel: DeviceSelector) -> int:
    """Index of the one device matching every given selector field, or a CameraConfigError."""
    wanted = {k: v for k, v in sel.model_dump().items() if v is not None}

    def describe(d: dict[str, Any]) -> str:
        return (
            f"serial_number={d['serial_number']!r} user_defined_name={d['user_defined_name']!r} "
            f"model={d['model']!r}"
        )

    if not devices:
        raise CameraError("no devices found on the GenTL producer")
    matches = [i for i, d in enumerate(devices) if all(d.get(k) == v for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    listing = "\n  - ".join(describe(devices[i]) for i in (matches or range(len(devices))))
    if not matches:
        raise CameraError(f"no device matches {wanted}; devices found:\n  - {listing}")
    raise CameraConfigError(
        f"device selector {wanted or '(empty)'} is ambiguous: {len(matches)} devices match; add "
        f"serial_number (or another field) to pick one of:\n  - {listing}"
    )


# -- node access for harvesters -----------------------------------------------------------------
class HarvestersNodes:
    """camera.nodes.NodeAccess over a harvesters/genicam node map."""

    def __init__(self, node_map: Any) -> None:
        from genicam import genapi

        self._nm = node_map
        self._g = genapi

    def _node(self, name: str) -> Any:
        return self._nm.get_node(name)

    def has(self, name: str) -> bool:
        if not self._nm.has_node(name):
            return False
        try:
            mode = self._node(name).get_access_mode()
        except Exception:
            return False
        return mode not in (self._g.EAccessMode.NI, self._g.EAccessMode.NA)

    def kind(self, name: str) -> Kind:
        n, g = self._node(name), self._g
        for cls, k in (
            (g.IInteger, "int"), (g.IFloat, "float"), (g.IEnumeration, "enum"),
            (g.IBoolean, "bool"), (g.ICommand, "command"), (g.IString, "string"),
        ):
            if isinstance(n, cls):
                return k  # type: ignore[return-value]
        return "other"

    def writable(self, name: str) -> bool:
        mode = self._node(name).get_access_mode()
        return bool(mode in (self._g.EAccessMode.RW, self._g.EAccessMode.WO))

    def bounds(self, name: str) -> tuple[float, float, float | None]:
        n = self._node(name)
        inc: float | None = None
        try:
            inc = n.inc
        except Exception:
            inc = None
        return n.min, n.max, inc

    def choices(self, name: str) -> list[str]:
        return list(self._node(name).symbolics)

    def get(self, name: str) -> Value:
        value: Value = self._node(name).value
        return value

    def set(self, name: str, value: Value) -> None:
        self._node(name).value = value

    def execute(self, name: str) -> None:
        self._node(name).execute()


# -- the source ---------------------------------------------------------------------------------
@dataclass
class _Session:
    ia: ImageAcquirer
    nodes: HarvestersNodes
    frame_ids: FrameIdUnwrapper
    stamps: TimestampUnwrapper
    part_base: int
    first_frame_id: int | None = None


class GenicamSource:
    """A FrameSource over one GenTL device; see the module docstring for the threading rules."""

    def __init__(self, settings: GenicamCameraSettings) -> None:
        self.camera_id = settings.id
        self.settings = settings
        self._triggered = isinstance(settings.trigger, TriggeredMode)
        trig = settings.trigger
        self._software_trigger = isinstance(trig, TriggeredMode) and trig.fires_software
        self._fetch_lock = threading.Lock()
        self._ctl_lock = threading.Lock()  # node access (trigger) vs. destroy
        self._producer: Producer | None = None
        self._s: _Session | None = None
        self._last_part = 0
        self.node_report: NodeReport | None = None
        self.device: dict[str, Any] | None = None

    # -- FrameSource ------------------------------------------------------------------------
    def open(self) -> None:
        if self._s is not None:
            return
        prod = get_producer(self.settings.cti)
        self._producer = prod
        with prod.lock:
            if not prod.scanned or (not prod.users and not self._listed(prod)):
                prod.rescan()
            devices = prod.devices()
            try:
                idx = select_device(devices, self.settings.device)
            except CameraConfigError:
                raise
            except CameraError as exc:
                if prod.users - {self}:
                    raise CameraError(
                        f"{exc}\n(rescan deferred: other cameras on this producer are live)"
                    ) from exc
                raise
            self.device = devices[idx]
            try:
                ia = prod.harvester.create(idx)
            except Exception as exc:
                raise CameraError(
                    f"cannot open device {self.device['serial_number']!r}: {type(exc).__name__}: "
                    f"{exc} (in use by another camera entry or process?)"
                ) from exc
            prod.users.add(self)
        try:
            self._configure(ia)
        except BaseException:
            self._destroy(ia)
            raise

    def _listed(self, prod: Producer) -> bool:
        try:
            select_device(prod.devices(), self.settings.device)
        except CameraError:
            return False
        return True

    def _configure(self, ia: ImageAcquirer) -> None:
        st = self.settings
        nodes = HarvestersNodes(ia.remote_device.node_map)
        steps = plan(st.nodes, st.trigger, st.required_nodes)
        report = apply(nodes, steps, st.required_nodes, st.id)
        if self._software_trigger and not nodes.has("TriggerSoftware"):
            raise CameraConfigError(
                f"camera {st.id}: software trigger requested but the device has no TriggerSoftware"
            )
        if st.buffer_count < ia.min_num_buffers:
            raise CameraConfigError(
                f"camera {st.id}: buffer_count {st.buffer_count} is below the device minimum "
                f"{ia.min_num_buffers}"
            )
        ia.num_buffers = st.buffer_count
        self.node_report = report
        if report.missing or report.warnings:
            log.warning("camera_nodes", camera=st.id, **report.as_dict())
        else:
            log.info("camera_nodes", camera=st.id, applied=report.applied)
        try:
            ia.start()
        except Exception as exc:
            raise CameraError(f"camera {st.id}: acquisition start failed: {exc}") from exc
        self._s = _Session(
            ia=ia,
            nodes=nodes,
            frame_ids=FrameIdUnwrapper(),
            stamps=TimestampUnwrapper(st.timestamp_wrap_ns),
            part_base=self._last_part,
        )

    def read(self, timeout_s: float) -> Frame | None:
        with self._fetch_lock:
            s = self._s
            if s is None:
                raise CameraError(f"camera {self.camera_id}: read on a closed source")
            if not s.ia.is_valid():
                raise CameraError(f"camera {self.camera_id}: image acquirer was destroyed")
            try:
                buf = s.ia.try_fetch(timeout=min(timeout_s, self.settings.fetch_timeout_s))
            except Exception as exc:
                raise CameraError(f"camera {self.camera_id}: fetch failed: {exc}") from exc
            if buf is None:
                return None
            arrived_ns = time.monotonic_ns()
            wall_ns = time.time_ns()
            try:
                return self._frame(s, buf, arrived_ns, wall_ns)
            finally:
                buf.queue()

    def _frame(self, s: _Session, buf: Any, arrived_ns: int, wall_ns: int) -> Frame:
        comp = buf.payload.components[0]
        fmt = str(comp.data_format)
        problem: str | None = None
        try:
            image, out_fmt = convert(comp.data, comp.width, comp.height, fmt, self.settings.output)
        except CameraConfigError as exc:  # the frame is still a part: mark it, never raise
            image, out_fmt, problem = PLACEHOLDER, "Mono8", f"unsupported pixel format: {exc}"
        except ValueError as exc:  # buffer size does not match width x height x format
            image, out_fmt = PLACEHOLDER, "Mono8"
            problem = f"corrupt buffer ({comp.width}x{comp.height} {fmt}): {exc}"
        try:
            raw_id: int | None = int(buf.frame_id)
        except Exception:
            raw_id = None
        try:
            raw_ts: int | None = int(buf.timestamp_ns)
        except Exception:  # NotAvailableException on producers without timestamps
            raw_ts = None
        frame_id = s.frame_ids(raw_id) if raw_id is not None else s.frame_ids.next()
        if s.first_frame_id is None:
            s.first_frame_id = frame_id
        # Software triggers: the worker replaces this count with the id it queued the trigger
        # under (camera.triggerq); used standalone (CLI snapshot) the count is all there is.
        part_id = part_id_of(frame_id, s.first_frame_id, s.part_base, self._triggered)
        self._last_part = max(self._last_part, part_id)
        ready_ns = time.monotonic_ns()
        return Frame(
            camera_id=self.camera_id,
            frame_id=frame_id,
            part_id=part_id,
            captured_ns=arrived_ns,
            captured_wall_ns=wall_ns,
            image=image,
            pixel_format=out_fmt,
            device_timestamp_ns=s.stamps(raw_ts, arrived_ns),
            source_meta={"device_pixel_format": fmt, "raw_frame_id": raw_id,
                         "ready_ns": ready_ns},
            problem=problem,
        )

    def trigger(self) -> None:
        """Execute TriggerSoftware once. Raises CameraError when it cannot; serialising
        triggers (one in flight) is the worker's job, see camera.triggerq."""
        if self._software_trigger:
            self._fire()

    def _fire(self) -> None:
        with self._ctl_lock:
            s = self._s
            if s is None or not s.ia.is_valid():
                raise CameraError(f"camera {self.camera_id}: trigger on a closed source")
            try:
                s.nodes.execute("TriggerSoftware")
            except Exception as exc:
                raise CameraError(
                    f"camera {self.camera_id}: TriggerSoftware failed: {exc}"
                ) from exc

    def close(self) -> None:
        with self._fetch_lock:
            s, self._s = self._s, None
        if s is not None:
            self._destroy(s.ia)

    # -- internals --------------------------------------------------------------------------
    def _destroy(self, ia: ImageAcquirer) -> None:
        with self._fetch_lock, self._ctl_lock:
            try:
                if ia.is_valid():
                    ia.stop()
                ia.destroy()
            except Exception as exc:
                log.warning("camera_destroy_failed", camera=self.camera_id, error=str(exc))
        if self._producer is not None:
            with self._producer.lock:
                self._producer.users.discard(self)

    def node_access(self) -> HarvestersNodes | None:
        """The live node map (calibration adjusts exposure through it while acquiring)."""
        s = self._s
        return s.nodes if s else None

    def destroy_acquirer(self) -> None:
        """Destroy the acquirer *between* fetches, as a producer rescan or a lost device would;
        the next read raises CameraError. For fault-injection tests and diagnostics."""
        with self._fetch_lock, self._ctl_lock:
            s = self._s
            if s is not None:
                s.ia.destroy()
