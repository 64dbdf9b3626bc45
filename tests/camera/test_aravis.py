"""GigE Vision through Aravis against arv-fake-gv-camera, inside a private network namespace.

Every scenario runs in a child process started with ``unshare -n`` whose only interface is ``lo``
(see aravis_scenarios.py): real GVCP/GVSP traffic, none of it able to leave this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def scenario(name: str, tmp_path: Path, timeout_s: float = 90) -> Any:
    cmd = ["unshare", "-n", "sh", "-c",
           f'ip link set lo up && exec "{sys.executable}" -m tests.camera.aravis_scenarios '
           f'{name} "{tmp_path}"']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    pytest.fail(f"scenario {name} gave no result (rc {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def test_frame_id_wraps_65535_to_1_without_counting_misses(tmp_path: Path) -> None:
    r = scenario("wrap", tmp_path)
    raw, ids = r["raw"], r["ids"]
    i = raw.index(1)
    assert raw[i - 1] == 65535  # the device really wrapped, skipping 0
    assert ids[i] == ids[i - 1] + 1 and ids == sorted(set(ids))
    assert r["missed"] == ids[-1] - ids[0] + 1 - len(ids)
    assert r["missed"] == 0


def test_frame_rate_is_applied_and_delivered(tmp_path: Path) -> None:
    r = scenario("rate", tmp_path)
    assert r["applied"]["AcquisitionFrameRate"] == pytest.approx(100.0)
    assert r["25.0"]["fps"] == pytest.approx(25.0, rel=0.2)
    assert r["50.0"]["fps"] == pytest.approx(50.0, rel=0.2)


def test_packet_size_applied_and_checked(tmp_path: Path) -> None:
    r = scenario("packet", tmp_path)
    for size in ("576", "8192"):  # 512x512 Mono8 = 456 or 33 packets per frame
        assert r[size]["applied"] == int(size)
        assert r[size]["shape"] == [512, 512] and r[size]["checksum_ok"]
        assert r[size]["incomplete"] == 0
    assert "16383 is not on the increment grid" in r["bad_16383"]
    assert "16408 is out of range [220, 16404]" in r["bad_16408"]


def test_software_trigger_gives_one_part_per_trigger(tmp_path: Path) -> None:
    r = scenario("trigger", tmp_path)
    assert r["parts"] == list(range(1, 16))


def test_plc_triggers_over_gige_carry_plc_part_ids_and_losses_are_reported(
    tmp_path: Path,
) -> None:
    r = scenario("plc_trigger", tmp_path)
    assert r["refused_while_down"]
    assert r["got"] == [*r["parts"], 900, 904]
    assert r["lost"] == [901, 902, 903]
    assert all(("closed" in x) for x in r["reasons"]), r["reasons"]
    assert r["states"][:2] == ["down", "up"] and r["states"][-2:] == ["down", "up"]
    st = r["stats"]
    assert st["triggers"] == len(r["parts"]) + 5 and st["lost_triggers"] == 3
    assert st["refused_triggers"] == 1 and st["unsolicited"] == 0 and st["missed"] == 0


def test_camera_disappears_detected_and_reopened(tmp_path: Path) -> None:
    r = scenario("disappear", tmp_path)
    assert [s for s, _ in r["states"]] == ["up", "down", "up"]
    assert "stalled" in r["states"][1][1]
    assert 0.9 < r["detect_s"] < 3.0  # stall_timeout_s = 1.0
    assert r["reopens"] >= 2 and "no GigE Vision camera answers at 127.0.0.1" in r["failed_reason"]


def test_calibrate_auto_exposure_reaches_target_and_is_written_back(tmp_path: Path) -> None:
    r = scenario("calibrate", tmp_path)
    assert r["exit"] == 0, r["output"]
    assert "on target" in r["output"]
    assert r["exposure_us"] is not None and r["exposure_us"] != 10000.0  # moved off the default
    assert abs(r["mean_after"] - 90) <= 6  # a fresh open with the written value sees the target
    removed = set(r["before"].splitlines()) - set(r["after"].splitlines())
    assert not removed  # comments and layout kept; only exposure_us was added
    assert f"exposure_us: {r['exposure_us']}" in r["after"]


def test_pixel_formats_convert_to_what_the_model_takes(tmp_path: Path) -> None:
    r = scenario("formats", tmp_path)
    assert r["Mono8"]["out"] == "Mono8" and r["Mono8"]["shape"] == [48, 64]
    # Mono16 (same ramp, 16-bit) lands on the same 8-bit levels
    assert r["Mono16"]["out"] == "Mono8" and abs(r["Mono16"]["mean"] - r["Mono8"]["mean"]) < 8
    assert r["RGB8"]["out"] == "BGR8" and r["RGB8"]["shape"] == [48, 64, 3]
    b, g, red = r["RGB8"]["channel_means"]
    assert red > g > b  # the fake camera's jet-colormap ramp is mostly red/orange here
    # arv-fake-gv-camera 0.8 writes its "BayerRG8" mosaic with B at (0,0) (R and B swapped
    # relative to PFNC; see fill code in arvfakecamera.c). Demosaicing by the PFNC definition
    # must therefore give the RGB8 image with red and blue exchanged, and green unchanged.
    bb, bg, br = r["BayerRG8"]["channel_means"]
    assert r["BayerRG8"]["out"] == "BGR8"
    assert abs(bb - red) < 20 and abs(br - b) < 20 and abs(bg - g) < 20
    assert r["BayerGB8"]["out"] == "Mono8" and r["BayerGB8"]["shape"] == [48, 64]


def test_hardware_triggered_camera_loss_seen_through_control_channel(tmp_path: Path) -> None:
    r = scenario("lost_hw", tmp_path)
    assert r["up_while_silent"]  # no triggers, no frames: not a stall
    assert [s for s, _ in r["states"]] == ["up", "down"]
    assert "control lost" in r["states"][1][1]
    assert r["detect_s"] < 15  # the fake camera's 3 s heartbeat timeout plus Aravis' retries


def test_rejected_settings_are_listed(tmp_path: Path) -> None:
    r = scenario("rejected", tmp_path)
    assert r["type"] == "CameraConfigError"
    err = r["error"]
    assert "Width (from width): 99999 is out of range [1, 2048]" in err
    assert "ExposureTimeAbs (from exposure_us): 1.0 is out of range [10, 10000000]" in err
    assert "'YUV' is not one of BayerBG8" in err
    assert "required node Gain does not exist" in err
