"""The rollout's arithmetic and its refusals, without lines: metrics parsing, windows, every gate
on both sides of its limit, the wave plan checked against Ansible's own batching code, the
config-path rules checked against the daemon's loader, and bad input refused before any change
(exit 2)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fleet.conftest import DEMO, ROLLOUT

FLEET = Path(__file__).resolve().parents[2] / "scripts" / "fleet"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


ef = _load("edge_fleet", FLEET / "module_utils" / "edge_fleet.py")
ro = _load("fleet_rollout", FLEET / "rollout.py")

METRICS = """\
# HELP edge_frames_total Frames received from cameras.
# TYPE edge_frames_total counter
edge_frames_total{camera="cam0"} 100.0
edge_frames_total{camera="cam1"} 50.0
edge_verdicts_total{camera="cam0",reason="none",verdict="OK"} 60.0
edge_verdicts_total{camera="cam0",reason="none",verdict="DEFECT"} 38.0
edge_verdicts_total{camera="cam1",reason="none",verdict="DEFECT"} 48.0
edge_verdicts_total{camera="cam0",reason="overload",verdict="FAILSAFE_REJECT"} 2.0
edge_failsafe_total{camera="cam0",reason="overload"} 2.0
edge_deadline_miss_total{camera="cam0",outcome="dropped_late"} 1.0
edge_end_to_end_latency_ms_bucket{camera="cam0",le="10.0"} 50.0
edge_end_to_end_latency_ms_bucket{camera="cam0",le="20.0"} 90.0
edge_end_to_end_latency_ms_bucket{camera="cam0",le="+Inf"} 100.0
edge_end_to_end_latency_ms_bucket{camera="cam1",le="10.0"} 40.0
edge_end_to_end_latency_ms_bucket{camera="cam1",le="20.0"} 48.0
edge_end_to_end_latency_ms_bucket{camera="cam1",le="+Inf"} 48.0
odd line without a value
"""


def test_counters_sum_over_cameras_and_labels() -> None:
    c = ef.Counters.from_metrics(METRICS, 0.0)
    assert c.frames == 150
    assert c.verdicts == {"OK": 60, "DEFECT": 86, "FAILSAFE_REJECT": 2}
    assert c.failsafes == {"overload": 2} and c.deadline_misses == 1
    assert c.e2e_buckets == {10.0: 90, 20.0: 138, math.inf: 148}


def test_label_values_with_commas_and_quotes() -> None:
    ((name, labels, value),) = ef.parse_metrics('m{a="x,y",b="say \\"hi\\""} 3')
    assert (name, labels, value) == ("m", {"a": "x,y", "b": 'say "hi"'}, 3.0)


def test_window_rates_are_per_decided_part() -> None:
    a = ef.Counters(t=0.0, frames=10, verdicts={"OK": 5, "DEFECT": 5},
                    e2e_buckets={10.0: 10, math.inf: 10})
    b = ef.Counters(t=4.0, frames=110, verdicts={"OK": 45, "DEFECT": 60, "FAILSAFE_REJECT": 5},
                    failsafes={"overload": 5}, deadline_misses=2,
                    e2e_buckets={10.0: 60, 20.0: 110, math.inf: 110})
    w = ef.window(a, b)
    assert (w["parts"], w["defects"], w["failsafes"]) == (100, 55, 5)
    assert w["defect_rate"] == 0.55 and w["failsafe_rate"] == 0.05
    assert w["deadline_misses"] == 2 and w["seconds"] == 4.0
    assert w["failsafe_reasons"] == {"overload": 5}


def test_quantile_matches_prometheus_histogram_quantile() -> None:
    # 100 samples: 50 <= 10 ms, 40 in (10, 20], 10 in (20, 50]
    b = {10.0: 50, 20.0: 90, 50.0: 100, math.inf: 100}
    assert ef.quantile_from_buckets(0.5, b) == pytest.approx(10.0)
    assert ef.quantile_from_buckets(0.99, b) == pytest.approx(20 + 30 * 9 / 10)
    assert ef.quantile_from_buckets(0.99, {10.0: 0, math.inf: 0}) is None
    # the rank in +Inf: the highest finite edge, as Prometheus answers
    assert ef.quantile_from_buckets(0.99, {10.0: 50, math.inf: 100}) == 10.0


BASE = {"failsafe_rate": 0.0, "defect_rate": 0.5, "e2e_p99_ms": 100.0, "deadline_misses": 0}


@pytest.mark.parametrize(("after", "word"), [
    ({"failsafe_rate": 0.02}, "fail-safe rate"),
    ({"defect_rate": 0.61}, "defect rate"),
    ({"defect_rate": 0.39}, "defect rate"),  # flipping parts to OK is caught too
    ({"e2e_p99_ms": 150.1}, "p99"),  # 100 x 1.5
    ({"deadline_misses": 1}, "deadline misses"),
])
def test_each_gate_fails_past_its_limit(after: dict[str, Any], word: str) -> None:
    problems = ef.gate_problems(BASE, {**BASE, **after}, ef.GateLimits())
    assert len(problems) == 1 and word in problems[0], problems


def test_gates_hold_at_their_limits() -> None:
    at_limit = {"failsafe_rate": 0.01, "defect_rate": 0.6, "e2e_p99_ms": 150.0,
                "deadline_misses": 0}
    assert ef.gate_problems(BASE, at_limit, ef.GateLimits()) == []
    # a fast line: +25 ms slack rather than x1.5 (one histogram bucket is not a regression)
    fast = {**BASE, "e2e_p99_ms": 10.0}
    assert ef.gate_problems(fast, {**fast, "e2e_p99_ms": 35.0}, ef.GateLimits()) == []
    assert ef.gate_problems(fast, {**fast, "e2e_p99_ms": 35.1}, ef.GateLimits()) != []


def test_health_gate_only_fails_on_what_a_model_can_break() -> None:
    before = {"components": {"model": True, "verdicts": True, "camera:cam0": True},
              "alarms": ["UPLINK_BACKLOG_HIGH"], "http_status": 200}
    after = {"components": {"model": False, "verdicts": True, "camera:cam0": False},
             "alarms": ["UPLINK_BACKLOG_HIGH", "DRIFT", "RESULTS_UNACKNOWLEDGED"]}
    problems, notes = ef.health_problems(before, after, ef.GateLimits())
    assert problems == ["model down after the change", "new alarm DRIFT"]
    assert notes == ["camera:cam0 down after the change", "new alarm RESULTS_UNACKNOWLEDGED"]


def test_shadow_gate() -> None:
    lim = ef.GateLimits()
    good = {"frames": 120, "agreement": 1.0, "failsafe_free_rate": 1.0}
    assert ef.shadow_problems(good, lim, 100) == []
    assert "agreement" in ef.shadow_problems({**good, "agreement": 0.5}, lim, 100)[0]
    assert "frames" in ef.shadow_problems({**good, "frames": 99}, lim, 100)[0]
    assert "fail-safe-free" in ef.shadow_problems({**good, "failsafe_free_rate": 0.9}, lim,
                                                  100)[0]
    assert ef.shadow_problems({**good, "agreement": 0.5},
                              ef.GateLimits(min_shadow_agreement=0), 100) == []
    assert ef.shadow_problems(None, lim, 100) != []


def test_limits_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown gate limits"):
        ef.GateLimits.from_dict({"max_defect_rate": 0.1})
    lim = ef.GateLimits.from_dict({"gate_alarms": "MODEL_DOWN, DRIFT"})
    assert lim.gate_alarms == ["MODEL_DOWN", "DRIFT"]


_WAVE_NS = [1, 2, 3, 7, 10, 25]
_WAVE_SPECS = ["1,10%,100%", "1", "2,50%", "30%", "1,1,100%"]

# Ansible's batching code runs in a child: importing ansible patches sys.intern process-wide,
# which breaks torch (imported by the model tests later in the same pytest process).
_ANSIBLE_BATCHES = """
import json, sys
from types import SimpleNamespace
from ansible.executor.playbook_executor import PlaybookExecutor
out = {}
for n, spec, serial in json.load(sys.stdin):
    hosts = [f"h{i}" for i in range(n)]
    me = SimpleNamespace(_inventory=SimpleNamespace(get_hosts=lambda *a, **k: list(hosts)))
    play = SimpleNamespace(hosts="all", order=None, serial=serial)
    out[f"{n}|{spec}"] = PlaybookExecutor._get_serialized_batches(me, play)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ansible_batches() -> dict[str, list[list[str]]]:
    cases = [(n, spec, ef.parse_waves(spec)) for n in _WAVE_NS for spec in _WAVE_SPECS]
    r = subprocess.run([sys.executable, "-c", _ANSIBLE_BATCHES], input=json.dumps(cases),
                       capture_output=True, text=True, timeout=120, check=True)
    batches: dict[str, list[list[str]]] = json.loads(r.stdout)
    return batches


