"""``lorasmith merge``: LoRAs into a LoRA, LoRAs baked into a checkpoint, checkpoints into a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from lorasmith.commands._common import ArchOpt, JsonOpt, OutputOpt, OverwriteOpt, QuietOpt, guarded
from lorasmith.output import emit
from lorasmith.progress import cli_progress

if TYPE_CHECKING:
    from lorasmith.ops.merge import MergeResult


def render(console: Console, r: MergeResult) -> None:
    """Human-readable rendering of a :class:`~lorasmith.ops.merge.MergeResult`."""
    what = {"lora": "LoRA merge", "bake": "bake", "checkpoint": f"checkpoint merge ({r.method})"}[r.mode]
    console.print(f"{what} -> {r.output} ({r.file_bytes:,} bytes)", markup=False)
    for i in r.inputs:
        console.print(f"  {i.path}" + ("" if i.ratio is None else f" : {i.ratio:g}"), markup=False)
    if r.mode == "lora":
        ranks = sorted(set(r.ranks.values()))
        console.print(f"  modules {r.modules}, ranks {ranks[0]}..{ranks[-1]}" if ranks else "  no modules")
    else:
        console.print(f"  tensors {r.tensors}, changed {r.changed}")
    if r.block_notation:
        console.print(f"  block weights: {r.block_notation}")
    for name in r.unmatched[:20]:
        console.print(f"  unmatched: {name}", markup=False)
    for w in r.warnings:
        console.print(f"  warning: {w}", markup=False)


@guarded
def command(
    loras: Annotated[
        list[str] | None,
        typer.Argument(
            help="LoRA files (or checkpoints with --models), each FILE[:RATIO].", show_default=False
        ),
    ] = None,
    output: OutputOpt = Path("merged.safetensors"),
    base: Annotated[Path | None, typer.Option("--base", help="Bake the LoRAs into this checkpoint.")] = None,
    models: Annotated[
        bool, typer.Option("--models", help="The positional files are checkpoints to merge (FILE[:RATIO]).")
    ] = False,
    ratios: Annotated[
        str | None, typer.Option("--ratios", help="Comma-separated ratios, one per input.")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="weighted-sum, add-difference, ties or dare.")
    ] = "weighted-sum",
    rank: Annotated[int | None, typer.Option("--rank", help="SVD merge of LoRAs to this rank.")] = None,
    dynamic: Annotated[
        str | None, typer.Option("--dynamic", help="SVD merge rank rule: sv_ratio:T, sv_fro:T, energy:T...")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Output spelling of a LoRA merge.")] = None,
    blocks: Annotated[
        str | None, typer.Option("--blocks", help="Block weights: values, LABEL=v pairs, or a preset.")
    ] = None,
    unet_only: Annotated[
        bool, typer.Option("--unet-only", help="Copy VAE and text encoders from the first model.")
    ] = False,
    density: Annotated[float, typer.Option("--density", help="TIES: fraction kept.")] = 0.2,
    drop: Annotated[float, typer.Option("--drop", help="DARE: drop probability.")] = 0.9,
    lam: Annotated[float, typer.Option("--lambda", help="TIES/DARE: task-vector scale.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="DARE: seed.")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="Compute dtype.")] = "float32",
    save_dtype: Annotated[str | None, typer.Option("--save-dtype", help="Output dtype.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Bake: unmatched LoRA keys are an error.")] = False,
    arch: ArchOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge LoRAs (exact or SVD), bake LoRAs into a checkpoint, or merge checkpoints; streams."""
    from lorasmith.errors import LorasmithError
    from lorasmith.ops.merge import merge

    ratio_list: list[float] | None = None
    if ratios is not None:
        try:
            ratio_list = [float(x) for x in ratios.split(",")]
        except ValueError:
            raise LorasmithError(f"bad --ratios {ratios!r}", hint="write numbers like 0.7,0.3") from None
    with cli_progress(enabled=not quiet and not as_json) as progress:
        result = merge(
            [] if models else (loras or []),
            output=output,
            base=base,
            models=(loras or []) if models else [],
            ratios=ratio_list,
            method=method,
            rank=rank,
            dynamic=dynamic,
            to=to,
            blocks=blocks,
            arch=arch,
            unet_only=unet_only,
            density=density,
            drop=drop,
            lam=lam,
            seed=seed,
            precision=precision,
            save_dtype=save_dtype,
            strict=strict,
            overwrite=overwrite,
            progress=progress,
        )
    emit(result, as_json, render)
