"""Issue 12 across the fleet: scripts/fleet/rollout (Ansible, ansible_connection=local) against
three real demo lines. What each line runs is read back through the daemon's own control client
and model store reader (what `edge model status|list` print), not with the rollout's module.

The lines share a loaded 2-core box with other test runs, which can stall every process at once:
where a test needs a rollout to PASS, the timing-driven gates (e2e p99, fail-safe rate, deadline
misses, FAILSAFE_ACTIVE) are opened wide so a box-wide stall cannot fail it; their arithmetic is
tested in test_gates.py. The bad package is caught by its defect rate (every part DEFECT against
a baseline of one in two), which does not depend on timing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.fleet.conftest import ROLLOUT, Line

# Short windows: the demo lines decide 15 parts/s each.
FAST = ["--soak-s", "3", "--min-parts", "20", "--shadow-sample", "0.5",
        "--min-shadow-frames", "15"]
NO_TIMING_GATES = ["--max-p99-ratio", "100", "--p99-slack-ms", "10000",
                   "--max-failsafe-increase", "1", "--max-deadline-misses", "1000000",
                   "--gate-alarms", "MODEL_DOWN,DRIFT"]


def rollout(inventory: Path, package: Path, tmp: Path, *extra: str) -> tuple[int, dict[str, Any],
                                                                            str]:
    report = tmp / "report.json"
    r = subprocess.run(
        [str(ROLLOUT), "--inventory", str(inventory), "--package", str(package),
         "--report", str(report), *FAST, *extra],
        capture_output=True, text=True, timeout=600,
    )
    doc = json.loads(report.read_text()) if report.exists() else {}
    return r.returncode, doc, r.stdout + r.stderr


def by_host(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in report["hosts"]}


def test_dry_run_shows_the_plan_and_changes_nothing(
    fleet: list[Line], inventory: Path, good_package: Path, tmp_path: Path
) -> None:
    before = {ln.name: ln.status() for ln in fleet}
    rc, rep, out = rollout(inventory, good_package, tmp_path, "--dry-run")
    assert rc == 0, out
    assert rep["result"] == "dry_run"
    assert rep["waves"] == [["line2"], ["line1"], ["line3"]]  # the [canary] group goes first
    hosts = by_host(rep)
    for ln in fleet:
        assert hosts[ln.name]["action"] == "would_roll_out", hosts[ln.name]
        assert hosts[ln.name]["before"] == before[ln.name]["active"]
        after = ln.status()
        assert (after["active"], after["previous"], after["shadow"]) == (
            before[ln.name]["active"], before[ln.name]["previous"], None)
        assert "synth-demo:1.0.1" not in ln.store()
    assert "wave 1: line2" in out and "would_roll_out" in out


def test_bad_package_is_rolled_back_at_the_canary(
    fleet: list[Line], inventory: Path, bad_package: Path, tmp_path: Path
) -> None:
    """Shadow gate off, so the bad package is activated on the canary and the health gate must
    catch it: that line goes back to the model it ran, the others are never touched."""
    before = {ln.name: ln.status() for ln in fleet}
    rc, rep, out = rollout(inventory, bad_package, tmp_path, "--min-shadow-agreement", "0",
                           *NO_TIMING_GATES)
    assert rc == 1, out
    assert rep["result"] == "stopped" and rep["stopped_at"] == ["line2"], out
    hosts = by_host(rep)
    canary = hosts["line2"]
    assert canary["action"] == "rolled_back", canary
    assert any("defect rate" in p for p in canary["problems"]), canary
    # half the demo parts are good: the bad model calls (nearly) all DEFECT, the rest are
    # fail-safes when the box is loaded (it decodes every candidate)
    assert canary["gate"]["defect_rate"] > canary["baseline"]["defect_rate"] + 0.3, canary
    assert canary["before"] == before["line2"]["active"] == canary["after"]
    st = {ln.name: ln.status() for ln in fleet}
    assert st["line2"]["active"] == before["line2"]["active"]
    assert st["line2"]["previous"] == "synth-demo:6.6.6"  # it did run, and was rolled back
    assert st["line2"]["last_event"]["model"] == before["line2"]["active"]
    for name in ("line1", "line3"):
        assert hosts[name]["action"] == "not_reached"
        assert (st[name]["active"], st[name]["previous"]) == (
            before[name]["active"], before[name]["previous"])
        assert "synth-demo:6.6.6" not in next(ln for ln in fleet if ln.name == name).store()


def test_bad_package_is_stopped_in_shadow_by_default(
    fleet: list[Line], inventory: Path, bad_package: Path, tmp_path: Path
) -> None:
    """With the default shadow agreement gate the canary never decides a part with it."""
    before = {ln.name: ln.status() for ln in fleet}
    rc, rep, out = rollout(inventory, bad_package, tmp_path)
    assert rc == 1, out
    canary = by_host(rep)["line2"]
    assert canary["action"] == "stopped_before_activation", canary
    assert canary["shadow"]["frames"] >= 15 and canary["shadow"]["agreement"] < 0.9, canary
    assert canary["gate"] is None
    st = {ln.name: ln.status() for ln in fleet}
    for ln in fleet:
        assert (st[ln.name]["active"], st[ln.name]["previous"], st[ln.name]["shadow"]) == (
            before[ln.name]["active"], before[ln.name]["previous"], None)


def test_good_package_reaches_every_line(
    fleet: list[Line], inventory: Path, good_package: Path, tmp_path: Path
) -> None:
    before = {ln.name: ln.status() for ln in fleet}
    rc, rep, out = rollout(inventory, good_package, tmp_path, *NO_TIMING_GATES)
    assert rc == 0, out
    assert rep["result"] == "complete" and rep["stopped_at"] == []
    hosts = by_host(rep)
    for ln in fleet:
        h = hosts[ln.name]
        assert h["action"] == "rolled_out", h
        assert h["shadow"]["agreement"] >= 0.99, h  # identical weights
        assert h["gate"]["parts"] >= 20 and h["problems"] == []
        st = ln.status()
        assert st["active"] == "synth-demo:1.0.1", (ln.name, st)
        assert st["previous"] == before[ln.name]["active"]
        assert st["active_digest"] == rep["package"]["digest"]
    # the table names every line and what happened to it
    for ln in fleet:
        assert any(row.split()[1:2] == [ln.name] and "rolled_out" in row
                   for row in out.splitlines() if row[:1].isdigit()), out
    # run again (all lines in one wave): every line already runs it, nothing is re-done
    rc, rep, out = rollout(inventory, good_package, tmp_path, "--waves", "100%")
    assert rc == 0, out
    assert rep["waves"] == [["line2", "line1", "line3"]]
    assert {h["action"] for h in rep["hosts"]} == {"already_active"}, out
    assert all(h["gate"] is None and h["shadow"] is None for h in rep["hosts"])
    assert {ln.status()["previous"] for ln in fleet} == {before[ln.name]["active"] for ln in fleet}
