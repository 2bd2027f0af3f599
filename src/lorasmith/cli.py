"""The ``lorasmith`` command: one Typer app, one module per subcommand.

Importing this module must stay cheap: no torch here or in the command modules' import path.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Annotated

import typer

from lorasmith import __version__
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


#: Subcommands in help order; each is the module ``lorasmith.commands.<name>`` with a ``command`` function.
#: A command whose module does not exist yet is registered as a stub that says so and exits 1.
COMMANDS: tuple[str, ...] = ("inspect", "merge", "resize", "extract", "convert", "cache", "plugins")


def _register() -> None:
    for name in COMMANDS:
        modname = f"lorasmith.commands.{name}"
        if importlib.util.find_spec(modname) is None:
            stubs.register_one(app, name)
            continue
        module = importlib.import_module(modname)
        spec = getattr(module, "COMMAND", None)
        if isinstance(spec, typer.Typer):  # a command group (``cache latents|text|norms``)
            app.add_typer(spec, name=name)
        else:
            app.command(name)(module.command)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
