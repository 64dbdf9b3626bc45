"""`edge run`, `edge config check` and `edge swap-model`: the daemon and its config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.cli.common import ConfigOpt, load_or_exit

config_app = typer.Typer(help="Validate line configs.", no_args_is_help=True)

@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Line YAML to validate.")],
    schema_only: Annotated[
        bool,
        typer.Option(
            "--schema-only",
            help="Only the schema (for a template checked away from its line PC): skip the "
            "model package, files, PLC map and secrets that `edge run` also checks.",
        ),
    ] = False,
) -> None:
    """Validate FILE as `edge run` would; print every problem with its key path; exit 2 if any."""
    cfg = load_or_exit(file, deep=not schema_only)
    typer.echo(
        f"{file}: OK (line {cfg.line}, {len(cfg.cameras)} camera(s), plc {cfg.plc.type}, "
        f"model {cfg.model.package})" + (" [schema only]" if schema_only else "")
    )


def run(
    config: ConfigOpt = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after SECONDS (default: run until SIGTERM).")
    ] = None,
    json_summary: Annotated[
        Path | None, typer.Option("--summary-json", help="Also write the exit summary here.")
    ] = None,
) -> None:
    """Run the line daemon (the demo when no --config is given)."""
    from edge.config import DEMO_CONFIG
    from edge.daemon import install_early_signal_handlers, run_daemon
    from edge.logs import configure_logging, under_systemd
    from edge.malloc import limit_arenas

    install_early_signal_handlers()
    limit_arenas()  # before any thread starts
    path = config or DEMO_CONFIG
    cfg = load_or_exit(path)
    configure_logging(cfg.logging.level, cfg.logging.format, capture_stderr=True)
    tty = sys.stderr.isatty() and not under_systemd()
    code, daemon = run_daemon(cfg, path, duration, status_line=tty)
    summary = daemon.summary()
    summary["exit_reason"] = daemon.exit_reason
    summary["exit_code"] = int(code)
    typer.echo(format_summary(summary))
    if json_summary:
        json_summary.write_text(json.dumps(summary, indent=2, default=str))
    raise typer.Exit(int(code))


_CAMERA_LOSSES = (
    "missed", "refused_triggers", "lost_triggers", "unsolicited", "bad_files", "refused",
    "downscaled", "reopens", "stalls",
)


def format_summary(s: dict[str, Any]) -> str:
    e2e = s["end_to_end_ms"]
    lines = [
        "== edge run summary ==",
        f"frames {s['frames']}  decided {s['decided']}  exit: {s.get('exit_reason', '?')}",
        "verdicts   " + ("  ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items())) or "-"),
        "fail-safes "
        + ("  ".join(f"{k} {v}" for k, v in sorted(s["failsafes"].items())) or "none"),
        f"deadline misses {s['deadline_misses']} "
        + (str(s["misses_by_outcome"]) if s["deadline_misses"] else ""),
        f"latency capture->PLC ack ms: p50 {e2e['p50']:.1f}  p99 {e2e['p99']:.1f}  "
        f"max {e2e['max']:.1f}  (n={e2e['n']})",
    ]
    width = max((len(stage) for stage in s["stages_ms"]), default=0)
    for stage, st in s["stages_ms"].items():
        lines.append(
            f"  {stage:<{width}} p50 {st['p50']:7.2f}  p99 {st['p99']:7.2f}  max {st['max']:7.2f}"
        )
    for cam, st in (s.get("cameras") or {}).items():
        losses = {k: st.get(k) for k in _CAMERA_LOSSES if st.get(k)}
        lines.append(
            f"camera {cam}: {st.get('frames', 0)} frames"
            + (f", LOST/REFUSED {losses}" if losses else ", none lost")
        )
    if s.get("plc_simulator"):
        lines.append(f"plc simulator: {s['plc_simulator']}")
    if s.get("late_results_discarded"):
        lines.append(
            f"late real verdicts discarded (fail-safe already out): {s['late_results_discarded']}"
        )
    if s.get("spool_rejected"):
        lines.append(f"events the spool refused: {s['spool_rejected']}")
    return "\n".join(lines)


def swap_model(
    package: Annotated[str, typer.Argument(help="Package directory or NAME:VERSION.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="The running line's YAML.")],
) -> None:
    """Alias of `edge model activate PACKAGE --config FILE` (kept for wave-1 scripts).

    The running daemon verifies the package, loads it beside the running model and switches
    between batches; the choice is kept across restarts in the model store (the YAML is not
    edited). A package that does not verify is refused and the old model keeps running.
    """
    from edge.cli.common import control_call

    status = control_call(config, "model.activate", {"package": package})
    typer.echo(f"active model: {status['active']} (previous {status['previous']})")
