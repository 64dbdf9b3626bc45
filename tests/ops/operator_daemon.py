"""`edge run` with the operator view attached, for tests/ops (a child process the test stops).

Same steps as `edge run` (early signal handlers, config, JSON logs with stderr capture,
run_daemon), plus a ready hook that attaches an OperatorView to the pipeline and the HTTP server
when the daemon has not wired one itself. Once the daemon wires it, the hook does nothing and the
tests exercise the daemon's own wiring.

    python tests/ops/operator_daemon.py CONFIG.yaml [DURATION_S]
"""

from __future__ import annotations

import sys
from pathlib import Path

import structlog

from edge.daemon import Daemon, install_early_signal_handlers, run_daemon
from edge.logs import configure_logging
from edge.operator import OperatorView


def attach_view(daemon: Daemon) -> None:
    http, pipeline = daemon.http, daemon.pipeline
    if http is None or pipeline is None or http.view is not None:
        return
    view = OperatorView(daemon.config.line, budget_ms=daemon.config.pipeline.budget_ms)
    pipeline.observers.append(view.observe)
    http.attach_view(view)
    structlog.get_logger("tests.ops").info("operator_view_attached", by="test ready hook")


def main() -> int:
    from edge.config import load_config

    install_early_signal_handlers()
    path = Path(sys.argv[1])
    duration = float(sys.argv[2]) if len(sys.argv) > 2 else None
    cfg = load_config(path)
    configure_logging(cfg.logging.level, cfg.logging.format, capture_stderr=True)
    code, _daemon = run_daemon(cfg, path, duration, False, ready_hooks=[attach_view])
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
