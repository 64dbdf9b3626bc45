#!/usr/bin/env python3
"""Model latency benchmark: bare ``session.run`` and the full preprocess+infer+decode path.

Why both: the bare number is what the network costs (and what published figures quote); the
full path is what the daemon pays per frame, including the letterbox of a camera-sized frame
and the mask decode at the original resolution. Timings live here, never in tests.

    python scripts/bench_model.py                       # demo package, 1 and 2 threads
    python scripts/bench_model.py --package P --threads 1 2 4 --runs 500 --frame 1200x1920
    python scripts/bench_model.py --json out.json
    python scripts/bench_model.py --sweep --threads 1 2  # ONNX Runtime options, side by side
    python scripts/bench_model.py --sweep --package INT8_PKG --compare models/demo/package

``--sweep`` times bare ``session.run`` for each ONNX Runtime option variant (graph optimisation
level, memory arena, memory pattern, spinning, inter-op parallelism, thread affinity) built by the
daemon's own ``session_options``. The variants run interleaved in rounds, so a burst of load
from another process hits all of them alike instead of one: on a shared 2-core box that is the
difference between a ranking and noise. ``--compare PKG`` adds another package (e.g. the FP32
original of an INT8 package) to the same rounds.
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
from models.onnx_runtime import OnnxDetector, session_options  # noqa: E402
from models.package import load_package  # noqa: E402
from models.preprocess import preprocess  # noqa: E402
from models.runtimes import OnnxRuntimeSettings  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "graph opt extended": {"graph_optimization": "extended"},
    "graph opt basic": {"graph_optimization": "basic"},
    "graph opt disabled": {"graph_optimization": "disable"},
    "memory arena off": {"cpu_mem_arena": False},
    "memory pattern off": {"mem_pattern": False},
    "spin-wait on": {"spin_wait": True},
    "parallel, inter_op 2": {"execution_mode": "parallel", "inter_op_threads": 2},
    "affinity pinned": {"thread_affinity": "AFFINITY"},
}
"""ONNX Runtime option variants of --sweep, each a change from the default settings."""


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
            package=package,
            warmup_runs=0,
            onnxruntime=OnnxRuntimeSettings(intra_op_threads=threads, spin_wait=spin_wait),
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


def _openvino_runners(
    package: Path, threads: int, frames: list[np.ndarray]
) -> dict[str, tuple[Any, list[np.ndarray]]]:
    """The openvino runtime's detector (f32, and bf16 where the CPU has it), same tensors."""
    from models.openvino_runtime import OpenVinoDetector
    from models.runtimes import OpenVinoSettings

    pkg = load_package(package, check_model=False)
    hw = (pkg.manifest.input_size[0], pkg.manifest.input_size[1])
    tensors = [preprocess(f, hw).tensor for f in frames]
    out: dict[str, tuple[Any, list[np.ndarray]]] = {}
    for precision in ("f32", "bf16"):
        settings = ModelSettings(
            package=package,
            runtime="openvino",
            warmup_runs=2,
            openvino=OpenVinoSettings(threads=threads, precision=precision),
        )
        det = OpenVinoDetector(pkg, settings)
        if det.precision != precision:
            continue  # this CPU has no bf16: OpenVINO falls back, nothing new to measure
        out[f"openvino {precision}"] = (det.infer, tensors)
    return out


def sweep(
    packages: list[Path],
    threads: int,
    rounds: int,
    runs: int,
    frame: tuple[int, int],
    openvino: bool = False,
) -> list[dict[str, Any]]:
    """Bare session.run per option variant (and per package), interleaved in rounds."""
    import onnxruntime as ort

    sessions: dict[str, tuple[Any, str, list[np.ndarray]]] = {}
    frames = _frames(frame, 8)
    for pkg_path in packages:
        pkg = load_package(pkg_path, check_model=False)
        hw = (pkg.manifest.input_size[0], pkg.manifest.input_size[1])
        tensors = [preprocess(f, hw).tensor for f in frames]
        for name, change in VARIANTS.items():
            if name != "default" and len(packages) > 1 and pkg_path != packages[0]:
                continue  # a compared package runs with the defaults only
            fields = {"intra_op_threads": threads, **change}
            if fields.get("thread_affinity") == "AFFINITY":
                if threads < 2:
                    continue
                # Pin the pool threads to CPUs 2..threads (1-based), the caller stays free.
                fields["thread_affinity"] = ";".join(str(c) for c in range(2, threads + 1))
            opts = session_options(OnnxRuntimeSettings(**fields))
            sess = ort.InferenceSession(
                str(pkg.model_path), opts, providers=["CPUExecutionProvider"]
            )
            inp = sess.get_inputs()[0].name
            for t in tensors:
                sess.run(None, {inp: t})
            label = name if len(packages) == 1 else f"{pkg.ref}: {name}"
            sessions[label] = (sess, inp, tensors)
    runners: dict[str, tuple[Any, list[np.ndarray]]] = {
        label: ((lambda s, n: lambda t: s.run(None, {n: t}))(sess, inp), tensors)
        for label, (sess, inp, tensors) in sessions.items()
    }
    if openvino:
        runners.update(_openvino_runners(packages[0], threads, frames))
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for label, (run, tensors) in runners.items():
            for i in range(runs):
                t0 = time.perf_counter_ns()
                run(tensors[i % len(tensors)])
                samples[label].append((time.perf_counter_ns() - t0) / 1e6)
    return [
        {"variant": k, "threads": threads, "session_run_ms": _stats(v)} for k, v in samples.items()
    ]


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
    ap.add_argument("--sweep", action="store_true", help="ONNX Runtime option variants")
    ap.add_argument("--rounds", type=int, default=10, help="--sweep: interleaved rounds")
    ap.add_argument(
        "--compare", type=Path, nargs="*", default=[], help="--sweep: more packages, same rounds"
    )
    ap.add_argument(
        "--openvino", action="store_true", help="--sweep: add the openvino runtime (f32, bf16)"
    )
    args = ap.parse_args(argv)
    if args.sweep:
        return _run_sweep(args)
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


def _run_sweep(args: argparse.Namespace) -> int:
    pkgs = [args.package, *args.compare]
    runs = max(1, args.runs // args.rounds)
    print(
        f"sweep: {', '.join(load_package(p, check_model=False).ref for p in pkgs)}; "
        f"{args.rounds} rounds x {runs} runs per variant; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()})"
    )
    out: list[dict[str, Any]] = []
    for t in args.threads:
        res = sweep(pkgs, t, args.rounds, runs, args.frame, args.openvino)
        base = res[0]["session_run_ms"]["p50"]
        print(f"\nintra_op_threads {t}")
        print(f"{'variant':>40} | {'p50 ms':>7} | {'p99 ms':>7} | {'p50 vs first':>12}")
        for r in res:
            s = r["session_run_ms"]
            print(
                f"{r['variant']:>40} | {s['p50']:>7.2f} | {s['p99']:>7.2f} | "
                f"{s['p50'] / base:>11.2f}x"
            )
        out += res
    if args.json:
        args.json.write_text(json.dumps({"sweep": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
