"""``merge``: LoRAs into one LoRA, LoRAs baked into a checkpoint, checkpoints into a checkpoint.

One public function, :func:`merge`, returning a :class:`MergeResult`; it never prints and reports progress
through an optional callback. The maths and the choices are documented in ``docs/merge.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lorasmith.errors import LorasmithError
from lorasmith.progress import ProgressCallback, noop

__all__ = ["METHODS", "MergeInput", "MergeResult", "merge"]

Mode = Literal["lora", "bake", "checkpoint"]
#: Checkpoint merge methods.
METHODS: tuple[str, ...] = ("weighted-sum", "add-difference", "ties", "dare")

PathLike = str | os.PathLike[str]


class MergeInput(BaseModel):
    """One input file and its ratio (``None`` for a base checkpoint)."""

    path: str
    ratio: float | None


class MergeResult(BaseModel):
    """What :func:`merge` wrote."""

    mode: Mode
    output: str
    inputs: list[MergeInput]
    method: str | None = None
    arch: str | None = None
    modules: int = Field(0, description="LoRA modules written (LoRA merge)")
    ranks: dict[str, int] = Field(default_factory=dict, description="module -> rank written (LoRA merge)")
    rel_errors: dict[str, float] = Field(default_factory=dict, description="SVD merge: relative error")
    spelling: str | None = None
    tensors: int = Field(0, description="tensors written (checkpoint paths)")
    changed: int = Field(0, description="tensors changed (checkpoint paths)")
    unmatched: list[str] = Field(default_factory=list, description="LoRA modules that match no base weight")
    block_notation: str | None = None
    file_bytes: int = 0
    sshs_model_hash: str | None = None
    warnings: list[str] = Field(default_factory=list)


def _ratios(
    specs: Sequence[PathLike], ratios: Sequence[float] | None, default: float | None
) -> list[tuple[Path, float | None]]:
    from lorasmith.ops._merge_lora import parse_weighted

    parsed = [parse_weighted(s, None) for s in specs]
    for spec, (path, ratio) in zip(specs, parsed, strict=True):
        text = os.fspath(spec)
        head, sep, tail = text.rpartition(":")
        # "a.safetensors:abc" is taken as a path (a colon may be part of a name); when that path does not
        # exist but the part before the colon does, the user meant a ratio
        if ratio is None and sep and head and not path.exists() and Path(os.path.expanduser(head)).exists():
            raise LorasmithError(
                f"{text}: ratio {tail!r} is not a number",
                hint="write FILE:RATIO with a number (a.safetensors:0.7)",
            )
    if ratios is not None:
        bad = [r for r in ratios if not math.isfinite(r)]
        if bad:
            raise LorasmithError(
                f"ratio {bad[0]!r} is not a finite number", hint="give finite numbers like 0.7,0.3"
            )
        if len(ratios) != len(parsed):
            raise LorasmithError(
                f"ratio count mismatch: {len(ratios)} ratios for {len(parsed)} inputs",
                hint="give one ratio per input (or write them as file:ratio)",
            )
        if any(r is not None for _, r in parsed):
            raise LorasmithError(
                "ratios given twice (file:ratio and --ratios)", hint="use one of the two spellings"
            )
        return [(p, float(r)) for (p, _), r in zip(parsed, ratios, strict=True)]
    return [(p, default if r is None else r) for p, r in parsed]


def merge(
    loras: Sequence[PathLike] = (),
    *,
    output: PathLike,
    base: PathLike | None = None,
    models: Sequence[PathLike] = (),
    ratios: Sequence[float] | None = None,
    method: str = "weighted-sum",
    rank: int | None = None,
    dynamic: str | None = None,
    to: str | None = None,
    blocks: str | None = None,
    arch: str | None = None,
    unet_only: bool = False,
    density: float = 0.2,
    drop: float = 0.9,
    lam: float = 1.0,
    seed: int = 0,
    precision: str = "float32",
    save_dtype: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Merge LoRAs, bake LoRAs into ``base``, or merge checkpoints ``models`` (exactly one mode).

    :param loras: LoRA files, each optionally ``path:ratio`` (default ratio 1).
    :param output: the output file (written atomically; never one of the inputs).
    :param base: bake ``loras`` into this checkpoint.
    :param models: checkpoints to merge (``path:ratio``); see ``method``.
    :param ratios: ratios given separately, one per input (instead of ``path:ratio``).
    :param method: checkpoint merge method, one of :data:`METHODS`.
    :param rank: LoRA merge: SVD merge to this rank (or the cap of ``dynamic``).
    :param dynamic: LoRA merge: SVD merge with a rank rule ``sv_ratio:T``, ``sv_fro:T``,
        ``sv_cumulative:T`` or ``energy:T``.
    :param to: LoRA merge: output spelling (default: the first input's).
    :param blocks: block weights (see :mod:`lorasmith.ops.blocks`).
    :param arch: force the family.
    :param unet_only: checkpoint merge: copy every non-UNet/transformer tensor from the first model.
    :param density: TIES: fraction of each task vector kept (top-k by magnitude).
    :param drop: DARE: drop probability ``p``.
    :param lam: TIES/DARE: scale ``lambda`` of the merged task vector.
    :param seed: DARE: seed of the drop masks.
    :param precision: compute dtype (``float32`` or ``float64``).
    :param save_dtype: output dtype of float tensors (default: as the input).
    :param strict: bake: LoRA modules that match no base weight are an error.
    :param overwrite: replace an existing output.
    :param progress: progress callback.
    :raises LorasmithError: every user error (exit code 1 at the CLI).
    """
    from lorasmith.io.writer import check_output_path
    from lorasmith.ops._merge_lora import LoadedLora, RankPolicy, load_lora, merge_loras, torch_dtype_of

    cb = progress or noop
    out = Path(output)
    modes = [m for m, on in (("bake", base is not None), ("checkpoint", bool(models))) if on]
    if len(modes) > 1:
        raise LorasmithError("--base and --models cannot be combined", hint="bake or merge, not both")
    if not modes and not loras:
        raise LorasmithError("nothing to merge", hint="give LoRA files, --base CKPT LORAS, or --models")
    compute = torch_dtype_of(precision, "--precision")
    if compute.itemsize < 4:  # half-precision sums lose the small deltas a merge adds
        raise LorasmithError(
            f"--precision {precision} is too narrow to compute in",
            hint="use float32 or float64 (--save-dtype sets the output's dtype)",
        )
    save = torch_dtype_of(save_dtype, "--save-dtype") if save_dtype is not None else None
    if modes == ["checkpoint"]:
        from lorasmith.ops._merge_ckpt import merge_checkpoints

        if loras:
            raise LorasmithError("--models merges checkpoints only", hint="bake LoRAs with --base")
        if method not in METHODS:
            raise LorasmithError(f"unknown merge method {method!r}", hint=f"methods: {', '.join(METHODS)}")
        parsed = _ratios(models, ratios, None)
        n = len(parsed)
        if method == "add-difference" and n != 3:
            raise LorasmithError(
                f"add-difference takes 3 models (A + w (B - C)), got {n}", hint="--models A B:w C"
            )
        if n < 2:
            raise LorasmithError("a checkpoint merge needs at least 2 models", hint="--models a b")
        given = [r for _, r in parsed]
        if method == "weighted-sum":
            if all(r is None for r in given):
                vals = [1.0 / n] * n
            elif any(r is None for r in given):
                raise LorasmithError(
                    "ratio count mismatch: give a ratio to every model or to none",
                    hint="--models a:0.7 b:0.3 (no ratios means equal weights)",
                )
            else:
                vals = [float(r) for r in given if r is not None]
        else:
            vals = [1.0 if r is None else float(r) for r in given]
        if not 0.0 < density <= 1.0 or not 0.0 <= drop < 1.0:
            raise LorasmithError(
                f"--density {density:g} / --drop {drop:g} out of range",
                hint="--density is a fraction in (0, 1] (TIES) and --drop a probability in [0, 1) (DARE)",
            )
        pairs = list(zip([p for p, _ in parsed], vals, strict=True))
        check_output_path(out, overwrite=overwrite, inputs=[p for p, _ in pairs])
        res = merge_checkpoints(
            pairs,
            out,
            method=method,
            arch=arch,
            blocks_spec=blocks,
            unet_only=unet_only,
            density=density,
            drop=drop,
            lam=lam,
            seed=seed,
            compute=compute,
            save_dtype=save,
            overwrite=overwrite,
            progress=cb,
        )
        w = res.write
        return MergeResult(
            mode="checkpoint",
            output=str(out),
            method=method,
            inputs=[MergeInput(path=str(p), ratio=r) for p, r in pairs],
            tensors=res.tensors,
            changed=res.changed,
            block_notation=res.notation,
            file_bytes=w.file_bytes if w else 0,
            sshs_model_hash=w.sshs_model_hash if w else None,
        )

    parsed_l = _ratios(loras, ratios, 1.0)
    inputs = [p for p, _ in parsed_l] + ([Path(base)] if base is not None else [])
    check_output_path(out, overwrite=overwrite, inputs=inputs)
    with ExitStack() as stack:
        # every input's handle is closed on the way out, whichever input or step fails: nothing is left
        # to the garbage collector (an open file keeps a Windows file locked and warns under -X dev)
        loaded: list[LoadedLora] = []
        for p, r in parsed_l:
            lora = load_lora(p, float(r if r is not None else 1.0), arch)
            stack.callback(lora.close)
            loaded.append(lora)
        if base is not None:
            from lorasmith.ops._merge_ckpt import bake

            if not loaded:
                raise LorasmithError(
                    "--base needs at least one LoRA to bake", hint="--base CKPT a.safetensors:0.8"
                )
            res = bake(
                Path(base),
                loaded,
                out,
                arch=arch,
                blocks_spec=blocks,
                compute=compute,
                save_dtype=save,
                strict=strict,
                overwrite=overwrite,
                progress=cb,
            )
            w = res.write
            warnings = (
                [f"{len(res.unmatched)} LoRA module(s) matched no base weight"] if res.unmatched else []
            )
            return MergeResult(
                mode="bake",
                output=str(out),
                arch=loaded[0].detection.arch,
                inputs=[MergeInput(path=str(base), ratio=None)]
                + [MergeInput(path=str(x.path), ratio=x.ratio) for x in loaded],
                tensors=res.tensors,
                changed=res.changed,
                unmatched=res.unmatched,
                block_notation=res.notation,
                file_bytes=w.file_bytes if w else 0,
                sshs_model_hash=w.sshs_model_hash if w else None,
                warnings=warnings,
            )

        from lorasmith.ops._merge_lora import check_same_family
        from lorasmith.ops.blocks import parse_blocks

        check_same_family(loaded)
        policy = RankPolicy.parse(rank, dynamic)
        bw = parse_blocks(blocks, loaded[0].arch) if blocks is not None else None
        lres = merge_loras(
            loaded,
            out,
            policy=policy,
            to=to,
            blocks=bw,
            compute=compute,
            save_dtype=save,
            overwrite=overwrite,
            progress=cb,
        )
        from lorasmith.io.writer import WriteResult

        wr = lres.write
        assert isinstance(wr, WriteResult)
        return MergeResult(
            mode="lora",
            output=str(out),
            arch=loaded[0].detection.arch,
            inputs=[MergeInput(path=str(x.path), ratio=x.ratio) for x in loaded],
            modules=lres.modules,
            ranks=lres.ranks,
            rel_errors=lres.rel_errors,
            spelling=lres.spelling,
            block_notation=lres.notation,
            file_bytes=wr.file_bytes,
            sshs_model_hash=wr.sshs_model_hash,
            warnings=lres.warnings,
        )
