#!/usr/bin/env python3
"""Benchmark the camera layer alone: harvesters+TLSimu -> GenicamSource -> CameraWorker -> callback.

Reports, for a free-running camera at the given size (default 1280x1024 Mono8):
  * sustained frames/s delivered to the callback (bounded by the simulator's own rate);
  * CPU time the camera thread spends per frame, and the frames/s that cost would allow;
  * added latency from buffer arrival to the frame being ready for the model, p50/p99:
      - fetch->ready: from harvesters handing us the buffer to the Frame object existing
        (pixel copy/conversion, ids, timestamps);
      - fetch->callback: up to the daemon's on_frame callback (what the pipeline sees);
      - device->ready: from TLSimu's own buffer timestamp (it stamps the sub-second part of the
        host's wall clock) to ready, which adds the GenTL event dispatch and harvesters' wrapping.

    python scripts/bench_camera.py --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from camera.config import GenicamCameraSettings
from camera.frame import Frame
from camera.genicam import GenicamSource, default_cti, release_producers
from camera.worker import CameraWorker


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cti = args.cti or default_cti()
    if cti is None:
        raise SystemExit("no --cti given and genicam==1.5.0 (TLSimu.cti) is not installed")
    settings = GenicamCameraSettings.model_validate({
        "type": "genicam", "id": "bench", "plc_slot": 0, "cti": [str(cti)],
        "device": {"serial_number": args.serial},
        "nodes": {"width": args.width, "height": args.height},
        "output": args.output, "buffer_count": args.buffers,
        "timestamp_wrap_ns": 1_000_000_000,
    })
    fetch_ready: list[float] = []
    fetch_cb: list[float] = []
    dev_ready: list[float] = []
    lock = threading.Lock()
    thread_cpu: dict[str, float] = {}
    state = {"measuring": False}

    def on_frame(f: Frame) -> None:
        now = time.monotonic_ns()
        if not state["measuring"]:
            return
        ready = int(f.source_meta["ready_ns"])  # type: ignore[call-overload]
        with lock:
            fetch_ready.append((ready - f.captured_ns) / 1e6)
            fetch_cb.append((now - f.captured_ns) / 1e6)
            raw = f.source_meta.get("raw_frame_id")
            if f.device_timestamp_ns is not None and raw is not None:
                ready_wall = f.captured_wall_ns + (ready - f.captured_ns)
                d = (ready_wall - f.device_timestamp_ns) % 1_000_000_000
                dev_ready.append(d / 1e6)

    src = GenicamSource(settings)
    w = CameraWorker(src, on_frame=on_frame, on_state=lambda *a: None, stall_timeout_s=5)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while w.stats()["frames"] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        cam_thread = next(t for t in threading.enumerate() if t.name == "camera-bench")
        tid = cam_thread.native_id
        f0 = w.stats()["frames"]
        c0 = _thread_cpu(tid)
        t0 = time.monotonic()
        state["measuring"] = True
        time.sleep(args.seconds)  # the measurement window itself
        state["measuring"] = False
        t1 = time.monotonic()
        c1 = _thread_cpu(tid)
        st = w.stats()
    finally:
        w.stop(5)
        release_producers()
    frames = st["frames"] - f0
    elapsed = t1 - t0
    thread_cpu["seconds"] = c1 - c0
    cpu_per_frame_ms = thread_cpu["seconds"] / max(frames, 1) * 1e3
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "python":
                    platform.python_version(), "cores": _cores()},
        "camera": {"producer": "TLSimu.cti (genicam 1.5.0)", "serial": args.serial,
                   "size": f"{args.width}x{args.height}", "output": args.output,
                   "buffers": args.buffers},
        "seconds": round(elapsed, 2),
        "frames": frames,
        "frames_per_s": round(frames / elapsed, 1),
        "missed": st["missed"],
        "camera_thread_cpu_ms_per_frame": round(cpu_per_frame_ms, 3),
        "camera_thread_capacity_fps": (
            round(1e3 / cpu_per_frame_ms, 0) if cpu_per_frame_ms else None
        ),
        "latency_ms": {
            name: {"p50": round(pct(xs, 50), 3), "p99": round(pct(xs, 99), 3),
                   "max": round(max(xs), 3) if xs else None, "n": len(xs)}
            for name, xs in (("fetch_to_ready", fetch_ready), ("fetch_to_callback", fetch_cb),
                             ("device_timestamp_to_ready", dev_ready))
        },
    }


def _thread_cpu(tid: int | None) -> float:
    """utime+stime of one thread from /proc (Linux), in seconds."""
    import os

    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--output", choices=["mono8", "bgr8"], default="mono8")
    p.add_argument("--serial", default="SN_InterfaceA_0", help="TLSimu: SN_InterfaceA_0 is mono")
    p.add_argument("--buffers", type=int, default=8)
    p.add_argument("--cti", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
