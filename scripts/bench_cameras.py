#!/usr/bin/env python3
"""How many cameras x fps this box holds with zero fail-safes, per model and frame size.

    .venv/bin/python scripts/bench_cameras.py --out var/bench/cameras            # the README table
    .venv/bin/python scripts/bench_cameras.py --models models/demo/package --frames 640x480 \
        --cameras 1,2 --duration 8                                               # quick look

For each (model, frame size): one closed-loop `edge bench` gives the box's capacity C (real
verdicts/s, every core busy); then for N cameras a paced `edge bench` at fps = 0.9 C / N (rounded
down) checks that N cameras at that rate are decided with zero fail-safes and zero deadline
misses; if not, the rate is lowered by 20 % until they are (at most 3 tries). The knee is where
N x fps stops growing with N. Frames are the demo samples resized to the frame size; every run is
a real `edge bench` process (the daemon, Modbus TCP to a PLC process, the spool).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
EDGE = [sys.executable, "-m", "edge"]


def frames_folder(tmp: Path, size: tuple[int, int]) -> Path:
    w, h = size
    out = tmp / f"frames-{w}x{h}"
    out.mkdir(exist_ok=True)
    for p in sorted((ROOT / "models/demo/samples").glob("*.png")):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        cv2.imwrite(str(out / p.name), cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
    return out


def line_config(tmp: Path, package: Path) -> Path:
    text = (ROOT / "configs/demo.yaml").read_text()
    text = text.replace("package: ../models/demo/package", f"package: {package.resolve()}")
    text = text.replace("../models/demo/samples", str(ROOT / "models/demo/samples"))
    text = text.replace("../var/demo/uplink", str(tmp / "spool"))
    cfg = tmp / f"line-{package.name}.yaml"
    cfg.write_text(text)
    return cfg


def bench(config: Path, images: Path, out: Path, duration: float, *args: str) -> dict:
    r = subprocess.run(
        [*EDGE, "bench", "--config", str(config), "--images", str(images), "--duration",
         str(duration), "--out", str(out), *args],
        capture_output=True, text=True, timeout=duration * 6 + 300, cwd=ROOT,
    )
    if r.returncode != 0:
        raise SystemExit(f"edge bench {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    doc: dict = json.loads((out / "bench.json").read_text())
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="models/demo/package,var/bench/yolov8n-seg-640",
                    help="comma-separated package folders")
    ap.add_argument("--frames", default="640x480,1280x1024")
    ap.add_argument("--cameras", default="1,2,4,8")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--out", type=Path, default=Path("var/bench/cameras"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cameras-") as t:
        tmp = Path(t)
        for model in [Path(m) for m in a.models.split(",")]:
            if not (model / "manifest.json").exists():
                print(f"skip {model}: not a model package", file=sys.stderr)
                continue
            config = line_config(tmp, model)
            for size_text in a.frames.split(","):
                w, h = (int(x) for x in size_text.split("x"))
                images = frames_folder(tmp, (w, h))
                tag = f"{model.name}-{w}x{h}"
                cap = bench(config, images, a.out / f"{tag}-capacity", a.duration,
                            "--closed-loop", "--workers", a.workers)
                capacity = cap["real_verdicts_per_s"]
                print(f"{tag}: capacity {capacity:.1f} real verdicts/s", flush=True)
                for n in (int(x) for x in a.cameras.split(",")):
                    fps = max(1, math.floor(0.9 * capacity / n))
                    for _try in range(3):
                        r = bench(config, images, a.out / f"{tag}-{n}cam-{fps}fps", a.duration,
                                  "--rate", str(fps), "--cameras", str(n), "--workers",
                                  a.workers)
                        s = r["summary"]
                        clean = not s["failsafes"] and not s["deadline_misses"]
                        if clean or fps <= 1:
                            break
                        fps = max(1, math.floor(fps * 0.8))
                    rows.append({
                        "model": model.name, "frame": f"{w}x{h}", "cameras": n, "fps": fps,
                        "total_fps": n * fps, "held": clean, "capacity": round(capacity, 1),
                        "e2e_p50": round(s["end_to_end_ms"]["p50"], 1),
                        "e2e_p99": round(s["end_to_end_ms"]["p99"], 1),
                        "failsafes": sum(s["failsafes"].values()),
                        "misses": s["deadline_misses"],
                    })
                    print(json.dumps(rows[-1]), flush=True)
    (a.out / "cameras.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | frame | cameras | fps each | total fps | zero fail-safes | e2e p50 / p99 ms"
             " | closed-loop capacity |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['frame']} | {r['cameras']} | {r['fps']} | "
                     f"{r['total_fps']} | {'yes' if r['held'] else 'NO'} | {r['e2e_p50']} / "
                     f"{r['e2e_p99']} | {r['capacity']}/s |")
    table = "\n".join(lines)
    (a.out / "cameras.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
