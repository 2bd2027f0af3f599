"""``lorasmith extract``: a LoRA from the difference of two checkpoints, streamed module by module."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorasmith.commands._common import (
    AllowNonfiniteOpt,
    ArchOpt,
    DeviceOpt,
    JsonOpt,
    OutputOpt,
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
    from lorasmith.ops.extract import ExtractResult


def _renderer(summary: bool, verbose: bool):  # type: ignore[no-untyped-def]
    def render(console: Console, r: ExtractResult) -> None:
        what = "checkpoint" if r.kind == "checkpoint" else f"LoRA ({r.spelling} spelling)"
        console.print(f"extract -> {r.output}: {what}, {r.file_bytes:,} bytes", markup=False)
        src = f"  {r.arch}" + (f"/{r.variant}" if r.variant else "") + f": {r.tuned} - {r.base}"
        if r.tuned2:
            src += f" ({r.mode} with {r.tuned2})"
        console.print(src, markup=False)
        ranks = f"{r.ranks[0]}..{r.ranks[-1]}" if r.ranks else "-"
        console.print(
            f"  modules {r.modules} (dense diffs {r.diffs}), ranks {ranks}, relative error "
            f"mean {r.mean_rel_error:.2e} max {r.max_rel_error:.2e}",
            markup=False,
        )
        for c in r.components:
            console.print(f"  {c.component}: {c.extracted} module(s); {c.reason}", markup=False)
        if r.detail:
            console.print(f"  residual -> {r.detail}", markup=False)
        if summary or verbose:
            table = Table("block", "count", "rank", "S max", "S min", "ratio", "energy")
            for b in r.blocks:
                rank = str(b.rank_min) if b.rank_min == b.rank_max else f"{b.rank_min}-{b.rank_max}"
                table.add_row(
                    b.block,
                    str(b.count),
                    rank,
                    f"{b.s_max:.3g}",
                    f"{b.s_min:.3g}",
                    f"{b.ratio:.3g}",
                    f"{b.energy:.3f}",
                )
            console.print(table)
        if verbose:
            for m in r.records:
                console.print(
                    f"  {m.name}: {m.kind} rank {m.rank} {m.shape} S {m.s_max:.3g}..{m.s_min:.3g} "
                    f"energy {m.energy:.3f} error {m.rel_error:.2e} ({m.method})",
                    markup=False,
                )
            for reason, n in sorted(r.skipped.items()):
                console.print(f"  skipped {n}: {reason}", markup=False)
        for w in r.warnings:
            console.print(f"  warning: {w}", markup=False)

    return render


@guarded
def command(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint.", dir_okay=False)],
    tuned: Annotated[Path, typer.Option("--tuned", help="Fine-tuned checkpoint, or a LoRA.", dir_okay=False)],
    output: OutputOpt = Path("extracted.safetensors"),
    tuned2: Annotated[
        Path | None, typer.Option("--tuned2", help="Second fine-tune (checkpoint or LoRA); needs --mode.")
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="With --tuned2: common or union.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Union weight: 2A d1 + 2(1-A) d2.")] = 0.5,
    rank: Annotated[int | None, typer.Option("--rank", help="Fixed rank (default 32).")] = None,
    conv_rank: Annotated[
        int | None, typer.Option("--conv-rank", help="Rank of 3x3 convs (extracted only when given).")
    ] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Rank by explained variance (--energy).")] = False,
    energy: Annotated[float, typer.Option("--energy", help="--auto: variance to keep.")] = 0.95,
    rank_max: Annotated[int, typer.Option("--rank-max", help="--auto: largest rank.")] = 64,
    ratio: Annotated[float | None, typer.Option("--ratio", help="LyCORIS: keep S > ratio*S0.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="LyCORIS: keep S > T.")] = None,
    quantile: Annotated[
        float | None, typer.Option("--quantile", help="LyCORIS: keep while cumsum(S) < q*sum(S).")
    ] = None,
    min_dim: Annotated[int, typer.Option("--min-dim", help="Skip modules thinner than this.")] = 0,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only modules whose key contains this (repeat).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Drop modules whose key contains this (repeat).")
    ] = None,
    full_layer: Annotated[
        bool, typer.Option("--full-layer", help="Also store norm (1-d) and bias deltas as diffs.")
    ] = False,
    min_rel_diff: Annotated[
        float, typer.Option("--min-rel-diff", help="Changed when ||D||/||W|| exceeds this (per module).")
    ] = 1e-6,
    clamp_quantile: Annotated[
        float | None, typer.Option("--clamp-quantile", help="Clamp factors at this quantile (e.g. 0.99).")
    ] = None,
    detail: Annotated[
        Path | None, typer.Option("--detail", help="Also write the residual D - LoRA as a LoRA here.")
    ] = None,
    detail_scale: Annotated[float, typer.Option("--detail-scale", help="Scale of the residual.")] = 1.0,
    as_checkpoint: Annotated[
        bool, typer.Option("--as-checkpoint", help="Write base + low-rank delta as a checkpoint.")
    ] = False,
    as_checkpoint_full: Annotated[
        bool, typer.Option("--as-checkpoint-full", help="Write base + exact delta as a checkpoint.")
    ] = False,
    to: Annotated[str | None, typer.Option("--to", help="Output spelling (default: kohya).")] = None,
    save_dtype: Annotated[str | None, typer.Option("--save-dtype", help="fp16, bf16 or fp32.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="float32 or float64.")] = "float32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    device: DeviceOpt = "auto",
    summary: Annotated[bool, typer.Option("--summary", help="Per-block table.")] = False,
    verbose: VerboseOpt = False,
    arch: ArchOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a LoRA from two checkpoints (tuned - base), module by module in bounded memory."""
    from lorasmith.errors import UsageError
    from lorasmith.ops.extract import extract

    if mode is not None and mode not in ("common", "union"):
        raise UsageError(f"unknown --mode {mode!r}", hint="use common or union")
    with (
        write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
        cli_progress(enabled=not quiet and not as_json) as progress,
    ):
        result = extract(
            base,
            tuned,
            output=output,
            tuned2=tuned2,
            mode=mode,  # type: ignore[arg-type]
            alpha=alpha,
            rank=rank,
            conv_rank=conv_rank,
            auto=auto,
            energy=energy,
            rank_max=rank_max,
            ratio=ratio,
            threshold=threshold,
            quantile=quantile,
            min_dim=min_dim,
            include=include or (),
            exclude=exclude or (),
            full_layer=full_layer,
            min_rel_diff=min_rel_diff,
            clamp_quantile=clamp_quantile,
            detail=detail,
            detail_scale=detail_scale,
            as_checkpoint=as_checkpoint,
            as_checkpoint_full=as_checkpoint_full,
            to=to,
            device=device,
            precision=precision,
            save_dtype=save_dtype,
            seed=seed,
            arch=arch,
            overwrite=overwrite,
            progress=progress,
        )
    emit(result, as_json, _renderer(summary, verbose))
