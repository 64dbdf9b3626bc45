"""Aravis scenarios run INSIDE a private network namespace (see test_aravis.py).

``unshare -n`` gives this process a network stack of its own with only ``lo``: the fake GigE
Vision camera listens on 127.0.0.1 there, and nothing this process sends (GVCP, GVSP) can reach
a real network. Each scenario prints one JSON line with what it observed; the test asserts.

    unshare -n sh -c 'ip link set lo up && python -m tests.camera.aravis_scenarios wrap'
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from camera.aravis import AravisSource
from camera.config import AravisCameraSettings
from camera.frame import Frame
from camera.source import CameraError
from camera.worker import CameraWorker
from tests.support import spawned, wait_until

FAKE = shutil.which("arv-fake-gv-camera-0.8") or "/usr/bin/arv-fake-gv-camera-0.8"
GVCP_PORT_HEX = f"{3956:04X}"


def gvcp_listening() -> bool:
    """The fake camera bound UDP 3956 (read from /proc: a probe packet is not needed)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        local = line.split()[1]
        if local.endswith(":" + GVCP_PORT_HEX):
            return True
    return False


@contextmanager
def fake_camera(log: Path) -> Iterator[Any]:
    with spawned([FAKE, "-i", "127.0.0.1"], ready=gvcp_listening, what="arv-fake-gv-camera",
                 log=log) as proc:
        yield proc


def settings(**kw: Any) -> AravisCameraSettings:
    base: dict[str, Any] = {"type": "aravis", "id": "gige", "plc_slot": 0,
                            "address": "127.0.0.1", "nodes": {"width": 64, "height": 48}}
    base.update(kw)
    return AravisCameraSettings.model_validate(base)


class Rec:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str | None, float]] = []
        self.lock = threading.Lock()

    def on_frame(self, f: Frame) -> None:
        with self.lock:
            self.frames.append(f)

    def on_state(self, _c: str, state: str, reason: str | None) -> None:
        with self.lock:
            self.states.append((state, reason, time.monotonic()))

    def n(self) -> int:
        with self.lock:
            return len(self.frames)


def run_worker(s: AravisCameraSettings, until: Callable[[Rec, CameraWorker], bool],
               timeout_s: float, src: AravisSource | None = None) -> tuple[Rec, CameraWorker]:
    rec = Rec()
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state, source=src)
    w.start()
    try:
        wait_until(lambda: until(rec, w), timeout_s, "scenario condition")
    finally:
        w.stop(5)
    return rec, w


def scenario_wrap(tmp: Path) -> dict[str, Any]:
    """The fake camera's 16-bit block id starts near 65400 and wraps 65535 -> 1."""
    with fake_camera(tmp / "fake.log"):
        def wrapped(r: Rec, _w: CameraWorker) -> bool:
            with r.lock:
                raws = [int(f.source_meta["raw_frame_id"]) for f in r.frames]  # type: ignore[call-overload]
            return any(b < a for a, b in itertools.pairwise(raws)) and len(raws) > 200
        rec, w = run_worker(settings(trigger={"mode": "free_run", "fps": 400.0}), wrapped, 30)
    return {
        "raw": [f.source_meta["raw_frame_id"] for f in rec.frames],
        "ids": [f.frame_id for f in rec.frames],
        "missed": w.stats()["missed"],
    }


