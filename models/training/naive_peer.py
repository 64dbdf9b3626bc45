"""The naive loop a plant engineer writes first, run as `edge bench --peer naive`'s comparison.

    for img in frames:
        result = YOLO("model.onnx").predict(img)          # ultralytics, ONNX Runtime inside
        client.write_registers(1000, verdict_record(...))  # pymodbus, synchronous

Twenty lines: no deadline guard, no fail-safe, no events, no spool. It is measured closed loop
(next frame as soon as the previous write returned) on the same model, the same images and a real
Modbus server, so `edge bench` can print the daemon/naive ratio from one run instead of asking
anyone to trust a table. ultralytics is AGPL and heavy: this module belongs to the `train` extra
and runs in its own process; the daemon never imports it.

    python -m models.training.naive_peer --model M.onnx --imgsz 256 --images DIR \\
        --modbus-port P --duration 20 --out naive.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ultralytics predict + pymodbus write, closed loop")
    ap.add_argument("--model", type=Path, required=True, help="the package's ONNX file")
    ap.add_argument("--imgsz", type=int, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--modbus-port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    import cv2
    from pymodbus.client import ModbusTcpClient

    from models.training.ultra_env import prepare

    ultralytics = prepare()
    model = ultralytics.YOLO(str(a.model), task="segment")
    files = sorted(p for p in a.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    images = [img for img in (cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files)
              if img is not None]
    client = ModbusTcpClient("127.0.0.1", port=a.modbus_port, timeout=1)
    if not client.connect():
        print(f"cannot connect to the Modbus server on port {a.modbus_port}", file=sys.stderr)
        return 2
    for img in images[:3]:  # warm-up, as the daemon warms its model up
        model.predict(img, imgsz=a.imgsz, conf=a.conf, verbose=False)
    lat_ms: list[float] = []
    n = 0
    seq = 0
    t_end = time.monotonic() + a.duration
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        t = time.perf_counter_ns()
        result = model.predict(images[n % len(images)], imgsz=a.imgsz, conf=a.conf,
                               verbose=False)[0]
        defect = result.boxes is not None and len(result.boxes) > 0
        seq += 1
        rsp = client.write_registers(
            1000, [0, n & 0xFFFF, 2 if defect else 1, 0, 0, 0, 0, 0, seq >> 16, seq & 0xFFFF]
        )
        if rsp.isError():
            print(f"write refused: {rsp}", file=sys.stderr)
            return 1
        lat_ms.append((time.perf_counter_ns() - t) / 1e6)
        n += 1
    wall = time.monotonic() - t0
    client.close()
    lat_ms.sort()
    a.out.write_text(json.dumps({
        "frames": n,
        "wall_s": wall,
        "verdicts_per_s": n / wall,
        "latency_ms": {"p50": lat_ms[len(lat_ms) // 2], "p99": lat_ms[int(len(lat_ms) * 0.99)],
                       "max": lat_ms[-1]},
        "ultralytics": ultralytics.__version__,
        "samples_ms": lat_ms[:50_000],  # edge bench merges the runs before and after the daemon
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
