"""Logs a plant can ship: the Vector configuration and the documented field set, checked against
what a running daemon really writes (no Vector binary is reachable here, so the remap program
itself is not executed: its file parses and names every field)."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import datetime

from tests.ops.conftest import MONITORING, DemoDaemon

FIELDS = ("line", "camera", "part", "sequence", "model", "reason", "event", "level", "timestamp")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def test_vector_config_reads_the_edge_unit_and_names_the_field_set() -> None:
    cfg = tomllib.loads((MONITORING / "vector.toml").read_text())
    (source_name, source), = cfg["sources"].items()
    assert source["type"] == "journald" and source["include_units"] == ["edge.service"]
    remap = cfg["transforms"]["edge_logs"]
    assert remap["type"] == "remap" and remap["inputs"] == [source_name]
    program = remap["source"]
    assert "parse_json(" in program
    for f in FIELDS:
        assert re.search(rf"\.{f}\b", program), f"the remap never sets or reads .{f}"
    # The daemon's aliases are normalised, and a wrapped stderr line does not pose as a line name.
    assert ".part_id" in program and ".model_id" in program and '"stderr"' in program
    sinks = cfg["sinks"]
    assert {s["type"] for s in sinks.values()} == {"elasticsearch", "loki"}
    for sink in sinks.values():
        assert sink["inputs"] == ["edge_logs"]
        assert sink["buffer"]["type"] == "disk"  # a plant network outage loses nothing
    labels = sinks["loki"]["labels"]
    assert "line" in labels and "level" in labels
    high_cardinality = {"part", "sequence", "timestamp"}
    assert not any(f in str(v) for v in labels.values() for f in high_cardinality)


def test_the_field_set_is_documented() -> None:
    readme = (MONITORING / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.M))
    assert set(FIELDS) <= documented, set(FIELDS) - documented


def test_every_daemon_log_line_is_json_with_the_core_fields(demo: DemoDaemon) -> None:
    lines = demo.log_lines()
    assert len(lines) > 5
    events = set()
    for raw in lines:
        doc = json.loads(raw)  # every line: JSON, nothing printed as plain text
        assert isinstance(doc, dict), raw
        assert isinstance(doc.get("event"), str) and doc["event"], raw
        events.add(doc["event"])
        assert doc.get("level") in LEVELS, raw
        ts = doc.get("timestamp")
        assert isinstance(ts, str) and ts.endswith("Z"), raw
        datetime.fromisoformat(ts.replace("Z", "+00:00"))
        # `line` names the production line everywhere but in a wrapped stderr line (the shipper
        # moves that one to `text`).
        if "line" in doc and doc["event"] != "stderr":
            assert doc["line"] == demo.line, raw
    assert "daemon_ready" in events
