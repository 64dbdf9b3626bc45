"""`python -m edge` = the `edge` command."""

from edge.cli import app

app()
