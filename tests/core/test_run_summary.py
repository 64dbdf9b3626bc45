"""`edge run`'s exit summary (edge/cli/run.py format_summary): what an engineer reads first."""

from __future__ import annotations

from edge.cli.run import format_summary
from edge.stats import RunStats


def test_stage_columns_line_up_whatever_the_stage_names() -> None:
    stats = RunStats()
    stats.frames = 1
    stats.record_verdict("cam0", "OK", 6.0)
    for stage, ms in (("queue", 0.05), ("ipc_from_worker", 0.3), ("infer", 4.2)):
        stats.stage(stage, ms)
    text = format_summary(stats.summary())
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    assert [r.split()[0] for r in rows] == ["infer", "ipc_from_worker", "queue"]
    assert len({r.index(" p50 ") for r in rows}) == 1, text
