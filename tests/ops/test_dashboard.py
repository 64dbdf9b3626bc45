"""The Grafana dashboard, validated by structure (no Grafana binary is reachable here) and its
PromQL by promtool's parser. That its metrics exist is checked against a live daemon in
test_metric_names.py."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tests.ops.conftest import run_promtool
from tests.ops.monitoring_files import (
    dashboard_exprs,
    dashboard_panels,
    load_dashboard,
    metric_names,
    promql_for_checking,
)

PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "heatmap"}


def _required_topics(panels: list[dict[str, Any]]) -> dict[str, bool]:
    def uses(metric: str, ptype: str | None = None) -> bool:
        return any(
            metric in t.get("expr", "") and (ptype is None or p["type"] == ptype)
            for p in panels
            for t in p.get("targets") or []
        )

    return {
        "verdict mix": uses("edge_verdicts_total"),
        "fail-safes by reason": any(
            "by (line, camera, reason)" in t.get("expr", "") and "edge_failsafe_total" in t["expr"]
            for p in panels
            for t in p.get("targets") or []
        ),
        "e2e latency heatmap": uses("edge_end_to_end_latency_ms_bucket", "heatmap"),
        "stage latency": uses("edge_stage_latency_ms_bucket"),
        "queue depth": uses("edge_queue_depth"),
        "PLC link": uses("edge_plc_heartbeat") and uses('component="plc"'),
        "uplink backlog": uses("edge_uplink_unsent_events") and uses("edge_uplink_oldest_unsent"),
        "drift": uses("edge_drift_psi") and uses("edge_drift_defect_rate"),
    }


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert dash["uid"] and dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in ("x", "y", "w", "h")), p["title"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g))
        if p["type"] == "row":
            continue
        assert p.get("description"), f"{p['title']}: say what the panel shows"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p["targets"]
        assert targets, p["title"]
        assert len({t["refId"] for t in targets}) == len(targets), p["title"]
        for t in targets:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
    # Grafana silently rearranges overlapping panels: none may overlap.
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        overlap = (
            ga["x"] < gb["x"] + gb["w"]
            and gb["x"] < ga["x"] + ga["w"]
            and ga["y"] < gb["y"] + gb["h"]
            and gb["y"] < ga["y"] + ga["h"]
        )
        assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_dashboard_has_line_and_camera_variables() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("line", "camera"):
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["multi"], name
        # "All" must also match targets scraped without a `line` label.
        assert v["allValue"] == ".*", name
    assert "$line" in variables["camera"]["query"]["query"], "camera choices follow the line"


def test_dashboard_covers_what_a_line_needs() -> None:
    topics = _required_topics(dashboard_panels(load_dashboard()))
    missing = [t for t, ok in topics.items() if not ok]
    assert not missing, f"no panel for {missing}"


def test_every_query_follows_the_variables() -> None:
    """Every edge_* selector is filtered by $line, and by $camera where the metric has cameras
    (the per-camera series are listed by test_metric_names against a live daemon)."""
    for where, expr in dashboard_exprs(load_dashboard()):
        if where.startswith("variable line"):
            continue
        for sel in re.finditer(r"\b((?:edge|process)_[a-z0-9_]+|up)\{([^}]*)\}", expr):
            assert 'line=~"$line"' in sel.group(2), f"{where}: {sel.group(0)} ignores $line"
        bare = re.findall(r"\b(?:edge|process)_[a-z0-9_]+\b(?!\{)", expr)
        assert not bare, f"{where}: {bare} without a label filter"


def test_dashboard_promql_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses every query (as recording rules, variables substituted)."""
    exprs = dashboard_exprs(load_dashboard())
    rules = {
        "groups": [{
            "name": "dashboard",
            "rules": [
                {"record": f"dashboard:query_{i}", "expr": promql_for_checking(e)}
                for i, (_where, e) in enumerate(exprs)
            ],
        }]
    }
    path = tmp_path / "dashboard-queries.yml"
    with path.open("w") as f:
        YAML().dump(rules, f)
    r = run_promtool(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout
    assert all(metric_names(e) for _w, e in exprs), "a query that selects no metric"
