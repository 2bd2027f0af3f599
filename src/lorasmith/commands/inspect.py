"""``lorasmith inspect``: what a file is, whether its keys load, and per-block spectra.

Run once per file by hub operators, so this module imports only what a header-level inspect needs; rich
is imported by the human rendering alone (``--json`` never loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorasmith.commands._common import ArchOpt, DeviceOpt, JsonOpt, QuietOpt, guarded
from lorasmith.ops.inspect import InspectResult, inspect_path
from lorasmith.output import emit
from lorasmith.progress import cli_progress

if TYPE_CHECKING:
    from rich.console import Console


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"


def render(console: Console, r: InspectResult) -> None:
    """Human-readable rendering of one :class:`InspectResult`."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{r.path}[/]  ({_size(r.file_bytes)})")
    fam = f"{r.arch_name} ({r.arch})" if r.arch else "unknown"
    console.print(f"  kind        {r.kind}")
    console.print(f"  family      {fam}" + (f", variant {r.variant}" if r.variant else ""), markup=False)
    console.print(f"  confidence  {r.confidence:.0%} — {r.reason}", markup=False)
    if r.layout:
        console.print(f"  layout      {r.layout}")
    if r.components:
        console.print(f"  components  {', '.join(r.components)}")
    console.print(f"  tensors     {r.tensor_count} ({r.parameters:,} values), dtypes {_counts(r.dtypes)}")
    if r.shards is not None:
        console.print(f"  shards      {r.shards} (listed by this index)")
    if r.lora:
        lo = r.lora
        dora = f" (DoRA: {lo.dora})" if lo.dora else ""
        console.print(f"  modules     {lo.module_count}: {_counts(lo.algos)}{dora}")
        console.print(f"  ranks       {_counts(lo.ranks)}")
        console.print(f"  alphas      {_counts(lo.alphas)}")
        console.print(f"  spellings   {_counts(lo.spellings)}")
        console.print(f"  components  {_counts(lo.components)}")
    h = r.hashes
    if h.sshs_model_hash or h.status != "not-checked":
        line = f"  sshs hash   {h.sshs_model_hash or '-'} (legacy {h.sshs_legacy_hash or '-'})"
        if h.status != "not-checked":
            line += f" — {h.status}"
        console.print(line, markup=False)
    if r.training:
        console.print("  training metadata:")
        for k, v in r.training.items():
            console.print(f"    {k} = {v}", markup=False)
    if r.modelspec:
        console.print("  modelspec:")
        for k, v in r.modelspec.items():
            console.print(f"    {k} = {v}", markup=False)
    other = {k: v for k, v in r.metadata.items() if not k.startswith(("ss_", "modelspec.", "sshs_"))}
    if other:
        console.print("  other metadata:")
        for k, v in other.items():
            console.print(f"    {k} = {v[:120]}", markup=False)
    if r.modules is not None:
        table = Table(title="modules", title_justify="left")
        for col in ("module", "algo", "rank", "alpha", "spelling", "block", "target"):
            table.add_column(col, overflow="fold")
        for m in r.modules:
            tgt = (m.target or "?") + (f" rows {m.slice[1]}:{m.slice[1] + m.slice[2]}" if m.slice else "")
            table.add_row(
                m.name,
                m.algo + (" +DoRA" if m.dora else ""),
                str(m.rank or "-"),
                "-" if m.alpha is None else f"{m.alpha:g}",
                m.spelling or "?",
                m.block or "-",
                tgt,
            )
        console.print(table)
    if r.blocks is not None:
        table = Table(title="per-block spectra", title_justify="left")
        for col in ("block", "type", "count", "mean rank", "σ max", "σ min", "ratio", "energy top half"):
            table.add_column(col, justify="right" if col not in ("block", "type") else "left")
        for b in r.blocks:
            table.add_row(
                b.block,
                b.type,
                str(b.count),
                f"{b.mean_rank:g}",
                f"{b.sv_max:.4g}",
                f"{b.sv_min:.4g}",
                "-" if b.ratio is None else f"{b.ratio:.3g}",
                f"{b.energy_half:.1%}",
            )
        console.print(table)
    for w in r.warnings:
        console.print("  [yellow]warning:[/] " + escape(w))


@guarded
def command(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="safetensors files, shard indexes (*.safetensors.index.json) or diffusers folders.",
            show_default=False,
        ),
    ],
    as_json: JsonOpt = False,
    keys: Annotated[bool, typer.Option("--keys", help="List every LoRA module with its target.")] = False,
    verify_hash: Annotated[
        bool, typer.Option("--verify-hash", help="Recompute sshs_model_hash / sshs_legacy_hash and compare.")
    ] = False,
    blocks: Annotated[
        bool,
        typer.Option("--blocks", help="Per block group and module type spectra of a LoRA (loads tensors)."),
    ] = False,
    arch: ArchOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Say what a file is: family, variant, adapter kind, spelling, ranks, alphas, dtypes, metadata."""
    results = []
    with cli_progress(enabled=blocks and not quiet and not as_json) as progress:
        for f in files:
            results.extend(
                inspect_path(
                    f,
                    arch=arch,
                    keys=keys,
                    verify_hash=verify_hash,
                    blocks=blocks,
                    device=device,
                    progress=progress,
                )
            )
    emit(results if len(results) > 1 else results[0], as_json, render)
