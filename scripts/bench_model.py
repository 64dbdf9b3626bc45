#!/usr/bin/env python3
"""Model latency benchmark: bare ``session.run`` and the full preprocess+infer+decode path.

Why both: the bare number is what the network costs (and what published figures quote); the
full path is what the daemon pays per frame, including the letterbox of a camera-sized frame
and the mask decode at the original resolution. Timings live here, never in tests.

    python scripts/bench_model.py                       # demo package, 1 and 2 threads
    python scripts/bench_model.py --package P --threads 1 2 4 --runs 500 --frame 1200x1920
    python scripts/bench_model.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.config import ModelSettings  # noqa: E402
from models.onnx_runtime import OnnxDetector  # noqa: E402
from models.package import load_package  # noqa: E402
from models.preprocess import preprocess  # noqa: E402


def _stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {
        "n": len(a),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "max": round(float(a.max()), 3),
    }


def _frames(shape: tuple[int, int], n: int) -> list[np.ndarray]:
    """Synthetic defect frames (the demo model's own generator), BGR, at the camera size."""
    import cv2

    try:
        from models.synth.generator import SynthConfig, generate_sample
    except ImportError:  # generator not installed: plain noise still exercises every stage
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]
    h, w = shape
    cfg = SynthConfig.model_validate({"width": w, "height": h, "defect_fraction": 1.0})
    return [cv2.cvtColor(generate_sample(1234, i, cfg).image, cv2.COLOR_GRAY2BGR) for i in range(n)]


def bench(
    package: Path,
    threads: int,
    runs: int,
    warmup: int,
    frame: tuple[int, int],
    spin_wait: bool = False,
) -> dict[str, Any]:
    det = OnnxDetector(
        load_package(package, check_model=False),
        ModelSettings(
            package=package, intra_op_threads=threads, warmup_runs=0, spin_wait=spin_wait
        ),
    )
    sess = det.session
    name = sess.get_inputs()[0].name
    frames = _frames(frame, 8)
    tensors = [preprocess(f, det.input_hw).tensor for f in frames]
    for i in range(warmup):
        sess.run(None, {name: tensors[i % len(tensors)]})
    bare: list[float] = []
    for i in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, {name: tensors[i % len(tensors)]})
        bare.append((time.perf_counter_ns() - t0) / 1e6)
    stages: dict[str, list[float]] = {"preprocess": [], "infer": [], "postprocess": [], "total": []}
    n_det = 0
    for i in range(runs):
        img = frames[i % len(frames)]
        t0 = time.perf_counter_ns()
        p = det.preprocess(img)
        t1 = time.perf_counter_ns()
        out = det.infer(p.tensor)
        t2 = time.perf_counter_ns()
        dets = det.postprocess(out, [p], masks=True)[0]
        t3 = time.perf_counter_ns()
        n_det += len(dets)
        for k, (a, b) in {
            "preprocess": (t0, t1),
            "infer": (t1, t2),
            "postprocess": (t2, t3),
            "total": (t0, t3),
        }.items():
            stages[k].append((b - a) / 1e6)
    det.close()
    return {
        "threads": threads,
        "session_run_ms": _stats(bare),
        "full_path_ms": {k: _stats(v) for k, v in stages.items()},
        "detections_per_frame": round(n_det / runs, 2),
    }


def _shape(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--package", type=Path, default=REPO / "models" / "demo" / "package")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--frame", type=_shape, default=(480, 640), help="camera frame HxW")
    ap.add_argument(
        "--spin-wait", action="store_true", help="let ORT threads busy-wait (model.spin_wait)"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    pkg = load_package(args.package)
    m = pkg.manifest
    print(
        f"model {m.name}:{m.version} input {m.input_size[0]}x{m.input_size[1]}, "
        f"frame {args.frame[0]}x{args.frame[1]}, {args.runs} runs, spin_wait={args.spin_wait}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    results = [
        bench(args.package, t, args.runs, args.warmup, args.frame, args.spin_wait)
        for t in args.threads
    ]
    print(
        f"{'threads':>7} | {'session.run p50/p99 ms':>22} | {'pre p50':>7} | {'infer p50':>9} | "
        f"{'post p50':>8} | {'full p50/p99 ms':>15}"
    )
    for r in results:
        s, f = r["session_run_ms"], r["full_path_ms"]
        print(
            f"{r['threads']:>7} | {s['p50']:>10.2f} / {s['p99']:<9.2f} | "
            f"{f['preprocess']['p50']:>7.2f} | {f['infer']['p50']:>9.2f} | "
            f"{f['postprocess']['p50']:>8.2f} | "
            f"{f['total']['p50']:>6.2f} / {f['total']['p99']:<6.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": f"{m.name}:{m.version}",
                    "input_size": list(m.input_size),
                    "frame": list(args.frame),
                    "cpus": os.cpu_count(),
                    "spin_wait": args.spin_wait,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
