"""`edge uplink status` and `edge uplink drain`: look at and empty a line's spool from a shell.

Works on the spool files alone (no running daemon needed): status reads the database and the
status files the daemon leaves beside it; drain takes the spool's writer lock, so it refuses to run
while the daemon for that line is running.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from ruamel.yaml import YAML, YAMLError

from edge.config import resolve_paths
from uplink.config import UplinkSettings
from uplink.forwarder import Forwarder
from uplink.spool import (
    FORWARDER_STATUS,
    SPOOL_STATUS,
    Spool,
    SpoolBusy,
    SpoolCorrupt,
    SpoolOutdated,
    SpoolTooNew,
    read_status,
)

app = typer.Typer(
    help="Inspect and drain the durable uplink spool (events -> Kafka, images -> S3).",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Line config YAML (its `uplink:` section is used)."),
]
SpoolOpt = Annotated[
    Path | None, typer.Option("--spool-dir", help="Spool directory (overrides the config's).")
]


def load_settings(config: Path | None, spool_dir: Path | None) -> tuple[UplinkSettings, str]:
    """The `uplink:` section of a line config (or a file that is only that section)."""
    doc: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = YAML(typ="safe").load(config.read_text())
        except (OSError, YAMLError) as exc:
            typer.echo(f"error: cannot read {config}: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not isinstance(loaded, dict):
            typer.echo(f"error: {config} is not a YAML mapping", err=True)
            raise typer.Exit(2)
        doc = loaded
    section = doc.get("uplink", doc if "spool_dir" in doc else {})
    line = doc.get("line", "line")
    if isinstance(line, dict):
        line = line.get("name", "line")
    try:
        settings = UplinkSettings.model_validate(section)
    except ValidationError as exc:
        for err in exc.errors():
            path = ".".join(["uplink", *(str(p) for p in err["loc"])])
            typer.echo(f"error: {path}: {err['msg']}", err=True)
        raise typer.Exit(2) from exc
    if config is not None:  # relative paths are relative to the YAML, as for the daemon
        resolve_paths(settings, config.resolve().parent)
    if spool_dir is not None:
        settings.spool_dir = spool_dir.resolve()
    return settings, str(line)


def _age(ts: float | None) -> str:
    return "-" if ts is None else f"{time.time() - ts:.0f}s ago"


@app.command()
def status(
    config: ConfigOpt = None,
    spool_dir: SpoolOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Backlog, oldest unsent age, rates, disk use and last error of a spool."""
    settings, line = load_settings(config, spool_dir)
    if not (settings.spool_dir / "spool.db").exists():
        typer.echo(f"error: no spool at {settings.spool_dir} (spool.db missing)", err=True)
        raise typer.Exit(2)
    spool = Spool(settings, line)
    try:
        spool.open(start_writer=False)
    except SpoolCorrupt as exc:
        typer.echo(f"error: spool at {settings.spool_dir} is corrupt ({exc}); the daemon moves it "
                   "aside on its next start", err=True)
        raise typer.Exit(1) from exc
    except (SpoolOutdated, SpoolTooNew) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        st = spool.stats()
        st.update(spool.rates(60.0))
    finally:
        spool.close()
    daemon = read_status(settings.spool_dir / SPOOL_STATUS) or {}
    fwd = read_status(settings.spool_dir / FORWARDER_STATUS) or {}
    st.pop("alarms", None)
    live = ("healthy", "last_error", "last_error_at", "pending", "submitted", "committed",
            "refused", "amendments", "amended_in_place", "malformed", "images_accepted",
            "images_written", "images_dropped", "image_errors", "image_bytes_held",
            "image_queue_bytes", "commit_failing", "commit_failing_since", "commit_failures")
    # Counters of the running daemon come from its status file, not from this process.
    report = {"spool": {k: v for k, v in st.items() if k not in live},
              "daemon": daemon, "forwarder": fwd}
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    last_error = fwd.get("last_error") or daemon.get("last_error") or "-"
    lines = [
        f"spool            {settings.spool_dir}",
        f"stored events    {st['events_stored']}",
        f"unsent events    {st['unsent_events']}",
        f"unsent images    {st['unsent_images']}",
        f"oldest unsent    {st['oldest_unsent_age_s']:.1f} s",
        f"rates (60 s)     spooled {st['spooled_per_s']}/s, sent {st['sent_per_s']}/s, "
        f"images {st['images_sent_per_s']}/s",
        f"disk             {st['bytes_used'] / 1e6:.1f} MB of {st['quota_bytes'] / 1e6:.0f} MB "
        f"({st['usage_fraction']:.1%}), WAL {st['wal_bytes'] / 1e6:.1f} MB",
        f"evicted          {st['evicted']}",
        f"dead-lettered    {st['dead_lettered']} (corrupt rows, table dead_letter)",
        f"images dropped   {daemon.get('images_dropped', '-')} (image queue full)",
        f"daemon status    {_age(daemon.get('written_at'))}, healthy={daemon.get('healthy', '-')}",
        f"forwarder        {_age(fwd.get('written_at'))}, kafka_up={fwd.get('kafka_up', '-')}, "
        f"s3_up={fwd.get('s3_up', '-')}",
        f"last error       {last_error}",
    ]
    if daemon.get("quarantined"):
        lines.append(f"quarantined      {daemon['quarantined']}")
    typer.echo("\n".join(lines))


@app.command()
def drain(
    config: ConfigOpt = None,
    spool_dir: SpoolOpt = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Forward everything unsent to Kafka/S3, then exit (0 drained, 1 timed out, 2 error).

    Stop the line's daemon first: a spool has one writer at a time.
    """
    settings, line = load_settings(config, spool_dir)
    if settings.kafka is None and settings.s3 is None:
        typer.echo("error: the config has neither uplink.kafka nor uplink.s3: nowhere to drain to",
                   err=True)
        raise typer.Exit(2)
    spool = Spool(settings, line)
    try:
        spool.open()
    except SpoolBusy as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        if not spool.healthy:
            typer.echo(f"error: {spool.stats()['last_error']}", err=True)
            raise typer.Exit(2)
        before = spool.backlog()
        fwd = Forwarder(spool, settings)
        drained = asyncio.run(fwd.drain(timeout))
        after = spool.backlog()
    finally:
        spool.close()
    if after["dead_lettered"] > before["dead_lettered"]:
        typer.echo(f"moved {after['dead_lettered'] - before['dead_lettered']} corrupt rows to the "
                   "dead-letter table (spool.db, table dead_letter)", err=True)
    typer.echo(
        f"sent {fwd.events_sent} events and {fwd.images_sent} images; left unsent: "
        f"{after['unsent_events'] if settings.kafka else '-'} events, "
        f"{after['unsent_images'] if settings.s3 else '-'} images "
        f"(before: {before['unsent_events']} events, {before['unsent_images']} images)"
    )
    if not drained:
        typer.echo(f"not drained within {timeout:.0f}s; last error: {fwd.last_error}", err=True)
        raise typer.Exit(1)
