"""The ``convert --assemble`` / ``convert --split`` and ``merge --clip-l ... --clip-l-out ...`` paths of the
CLI: option checks, one call into :mod:`lorasmith.ops.components`, rendering. Not a command of its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from lorasmith.errors import UsageError
from lorasmith.output import emit
from lorasmith.progress import ProgressCallback

if TYPE_CHECKING:
    from lorasmith.ops.components import ComponentsResult


def render(console: Console, r: ComponentsResult) -> None:
    """Human-readable rendering of a :class:`~lorasmith.ops.components.ComponentsResult`."""
    console.print(f"{r.mode} ({r.arch}" + (f", {r.variant})" if r.variant else ")"), markup=False)
    for p in r.inputs:
        console.print(f"  < {p.slot:12} {p.path}", markup=False)
    for p in r.outputs:
        extra = f", changed {p.changed}" if r.mode == "bake" else ""
        console.print(
            f"  > {p.slot:12} {p.path} ({p.tensors} tensors{extra}, {p.file_bytes:,} bytes)", markup=False
        )
    if r.cast.get("tensors"):
        console.print(
            f"  cast {r.cast['tensors']} tensors: {r.cast['overflowed']:,} overflowed (saturated), "
            f"{r.cast['flushed_to_zero']:,} flushed to zero",
            markup=False,
        )
    for name in r.unmatched[:20]:
        console.print(f"  unmatched: {name}", markup=False)
    for w in r.warnings:
        console.print(f"  warning: {w}", markup=False)


def run_convert(
    *,
    assemble: bool,
    split: Path | None,
    parts: Mapping[str, Path | None],
    input: Path | None,
    output: Path | None,
    output_dir: Path | None,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    overwrite: bool,
    as_json: bool,
    progress: ProgressCallback,
) -> None:
    """``convert --assemble`` or ``convert --split``.

    :raises UsageError: both modes, a stray positional input, a missing ``-o``/``--output-dir``.
    """
    from lorasmith.ops import components

    if assemble and split is not None:
        raise UsageError("--assemble and --split cannot be combined", hint="assemble or split, not both")
    if input is not None:
        raise UsageError(
            f"{input}: no positional input with --assemble/--split",
            hint="give the parts as --transformer/--vae/--clip-l..., or the file to --split",
        )
    result: ComponentsResult
    if split is not None:
        if output_dir is None:
            raise UsageError(
                "--split needs --output-dir DIR", hint="lorasmith convert --split CKPT --output-dir DIR"
            )
        if any(v is not None for v in parts.values()):
            raise UsageError("part options go with --assemble", hint="--split takes one checkpoint")
        result = components.split(
            split, output_dir, arch=arch, overwrite=overwrite, progress=progress, **dtypes
        )
    else:
        if output is None:
            raise UsageError(
                "--assemble needs -o OUT", hint="lorasmith convert --assemble --transformer F ... -o OUT"
            )
        result = components.assemble(
            parts, output, arch=arch, overwrite=overwrite, progress=progress, **dtypes
        )
    emit(result, as_json, render)


def run_bake(
    *,
    base: Path,
    loras: list[str],
    output: Path,
    parts: Mapping[str, tuple[Path | None, Path | None]],
    arch: str | None,
    blocks: str | None,
    precision: str,
    save_dtype: str | None,
    strict: bool,
    overwrite: bool,
    as_json: bool,
    progress: ProgressCallback,
) -> None:
    """``merge --base MODEL --clip-l F --clip-l-out O ...``: bake into separate text-encoder files.

    :raises UsageError: a part file without its ``--*-out`` (or the reverse).
    """
    from lorasmith.ops.components import bake_parts

    given: dict[str, tuple[Path, Path]] = {}
    for slot, (src, dst) in parts.items():
        opt = "--" + slot.replace("_", "-")
        if (src is None) != (dst is None):
            raise UsageError(f"{opt} and {opt}-out go together", hint=f"{opt} FILE {opt}-out OUT")
        if src is not None and dst is not None:
            given[slot] = (src, dst)
    result = bake_parts(
        base,
        loras,
        output,
        parts=given,
        arch=arch,
        blocks=blocks,
        precision=precision,
        save_dtype=save_dtype,
        strict=strict,
        overwrite=overwrite,
        progress=progress,
    )
    emit(result, as_json, render)
