"""Issue 9 regressions: no transient fault may become a permanent state, and odd input never stops
the line. Each test runs `edge run` as a real process against the PLC simulator process (its own
per-record log is the independent accounting) and drives the fault from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from plc.record import Alarm, Verdict
from tests.core.conftest import DEMO_SAMPLES, PlcProcess
from tests.core.harness import (
    EDGE,
    assert_each_frame_decided_once,
    healthz,
    inference_children,
    line_yaml,
    metrics_text,
    running_daemon,
    stop,
)
from tests.support import mbpoll_read, wait_until

REAL = (int(Verdict.OK), int(Verdict.DEFECT))


def summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "summary.json").read_text())


def test_healthz_tells_the_truth_while_no_real_verdict_is_produced(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """A frozen worker that is not (yet) declared hung: frames are fail-safed by the guard,
    `/healthz` must say 503 and the PLC must see MODEL_DOWN, then both clear on recovery."""
    config = line_yaml(
        tmp_path, plc.port, demo_package,
        pipeline={"model_hang_s": 60},
        status={"heartbeat_ms": 100, "no_verdict_alarm_s": 1.0},
    )
    with running_daemon(config, tmp_path) as d:
        port = d.event("daemon_ready")["http_port"]  # type: ignore[index]
        wait_until(lambda: any(v in REAL for *_, v in plc.records), 30, "a real verdict")
        wait_until(lambda: healthz(port)[0] == 200, 10, "healthy")
        (worker,) = inference_children(d.proc.pid)
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_until(lambda: healthz(port)[0] == 503, 10, "healthz 503 without real verdicts")
            _status, doc = healthz(port)
            assert doc["components"]["verdicts"]["up"] is False, doc["components"]
            wait_until(
                lambda: mbpoll_read(plc.port, 101, 1)[0] & int(Alarm.MODEL_DOWN), 5,
                "MODEL_DOWN bit at the PLC",
            )
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: healthz(port)[0] == 200, 15, "healthz back to 200")
        wait_until(
            lambda: not mbpoll_read(plc.port, 101, 1)[0] & int(Alarm.MODEL_DOWN), 5,
            "MODEL_DOWN cleared",
        )
        assert stop(d) == 0
    s = summary(tmp_path)
    assert_each_frame_decided_once(s, plc.records)


def test_repeated_worker_crashes_respawn_and_admission_recovers(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9.1): the respawn used to run inside the next batch, so its duration counted
    as service time and admission refused every later frame as `overload`, forever. Kill the
    worker three times in a row: each time real verdicts come back, and no frame after the last
    recovery is refused as overload."""
    config = line_yaml(tmp_path, plc.port, demo_package)
    with running_daemon(config, tmp_path) as d:
        for round_ in range(3):
            wait_until(lambda: any(v in REAL for *_, v in plc.records[-5:]), 40, "real verdicts")
            (worker,) = inference_children(d.proc.pid)
            os.kill(worker, signal.SIGKILL)
            wait_until(
                lambda w=worker: inference_children(d.proc.pid) not in ([], [w]), 40,
                f"respawn {round_ + 1}",
            )
        n = len(plc.records)
        wait_until(lambda: any(v in REAL for *_, v in plc.records[n:]), 40, "real verdicts again")
        m = len(plc.records)
        wait_until(lambda: len(plc.records) >= m + 60, 30, "one more second of frames")
        assert stop(d) == 0
    s = summary(tmp_path)
    assert_each_frame_decided_once(s, plc.records)
    tail = [v for *_, v in plc.records[m:]]
    assert tail.count(int(Verdict.FAILSAFE_REJECT)) == 0, "fail-safes after the recovery"
    assert s["model"]["restarts_in_window"] >= 3


UNREADABLE = {
    "latin-1": "line: 'caf\xe9'\n".encode("latin-1"),
    "utf-16": "line: demo\n".encode("utf-16"),
    "binary": bytes(range(256)) * 64,
    "deeply-nested": b"line: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "huge": b"# padding\n" * (1024 * 1024),
}


