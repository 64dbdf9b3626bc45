"""scripts/bench_decode.py runs the worker's own decode-and-decide on the demo samples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_decode_reports_hot_and_cold_figures() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_decode.py"), "--rounds", "1", "--hz", "200"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^12 frames from .*samples, model synth-demo, CPU wake-up latency hint",
                     r.stdout, re.M), r.stdout
    figures = r"mean \d+\.\d{3}  p50 \d+\.\d{3}  p99 \d+\.\d{3} ms"
    assert re.search(rf"^hot  \(per-frame medians\): {figures}; busiest frame", r.stdout, re.M)
    assert re.search(rf"^cold \(after each inference, 200 Hz, 12 decodes\): {figures}$",
                     r.stdout, re.M)
