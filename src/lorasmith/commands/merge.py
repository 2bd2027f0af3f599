"""``lorasmith merge``: LoRAs into a LoRA, LoRAs baked into a checkpoint, checkpoints into a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from lorasmith.commands._common import (
    AllowNonfiniteOpt,
    ArchOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    VerifyOpt,
    guarded,
    write_checks,
)
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
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Output file [default: merged.safetensors].", dir_okay=False),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", help="Read the whole merge from a YAML recipe (see docs/merge.md).", dir_okay=False
        ),
    ] = None,
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
    clip_l: Annotated[Path | None, typer.Option("--clip-l", help="Bake: a separate CLIP-L file.")] = None,
    clip_l_out: Annotated[Path | None, typer.Option("--clip-l-out", help="Bake: baked CLIP-L file.")] = None,
    clip_g: Annotated[Path | None, typer.Option("--clip-g", help="Bake: a separate CLIP-G file.")] = None,
    clip_g_out: Annotated[Path | None, typer.Option("--clip-g-out", help="Bake: baked CLIP-G file.")] = None,
    t5xxl: Annotated[Path | None, typer.Option("--t5xxl", help="Bake: a separate T5-XXL file.")] = None,
    t5xxl_out: Annotated[Path | None, typer.Option("--t5xxl-out", help="Bake: baked T5-XXL file.")] = None,
    text_encoder: Annotated[
        Path | None, typer.Option("--text-encoder", help="Bake: a separate text-encoder file.")
    ] = None,
    text_encoder_out: Annotated[
        Path | None, typer.Option("--text-encoder-out", help="Bake: baked text-encoder file.")
    ] = None,
    arch: ArchOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge LoRAs (exact or SVD), bake LoRAs into a checkpoint, or merge checkpoints; streams."""
    from lorasmith.errors import LorasmithError, UsageError
    from lorasmith.ops.merge import merge

    if recipe is not None:
        from lorasmith.ops.recipes import load_recipe, run_recipe

        given = {
            "FILES": bool(loras),
            "--base": base is not None,
            "--models": models,
            "--ratios": ratios is not None,
            "--method": method != "weighted-sum",
            "--rank": rank is not None,
            "--dynamic": dynamic is not None,
            "--to": to is not None,
            "--blocks": blocks is not None,
            "--unet-only": unet_only,
            "--save-dtype": save_dtype is not None,
            "--strict": strict,
            "--arch": arch is not None,
            "--precision": precision != "float32",
            "--clip-l": clip_l is not None,
            "--clip-l-out": clip_l_out is not None,
            "--clip-g": clip_g is not None,
            "--clip-g-out": clip_g_out is not None,
            "--t5xxl": t5xxl is not None,
            "--t5xxl-out": t5xxl_out is not None,
            "--text-encoder": text_encoder is not None,
            "--text-encoder-out": text_encoder_out is not None,
        }
        clash = [name for name, on in given.items() if on]
        if clash:
            raise UsageError(
                f"--recipe takes the merge from the file; also given: {', '.join(clash)}",
                hint="put these in the recipe (-o, --overwrite, --verify, --allow-nonfinite, --json and -q "
                "combine with --recipe)",
            )
        from lorasmith.ops.merge import MergeResult

        with (
            write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
            cli_progress(enabled=not quiet and not as_json) as progress,
        ):
            # -o given on the command line wins over the recipe's output; text-encoder files in the recipe
            # make it a bake into separate files
            done = run_recipe(
                load_recipe(recipe), recipe.parent, output, overwrite=overwrite, progress=progress
            )
        if isinstance(done, MergeResult):
            emit(done, as_json, render)
        else:
            from lorasmith.commands._components import render as render_parts

            emit(done, as_json, render_parts)
        return

    te_parts = {
        "clip_l": (clip_l, clip_l_out),
        "clip_g": (clip_g, clip_g_out),
        "t5xxl": (t5xxl, t5xxl_out),
        "text_encoder": (text_encoder, text_encoder_out),
    }
    if any(a is not None or b is not None for a, b in te_parts.values()):
        from lorasmith.commands._components import run_bake

        if base is None or models or ratios is not None:
            raise UsageError(
                "separate text-encoder files go with --base (and FILE:RATIO, not --ratios)",
                hint="merge --base MODEL LORA:1.0 --clip-l F --clip-l-out OUT -o OUT",
            )
        with (
            write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
            cli_progress(enabled=not quiet and not as_json) as progress,
        ):
            run_bake(
                base=base,
                loras=loras or [],
                output=output if output is not None else Path("merged.safetensors"),
                parts=te_parts,
                arch=arch,
                blocks=blocks,
                precision=precision,
                save_dtype=save_dtype,
                strict=strict,
                overwrite=overwrite,
                as_json=as_json,
                progress=progress,
            )
        return

    ratio_list: list[float] | None = None
    if ratios is not None:
        try:
            ratio_list = [float(x) for x in ratios.split(",")]
        except ValueError:
            raise LorasmithError(f"bad --ratios {ratios!r}", hint="write numbers like 0.7,0.3") from None
    with (
        write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
        cli_progress(enabled=not quiet and not as_json) as progress,
    ):
        result = merge(
            [] if models else (loras or []),
            output=output if output is not None else Path("merged.safetensors"),
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
