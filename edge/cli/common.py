"""What every `edge` command group shares: loading a line config the way the daemon does, and
turning a refusal into a clear message with the documented exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edge.config import DEMO_CONFIG, ConfigError, LineConfig, load_config

CONFIG_ERROR_EXIT = 2
"""Matches edge.daemon.ExitCode.CONFIG_ERROR (systemd does not restart on it)."""

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Line YAML; default: the embedded demo (configs/demo.yaml)."
    ),
]


def fail(msg: str, code: int = 1) -> typer.Exit:
    """Print `msg` on stderr and return the Exit to raise (``raise fail(...)``)."""
    typer.echo(msg, err=True)
    return typer.Exit(code)


def load_or_exit(path: Path | None, *, deep: bool = True) -> LineConfig:
    """The line config at `path` (the demo when None), or every problem printed and exit 2."""
    path = path or DEMO_CONFIG
    try:
        return load_config(path, deep=deep)
    except ConfigError as exc:
        typer.echo(f"config error in {exc.path}:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None


def control_call(config: Path | None, cmd: str, args: dict[str, Any] | None = None,
                 timeout_s: float = 300.0) -> Any:
    """One command to the running daemon of the line `config` describes; exit 1 if refused."""
    from edge.control import ControlError, call

    cfg = load_or_exit(config, deep=False)
    try:
        return call(cfg.control_socket(), cmd, args, timeout_s)
    except ControlError as exc:
        raise fail(f"refused: {exc}", 1) from None