def test_sighup_with_unreadable_files_is_a_refused_reload(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9.5): a latin-1, UTF-16, binary, deeply nested or 10 MB file at SIGHUP used
    to crash the daemon (UnicodeDecodeError/RecursionError, exit 1, frames lost)."""
    config = line_yaml(tmp_path, plc.port, demo_package)
    good = config.read_bytes()
    with running_daemon(config, tmp_path) as d:
        for i, (name, data) in enumerate(UNREADABLE.items()):
            config.write_bytes(data)
            d.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda i=i: sum(1 for x in d.lines if x.get("event") == "reload_rejected") > i,
                30, f"reload of the {name} file refused",
            )
            n = len(plc.records)
            wait_until(lambda n=n: len(plc.records) > n + 5, 20, f"frames decided after {name}")
        config.write_bytes(good)
        assert stop(d) == 0
    assert d.event("daemon_crashed") is None
    s = summary(tmp_path)
    assert_each_frame_decided_once(s, plc.records)


def test_sighup_before_ready_does_not_kill_the_daemon(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    config = line_yaml(tmp_path, plc.port, demo_package)
    proc = subprocess.Popen(
        [*EDGE, "run", "--config", str(config), "--summary-json", str(tmp_path / "summary.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        # As soon as the interpreter runs our code (it imports the CLI first), signal it.
        wait_until(lambda: Path(f"/proc/{proc.pid}/maps").read_text().count("onnxruntime") > 0
                   or proc.poll() is not None, 60, "the daemon loading")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(plc.records) >= 10, 60, "frames decided")
        assert proc.poll() is None, "SIGHUP before ready killed the daemon"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _bad_configs(tmp: Path, plc_port: int, package: Path) -> dict[str, tuple[Path, str]]:
    """Configs `edge run` cannot work with; each with the key path its error must name."""
    import shutil

    corrupt = tmp / "corrupt-pkg"
    shutil.copytree(package, corrupt)
    with (corrupt / "model.onnx").open("r+b") as f:
        f.truncate(1000)
    out: dict[str, tuple[Path, str]] = {}

    def cfg(name: str, key: str, **over: object) -> None:
        d = tmp / name
        d.mkdir()
        out[name] = (line_yaml(d, plc_port, package, **over), key)

    cfg("corrupt-package", "model.package", model={"package": str(corrupt)})
    cfg("unknown-class", "decision.classes", decision={"classes": {"dent": {"min_score": 0.5}}})
    cfg("missing-cti", "cameras[0].cti[0]", cameras=[{
        "id": "g0", "type": "genicam", "plc_slot": 0, "cti": [str(tmp / "no.cti")]}])
    cfg("empty-replay-path", "cameras[0].path", cameras=[{
        "id": "r0", "type": "replay", "plc_slot": 0, "path": ""}])
    cfg("map-overlap", "plc", plc={"type": "modbus", "host": "127.0.0.1", "port": plc_port,
                                   "record_base": 95})
    cfg("map-past-65535", "plc", plc={"type": "modbus", "host": "127.0.0.1", "port": plc_port,
                                      "record_base": 65530})
    cfg("bool-budget", "pipeline.budget_ms", pipeline={"budget_ms": True})
    cfg("huge-slot", "plc", cameras=[{
        "id": "r0", "type": "replay", "plc_slot": 1000000, "path": str(DEMO_SAMPLES)}])
    cfg("unset-secret", "uplink.kafka.sasl.password", uplink={
        "spool_dir": str(tmp / "spool"),
        "kafka": {"bootstrap_servers": ["127.0.0.1:9"], "sasl": {
            "mechanism": "PLAIN", "username": "u", "password": {"env": "EDGE_TEST_UNSET_42"}}}})
    for name, data in UNREADABLE.items():
        p = tmp / f"{name}.yaml"
        p.write_bytes(data)
        out[f"file-{name}"] = (p, "")
    return out


def test_every_unusable_config_is_refused_with_exit_2_by_check_and_run(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9.5, 9.7): `edge config check` passed configs `edge run` then failed on with
    exit 3 (systemd restarts it forever), and unreadable files gave a traceback and exit 1."""
    env = {k: v for k, v in os.environ.items() if k != "EDGE_TEST_UNSET_42"}
    for name, (path, key) in _bad_configs(tmp_path, plc.port, demo_package).items():
        for cmd in (["config", "check", str(path)], ["run", "--config", str(path),
                                                     "--duration", "1"]):
            r = subprocess.run([*EDGE, *cmd], capture_output=True, text=True, timeout=120,
                               env=env)
            assert r.returncode == 2, f"{name}: `edge {cmd[0]}` exited {r.returncode}\n{r.stderr}"
            assert "Traceback" not in r.stderr, f"{name}: {r.stderr}"
            assert key in r.stderr, f"{name}: {key!r} not named in\n{r.stderr}"
    assert not plc.records, "a refused config must never reach the PLC"