@pytest.mark.parametrize("n", _WAVE_NS)
@pytest.mark.parametrize("spec", _WAVE_SPECS)
def test_wave_plan_is_ansibles_serial(
    n: int, spec: str, ansible_batches: dict[str, list[list[str]]]
) -> None:
    """The report's waves are the batches Ansible itself makes (its own code decides)."""
    hosts = [f"h{i}" for i in range(n)]
    assert ef.plan_waves(hosts, ef.parse_waves(spec)) == ansible_batches[f"{n}|{spec}"]


@pytest.mark.parametrize("bad", ["0", "1,x", "10.5%", "0%", "101%", ""])
def test_bad_waves_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="wave"):
        ef.parse_waves(bad)


@pytest.mark.parametrize("cfg", [
    {},
    {"uplink": {"spool_dir": "var/x/uplink"}},
    {"state_dir": "st"},
    {"control": {"socket": "run/ctl.sock"}, "observability": {"host": "0.0.0.0", "port": 9200}},
])
def test_endpoints_without_the_edge_package_match_the_daemons_loader(
    cfg: dict[str, Any], tmp_path: Path
) -> None:
    """The YAML-only fallback (a line PC whose Python lacks the edge package) follows the same
    rules as edge.config: relative paths from the YAML's folder."""
    from ruamel.yaml import YAML

    from edge.config import load_config

    doc = {"line": "l", "cameras": [{"id": "c", "type": "replay", "plc_slot": 0,
                                     "path": str(DEMO / "samples")}],
           "model": {"package": str(DEMO / "package")}, "plc": {"type": "modbus"},
           "uplink": {}, **cfg}
    path = tmp_path / "sub" / "line.yaml"
    path.parent.mkdir()
    with path.open("w") as f:
        YAML().dump(doc, f)
    sock, (host, port, enabled) = ef._endpoints_from_yaml(str(path))
    loaded = load_config(path, deep=False)
    assert sock == str(loaded.control_socket())
    assert (host, port, enabled) == (loaded.observability.host, loaded.observability.port,
                                     loaded.observability.enabled)
    ep = ef.line_endpoints(str(path))  # through the loader (the edge package is here)
    assert ep.control_socket == sock and ep.http.startswith("127.0.0.1:")


