"""`edge camera list|snapshot`, `edge calibrate`, `edge replay` through the real CLI."""

from __future__ import annotations

import csv
import difflib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from camera.genicam import default_cti, release_producers
from edge.cli import app
from edge.config import load_config
from tests.camera.conftest import ROOT, line_yaml, write_images

CTI = default_cti()
assert CTI is not None
runner = CliRunner()

TLSIMU_CAMERAS = f"""cameras:
  # the simulator camera (this comment must survive calibration)
  - id: cam0
    type: genicam
    plc_slot: 0
    cti: [{CTI}]
    device: {{serial_number: SN_InterfaceA_0}}   # mono
    nodes:
      width: 640
      height: 480
"""


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    yield
    release_producers()


def test_camera_list_shows_devices_and_node_ranges() -> None:
    r = runner.invoke(app, ["camera", "list", "--cti", str(CTI)])
    assert r.exit_code == 0, r.output
    for serial in ("SN_InterfaceA_0", "SN_InterfaceA_1", "SN_InterfaceB_0", "SN_InterfaceB_1"):
        assert f"serial_number: {serial}" in r.output
    assert "Width: 512  [8..4096 step 4]" in r.output
    assert "TriggerMode: Off  {Off, On}" in r.output


def test_snapshot_ad_hoc_and_from_config(tmp_path: Path) -> None:
    out = tmp_path / "snap.png"
    r = runner.invoke(app, ["camera", "snapshot", "--cti", str(CTI), "--serial",
                            "SN_InterfaceA_1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (572, 768)  # TLSimuColor default size, mono8 output
    imgs = write_images(tmp_path / "imgs", 3)
    cfg = line_yaml(tmp_path, f"""cameras:
  - id: rep
    type: replay
    plc_slot: 0
    path: {tmp_path / 'imgs'}
    fps: 0
""")
    out2 = tmp_path / "snap2.png"
    r = runner.invoke(app, ["camera", "snapshot", "-c", str(cfg), "--out", str(out2)])
    assert r.exit_code == 0, r.output
    got, want = cv2.imread(str(out2)), cv2.imread(str(imgs[0]))
    assert got is not None and want is not None and np.array_equal(got, want)


def test_calibrate_writes_roi_keeps_comments_and_reports(tmp_path: Path) -> None:
    cfg = line_yaml(tmp_path, TLSIMU_CAMERAS)
    before = cfg.read_text()
    report = tmp_path / "report.png"
    r = runner.invoke(app, ["calibrate", "-c", str(cfg), "--roi", "100,50,320,240",
                            "--target-mean", "100", "--focus-seconds", "0.3",
                            "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "no ExposureTime/ExposureTimeAbs node" in r.output  # TLSimu has no exposure control
    assert "focus: last" in r.output
    after = cfg.read_text()
    diff = [ln for ln in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")
            if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    assert all(ln.startswith("+") for ln in diff), "\n".join(diff)  # nothing removed
    assert load_config(cfg).decision.camera_roi["cam0"].model_dump() == {
        "x": 100, "y": 50, "width": 320, "height": 240}
    img = cv2.imread(str(report))
    assert img is not None and img.shape[1] > 960  # frame plus the histogram/numbers panel
    # a second run replaces the ROI in place; a dry run changes nothing
    r = runner.invoke(app, ["calibrate", "-c", str(cfg), "--roi", "0,0,64,64",
                            "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert load_config(cfg).decision.camera_roi["cam0"].width == 64
    snapshot = cfg.read_text()
    r = runner.invoke(app, ["calibrate", "-c", str(cfg), "--roi", "1,1,8,8", "--dry-run",
                            "--report", str(report)])
    assert r.exit_code == 0 and "dry run: would set decision.camera_roi.cam0" in r.output
    assert cfg.read_text() == snapshot


def test_calibrate_bad_roi_is_a_clear_error(tmp_path: Path) -> None:
    cfg = line_yaml(tmp_path, TLSIMU_CAMERAS)
    r = runner.invoke(app, ["calibrate", "-c", str(cfg), "--roi", "600,0,100,100"])
    assert r.exit_code == 2 and "does not fit the 640x480 image" in r.output
    r = runner.invoke(app, ["calibrate", "-c", str(cfg), "--roi", "1,2,3"])
    assert r.exit_code == 2 and "four integers" in r.output


def test_replay_writes_verdict_and_overlay_per_image(tmp_path: Path) -> None:
    samples = ROOT / "models" / "demo" / "samples"
    names = sorted(p.name for p in samples.glob("*.png"))
    out = tmp_path / "out"
    r = runner.invoke(app, ["replay", str(samples), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "verdicts.csv").open()))
    assert [row["file"] for row in rows] == names
    for row in rows:
        assert row["verdict"] in ("OK", "DEFECT")
        assert (row["verdict"] == "DEFECT") == (int(row["counted"]) > 0)
        overlay = cv2.imread(str(out / row["file"]))
        src = cv2.imread(str(samples / row["file"]))
        assert overlay is not None and src is not None
        assert overlay.shape == (src.shape[0] + 22, src.shape[1], 3)  # verdict banner on top
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == len(names)
    r = runner.invoke(app, ["replay", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.output
