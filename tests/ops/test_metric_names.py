"""Every metric the alert rules and the dashboard use exists on a running demo daemon.

A rule or panel on a misspelt or renamed metric never fires and never shows anything: nothing
else would notice. The daemon is scraped as Prometheus would (GET /metrics).
"""

from __future__ import annotations

import re

import pytest

from tests.ops.conftest import DemoDaemon
from tests.ops.monitoring_files import (
    alert_rules,
    camera_labelled,
    dashboard_exprs,
    exported_names,
    load_dashboard,
    metric_names,
)
from tests.support import wait_until


def _used() -> dict[str, set[str]]:
    """metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    for r in alert_rules():
        for n in metric_names(r["expr"]):
            used.setdefault(n, set()).add(f"rule {r['alert']}")
    for where, expr in dashboard_exprs(load_dashboard()):
        for n in metric_names(expr):
            used.setdefault(n, set()).add(f"dashboard {where!r}")
    used.pop("up", None)  # Prometheus' own, per target
    return used


def test_rules_and_dashboard_metrics_exist_on_a_running_daemon(demo: DemoDaemon) -> None:
    used = {n: w for n, w in _used().items() if not n.startswith("edge_drift_")}
    assert len(used) > 40  # the extraction found the queries
    offered = exported_names(demo.metrics())
    missing = {n: sorted(w) for n, w in used.items() if n not in offered}
    assert not missing, f"used but not exported by the daemon: {missing}"


def test_drift_metrics_exist_on_a_running_daemon(demo: DemoDaemon) -> None:
    """The drift watch's gauges (edge_drift_*), once the daemon wires the drift watch."""
    wanted = {n for n in _used() if n.startswith("edge_drift_")}
    assert wanted >= {
        "edge_drift_psi",
        "edge_drift_defect_rate",
        "edge_drift_defect_rate_p_value",
        "edge_drift_active",
        "edge_drift_baseline_frames",
    }
    missing: set[str] = set(wanted)

    def present() -> bool:
        missing.intersection_update(wanted - exported_names(demo.metrics()))
        return not missing

    try:
        wait_until(present, 20, "edge_drift_* on /metrics", poll_s=0.5)
    except TimeoutError:
        pytest.fail(f"the daemon does not export {sorted(missing)}: the drift watch is not wired "
                    "into the daemon's metrics (edge/daemon.py) or not enabled in the demo")


def test_per_camera_metrics_are_filtered_by_camera(demo: DemoDaemon) -> None:
    """Where the daemon labels a series by camera, the dashboard follows $camera."""
    per_camera = camera_labelled(demo.metrics())
    assert "edge_frames_total" in per_camera
    for where, expr in dashboard_exprs(load_dashboard()):
        for sel in re.finditer(r"\b(edge_[a-z0-9_]+)\{([^}]*)\}", expr):
            if sel.group(1) in per_camera and not where.startswith("variable"):
                assert 'camera=~"$camera"' in sel.group(2), f"{where}: {sel.group(0)}"
