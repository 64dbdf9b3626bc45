"""`edge model activate|rollback|shadow|promote|status`: the models of a RUNNING line.

They talk to the line's daemon through its control socket (found from `--config`); the daemon
loads a candidate beside the running model and switches between batches, so nothing here stops
the line. The training-side `edge model ...` commands are in edge/cli/model.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from edge.cli.common import ConfigOpt, control_call


def _show(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(status, indent=1, default=str))
        return
    typer.echo(f"active   {status['active']}  (digest {str(status['active_digest'])[:16]}...)")
    typer.echo(f"previous {status['previous'] or '-'}")
    sh = status.get("shadow")
    if sh:
        agreement = sh["agreement"]
        typer.echo(
            f"shadow   {sh['model']}: {sh['frames']} frames, agreement "
            f"{'-' if agreement is None else f'{agreement:.4f}'}, latency p50/p99 "
            f"{sh['latency_ms']['p50'] or 0:.1f}/{sh['latency_ms']['p99'] or 0:.1f} ms"
        )
    c = status.get("canary")
    if c:
        typer.echo(f"canary   {c['model']} on {c['fraction']:.0%} of parts: canary {c['canary']}"
                   f" vs active {c['active']}")
    if status.get("last_event"):
        typer.echo(f"last     {status['last_event']}")


PackageArg = Annotated[str, typer.Argument(help="Package directory, or NAME:VERSION in the store.")]


def activate(
    package: PackageArg,
    config: ConfigOpt = None,
    canary: Annotated[
        float | None,
        typer.Option(help="Let the candidate decide only this share of parts (e.g. 0.1), watched "
                          "by the gates and rolled back automatically on a regression."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Import (if needed), load and warm PACKAGE beside the running model, then switch to it
    between batches; kept across restarts. Returns once it is live, or refused (exit 1)."""
    _show(control_call(config, "model.activate", {"package": package, "canary": canary}), as_json)


def rollback(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Back to the previous model (or end a running canary), same guarantees as activate."""
    _show(control_call(config, "model.rollback"), as_json)


def shadow(
    package: Annotated[
        str | None, typer.Argument(help="Package directory, or NAME:VERSION in the store.")
    ] = None,
    config: ConfigOpt = None,
    sample: Annotated[float, typer.Option(help="Share of parts the candidate also infers.")] = 0.1,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the running shadow.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Run PACKAGE on a sample of live frames in its own low-priority worker; it never writes to
    the PLC. Agreement, latency and errors show in `edge model status`."""
    args: dict[str, Any] = {"stop": True} if stop else {"package": package, "sample": sample}
    if not stop and not package:
        typer.echo("give a package (or --stop)", err=True)
        raise typer.Exit(2)
    _show(control_call(config, "model.shadow", args), as_json)


def promote(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Shadow or canary -> active when its gate holds (config `lifecycle:`); refused with the
    numbers otherwise (exit 1)."""
    _show(control_call(config, "model.promote"), as_json)


def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Active, previous, shadow (frames, agreement, latency) and canary of the running line."""
    _show(control_call(config, "model.status"), as_json)


def register(app: typer.Typer) -> None:
    for fn in (activate, rollback, shadow, promote, status):
        app.command(fn.__name__)(fn)
