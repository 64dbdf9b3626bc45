"""`edge recipe get|set`: the product recipe of a running line (through its control socket)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from edge.cli.common import ConfigOpt, control_call

app = typer.Typer(help="Product recipes of a running line.", no_args_is_help=True)


@app.command("get")
def get_command(config: ConfigOpt = None) -> None:
    """Show the recipe parts are judged by now, who selected it, and the recipe table."""
    typer.echo(json.dumps(control_call(config, "recipe.get"), indent=1))


@app.command("set")
def set_command(
    recipe: Annotated[int, typer.Argument(help="Recipe number from the config's recipes.table.")],
    config: ConfigOpt = None,
) -> None:
    """Judge parts by RECIPE from the next part on (lines with `recipes.select: cli`).

    The choice is kept across restarts. Refused (exit 1) when the PLC selects the recipe or the
    number is not defined.
    """
    got = control_call(config, "recipe.set", {"recipe": recipe})
    typer.echo(f"recipe {got['current']} ({got['name'] or 'unnamed'}) selected")
