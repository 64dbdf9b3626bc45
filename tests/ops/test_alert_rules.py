"""The shipped Prometheus rules: valid, unit-tested rule by rule, and complete in what they say."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from tests.ops.conftest import MONITORING, run_promtool
from tests.ops.monitoring_files import alert_rules, metric_names

REQUIRED = {
    # the issue's list -> the rule(s) that cover it
    "line down / heartbeat stale": {"EdgeDaemonDown", "EdgeHeartbeatStale"},
    "fail-safe rate high": {"EdgeFailsafeRateHigh"},
    "deadline misses": {"EdgeDeadlineMisses"},
    "end-to-end p99 near budget": {"EdgeLatencyP99NearBudget"},
    "camera down": {"EdgeCameraDown"},
    "model down": {"EdgeModelDown"},
    "no real verdicts": {"EdgeNoRealVerdicts"},
    "uplink backlog age": {"EdgeUplinkBacklogOld"},
    "spool near quota": {"EdgeSpoolNearQuota"},
    "drift": {"EdgeDriftAlarm", "EdgeInputDrift"},
    "defect-rate spike": {"EdgeDefectRateSpike", "EdgeDefectRateDrift"},
    "PLC unacknowledged records": {"EdgePlcUnacknowledgedRecords"},
    "supervised task restarts": {"EdgeTaskRestarted", "EdgeTaskGivenUp"},
}


def test_promtool_checks_the_rules(promtool: str) -> None:
    r = run_promtool(promtool, "check", "rules", "edge-alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    r = run_promtool(promtool, "test", "rules", "edge-alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_a_broken_expectation_fails_promtool(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: flip one expectation and promtool must say FAILED."""
    doc = YAML(typ="safe").load((MONITORING / "edge-alerts.test.yml").read_text())
    group = doc["tests"][0]
    case = next(c for c in group["alert_rule_test"] if c["exp_alerts"])
    case["exp_alerts"] = []
    doc["tests"] = [group]
    doc["rule_files"] = [str(MONITORING / "edge-alerts.yml")]
    broken = tmp_path / "broken.test.yml"
    with broken.open("w") as f:
        YAML().dump(doc, f)
    r = subprocess.run([promtool, "test", "rules", str(broken)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_every_rule_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = YAML(typ="safe").load((MONITORING / "edge-alerts.test.yml").read_text())
    assert doc["rule_files"] == ["edge-alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in doc["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "rules without a test where they fire"
    assert names - quiet == set(), "rules without a test where they stay quiet"
    assert (fires | quiet) - names == set(), "tests of rules that do not exist"


def test_every_rule_explains_itself() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    for r in rules:
        ann = r.get("annotations") or {}
        for key in ("summary", "description", "runbook"):
            assert str(ann.get(key, "")).strip(), f"{r['alert']}: no {key}"
        # A runbook line says what to check and what to do.
        assert "Check" in ann["runbook"] and "Do:" in ann["runbook"], r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert re.fullmatch(r"Edge[A-Za-z0-9]+", r["alert"]), r["alert"]


def test_the_issues_list_is_covered() -> None:
    names = {r["alert"] for r in alert_rules()}
    for topic, wanted in REQUIRED.items():
        assert wanted <= names, f"{topic}: {sorted(wanted - names)} missing"


def test_rules_select_only_edge_metrics_and_up() -> None:
    for r in alert_rules():
        used = metric_names(r["expr"])
        assert used, f"{r['alert']}: no metric found in {r['expr']!r}"
        assert all(n.startswith("edge_") or n == "up" for n in used), (r["alert"], used)


def test_example_prometheus_config_is_valid(promtool: str) -> None:
    r = run_promtool(promtool, "check", "config", "prometheus.example.yml")
    assert r.returncode == 0, r.stdout + r.stderr
