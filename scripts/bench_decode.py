#!/usr/bin/env python3
"""Decode-and-decide benchmark: the worker's `finish_batch` on real frames, hot and cold.

Why two figures: run back to back on one output, the decode is "hot" (its code and data stay in
the caches) and looks much faster than in a worker, where it always runs right after the
network has evicted them. The cold figure runs each decode after its own inference, paced like
one camera (``--hz``) and under the daemon's CPU wake-up latency hint: what the 60-fps tail
pays. Compare two checkouts with ``PYTHONPATH=<checkout> python scripts/bench_decode.py`` in
alternating runs.

    python scripts/bench_decode.py                         # demo config and samples
    python scripts/bench_decode.py --config configs/line.yaml --images DIR --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # a PYTHONPATH checkout given for an A/B run comes first

from edge.bench import load_sample_images  # noqa: E402
from edge.config import DEMO_CONFIG, load_config  # noqa: E402
from edge.cpulatency import CpuLatencyHint  # noqa: E402
from edge.inference import BatchItem, finish_batch, infer_staged, stage_batch  # noqa: E402
from edge.recipes import build_rules  # noqa: E402
from models.loader import load_detector  # noqa: E402
from models.package import load_package  # noqa: E402


def _ms(values: list[float]) -> str:
    v = sorted(values)
    p99 = v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]
    return f"mean {statistics.fmean(v):.3f}  p50 {statistics.median(v):.3f}  p99 {p99:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG)
    ap.add_argument("--images", type=Path, help="folder of frames (default: the demo samples)")
    ap.add_argument("--rounds", type=int, default=25, help="passes over the frames")
    ap.add_argument("--hz", type=float, default=60.0, help="pace of the cold runs")
    a = ap.parse_args()
    cfg = load_config(a.config)
    folder = a.images or REPO / "models" / "demo" / "samples"
    frames = load_sample_images(folder)
    det = load_detector(cfg.model)
    rules = build_rules(cfg.recipes, cfg.decision, load_package(cfg.model.package))
    cam = "cam0"
    # As in the daemon (pipeline.cpu_latency_us): without it a core idle between two paced
    # frames halts, and the first calls after it cost several times more again.
    hint = CpuLatencyHint(cfg.pipeline.cpu_latency_us)
    held = hint.start()
    try:
        staged = []
        for f in frames:
            b = stage_batch(det, [BatchItem(f, cam)])
            infer_staged(det, b)
            staged.append(b)
        hot_per_frame: list[list[float]] = [[] for _ in frames]
        for _ in range(a.rounds * 10):
            for i, b in enumerate(staged):
                t0 = time.perf_counter_ns()
                finish_batch(det, rules, b, True)
                hot_per_frame[i].append((time.perf_counter_ns() - t0) / 1e6)
        hot = [statistics.median(v) for v in hot_per_frame]
        cold: list[float] = []
        period = 1 / a.hz
        for _ in range(a.rounds):
            for f in frames:
                start = time.perf_counter()
                b = stage_batch(det, [BatchItem(f, cam)])
                infer_staged(det, b)
                t0 = time.perf_counter_ns()
                finish_batch(det, rules, b, True)
                cold.append((time.perf_counter_ns() - t0) / 1e6)
                time.sleep(max(0.0, period - (time.perf_counter() - start)))
    finally:
        det.close()
        hint.stop()
    print(f"{len(frames)} frames from {folder}, model {det.info.name}, "
          f"CPU wake-up latency hint {'held' if held else 'not held'}")
    print(f"hot  (per-frame medians): {_ms(hot)}; busiest frame {max(hot):.3f} ms")
    print(f"cold (after each inference, {a.hz:g} Hz, {len(cold)} decodes): {_ms(cold)}")


if __name__ == "__main__":
    main()
