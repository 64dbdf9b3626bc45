"""The daemon as a process: `edge run` under a fake systemd notify socket, drained by SIGTERM.

The PLC is a separate simulator process (it outlives the daemon, so its registers are read with
mbpoll after the daemon is gone); the spool is read with sqlite3 directly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge.pipeline import usable_cpus
from plc.record import Verdict
from tests.core.conftest import DEMO_SAMPLES, ROOT, PlcProcess, mbpoll_record
from tests.core.harness import (
    EDGE,
    NotifySocket,
    assert_each_frame_decided_once,
    inference_children,
    line_yaml,
    running_daemon,
    stop,
)
from tests.support import mbpoll_read, wait_until


def test_sigterm_drains_and_everything_is_accounted(
    tmp_path: Path, plc: PlcProcess, demo_package: Path, notify: NotifySocket
) -> None:
    config = line_yaml(tmp_path, plc.port, demo_package)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"}
    summary_path = tmp_path / "summary.json"
    with running_daemon(config, tmp_path, env) as d:
        wait_until(lambda: bool(notify.seen("READY=1")), 5, "READY=1 from the daemon")
        ready = d.event("daemon_ready")
        assert ready is not None
        port = ready["http_port"]
        # Let frames flow, then look at health and metrics while running.
        wait_until(lambda: len(plc.records) >= 20, 30, "20 decisions at the PLC")
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5))
        assert health["status"] == "ok", health
        assert {"plc", "model", "spool", "camera:cam0"} <= set(health["components"])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"edge_end_to_end_latency_ms_bucket" in metrics
        assert b'edge_component_up{component="plc"} 1.0' in metrics
        assert b'edge_gc_pause_ms_count{generation="0"}' in metrics
        # The startup heap (modules, classes: ~100k objects) is out of the collector's walk.
        settled = d.event("heap_settled")
        assert settled is not None and settled["frozen_objects"] > 20_000, settled
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(30)
    assert rc == 0, d.lines[-5:]
    s = json.loads(summary_path.read_text())
    assert s["exit_reason"] == "SIGTERM"
    assert s["decided"] > 0
    assert s["gc_pause_ms"]["0"]["n"] > 0  # the young generation is collected all the time
    assert_each_frame_decided_once(s, plc.records)
    # The PLC saw one record per frame that went out, in sequence; mbpoll reads the last one.
    sent = s["decided"] - s["misses_by_outcome"].get("dropped_late", 0)
    wait_until(lambda: len(plc.records) >= sent, 5, "the server's record log")
    assert [seq for _c, seq, _p, _v in plc.records] == list(range(1, len(plc.records) + 1))
    assert mbpoll_record(plc.port, 0)["sequence"] == len(plc.records)
    # Every decided part is in the spool (flushed on shutdown).
    db = next((tmp_path / "spool").glob("*.db"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == s["decided"]
    # systemd protocol: READY, then WATCHDOG pings at < WatchdogSec/2, then STOPPING.
    pings = notify.seen("WATCHDOG=1")
    assert len(pings) >= 2
    assert max(b - a for a, b in itertools.pairwise(pings)) < 0.6
    assert notify.seen("STOPPING=1")
    assert notify.seen("STATUS=")


def test_config_check_reports_every_error_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "line: 'bad line!'\n"
        "cameras:\n"
        "  - {id: c0, type: replay, plc_slot: 0, path: /nonexistent, fps: -5}\n"
        "  - {id: c0, type: teleport, plc_slot: 0}\n"
        "model: {package: x, runtme: onnxruntime}\n"
        "plc: {type: modbus, port: 70000}\n"
        "uplink: {}\n"
        "pipeline: {budget_ms: 348, failsafe_reserve_ms: 400}\n"
    )
    r = subprocess.run(
        [*EDGE, "config", "check", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    err = r.stderr
    for expected in (
        "line:",
        "cameras[0].fps:",
        "cameras[1]:",
        "model.runtme: unknown key",
        "plc.port:",
        "pipeline:",
    ):
        assert expected in err, f"{expected!r} missing from:\n{err}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("line: [unclosed\n", "YAML syntax"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("", "top level must be a mapping"),
    ],
)
def test_config_check_rejects_malformed_yaml(tmp_path: Path, text: str, expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = subprocess.run(
        [*EDGE, "config", "check", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and expected in r.stderr, r.stderr


def test_shipped_configs_are_valid() -> None:
    """The demo passes the full check here; the line example is a template for a plant, so only
    its schema is checked here, and the full check names what this box lacks."""
    env = {**os.environ, "EDGE_S3_SECRET_KEY": "x", "EDGE_S3_ACCESS_KEY": "x"}
    demo = subprocess.run(
        [*EDGE, "config", "check", str(ROOT / "configs" / "demo.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert demo.returncode == 0, demo.stderr
    example = ROOT / "configs" / "line.example.yaml"
    schema = subprocess.run(
        [*EDGE, "config", "check", "--schema-only", str(example)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert schema.returncode == 0, schema.stderr
    full = subprocess.run(
        [*EDGE, "config", "check", str(example)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert full.returncode == 2
    assert "model.package:" in full.stderr and "cameras[0].cti[0]:" in full.stderr


def test_runtime_import_path_has_no_torch_or_ultralytics() -> None:
    code = (
        "import sys, edge.cli, edge.daemon, edge.bench, models.loader, models.onnx_runtime\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "edge.service").read_text()
    local = tmp_path / "edge.service"
    local.write_text(
        unit.replace("/opt/edge/venv/bin/edge", str(Path(sys.executable).parent / "edge"))
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestartPreventExitStatus=2",
        "DeviceAllow=/dev/cpu_dma_latency w",
        "LimitNICE=+0",
    ):
        assert directive in unit


def test_sighup_applies_safe_changes_and_survives_a_broken_config(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    config = line_yaml(tmp_path, plc.port, demo_package)
    with running_daemon(config, tmp_path) as d:
        # 1. A valid change of decision rules and a restart-only section.
        text = config.read_text()
        config.write_text(
            text.replace("heartbeat_ms: 100", "heartbeat_ms: 150") + "decision: {min_area_px: 25}\n"
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.event("reload_done") is not None, 30, "reload_done")
        assert d.event("reload_model_applied") is not None
        # 2. A broken file: refused, the old config keeps running, frames keep flowing.
        config.write_text("line: [broken\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.event("reload_rejected") is not None, 30, "reload_rejected")
        n = len(plc.records)
        wait_until(lambda: len(plc.records) > n + 10, 30, "decisions after the bad reload")
        # 3. Sections that only a restart applies: named, not silently dropped.
        config.write_text(text.replace("fps: 30", "fps: 20") + "drift: {window_frames: 400}\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.event("reload_needs_restart") is not None, 30, "restart warning")
        assert d.event("reload_needs_restart")["sections"] == [  # type: ignore[index]
            "cameras", "drift"
        ]
        assert d.proc.poll() is None
        assert stop(d) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert_each_frame_decided_once(s, plc.records)


def test_bench_writes_report_and_cdf(tmp_path: Path, demo_package: Path) -> None:
    """`edge bench` runs the daemon (paced and closed loop) beside bare session.run and, closed
    loop, the naive loop; the references are measured before and after the daemon. The PLC is
    the native libmodbus server by default (scripts/setup.sh installs gcc and libmodbus-dev),
    the project's Python simulator on request."""
    for mode in (["--rate", "30", "--plc", "sim"],
                 ["--closed-loop", "--workers", "2", "--peer", "naive"]):
        out = tmp_path / mode[0].strip("-")
        r = subprocess.run(
            [*EDGE, "bench", *mode, "--duration", "4", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads((out / "bench.json").read_text())
        s = report["summary"]
        assert s["decided"] == s["frames"] > 20
        assert {"queue", "preprocess", "infer", "postprocess", "plc", "ipc", "ipc_to_worker",
                "ipc_from_worker"} <= set(s["stages_ms"])
        bare = report["bare"]
        assert bare["one_caller_all_threads"]["runs"] > 0
        assert bare["one_caller_per_worker"]["callers"] == report["config"]["workers"]
        assert report["ratios"]["daemon_vs_bare_one_caller_per_worker"] > 0
        for b in bare.values():
            assert b["before_runs_per_s"] > 0 and b["after_runs_per_s"] > 0
        assert (out / "bench-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "ratios: daemon/bare" in r.stdout
        assert report["config"]["plc_peer"] == ("sim" if "sim" in mode else "native")
    closed = json.loads((tmp_path / "closed-loop" / "bench.json").read_text())
    assert closed["config"]["mode"] == "closed_loop" and closed["real_verdicts_per_s"] > 0
    naive = closed["naive"]
    assert naive["before_per_s"] > 0 and naive["after_per_s"] > 0
    assert naive["frames"] == pytest.approx(naive["verdicts_per_s"] * naive["wall_s"])
    assert closed["ratios"]["daemon_vs_naive"] == pytest.approx(
        closed["real_verdicts_per_s"] / naive["verdicts_per_s"])


def test_camera_down_raises_plc_alarm_and_recovery_clears_it(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    images = tmp_path / "images"  # nothing decodable yet: the camera cannot open
    images.mkdir()
    (images / "00_broken.png").write_bytes(b"not a png")
    config = line_yaml(tmp_path, plc.port, demo_package)
    text = config.read_text().replace(str(DEMO_SAMPLES), str(images))
    config.write_text(text.replace("loop: true", "loop: true\n  reopen_backoff_max_s: 0.5"))

    def alarm_word() -> int:
        return mbpoll_read(plc.port, 101, 1)[0]

    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: alarm_word() & 1 == 1, 20, "CAMERA_DOWN bit in the PLC alarm word")
        hb1 = mbpoll_read(plc.port, 100, 1)[0]
        wait_until(lambda: mbpoll_read(plc.port, 100, 1)[0] != hb1, 5, "heartbeat moving")
        port = d.event("daemon_ready")["http_port"]  # type: ignore[index]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            raise AssertionError("healthz must be 503 while a camera is down")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            health = json.load(exc)
        assert health["components"]["camera:cam0"]["up"] is False
        assert "CAMERA_DOWN" in health["alarms"]
        # The camera comes back: frames flow, the alarm clears.
        shutil.copytree(DEMO_SAMPLES, images, dirs_exist_ok=True)
        wait_until(lambda: len(plc.records) >= 5, 30, "decisions after the camera recovered")
        wait_until(lambda: alarm_word() & 1 == 0, 10, "CAMERA_DOWN cleared")
        assert stop(d) == 0


def test_heartbeat_stops_when_the_daemon_dies(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """The PLC's watchdog relies on it: a dead daemon must leave a frozen heartbeat word."""
    config = line_yaml(tmp_path, plc.port, demo_package)
    with running_daemon(config, tmp_path) as d:
        first = mbpoll_read(plc.port, 100, 1)[0]
        wait_until(lambda: mbpoll_read(plc.port, 100, 1)[0] != first, 5, "heartbeat moving")
        d.proc.kill()  # SIGKILL: no drain, no goodbye
        d.proc.wait(10)
    frozen = mbpoll_read(plc.port, 100, 1)[0]
    # Watch for 5 heartbeat periods (100 ms each): the word must not move any more.
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        assert mbpoll_read(plc.port, 100, 1)[0] == frozen


@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_inference_process_hang_or_crash_fails_safe_and_recovers(
    tmp_path: Path, plc: PlcProcess, demo_package: Path, fault: str
) -> None:
    """A frozen (SIGSTOP) or killed worker: every frame still decided in time, then a respawn and
    real verdicts. A frozen worker outlives the budget, so its frames must be fail-safed; a killed
    one may be respawned fast enough that its frames still get real verdicts."""
    config = line_yaml(tmp_path, plc.port, demo_package, pipeline={"model_hang_s": 0.6})
    real = (int(Verdict.OK), int(Verdict.DEFECT))
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: any(v in real for *_, v in plc.records), 30, "first real verdict")
        ready = d.event("inference_process_ready")
        assert ready is not None and ready["overlap"] is (usable_cpus() > 1), ready
        (worker,) = inference_children(d.proc.pid)
        os.kill(worker, signal.SIGSTOP if fault == "hang" else signal.SIGKILL)
        n = len(plc.records)
        if fault == "hang":
            wait_until(
                lambda: any(v == Verdict.FAILSAFE_REJECT for *_, v in plc.records[n:]),
                10,
                "fail-safe REJECTs while the worker is frozen",
            )
        wait_until(lambda: d.event("inference_process_respawn") is not None, 20, "respawn")
        m = len(plc.records)
        wait_until(lambda: any(v in real for *_, v in plc.records[m:]), 30, "real verdicts again")
        if fault == "hang":
            assert d.event("inference_process_killed") is not None
        (new_worker,) = inference_children(d.proc.pid)
        assert new_worker != worker
        assert stop(d) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert_each_frame_decided_once(s, plc.records)
    allowed = {"inference_timeout", "queue_wait", "model_error", "model_down", "plc_retry"}
    assert set(s["failsafes"]) <= allowed, s
    if fault == "hang":
        assert s["failsafes"].get("inference_timeout", 0) + s["failsafes"].get("queue_wait", 0), s


def test_daemon_end_to_end_from_a_genicam_camera(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """harvesters + the TLSimu GenTL producer -> model -> Modbus: every triggered part decided."""
    from camera.genicam import default_cti

    camera = {
        "id": "gt0", "type": "genicam", "plc_slot": 0, "cti": [str(default_cti())],
        "device": {"serial_number": "SN_InterfaceA_0"}, "nodes": {"width": 320, "height": 256},
        "trigger": {"mode": "triggered", "source": "software", "rate_hz": 20},
        "timestamp_wrap_ns": 1_000_000_000,
    }
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[camera])
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: len(plc.records) >= 30, 30, "30 decisions from the GenICam camera")
        assert stop(d) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["decided"] >= 30
    assert_each_frame_decided_once(s, plc.records)
    wait_until(lambda: len(plc.records) >= s["decided"], 5, "the server's record log")
    parts = [part for _c, _seq, part, _v in plc.records]
    assert parts == list(range(1, len(parts) + 1)), "part id = software trigger count"