def test_bad_images_are_skipped_and_counted_not_fatal(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9.8, 9.9): one zero-byte PNG disabled a replay camera (0 frames, exit 0, a
    silent summary); camera losses reached no metric. Every stderr line stays JSON, libjpeg's
    complaints about a truncated JPEG included."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(DEMO_SAMPLES, images)
    (images / "00_empty.png").write_bytes(b"")
    jpeg = (DEMO_SAMPLES / sorted(os.listdir(DEMO_SAMPLES))[0]).read_bytes()
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    assert ok
    (images / "01_truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    config = line_yaml(tmp_path, plc.port, demo_package)
    config.write_text(config.read_text().replace(str(DEMO_SAMPLES), str(images)))
    with running_daemon(config, tmp_path) as d:
        port = d.event("daemon_ready")["http_port"]  # type: ignore[index]
        wait_until(lambda: len(plc.records) >= 30, 30, "frames from the camera")
        text = metrics_text(port)
        assert 'edge_camera_bad_files_total{camera="cam0"} 1.0' in text, text[-3000:]
        assert stop(d) == 0
        assert d.proc.stderr is not None
    s = summary(tmp_path)
    assert s["decided"] >= 30
    assert_each_frame_decided_once(s, plc.records)
    assert s["cameras"]["cam0"]["bad_files"] == 1, s["cameras"]
    assert d.non_json == [], d.non_json[:5]
    # libjpeg wrote its warning straight to file descriptor 2: it arrives wrapped as JSON.
    wrapped = [x for x in d.lines if x.get("event") == "stderr"]
    assert any("JPEG" in x.get("text", "") for x in wrapped), wrapped[:5]


def test_yaml_edits_keep_the_files_mode_and_owner(tmp_path: Path) -> None:
    """Regression (9.10): editing the line YAML (`edge calibrate`, formerly `edge swap-model`)
    left it 0600 and root's: the service user could not read it at the next restart."""
    from tests.core.conftest import ROOT

    config = tmp_path / "line.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    config.write_text(text.replace("../models/", str(ROOT / "models") + "/"))
    os.chmod(config, 0o640)
    if os.getuid() == 0:
        os.chown(config, 0, 65534)  # root:nogroup, as install.sh sets root:edge
    before = config.stat()
    r = subprocess.run(
        [*EDGE, "calibrate", "--config", str(config), "--roi", "0,0,64,64",
         "--report", str(tmp_path / "report.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "camera_roi" in config.read_text()
    after = config.stat()
    assert oct(after.st_mode & 0o7777) == oct(0o640)
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


@pytest.mark.slow
def test_plc_outage_is_logged_in_tens_of_lines_not_per_frame(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9, logging): one `deadline_miss` line per frame flooded 33,000 lines per
    10-minute PLC outage. A 4 s outage at 60 fps touches ~240 frames: a handful of lines."""
    config = line_yaml(tmp_path, plc.port, demo_package, cameras=[{
        "id": "cam0", "type": "replay", "plc_slot": 0, "path": str(DEMO_SAMPLES), "fps": 60}])
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: len(plc.records) >= 30, 30, "frames decided")
        os.killpg(plc.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(4)  # the fault's duration (not a synchronisation)
        finally:
            os.killpg(plc.proc.pid, signal.SIGCONT)
        n = len(plc.records)
        wait_until(lambda: len(plc.records) > n + 30, 30, "frames after the outage")
        assert stop(d) == 0
    s = summary(tmp_path)
    affected = s["deadline_misses"] + sum(s["failsafes"].values())
    assert affected >= 100, s
    per_frame = [x for x in d.lines if str(x.get("event", "")).startswith(
        ("deadline_miss", "failsafe"))]
    assert len(per_frame) <= 20, [x.get("event") for x in per_frame]


def test_hand_edited_manifest_is_refused_by_check_swap_and_reload(
    tmp_path: Path, plc: PlcProcess, demo_package: Path
) -> None:
    """Regression (9.6): raising a threshold in manifest.json by hand (0.15 -> 0.99) was
    accepted by `swap-model` and by the live daemon and turned every defect into OK, with the
    same model id in the events. The package digest covers the manifest: refused everywhere, and
    the events name the digest of the model that decided."""
    import shutil
    import sqlite3

    tampered = tmp_path / "tampered"
    shutil.copytree(demo_package, tampered)
    manifest = tampered / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["thresholds"]["default"] = 0.99
    manifest.write_text(json.dumps(doc, indent=2))
    config = line_yaml(tmp_path, plc.port, demo_package)
    (tmp_path / "bad").mkdir()
    bad = line_yaml(tmp_path / "bad", plc.port, tampered)
    r = subprocess.run([*EDGE, "config", "check", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "model.package" in r.stderr and "digest" in r.stderr, r.stderr
    r = subprocess.run([*EDGE, "swap-model", str(tampered), "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr
    with running_daemon(config, tmp_path) as d:
        wait_until(lambda: len(plc.records) >= 10, 30, "frames decided")
        config.write_text(config.read_text().replace(str(demo_package), str(tampered)))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.event("reload_rejected") is not None, 30, "reload refused")
        n = len(plc.records)
        wait_until(lambda: len(plc.records) > n + 10, 30, "frames after the refused reload")
        assert stop(d) == 0
    digest = (demo_package / "package.digest").read_text()
    db = tmp_path / "spool" / "spool.db"
    with sqlite3.connect(db) as conn:
        payloads = [json.loads(p) for (p,) in conn.execute("SELECT payload FROM events")]
    assert payloads and {p["model_digest"] for p in payloads} == {
        p["model_digest"] for p in payloads[:1]}
    assert payloads[0]["model_digest"] and payloads[0]["model_digest"] in digest