def test_a_random_observability_port_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "line.yaml"
    path.write_text(f"line: l\ncameras: [{{id: c, type: replay, plc_slot: 0, path: "
                    f"{DEMO / 'samples'}}}]\nmodel: {{package: {DEMO / 'package'}}}\n"
                    "plc: {type: modbus}\nuplink: {}\nobservability: {port: 0}\n")
    with pytest.raises(ValueError, match="fixed port"):
        ef.line_endpoints(str(path))


def test_report_actions() -> None:
    assert ro.action_of(None) == "not_reached"
    assert ro.action_of({"dry_run": True}) == "would_roll_out"
    assert ro.action_of({"already_active": True}) == "already_active"
    assert ro.action_of({"failed_task": None}) == "rolled_out"
    read = {"probe": {"status": {"active": "a:1"}}}
    assert ro.action_of({**read, "failed_task": "gate", "restored": {"action": "rolled_back"}}) \
        == "rolled_back"
    assert ro.action_of({**read, "failed_task": "shadow", "restored": {"action": "unchanged"}}) \
        == "stopped_before_activation"
    assert ro.action_of({**read, "failed_task": "gate", "restored": {
        "action": "rollback_failed"}}) == "failed_not_restored"
    assert ro.action_of({"failed_task": "probe", "restored": {}}) == "unreachable"


