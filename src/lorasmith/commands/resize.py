"""``lorasmith resize``: lower a LoRA's rank (fixed, dynamic, or base-aware recipes).

A thin command: it parses options, calls :func:`lorasmith.ops.resize.resize` and renders the result. The
op is imported inside the command, so ``import lorasmith.cli`` stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorasmith.commands._common import (
    AllowNonfiniteOpt,
    ArchOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    VerboseOpt,
    VerifyOpt,
    guarded,
    write_checks,
)
from lorasmith.output import emit
from lorasmith.progress import cli_progress

if TYPE_CHECKING:
    from lorasmith.ops.resize import OutputRecord, ResizeResult


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1048576:.2f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _render_output(console: Console, out: OutputRecord, verbose: bool) -> None:
    s = out.summary
    console.print(f"[bold]{escape(out.path)}[/]", highlight=False)
    line = f"  from {out.input}: {out.policy}"
    if out.threshold is not None:
        line += f", threshold {out.threshold:.4g}"
    console.print(line, markup=False, highlight=False)
    size = f"  {_size(out.file_bytes)} (input {_size(s.input_bytes)})"
    if out.target_bytes is not None:
        size += f", target {_size(out.target_bytes)}"
    console.print(size, markup=False, highlight=False)
    counts = f"  {s.modules} modules: {s.resized} resized, {s.unchanged} unchanged"
    if s.dropped:
        counts += f", {s.dropped} dropped"
    if s.copied:
        counts += f", {s.copied} copied"
    console.print(counts, markup=False, highlight=False)
    console.print(
        f"  rank {s.rank_min}..{s.rank_max} (mean {s.rank_mean:g}); ss_network_dim {out.network_dim}, "
        f"ss_network_alpha {out.network_alpha}",
        markup=False,
        highlight=False,
    )
    err = f"  relative error vs the LoRA {_pct(s.rel_error_lora)}"
    if s.rel_error_base_max is not None:
        err += f"; vs the base layer at most {_pct(s.rel_error_base_max)}"
    console.print(err, markup=False, highlight=False)
    if not verbose:
        return
    table = Table(title_justify="left", show_edge=False, pad_edge=False)
    for col in ("module", "algo", "kind", "rank", "alpha", "err LoRA", "err base", "status"):
        right = col in ("rank", "alpha", "err LoRA", "err base")
        table.add_column(col, justify="right" if right else "left", overflow="fold", no_wrap=right)
    for m in out.modules:
        old = "-" if m.old_rank is None else str(m.old_rank)
        alpha = "-" if m.new_alpha is None else f"{m.new_alpha:g}"
        table.add_row(
            m.name,
            m.algo,
            m.kind,
            f"{old} -> {m.new_rank}",
            alpha,
            _pct(m.rel_error_lora),
            _pct(m.rel_error_base),
            m.status,
        )
    console.print(table)


def _renderer(verbose: bool) -> Callable[[Console, ResizeResult], None]:
    def render(console: Console, result: ResizeResult) -> None:
        for i, out in enumerate(result.outputs):
            if i:
                console.print()
            _render_output(console, out, verbose)
        for b in result.base:
            console.print(
                f"base {b.path}: {b.cache_hits} norms from the cache, {b.computed} computed",
                markup=False,
                highlight=False,
            )
        console.print(
            f"{len(result.outputs)} file(s) written in {result.seconds:.2f} s on {result.device} "
            f"({result.decompositions} modules decomposed)",
            markup=False,
            highlight=False,
        )
        for w in result.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)

    return render


@guarded
def command(
    loras: Annotated[
        list[str],
        typer.Argument(
            help="LoRA files, globs ('loras/*.safetensors') or weighted merges ('a.safetensors:0.7,b:0.3').",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (one input).", dir_okay=False)
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", help="Output folder: one <lora>_<policy>.safetensors per input and recipe."
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="New rank; with --dynamic or --recipe, the maximum rank.")
    ] = None,
    conv_rank: Annotated[
        int | None, typer.Option("--conv-rank", help="Rank (or cap) for kxk convolutions; default --rank.")
    ] = None,
    dynamic: Annotated[
        str | None,
        typer.Option("--dynamic", help="Choose each module's rank: sv_ratio, sv_fro or sv_cumulative."),
    ] = None,
    param: Annotated[
        float | None,
        typer.Option("--param", help="The --dynamic target (ratio >= 1, or a fraction in [0, 1])."),
    ] = None,
    kohya_compat: Annotated[
        bool, typer.Option("--kohya-compat", help="Count --dynamic ranks as sd-scripts does (one more).")
    ] = False,
    base: Annotated[
        Path | None, typer.Option("--base", help="Base checkpoint, for base-aware recipes and errors.")
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help="Score recipes, e.g. 'fro_ckpt=1,thr=-3.5:spn_lora=1,size=32'."),
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Write in another key spelling of the family.")
    ] = None,
    arch: ArchOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="float32 (default) or float64 (slower, exact tails).")
    ] = "float32",
    no_norms_cache: Annotated[
        bool, typer.Option("--no-norms-cache", help="Do not read or write the base-norm cache.")
    ] = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Lower the rank of LoRAs: fixed, dynamic (sv_ratio / sv_fro / sv_cumulative) or base-aware recipes."""
    from lorasmith.errors import LorasmithError
    from lorasmith.ops.resize import DynamicMethod, Precision, resize

    if precision not in ("float32", "float64"):
        raise LorasmithError(f"unknown precision {precision!r}", hint="use float32 or float64")
    with (
        write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
        cli_progress(enabled=not quiet and not as_json) as progress,
    ):
        result = resize(
            loras,
            output=output,
            output_dir=output_dir,
            rank=rank,
            conv_rank=conv_rank,
            dynamic=cast("DynamicMethod | None", dynamic),
            param=param,
            kohya_compat=kohya_compat,
            base=base,
            recipe=recipe,
            to=to,
            arch=arch,
            device=device,
            overwrite=overwrite,
            precision=cast("Precision", precision),
            norms_cache=not no_norms_cache,
            progress=progress,
        )
    emit(result, as_json, _renderer(verbose))
