"""The ``lorasmith`` command: one Typer app, one module per subcommand.

Importing this module must stay cheap: no torch here or in the command modules' import path, and no
command module at all. A command's module is imported only when that command runs or its own help is
shown (:class:`LazyCommandGroup`); ``lorasmith --help`` reads each command's one-line help from its
module's source without importing it. Hub operators run ``lorasmith inspect`` once per file, so every
module a command does not need is start-up time paid thousands of times.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from lorasmith import __version__

#: Subcommands in help order; each is the module ``lorasmith.commands.<name>`` exposing ``command`` (a
#: function) or ``COMMAND`` (a :class:`typer.Typer` group). A command whose module does not exist yet is
#: registered as a stub that says so and exits 1.
COMMANDS: tuple[str, ...] = ("inspect", "merge", "resize", "extract", "convert", "cache", "plugins")

#: Settings every command app shares with the root app (plain help, no pretty tracebacks).
_APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "rich_markup_mode": None,
    "pretty_exceptions_enable": False,
}


def _module_name(name: str) -> str:
    return f"lorasmith.commands.{name}"


def load_command(name: str) -> TyperCommand | TyperGroup:
    """Import ``lorasmith.commands.<name>`` and build its Click command (the stub for a missing module).

    The command is built exactly as registering it on the root app would: a function ``command`` becomes
    the command ``name``; a ``COMMAND`` group is added under ``name``.
    """
    holder = typer.Typer(**_APP_SETTINGS)
    if importlib.util.find_spec(_module_name(name)) is None:
        from lorasmith.commands import stubs

        stubs.register_one(holder, name)
    else:
        module = importlib.import_module(_module_name(name))
        spec = getattr(module, "COMMAND", None)
        if isinstance(spec, typer.Typer):  # a command group (``cache latents|text|norms``)
            holder.add_typer(spec, name=name)
        else:
            holder.command(name)(module.command)
    command = typer.main.get_group(holder).commands[name]
    assert isinstance(command, (TyperCommand, TyperGroup))
    return command


def _docstring_help(path: Path) -> str | None:
    """The help a command module gives without importing it: ``COMMAND = typer.Typer(help="...")``, or
    the docstring of its ``command`` function; ``None`` when the source does not say it plainly."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "command":
            return ast.get_docstring(node)
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "COMMAND" for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            for kw in node.value.keywords:
                value = kw.value
                if kw.arg == "help" and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return value.value
    return None


def command_help(name: str) -> str:
    """The help text of command ``name`` as ``lorasmith --help`` lists it, importing nothing if it can.

    Read from the module's source (:func:`_docstring_help`); a module whose source is not at hand, or
    does not spell its help plainly, is imported instead.
    """
    spec = importlib.util.find_spec(_module_name(name))
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        found = _docstring_help(Path(spec.origin))
        if found is not None:
            return found
    return load_command(name).help or ""


class _Pending(TyperCommand):
    """Stands for a command whose module is not imported yet (its help is filled in on demand)."""


class LazyCommandGroup(TyperGroup):
    """The root group: each of :data:`COMMANDS` is imported when it is looked up (to run it, to show its
    help, to complete it), and listed in ``--help`` from :func:`command_help` without importing it."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name in COMMANDS:
            # placeholders keep every name known to Typer (usage errors suggest the nearest command)
            self.commands.setdefault(name, _Pending(name))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command ``cmd_name``, importing its module on first use."""
        command = self.commands.get(cmd_name)
        if isinstance(command, _Pending):
            command = self.commands[cmd_name] = load_command(cmd_name)
        return command

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The ``Commands:`` section, one line per command, without importing the command modules."""
        rows: list[tuple[str, TyperCommand | TyperGroup]] = []
        for name in self.list_commands(ctx):
            command = self.commands[name]
            if isinstance(command, _Pending) and command.help is None:
                command.help = command_help(name)
            if isinstance(command, (TyperCommand, TyperGroup)) and not command.hidden:
                rows.append((name, command))
        if not rows:
            return
        # as Click does: the help column gets what the widest name leaves of the line
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


app = typer.Typer(
    name="lorasmith",
    help="Inspect, merge, resize, extract, convert and cache diffusion-model LoRAs and checkpoints.",
    no_args_is_help=True,
    cls=LazyCommandGroup,
    **_APP_SETTINGS,
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


def main() -> None:
    """Console-script entry point."""
    app()
