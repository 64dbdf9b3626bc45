"""Issue 12 on the box: activate, roll back, shadow, canary and promote on a running line at
60 fps, through the CLI and the daemon's control socket; the PLC simulator process's own record
log proves that no part was lost, late or decided twice during the switches."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from plc.record import Verdict
from tests.core.conftest import DEMO_SAMPLES, PlcProcess, mbpoll_record
from tests.core.harness import (
    EDGE,
    assert_each_frame_decided_once,
    line_yaml,
    running_daemon,
    stop,
)
from tests.support import wait_until

CAMERA_60FPS = {"id": "cam0", "type": "replay", "plc_slot": 0, "path": str(DEMO_SAMPLES),
                "fps": 60, "loop": True}


def edge(*args: str, timeout: float = 180) -> dict[str, Any]:
    r = subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"edge {' '.join(args)}: {r.stderr}"
    out: dict[str, Any] = json.loads(r.stdout) if "--json" in args else {}
    return out


def repackage(tmp: Path, version: str, plc_model_id: int) -> Path:
    """The demo model re-packaged under a new version, exactly as the issue's acceptance does."""
    data = tmp / f"data-{version}.yaml"
    data.write_text("names: {0: scratch, 1: pit, 2: crack, 3: stain}\nnc: 4\n")
    out = tmp / f"synth-demo-{version}"
    edge("model", "package", "--model", str(DEMO_SAMPLES.parent / "package" / "model.onnx"),
         "--name", "synth-demo", "--version", version, "--plc-model-id", str(plc_model_id),
         "--data", str(data), "--no-gate", "--out", str(out))
    return out


def test_activate_rollback_shadow_at_full_rate(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """The issue's acceptance: activate synth-demo 1.0.1, roll back, shadow it at sample 0.5:
    status names each model in turn, the shadow agrees (identical weights), and the summary has
    frames == decided, no fail-safes, no deadline misses."""
    pkg = repackage(tmp_path, "1.0.1", 2)
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[CAMERA_60FPS])
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: len(plc.records) >= 30, 30, "frames decided")
        st = edge("model", "activate", str(pkg), "--config", str(config), "--json")
        assert st["active"] == "synth-demo:1.0.1" and st["previous"] == "synth-demo:1.0.0"
        n = len(plc.records)
        wait_until(lambda: len(plc.records) >= n + 60, 20, "a second of parts on 1.0.1")
        assert mbpoll_record(plc.port, 0)["model_id"] == 2  # 1.0.1's PLC model id on the wire
        st = edge("model", "rollback", "--config", str(config), "--json")
        assert st["active"] == "synth-demo:1.0.0" and st["previous"] == "synth-demo:1.0.1"
        st = edge("model", "shadow", "synth-demo:1.0.1", "--sample", "0.5", "--config",
                  str(config), "--json")
        assert st["shadow"]["model"] == "synth-demo:1.0.1"
        wait_until(lambda: edge("model", "status", "--config", str(config), "--json")
                   ["shadow"]["frames"] >= 100, 60, "100 shadow frames")
        st = edge("model", "status", "--config", str(config), "--json")
        assert st["active"] == "synth-demo:1.0.0" and st["previous"] == "synth-demo:1.0.1"
        sh = st["shadow"]
        assert sh["frames"] >= 100 and sh["agreement"] >= 0.99, sh
        assert sh["latency_ms"]["p50"] > 0 and sh["latency_ms"]["p99"] >= sh["latency_ms"]["p50"]
        assert stop(d) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert_each_frame_decided_once(s, plc.records)
    assert s["failsafes"] == {} and s["deadline_misses"] == 0, s


def test_activation_survives_a_restart_and_a_bad_package_is_refused(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    pkg = repackage(tmp_path, "1.0.2", 3)
    tampered = tmp_path / "tampered"
    shutil.copytree(pkg, tampered)
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes()[:-10])
    config = line_yaml(tmp_path, plc.port, demo_package)
    with running_daemon(config, tmp_path) as d:
        r = subprocess.run([*EDGE, "model", "activate", str(tampered), "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "refused" in r.stderr, r.stderr
        # `edge swap-model` (wave 1) is now an alias of `edge model activate`.
        r = subprocess.run([*EDGE, "swap-model", str(tampered), "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "refused" in r.stderr, r.stderr
        edge("swap-model", str(pkg), "--config", str(config))
        assert stop(d) == 0
    with running_daemon(config, tmp_path) as d:
        st = edge("model", "status", "--config", str(config), "--json")
        assert st["active"] == "synth-demo:1.0.2", st
        wait_until(lambda: len(plc.full) > 20 and plc.full[-1]["verdict"] in (
            Verdict.OK, Verdict.DEFECT), 30, "real verdicts after the restart")
        assert stop(d) == 0


def flipping_package(tmp: Path, version: str) -> Path:
    """A bad candidate: the demo weights with every decision threshold at 0, so it calls every
    part DEFECT (the canary's defect-rate gate must catch it)."""
    data = tmp / "data-flip.yaml"
    data.write_text("names: {0: scratch, 1: pit, 2: crack, 3: stain}\nnc: 4\n")
    out = tmp / f"synth-demo-{version}"
    from models.package import load_package as load
    from models.package import write_package

    src = load(DEMO_SAMPLES.parent / "package")
    m = src.manifest
    write_package(out, src.model_path, name="synth-demo", version=version, plc_model_id=9,
                  classes=list(m.classes), input_size=m.input_size,
                  thresholds={"default": 0.0, "per_class": {}, "min_area_px": {}},
                  runtime_hints={"conf_threshold": 0.0})
    return out


@pytest.mark.slow
def test_canary_that_flips_parts_to_defect_is_rolled_back_automatically(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    flip = flipping_package(tmp_path, "6.6.6")
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[CAMERA_60FPS],
                       lifecycle={"canary_min_parts": 30})
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: len(plc.records) >= 30, 30, "frames decided")
        st = edge("model", "activate", str(flip), "--canary", "0.3", "--config", str(config),
                  "--json")
        assert st["canary"]["model"] == "synth-demo:6.6.6"
        wait_until(lambda: d.event("canary_stopped") is not None, 60, "automatic rollback")
        st = edge("model", "status", "--config", str(config), "--json")
        assert st["canary"] is None and st["active"] == "synth-demo:1.0.0"
        assert "defect rate" in st["last_event"]["why"], st["last_event"]
        assert stop(d) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert_each_frame_decided_once(s, plc.records)
