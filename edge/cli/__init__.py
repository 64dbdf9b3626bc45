"""`edge`: the one command a technician or a rollout script uses on a line PC.

One module per command group (run/config, camera, plc, uplink, model); `common` holds what they
share. Heavy imports happen inside the commands so `edge --help` stays fast and light.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Edge visual-inspection appliance: run the line daemon, benchmark, calibrate, manage "
    "models, test the PLC and the uplink.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _mount_subcommands() -> None:
    from edge import bench
    from edge.cli import camera, lifecycle, model, plc, recipe, run, uplink

    app.command("run")(run.run)
    app.add_typer(run.config_app, name="config")
    app.command("swap-model")(run.swap_model)
    app.command("bench")(bench.bench_command)
    app.add_typer(camera.app, name="camera")
    app.add_typer(plc.app, name="plc")
    app.add_typer(uplink.app, name="uplink")
    lifecycle.register(model.app)
    app.add_typer(model.app, name="model")
    app.add_typer(recipe.app, name="recipe")
    app.command("calibrate")(camera.calibrate_command)
    app.command("replay")(camera.replay_command)


_mount_subcommands()
