"""Issue 13: the drift watch in the running daemon, proven with the replay camera.

A replay folder plays the demo samples for a while (the baseline is learned from them), then the
same images changed: brightness shifted, blurred, or only defects (a new defect mix). The daemon
must raise the drift metric of THAT statistic (its `drift_raised` log line, the PLC alarm bit
DRIFT, /healthz), and unchanged images must never raise anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from plc.record import Alarm
from tests.core.conftest import DEMO_SAMPLES, PlcProcess
from tests.core.harness import healthz, line_yaml, running_daemon, stop
from tests.support import mbpoll_read, wait_until

BASELINE, WINDOW = 240, 120
DRIFT = {"baseline_frames": BASELINE, "window_frames": WINDOW, "window_blocks": 4,
         "defect_rate_alpha": 1e-4, "sample_hz": None}  # the folders are laid out in frames


def brighter(img: np.ndarray) -> np.ndarray:
    return cv2.add(img, np.full_like(img, 60))


def blurred(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), 3.0)


def build_folder(tmp: Path, change: Callable[[np.ndarray], np.ndarray] | None,
                 defects_only: bool = False) -> Path:
    """BASELINE + 30 frames of the samples as they are, then 2 windows of the changed ones."""
    names = sorted(p.name for p in DEMO_SAMPLES.glob("*.png"))
    images = {n: cv2.imread(str(DEMO_SAMPLES / n), cv2.IMREAD_COLOR) for n in names}
    folder = tmp / "frames"
    folder.mkdir()
    k = 0
    for i in range(BASELINE + 30):
        cv2.imwrite(str(folder / f"{k:05d}.png"), images[names[i % len(names)]])
        k += 1
    after = [n for n in names if "defect" in n] if defects_only else names
    for i in range(2 * WINDOW + 60):
        img = images[after[i % len(after)]]
        cv2.imwrite(str(folder / f"{k:05d}.png"), change(img) if change else img)
        k += 1
    return folder


@pytest.mark.parametrize(
    "case, change, defects_only, statistic",
    [
        ("unchanged", None, False, None),
        ("brightness", brighter, False, "brightness"),
        ("blur", blurred, False, "focus"),
        ("defect-mix", None, True, "defect_rate"),
    ],
)
def test_drift_is_raised_for_the_statistic_that_changed_and_only_then(
    tmp_path: Path, plc: PlcProcess, demo_package: Path, case: str,
    change: Callable[[np.ndarray], np.ndarray] | None, defects_only: bool, statistic: str | None,
) -> None:
    folder = build_folder(tmp_path, change, defects_only)
    camera = {"id": "cam0", "type": "replay", "plc_slot": 0, "path": str(folder), "fps": 60,
              "loop": False}
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[camera], drift=DRIFT)
    with running_daemon(config, tmp_path) as d:
        port = d.event("daemon_ready")["http_port"]  # type: ignore[index]
        wait_until(lambda: any(str(x.get("reason", "")).startswith("finished")
                               for x in d.lines if x.get("event") == "camera_state"),
                   60, "the replay played to its end")
        if statistic is not None:
            wait_until(lambda: any(x.get("event") == "drift_raised" for x in d.lines), 20,
                       "drift_raised")
            wait_until(lambda: mbpoll_read(plc.port, 101, 1)[0] & int(Alarm.DRIFT), 10,
                       "the DRIFT alarm bit at the PLC")
            wait_until(lambda: healthz(port)[1].get("drift", {}).get("cameras", {}).get(
                "cam0", {}).get("drifting"), 10, "drift in /healthz")
        else:  # an evaluation that saw every frame, then nothing may have been raised

            def evaluated_all() -> bool:
                drift = healthz(port)[1]["drift"]
                cam = drift["cameras"].get("cam0", {})
                return bool(cam) and cam["evaluated_frames"] == drift["observed_frames"]["cam0"]

            wait_until(evaluated_all, 15, "an evaluation of every frame")
            cam = healthz(port)[1]["drift"]["cameras"]["cam0"]
            assert cam["source"] == "learned" and cam["window_frames"] >= WINDOW // 2, cam
        assert stop(d) == 0
    raised = [x for x in d.lines if x.get("event") == "drift_raised"]
    if statistic is None:
        assert raised == [], raised
    else:
        names = {x["statistic"] for x in raised}
        assert statistic in names, json.dumps(raised)[:1000]
        if statistic == "focus":
            assert "brightness" not in names, names  # a blur is not a lighting change


def test_statistics_are_computed_for_a_sample_of_frames_at_the_configured_rate(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """drift.sample_hz bounds the statistics the workers compute, whatever the camera's rate (at
    most rate x elapsed + 2: models.drift.FrameSampler); every frame is still decided."""
    camera = {"id": "cam0", "type": "replay", "plc_slot": 0, "path": str(DEMO_SAMPLES),
              "fps": 60, "loop": True}
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[camera],
                       drift={"sample_hz": 2})
    launched = time.monotonic()
    with running_daemon(config, tmp_path) as d:
        port = d.event("daemon_ready")["http_port"]  # type: ignore[index]

        def observed() -> int:
            return int(healthz(port)[1]["drift"]["observed_frames"].get("cam0", 0))

        wait_until(lambda: len(plc.records) >= 300 and observed() >= 2, 60,
                   "300 decisions and 2 sampled frames")
        seen, elapsed_s = observed(), time.monotonic() - launched
        assert stop(d) == 0
    assert 2 <= seen <= 2 * elapsed_s + 2, (seen, elapsed_s)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["decided"] == summary["frames"] >= 300
