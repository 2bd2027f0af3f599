"""``lorasmith plugins``: the loaded plugins, their families and versions."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lorasmith.commands._common import JsonOpt, guarded
from lorasmith.ops.plugins import PluginsResult, list_plugins
from lorasmith.output import emit


def _render(console: Console, result: PluginsResult) -> None:
    table = Table(title="lorasmith plugins", title_justify="left")
    for col in ("plugin", "version", "source", "families"):
        table.add_column(col)
    for p in result.plugins:
        table.add_row(p.name, p.version, p.source, ", ".join(p.families) or "-")
    console.print(table)
    fams = Table(title="families", title_justify="left")
    for col in ("id", "name", "variants", "spellings", "layouts", "block notations"):
        fams.add_column(col)
    for f in result.families:
        fams.add_row(
            f.id,
            f.name,
            ", ".join(f.variants),
            ", ".join(f.spellings),
            ", ".join(f.layouts),
            ", ".join(f.block_notations),
        )
    console.print(fams)


@guarded
def command(as_json: JsonOpt = False) -> None:
    """List the loaded plugins, the families they provide and their versions."""
    emit(list_plugins(), as_json, _render)
