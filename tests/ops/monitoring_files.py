"""Reading the shipped monitoring files: the PromQL they contain and the metric names it uses."""

from __future__ import annotations

import json
import re
from typing import Any

from ruamel.yaml import YAML

from tests.ops.conftest import MONITORING

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(r"(?<![A-Za-z0-9_:$])((?:edge|process)_[a-z0-9_]+|up(?=\s*\{))")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", re.M)
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)$", re.M)


def load_rules() -> dict[str, Any]:
    return dict(YAML(typ="safe").load((MONITORING / "edge-alerts.yml").read_text()))


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "edge-dashboard.json").read_text()))


def dashboard_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])  # panels of a collapsed row
    return out


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard: panel targets and variable queries."""
    exprs = [
        (p["title"], t["expr"])
        for p in dashboard_panels(dash)
        for t in p.get("targets") or []
        if t.get("expr")
    ]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            assert m, f"variable {v['name']}: unexpected query {q!r}"
            exprs.append((f"variable {v['name']}", m.group(1)))
    return exprs


def promql_for_checking(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so promtool can parse it."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$line", ".*")
        .replace("$camera", ".*")
    )


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label values and strings left out)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page offers: sample names, and the declared families
    (a labelled counter with no child yet, e.g. edge_failsafe_total before the first fail-safe)."""
    names = set(_SAMPLE.findall(exposition))
    for name, kind in _TYPE.findall(exposition):
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def camera_labelled(exposition: str) -> set[str]:
    """Series names whose samples carry a `camera` label."""
    return {
        m.group(1)
        for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{[^}]*\bcamera=", exposition, re.M)
    }