def _rollout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROLLOUT), *args], capture_output=True, text=True, timeout=120)


def test_inventory_without_edge_config_is_refused(tmp_path: Path) -> None:
    inv = tmp_path / "inv.ini"
    inv.write_text("[lines]\nline1 ansible_connection=local edge_config=/etc/edge/l1.yaml\n"
                   "line2 ansible_connection=local\n")
    r = _rollout("--inventory", str(inv), "--package", str(DEMO / "package"))
    assert r.returncode == 2 and "edge_config" in r.stderr and "line2" in r.stderr, r.stderr


def test_damaged_package_is_refused_before_any_line(tmp_path: Path) -> None:
    inv = tmp_path / "inv.ini"
    inv.write_text("line1 ansible_connection=local edge_config=/nonexistent/line.yaml\n")
    pkg = tmp_path / "pkg"
    shutil.copytree(DEMO / "package", pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["plc_model_id"] = 7  # a hand edit: the seal no longer matches
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    r = _rollout("--inventory", str(inv), "--package", str(pkg))
    assert r.returncode == 2 and "refused" in r.stderr and "manifest.json" in r.stderr, r.stderr
    r = _rollout("--inventory", str(inv), "--package", str(tmp_path))
    assert r.returncode == 2 and "not a model package" in r.stderr, r.stderr
    r = _rollout("--inventory", str(inv), "--package", str(DEMO / "package"), "--waves", "1,x")
    assert r.returncode == 2 and "bad wave" in r.stderr, r.stderr


def test_a_line_that_cannot_be_reached_stops_the_rollout(tmp_path: Path) -> None:
    """No daemon behind the first line's socket: it fails (nothing to restore), the report says
    why, and the next wave is never started."""
    from tests.support import free_port

    hosts = []
    for name in ("down1", "down2"):
        cfg = tmp_path / name / "line.yaml"
        cfg.parent.mkdir()
        cfg.write_text(
            f"line: {name}\ncameras: [{{id: c, type: replay, plc_slot: 0, path: "
            f"{DEMO / 'samples'}}}]\nmodel: {{package: {DEMO / 'package'}}}\n"
            f"plc: {{type: modbus}}\nuplink: {{spool_dir: {tmp_path / name / 'spool'}}}\n"
            f"observability: {{port: {free_port()}}}\n")
        hosts.append(f"{name} edge_config={cfg}")
    inv = tmp_path / "inv.ini"
    inv.write_text("\n".join(hosts) + f"\n\n[all:vars]\nansible_connection=local\n"
                   f"ansible_python_interpreter={sys.executable}\n")
    report = tmp_path / "r.json"
    r = _rollout("--inventory", str(inv), "--package", str(DEMO / "package"),
                 "--report", str(report))
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(report.read_text())
    down1, down2 = rep["hosts"]
    assert down1["action"] == "unreachable" and "no daemon listening" in down1["error"]
    assert down2["action"] == "not_reached"
    assert rep["result"] == "stopped" and rep["stopped_at"] == ["down1"]
