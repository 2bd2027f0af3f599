"""``lorasmith convert``: LoRA spellings (rename, fuse, split), dtypes, pickles to safetensors, checkpoint
layouts (single file <-> diffusers folder, optionally sharded), diffusers folders resharded or recast."""

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
    VerboseOpt,
    VerifyOpt,
    guarded,
    write_checks,
)
from lorasmith.output import emit
from lorasmith.progress import cli_progress

if TYPE_CHECKING:
    from lorasmith.ops.convert import ConvertResult

_VERBOSE = False


def render(console: Console, r: ConvertResult) -> None:
    """Human-readable rendering of a :class:`~lorasmith.ops.convert.ConvertResult`."""
    console.print(f"{r.input} -> {r.output} ({r.file_bytes:,} bytes, {r.tensors} tensors)", markup=False)
    if r.arch:
        console.print(f"  family {r.arch}" + (f" ({r.variant})" if r.variant else ""), markup=False)
    if r.kind == "checkpoint" and r.to_spelling:
        console.print(f"  layout {r.to_spelling}", markup=False)
    if any(n > 1 for n in r.shards.values()):
        sharded = ", ".join(f"{sub} {n}" for sub, n in r.shards.items() if n > 1)
        console.print(f"  shards: {sharded}", markup=False)
    if r.copied:
        console.print(f"  copied {r.copied} other file(s) unchanged", markup=False)
    if r.kind == "lora":
        console.print(f"  spelling {r.from_spelling} -> {r.to_spelling}", markup=False)
        counts = ", ".join(f"{n} {mode}" for mode, n in sorted(r.counts.items()))
        console.print(f"  modules: {counts or 'none'}", markup=False)
        if r.max_rel_error is not None:
            console.print(f"  lossy: largest relative error {r.max_rel_error:.3g}", markup=False)
    console.print("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in r.dtypes.items()), markup=False)
    c = r.cast
    if c.tensors:
        console.print(
            f"  cast {c.tensors} tensors ({c.values:,} values): {c.overflowed:,} overflowed (saturated), "
            f"{c.flushed_to_zero:,} flushed to zero",
            markup=False,
        )
    if _VERBOSE:
        for m in r.modules:
            err = "" if m.rel_error is None else f" error {m.rel_error:.3g}"
            console.print(f"    {m.mode:7} {m.name} <- {', '.join(m.sources)}{err}", markup=False)
        for d in r.dropped:
            console.print(f"    dropped {d}", markup=False)
    for w in r.warnings:
        console.print(f"  warning: {w}", markup=False)


def _check_to_with_parts(to: str | None, *, splitting: bool) -> None:
    """``--to`` with ``--assemble``/``--split``: honoured where it names what they write, else a usage error.

    ``--assemble`` writes one single-file checkpoint in the family's layout, so ``--to single`` (and its
    synonyms ``original``, ``bfl``) and ``keep`` are what it does anyway. ``--split`` writes each part as
    its separate distribution keys it: only ``keep`` fits. Anything else would be silently ignored.

    :raises UsageError: any other ``--to`` (a diffusers folder, a LoRA spelling, an unknown word).
    """
    if to is None:
        return
    from lorasmith.errors import UsageError
    from lorasmith.ops.layouts import LAYOUT_WORDS

    word = to.strip().lower()
    layout = LAYOUT_WORDS.get(word)
    if word == "keep" or (layout == "single" and not splitting):
        return
    if splitting:
        raise UsageError(
            f"--to {to} does not apply to --split, which writes each part as its separate file",
            hint="drop --to; to change the checkpoint's layout, convert it without --split "
            "(lorasmith convert CKPT --to diffusers -o FOLDER)",
        )
    if layout == "diffusers":
        raise UsageError(
            "--to diffusers does not apply to --assemble, which writes one single-file checkpoint",
            hint="assemble into a file first, then: lorasmith convert FILE --to diffusers -o FOLDER",
        )
    raise UsageError(
        f"--to {to} does not apply to --assemble, which writes one single-file checkpoint",
        hint="drop --to (or give --to single); LoRA spellings are for converting LoRAs",
    )


@guarded
def command(
    input: Annotated[
        Path | None,
        typer.Argument(help="A LoRA or checkpoint (.safetensors), a .ckpt/.pt/.pth, or a diffusers folder."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Output .safetensors file (a folder for --to diffusers)."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="LoRA spelling: comfy (default), kohya, peft/diffusers, aitk, musubi, onetrainer, lycoris, "
            "comfy-keys, keep. Checkpoint layout: diffusers (a folder) or single.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2.")
    ] = None,
    unet_dtype: Annotated[
        str | None, typer.Option("--unet-dtype", help="Checkpoints: dtype of the UNet/transformer.")
    ] = None,
    te_dtype: Annotated[
        str | None, typer.Option("--te-dtype", help="Checkpoints: dtype of the text encoders.")
    ] = None,
    vae_dtype: Annotated[
        str | None, typer.Option("--vae-dtype", help="Checkpoints: dtype of the VAE.")
    ] = None,
    shard_size: Annotated[
        str | None,
        typer.Option(
            "--shard-size",
            help="--to diffusers: largest weights file per model, e.g. 5GB, 500MB, 10GiB (GB = 10^9 bytes); "
            "larger models are written as shards with an index. Default: one file per model (a folder "
            "input keeps its shards). Not for single-file outputs.",
        ),
    ] = None,
    lossy: Annotated[
        bool, typer.Option("--lossy", help="Allow lossy conversions (through an SVD; errors reported).")
    ] = False,
    lossy_tol: Annotated[
        float, typer.Option("--lossy-tol", help="Relative error a lossy module may have.")
    ] = 0.01,
    lossy_rank: Annotated[
        int | None, typer.Option("--lossy-rank", help="Largest rank of a lossy module.")
    ] = None,
    assemble: Annotated[
        bool, typer.Option("--assemble", help="Assemble the part files given below into one checkpoint.")
    ] = False,
    split: Annotated[
        Path | None, typer.Option("--split", help="Split this checkpoint into part files (--output-dir).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="--split: folder of the part files.")
    ] = None,
    transformer: Annotated[
        Path | None, typer.Option("--transformer", "--unet", help="--assemble: the diffusion model file.")
    ] = None,
    vae: Annotated[Path | None, typer.Option("--vae", help="--assemble: the VAE file.")] = None,
    clip_l: Annotated[Path | None, typer.Option("--clip-l", help="--assemble: the CLIP-L file.")] = None,
    clip_g: Annotated[Path | None, typer.Option("--clip-g", help="--assemble: the CLIP-G file.")] = None,
    t5xxl: Annotated[Path | None, typer.Option("--t5xxl", help="--assemble: the T5-XXL file.")] = None,
    text_encoder: Annotated[
        Path | None, typer.Option("--text-encoder", help="--assemble: Z-Image's Qwen3 (or SD2's) encoder.")
    ] = None,
    arch: ArchOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a LoRA between spellings, change dtypes, turn a pickle into safetensors, or change a
    checkpoint's layout (--to diffusers [--shard-size 5GB], --to single); a diffusers folder with --to
    diffusers and --dtype/--shard-size is recast/resharded into another folder."""
    global _VERBOSE
    from lorasmith.ops.convert import convert

    _VERBOSE = verbose
    parts = {
        "transformer": transformer,
        "vae": vae,
        "clip_l": clip_l,
        "clip_g": clip_g,
        "t5xxl": t5xxl,
        "text_encoder": text_encoder,
    }
    if assemble or split is not None or any(v is not None for v in parts.values()):
        from lorasmith.commands._components import run_convert

        if shard_size is not None:
            from lorasmith.errors import UsageError

            raise UsageError(
                "--shard-size applies to --to diffusers, not to --assemble/--split", hint="drop --shard-size"
            )
        if not (assemble and split is not None):  # both: run_convert says they cannot be combined
            _check_to_with_parts(to, splitting=split is not None)

        with (
            write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
            cli_progress(enabled=not quiet and not as_json) as progress,
        ):
            dts = {"dtype": dtype, "unet_dtype": unet_dtype, "te_dtype": te_dtype, "vae_dtype": vae_dtype}
            run_convert(
                assemble=assemble or split is None,
                split=split,
                parts=parts,
                input=input,
                output=output,
                output_dir=output_dir,
                dtypes=dts,
                arch=arch,
                overwrite=overwrite,
                as_json=as_json,
                progress=progress,
            )
        return
    if input is None or output is None:
        from lorasmith.errors import UsageError

        raise UsageError(
            "convert needs an INPUT and -o OUTPUT", hint="lorasmith convert IN -o OUT (see --help)"
        )
    with (
        write_checks(allow_nonfinite=allow_nonfinite, verify=verify),
        cli_progress(enabled=not quiet and not as_json) as progress,
    ):
        result = convert(
            input,
            output,
            to=to,
            dtype=dtype,
            unet_dtype=unet_dtype,
            te_dtype=te_dtype,
            vae_dtype=vae_dtype,
            lossy=lossy,
            lossy_tol=lossy_tol,
            lossy_rank=lossy_rank,
            arch=arch,
            overwrite=overwrite,
            progress=progress,
            shard_size=shard_size,
        )
    emit(result, as_json, render)
