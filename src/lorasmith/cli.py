"""The ``lorasmith`` command: one Typer app, one module per subcommand.

Importing this module must stay cheap: no torch here or in the command modules' import path.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lorasmith import __version__
from lorasmith.commands import inspect as inspect_cmd
from lorasmith.commands import plugins as plugins_cmd
from lorasmith.commands import stubs

app = typer.Typer(
    name="lorasmith",
    help="Inspect, merge, resize, extract, convert and cache diffusion-model LoRAs and checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorasmith {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Inspect, merge, resize, extract, convert and cache diffusion-model LoRAs and checkpoints."""


app.command("inspect")(inspect_cmd.command)
app.command("plugins")(plugins_cmd.command)
stubs.register(app, available={"inspect", "plugins"})


def main() -> None:
    """Console-script entry point."""
    app()
