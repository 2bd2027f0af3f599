"""``lorasmith plugins``: the loaded plugins, their families and versions, and each family's parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorasmith.commands._common import JsonOpt, guarded
from lorasmith.ops.plugins import FamilyRow, PartRow, PluginsResult, list_plugins
from lorasmith.output import emit

if TYPE_CHECKING:
    from rich.console import Console


def _render(console: Console, result: PluginsResult) -> None:
    from rich.table import Table

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
    _render_parts(console, result.families)


def _notes(family: FamilyRow, part: PartRow) -> str:
    notes = []
    if part.variants != family.variants:
        notes.append(f"variant {', '.join(part.variants)}")
    if not part.required:
        notes.append("optional")
    if part.form != part.file_form:
        notes.append(f"{part.form} form in the single file")
    if part.kind in family.part_kinds:
        notes.append("kind declared by the family")
    return "; ".join(notes)


def _render_parts(console: Console, families: list[FamilyRow]) -> None:
    """The parts of each family's single-file checkpoint (what ``convert --split``/``--assemble`` use)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="parts", title_justify="left")
    for col in ("family", "part", "option", "kind", "single-file prefix", "split file", "notes"):
        table.add_column(col)
    for f in families:
        for p in f.parts:
            kind = (
                p.kind_name
                if p.kind is None or p.kind_name.startswith(p.kind)
                else f"{p.kind} ({p.kind_name})"
            )
            cells = (f.id, p.name, p.option, kind, p.prefix, p.file or "<checkpoint name>", _notes(f, p))
            # plugin-given names may hold [brackets]: never read them as markup
            table.add_row(*(escape(c) for c in cells))
    if table.row_count:
        console.print(table)
    bare = [f.id for f in families if not f.parts]
    if bare:
        console.print(f"families without separate parts: {', '.join(bare)}")


@guarded
def command(as_json: JsonOpt = False) -> None:
    """List the loaded plugins, the families they provide and their versions, and each family's parts."""
    emit(list_plugins(), as_json, _render)
