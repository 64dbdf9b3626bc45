"""Issue 9's proof, the CI version: a 3-minute soak of the demo line at 60 fps with every fault
injected twice (worker frozen and killed, PLC killed, broker paused, S3 down past the spool
quota, SIGHUP with a bad then a good config). scripts/soak.py asserts every frame one decision
(the log of the Modbus server process), real verdicts back within 2 s of each fault, every
decided part's event in Kafka (read back by kcat), and the daemon's RSS slope after the first
fault cycle.

Three minutes cannot tell a leak from the heap's warm-up: with a fault every 5 s, each new peak
(queues filled while the broker or S3 is down, garbage awaiting the cycle collector) raises the
high-water mark, and that takes about ten minutes to level off: 2-5 MB/min in these three
minutes, on a quiet box and inside this loaded suite alike. So this run bounds the slope at
8 MB/min, a gross-leak guard (the glibc arena growth this soak first found was 11 MB/min); the
30-minute run (README) asserts < 1 MB/min, and each leak the soak found has its own regression
test (tests/core/test_malloc.py and
tests/models/test_package.py::test_an_unchanged_package_opens_onnxruntime_once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core.conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_minute_soak_with_faults(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--duration", "180", "--warmup", "15",
         "--gap", "5", "--outage-s", "5", "--max-rss-slope", "8.0", "--out", str(out)],
        capture_output=True, text=True, timeout=840,
    )
    report = json.loads((out / "soak.json").read_text()) if (out / "soak.json").exists() else {}
    assert r.returncode == 0, (r.stdout[-3000:], report.get("failures"))
    assert report["frames"] == report["decided"] > 60 * 150
    assert len(report["faults"]) >= 12  # every fault twice
    assert report["kafka_part_events"] >= report["decided"]
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
    kept = (out / "daemon.log").read_text().splitlines()  # every line, for tracing a miss later
    assert len(kept) == sum(report["daemon_log"]["lines_by_level"].values()) > 100
    assert any('"daemon_ready"' in line for line in kept)