def scenario_rate(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with fake_camera(tmp / "fake.log"):
        for fps in (25.0, 50.0):
            rec, _w = run_worker(
                settings(trigger={"mode": "free_run", "fps": fps}),
                lambda r, _w: r.n() >= 2 and r.frames[-1].captured_ns - r.frames[1].captured_ns
                > 2e9, 20)
            fr = rec.frames[1:]
            span = (fr[-1].captured_ns - fr[0].captured_ns) / 1e9
            out[str(fps)] = {"fps": (len(fr) - 1) / span,
                             "applied": None}
        src = AravisSource(settings(trigger={"mode": "free_run", "fps": 100.0}))
        src.open()
        assert src.node_report is not None
        out["applied"] = src.node_report.applied
        src.close()
    return out


def scenario_packet(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with fake_camera(tmp / "fake.log"):
        for size in (576, 8192):
            s = settings(packet_size=size, nodes={"width": 512, "height": 512})
            src = AravisSource(s)
            rec, _w = run_worker(s, lambda r, _w: r.n() >= 10, 20, src=src)
            assert src.node_report is not None
            f = rec.frames[-1]
            out[str(size)] = {
                "applied": src.node_report.applied.get("GevSCPSPacketSize"),
                "frames": len(rec.frames), "shape": list(f.image.shape),
                "incomplete": src.incomplete, "checksum_ok": bool(
                    # the fake camera draws a diagonal ramp: pixel (y, x+1) = pixel (y, x) + 1
                    ((f.image[:, 1:].astype(int) - f.image[:, :-1]) % 256 == 1).mean() > 0.95),
            }
        for bad in (16383, 16408):
            try:
                src = AravisSource(settings(packet_size=bad))
                src.open()
                src.close()
                out[f"bad_{bad}"] = "accepted"
            except CameraError as exc:
                out[f"bad_{bad}"] = str(exc)
    return out


def scenario_trigger(tmp: Path) -> dict[str, Any]:
    with fake_camera(tmp / "fake.log"):
        rec = Rec()
        w = CameraWorker.from_settings(settings(trigger={"mode": "triggered"}),
                                       on_frame=rec.on_frame, on_state=rec.on_state)
        w.start()
        try:
            wait_until(lambda: w.state == "up", 10, "up")
            for _ in range(15):
                assert w.trigger()
            wait_until(lambda: rec.n() >= 15, 10, "15 frames")
            idle = w.stats()["idle_reads"]
            wait_until(lambda: w.stats()["idle_reads"] >= idle + 5, 10, "idle reads")
        finally:
            w.stop(5)
    return {"parts": [f.part_id for f in rec.frames], "n": rec.n()}


def scenario_plc_trigger(tmp: Path) -> dict[str, Any]:
    """source: plc over real GVCP: refused while the camera is absent, PLC part ids in order
    once it answers, and the triggers queued when the device is closed under the worker are
    reported lost (then the camera is reopened and parts flow again)."""
    s = settings(trigger={"mode": "triggered", "source": "plc"}, reopen_backoff_min_s=0.1,
                 reopen_backoff_max_s=0.2)
    src = AravisSource(s)
    rec = Rec()
    lost: list[tuple[int, str]] = []
    gate = threading.Event()

    def consumer(f: Frame) -> None:
        rec.on_frame(f)
        if f.part_id == 900:
            gate.wait(10)  # busy while the PLC announces more parts

    w = CameraWorker.from_settings(s, on_frame=consumer, on_state=rec.on_state, source=src,
                                   on_trigger_lost=lambda _c, p, r: lost.append((p, r)))
    w.start()
    try:
        wait_until(lambda: w.state == "down", 20, "no camera yet: down")
        refused_while_down = not w.trigger(1)
        with fake_camera(tmp / "fake.log"):
            try:
                wait_until(lambda: w.state == "up", 20, "up once the camera answers")
                parts = [65_000 + 7 * i for i in range(12)]  # ids wider than 16 bits
                for p in parts:
                    assert w.trigger(p)
                wait_until(lambda: rec.n() == len(parts), 10, "one frame per trigger")
                assert w.trigger(900)
                wait_until(lambda: rec.n() == len(parts) + 1, 10, "frame 900 in the consumer")
                for p in (901, 902, 903):
                    assert w.trigger(p)
                src.close()  # the device is closed under the worker (its thread is in on_frame)
                gate.set()
                wait_until(lambda: len(lost) == 3, 10, "lost parts reported")
                wait_until(lambda: [st for st, _r, _t in rec.states][-1:] == ["up"]
                           and len(rec.states) >= 4, 20, "reopened")
                assert w.trigger(904)
                wait_until(lambda: rec.n() == len(parts) + 2, 10, "frame after reopen")
            finally:
                w.stop(10)  # before the camera goes: closing a vanished camera waits on GVCP
    finally:
        w.stop(10)
    return {"refused_while_down": refused_while_down, "parts": parts,
            "got": [f.part_id for f in rec.frames], "lost": [p for p, _r in lost],
            "reasons": [r for _p, r in lost], "states": [st for st, _r, _t in rec.states],
            "stats": w.stats()}


def scenario_disappear(tmp: Path) -> dict[str, Any]:
    """Kill the camera: down within the stall timeout; restart it: up again."""
    s = settings(stall_timeout_s=1.0, reopen_backoff_min_s=0.2, reopen_backoff_max_s=0.5)
    rec = Rec()
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    with fake_camera(tmp / "fake1.log"):
        w.start()
        wait_until(lambda: rec.n() >= 10, 10, "frames")
    # the fake camera is stopped here (by PID)
    with rec.lock:
        last_frame = rec.frames[-1].captured_ns / 1e9
    try:
        wait_until(lambda: any(s == "down" for s, _r, _t in rec.states), 10, "down")
        down_at = next(t for s, _r, t in rec.states if s == "down")
        # at least one reopen attempt fails while the camera is gone
        wait_until(lambda: w.stats()["reopens"] >= 2, 20, "a failed reopen")
        failed_reason = w.stats()["reason"]
        before = rec.n()
        with fake_camera(tmp / "fake2.log"):
            try:
                wait_until(lambda: rec.n() >= before + 10, 20, "frames after restart")
            finally:
                w.stop(10)
    finally:
        w.stop(10)
    return {"states": [(s, r) for s, r, _t in rec.states],
            "detect_s": down_at - last_frame, "reopens": w.stats()["reopens"],
            "failed_reason": failed_reason}


def scenario_lost_hw(tmp: Path) -> dict[str, Any]:
    """Hardware trigger: silence is normal, so only the lost control channel reveals the loss."""
    s = settings(trigger={"mode": "triggered", "source": "hardware", "line": "Line0"},
                 stall_timeout_s=1.0, reopen_backoff_min_s=5.0)
    rec = Rec()
    w = CameraWorker.from_settings(s, on_frame=rec.on_frame, on_state=rec.on_state)
    try:
        with fake_camera(tmp / "fake.log"):
            w.start()
            wait_until(lambda: w.state == "up", 10, "up")
            idle = w.stats()["idle_reads"]
            wait_until(lambda: w.stats()["idle_reads"] >= idle + 10, 10, "silent reads")
            up_while_silent = w.state == "up"
            killed_at = time.monotonic()
        wait_until(lambda: w.state == "down", 20, "control lost")
        detect_s = time.monotonic() - killed_at
    finally:
        w.stop(10)
    return {"up_while_silent": up_while_silent, "states": [(s, r) for s, r, _t in rec.states],
            "detect_s": detect_s, "frames": rec.n()}


def scenario_rejected(tmp: Path) -> dict[str, Any]:
    with fake_camera(tmp / "fake.log"):
        try:
            # max_frame downscale: the device, not the frame-size check, must reject 99999
            AravisSource(settings(nodes={"width": 99999, "exposure_us": 1.0,
                                         "pixel_format": "YUV"},
                                  required_nodes=["Gain"],
                                  max_frame={"action": "downscale"})).open()
            return {"error": None}
        except CameraError as exc:
            return {"error": str(exc), "type": type(exc).__name__}


def scenario_calibrate(tmp: Path) -> dict[str, Any]:
    """`edge calibrate` auto-exposure against the fake camera (its ramp scales with exposure)."""
    from typer.testing import CliRunner

    from camera.calibrate import fresh_frame, levels
    from edge.cli import app
    from edge.config import load_config
    from tests.camera.conftest import line_yaml

    cfg = line_yaml(tmp, """cameras:
  # GigE camera (this comment must survive calibration)
  - id: gige0
    type: aravis
    plc_slot: 0
    address: 127.0.0.1
    nodes:
      width: 320    # keep
      height: 240
""")
    before = cfg.read_text()
    with fake_camera(tmp / "fake.log"):
        r = CliRunner().invoke(app, ["calibrate", "-c", str(cfg), "--target-mean", "90",
                                     "--tolerance", "4", "--report", str(tmp / "r.png")])
        cam = load_config(cfg).cameras[0]
        assert isinstance(cam, AravisCameraSettings)
        src = AravisSource(cam)
        src.open()
        try:
            mean = levels(fresh_frame(src.read).image).mean
        finally:
            src.close()
    return {"exit": r.exit_code, "output": r.output, "before": before, "after": cfg.read_text(),
            "exposure_us": cam.nodes.exposure_us, "mean_after": mean}


def main() -> None:
    name = sys.argv[1]
    tmp = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp")
    fn = globals()[f"scenario_{name}"]
    result = fn(tmp)
    print("RESULT " + json.dumps(result, default=str), flush=True)



def scenario_formats(tmp: Path) -> dict[str, Any]:
    """Every pixel format the fake camera offers, converted to what the model takes."""
    import numpy as np

    from camera.calibrate import fresh_frame

    out: dict[str, Any] = {}
    with fake_camera(tmp / "fake.log"):
        for fmt, output in (("Mono8", "mono8"), ("Mono16", "mono8"), ("RGB8", "bgr8"),
                            ("BayerRG8", "bgr8"), ("BayerGB8", "mono8")):
            src = AravisSource(settings(nodes={"width": 64, "height": 48, "pixel_format": fmt},
                                        output=output))
            src.open()
            try:
                f = fresh_frame(src.read, skip=0)
            finally:
                src.close()
            img = f.image
            chans = img.reshape(-1, img.shape[2]) if img.ndim == 3 else img.reshape(-1, 1)
            out[fmt] = {"device": f.source_meta["device_pixel_format"], "out": f.pixel_format,
                        "shape": list(img.shape), "dtype": str(img.dtype),
                        "mean": float(img.mean()),
                        "channel_means": [float(c) for c in np.mean(chans, axis=0)]}
    return out


if __name__ == "__main__":
    main()
