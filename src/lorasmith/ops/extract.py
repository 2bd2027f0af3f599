"""``extract``: a LoRA from the difference of two checkpoints, streamed module by module.

One public function, :func:`extract`, returning an :class:`ExtractResult`; it never prints and reports
progress through an optional callback. The maths and the choices are documented in ``docs/extract.md``.

Memory: both inputs are read one tensor at a time (:func:`lorasmith.io.reader.open_tensors`); each
module's delta is decomposed and its factors parked in a scratch file, so the peak is a few modules
whatever the model's size. A checkpoint output is streamed through a planned writer.

Threads: on a CPU the modules are decomposed in parallel worker threads, each with one torch thread
(:func:`~lorasmith.ops._extract_math.compute_threads`), while the calling thread reads the inputs in order
and consumes the results in order (:func:`~lorasmith.ops._extract_math.pipelined`): what is written and
reported does not depend on the scheduling.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from lorasmith.errors import LorasmithError, ShapeMismatchError, UsageError
from lorasmith.ops._device import compute_device
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import torch

    from lorasmith.archs.base import Alias, Architecture, Inventory
    from lorasmith.ops._extract_io import CheckpointInput, Input, LoraParts, Spill
    from lorasmith.ops._extract_math import RankPolicy

__all__ = ["BlockRow", "ComponentReport", "ExtractResult", "ModuleRecord", "extract"]

PathLike = str | os.PathLike[str]
Mode = Literal["common", "union"]


class ModuleRecord(BaseModel):
    """One output module."""

    name: str = Field(description="output module name")
    key: str = Field(description="canonical weight key")
    component: str | None = None
    block: str | None = None
    kind: Literal["lora", "diff"] = "lora"
    rank: int = 0
    shape: list[int] = Field(default_factory=list)
    s_max: float = 0.0
    s_min: float = Field(0.0, description="smallest singular value kept")
    energy: float = Field(1.0, description="explained variance kept")
    rel_error: float = Field(0.0, description="||D - LoRA||_F / ||D||_F")
    rel_change: float = Field(0.0, description="||D||_F / ||W_base||_F")
    method: str = "exact"


class BlockRow(BaseModel):
    """Per-block summary line."""

    block: str
    count: int
    rank_min: int
    rank_max: int
    s_max: float
    s_min: float
    ratio: float = Field(description="s_max / s_min")
    energy: float = Field(description="explained variance kept over the block")


class ComponentReport(BaseModel):
    """What happened to one component (unet, te1, vae...)."""

    component: str
    weights: int = Field(0, description="2-D/4-D weights seen")
    changed: int = Field(0, description="weights whose relative change exceeds --min-rel-diff")
    extracted: int = Field(0, description="output modules written")
    max_rel_change: float = 0.0
    reason: str = ""


class ExtractResult(BaseModel):
    """What :func:`extract` wrote."""

    output: str
    kind: Literal["lora", "checkpoint"] = "lora"
    arch: str
    variant: str | None = None
    spelling: str | None = None
    base: str
    tuned: str
    tuned2: str | None = None
    mode: str | None = None
    modules: int = 0
    diffs: int = Field(0, description="modules stored as dense diffs")
    ranks: list[int] = Field(default_factory=list, description="distinct ranks written")
    mean_rel_error: float = 0.0
    max_rel_error: float = 0.0
    components: list[ComponentReport] = Field(default_factory=list)
    blocks: list[BlockRow] = Field(default_factory=list)
    records: list[ModuleRecord] = Field(default_factory=list)
    skipped: dict[str, int] = Field(default_factory=dict, description="reason -> count")
    detail: str | None = None
    file_bytes: int = 0
    sshs_model_hash: str | None = None
    warnings: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _Unit:
    """One output module: an alias (whole weight or a row slice) of a canonical key."""

    alias: Alias
    rows: tuple[int, int] | None  # local row range in the stored weight, None for the whole


@dataclass
class _Job:
    key: str
    component: str | None
    shape: tuple[int, ...]
    units: list[_Unit]


def _output_index(arch: Architecture, variant: str | None, spelling: str) -> dict[str, list[Alias]]:
    index: dict[str, list[Alias]] = {}
    for a in arch.aliases(variant, spelling):
        index.setdefault(a.target.key, []).append(a)
    return index


def _units_for(
    key: str, aliases: list[Alias], shape: tuple[int, ...], real_shape: tuple[int, ...] | None
) -> list[_Unit]:
    """Prefer one whole-weight alias; otherwise the row slices that tile the weight."""
    whole = [a for a in aliases if a.target.slice is None]
    if whole:
        return [_Unit(sorted(whole, key=lambda a: a.name)[0], None)]
    rows = shape[0]
    real = real_shape[0] if real_shape else rows
    f = real // rows if rows and real % rows == 0 else 1
    out = []
    for a in sorted(aliases, key=lambda a: a.target.slice[1] if a.target.slice else 0):
        sl = a.target.slice
        if sl is None or sl[0] != 0:
            continue
        out.append(_Unit(a, (sl[1] // f, (sl[1] + sl[2]) // f)))
    return out


_EMBEDDINGS = ("token_embedding", "position_embedding", "embed_tokens", "shared.weight", "embeddings.")


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(p in n for p in patterns for n in names)


# ------------------------------------------------------------------------------------------------- extract
def extract(
    base: PathLike,
    tuned: PathLike,
    *,
    output: PathLike,
    tuned2: PathLike | None = None,
    mode: Mode | None = None,
    alpha: float = 0.5,
    rank: int | None = None,
    conv_rank: int | None = None,
    auto: bool = False,
    energy: float = 0.95,
    rank_max: int = 64,
    ratio: float | None = None,
    threshold: float | None = None,
    quantile: float | None = None,
    min_dim: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    full_layer: bool = False,
    min_rel_diff: float = 1e-6,
    clamp_quantile: float | None = None,
    detail: PathLike | None = None,
    detail_scale: float = 1.0,
    as_checkpoint: bool = False,
    as_checkpoint_full: bool = False,
    to: str | None = None,
    device: str = "auto",
    precision: str = "float32",
    save_dtype: str | None = None,
    svd_method: Literal["auto", "exact", "randomized"] = "auto",
    seed: int = 0,
    arch: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ExtractResult:
    """Extract a LoRA (or a checkpoint) from the difference ``tuned - base``.

    :param base: the base checkpoint (canonical single-file, or a bare / prefixed UNet / transformer file).
    :param tuned: the fine-tuned checkpoint, or a LoRA whose delta is used.
    :param output: the output file (a LoRA; a checkpoint with ``as_checkpoint`` / ``as_checkpoint_full``).
    :param tuned2: a second fine-tune (checkpoint or LoRA) combined with the first by ``mode``.
    :param mode: ``common`` (the shared component, see :func:`~lorasmith.ops._extract_math.common_component`)
        or ``union`` (``2 alpha d1 + 2 (1 - alpha) d2``).
    :param alpha: the union weight.
    :param rank: fixed rank of linear (and 1x1 conv) modules; the default is 32 when no other rule is given.
    :param conv_rank: rank of kxk convs (they are extracted only when given); the cap in the other modes.
    :param auto: explained-variance rank: smallest rank keeping ``energy``, capped at ``rank_max``.
    :param ratio: LyCORIS ratio mode (keep ``S > ratio * S0``).
    :param threshold: LyCORIS threshold mode (keep ``S > threshold``).
    :param quantile: LyCORIS quantile mode (keep while ``cumsum(S) < quantile * sum(S)``).
    :param min_dim: skip modules whose smaller dimension is below this.
    :param include: keep only modules whose canonical key or output name contains one of these.
    :param exclude: drop modules whose canonical key or output name contains one of these.
    :param full_layer: also store the deltas of 1-d weights (norms) and biases as dense diffs.
    :param min_rel_diff: a weight counts as changed when ``||D||_F / ||W_base||_F`` exceeds this.
    :param clamp_quantile: clamp the factors at this quantile of their absolute values.
    :param detail: also write the residual ``D - LoRA`` (times ``detail_scale``) as a second LoRA here.
    :param as_checkpoint: write ``base + LoRA delta`` as a checkpoint instead of a LoRA.
    :param as_checkpoint_full: write ``base + exact delta`` of the selected modules as a checkpoint.
    :param to: output spelling (default: the family's default spelling).
    :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    :param precision: compute dtype, ``float32`` or ``float64``.
    :param save_dtype: dtype of the written factors (default: the base's dtype).
    :param svd_method: ``auto`` (randomized when the rank is small against the matrix), ``exact`` or
        ``randomized``.
    :param seed: seed of the randomized SVD.
    :param arch: force the family.
    :param overwrite: replace an existing output.
    :raises LorasmithError: bad inputs (different families, mismatched shapes, missing keys, identical
        files, a LoRA as base), bad options, an existing output.
    """
    import torch

    from lorasmith.io.writer import check_output_path
    from lorasmith.ops._extract_io import CheckpointInput, check_pair, is_float, open_input

    report = progress or noop
    policy = _policy(rank, auto, energy, rank_max, ratio, threshold, quantile)
    conv_policy = _conv_policy(policy, conv_rank)
    if (tuned2 is None) != (mode is None):
        raise UsageError("--tuned2 and --mode go together", hint="give both, or neither")
    if as_checkpoint and as_checkpoint_full:
        raise UsageError("--as-checkpoint and --as-checkpoint-full exclude each other", hint="choose one")
    if detail is not None and (as_checkpoint or as_checkpoint_full):
        raise UsageError("--detail writes a LoRA; it does not go with --as-checkpoint", hint="drop one")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UsageError(f"--clamp-quantile {clamp_quantile} is not in (0, 1]", hint="use e.g. 0.99")
    if precision not in ("float32", "float64"):
        raise UsageError(f"unknown --precision {precision!r}", hint="use float32 or float64")
    dev = compute_device(device, error=UsageError)
    compute = torch.float64 if precision == "float64" else torch.float32
    base_p, tuned_p = Path(base), Path(tuned)
    tuned2_p = Path(tuned2) if tuned2 is not None else None
    inputs = [base_p, tuned_p] + ([tuned2_p] if tuned2_p else [])
    out_p = check_output_path(output, overwrite=overwrite, inputs=inputs)
    detail_p = check_output_path(detail, overwrite=overwrite, inputs=inputs) if detail else None
    if detail_p is not None and detail_p.resolve() == out_p.resolve():
        raise UsageError("--detail and -o name the same file", hint="give the residual its own file")

    with ExitStack() as stack:
        b = open_input(base_p, role="base", arch=arch, allow_lora=False)
        assert isinstance(b, CheckpointInput)
        stack.callback(b.close)
        t1 = open_input(tuned_p, role="tuned", arch=b.arch.id, allow_lora=True)
        stack.callback(t1.close)
        check_pair(b, t1, "tuned", forced=arch is not None)
        t2: Input | None = None
        if tuned2_p is not None:
            t2 = open_input(tuned2_p, role="tuned2", arch=b.arch.id, allow_lora=True)
            stack.callback(t2.close)
            check_pair(b, t2, "tuned2", forced=arch is not None)
        family = b.arch
        variant = b.variant if b.variant in family.variants else family.default_variant
        spelling = to or family.spellings[0]
        if spelling not in family.spellings:
            raise UsageError(
                f"{family.name} has no spelling {spelling!r}",
                hint=f"use one of: {', '.join(family.spellings)}",
            )
        inv = family.canonical_inventory(variant)
        index = _output_index(family, variant, spelling)
        warnings: list[str] = []
        for src in (t1, t2):
            if src is not None and not isinstance(src, CheckpointInput) and src.unresolved:
                warnings.append(
                    f"{src.path.name}: {len(src.unresolved)} module(s) match no weight and are ignored"
                )

        comps: dict[str, ComponentReport] = {}
        skipped: dict[str, int] = {}

        def comp_report(c: str | None) -> ComponentReport:
            name = c or "other"
            if name not in comps:
                comps[name] = ComponentReport(component=name)
            return comps[name]

        def skip(reason: str, c: str | None) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1
            comp_report(c)

        # ---- plan: which canonical keys become which output modules, checked against the inputs
        base_order = {fk: ck for ck, fk in b.keys.items()}
        tuned_ckpts = [s for s in (t1, t2) if isinstance(s, CheckpointInput)]
        tuned_comps = [{inv.component_of(k) for k in s.keys} for s in tuned_ckpts]
        jobs: list[_Job] = []
        bias_jobs: dict[str, _Job] = {}
        for fk in b.header.tensors:
            key = base_order.get(fk)
            if key is None or not is_float(b.header, fk):
                continue
            shape = b.shape(key)
            comp = inv.component_of(key)
            spec = inv.tensors.get(key)
            for s, have in zip(tuned_ckpts, tuned_comps, strict=True):
                if comp not in have:
                    continue
                if key not in s.keys:
                    raise LorasmithError(
                        f"{s.path.name}: missing {key!r} (present in {b.path.name})",
                        hint="base and tuned must hold the same weights",
                    )
                if s.shape(key) != shape:
                    raise ShapeMismatchError(
                        f"{key}: shape {list(s.shape(key))} in {s.path.name}, {list(shape)} in {b.path.name}",
                        hint="extract from two models of the same architecture and size",
                    )
            if any(comp not in have for have in tuned_comps):
                if len(shape) in (2, 4):
                    skip(f"{comp or 'other'}: not in the tuned model", comp)
                continue
            is_weight = key.endswith("weight")
            if len(shape) not in (2, 4) or not is_weight:
                if full_layer:
                    job = _full_layer_job(key, comp, shape, index)
                    if job is not None and not _filtered(job, include, exclude):
                        if job.key.endswith("bias") and job.units:
                            bias_jobs[job.key] = job
                        else:
                            jobs.append(job)
                continue
            rep = comp_report(comp)
            rep.weights += 1
            aliases = index.get(key)
            if not aliases:
                skip(f"{comp or 'other'}: no {spelling} LoRA name", comp)
                continue
            if _matches(_EMBEDDINGS, key):
                skip("embedding", comp)
                continue
            units = _units_for(key, aliases, shape, spec.shape if spec else None)
            if not units:
                skip(f"{comp or 'other'}: no {spelling} LoRA name", comp)
                continue
            job = _Job(key, comp, shape, units)
            if _filtered(job, include, exclude):
                skip("--include/--exclude", comp)
                continue
            kernel = shape[2] * shape[3] if len(shape) == 4 else 1
            if kernel > 1 and conv_policy is None:
                skip("kxk conv (give --conv-rank)", comp)
                continue
            if min(shape[0], math.prod(shape[1:])) < min_dim:
                skip(f"smaller than --min-dim {min_dim}", comp)
                continue
            jobs.append(job)

        # ---- run
        from lorasmith.ops._extract_io import Spill
        from lorasmith.ops._extract_math import compute_threads, pipelined

        spill = Spill(out_p.parent)
        stack.callback(spill.close)
        detail_spill: Spill | None = None
        if detail_p is not None:
            detail_spill = Spill(detail_p.parent)
            stack.callback(detail_spill.close)
        records: list[ModuleRecord] = []
        to_ckpt = as_checkpoint or as_checkpoint_full
        out_dtype = _save_dtype(save_dtype, _weights_dtype(b, jobs))
        ckpt_writer = _CheckpointSink(b, out_p, overwrite, inputs) if to_ckpt else None
        if ckpt_writer is not None:
            stack.callback(ckpt_writer.abort)
        settings = _Settings(
            t1=t1,
            t2=t2,
            mode=mode,
            alpha=alpha,
            policy=policy,
            conv_policy=conv_policy,
            compute=compute,
            dev=dev,
            seed=seed,
            svd_method=svd_method,
            clamp_quantile=clamp_quantile,
            style=_style(spelling),
            out_dtype=out_dtype,
            min_rel_diff=min_rel_diff,
            detail_scale=detail_scale if detail_spill is not None else None,
            checkpoint=("full" if as_checkpoint_full else "lora") if to_ckpt else None,
        )
        # the inventory _fetch reads the real row counts from (shrunk test models scale fused slices)
        rows_inv = family.canonical_inventory(b.variant if b.variant in family.variants else None)

        def fetch(job: _Job) -> _Fetched:
            # biases are stored as diff_b of their weight's module; a checkpoint output copies them
            bias = None
            if ckpt_writer is None and job.key.endswith("weight"):
                bias = bias_jobs.get(job.key[: -len("weight")] + "bias")
            return _fetch(job, b, t1, t2, rows_inv, bias)

        def cost(job: _Job) -> int:
            return math.prod(job.shape) * compute.itemsize

        def solve(fetched: _Fetched) -> _Solved:
            return _solve(fetched, settings)

        total = len(jobs)
        with (
            compute_threads(dev) as workers,
            closing(pipelined(fetch, solve, jobs, workers, cost)) as solved_jobs,
        ):
            # results arrive in job order whatever the threads did: the spill, the checkpoint and the
            # report are written exactly as by a sequential run
            for n, solved in enumerate(solved_jobs, 1):
                job = solved.job
                rep = comp_report(job.component)
                matrix = len(job.shape) in (2, 4)
                if solved.rel is not None and matrix:
                    rep.max_rel_change = max(rep.max_rel_change, solved.rel)
                if not solved.units:
                    if matrix:
                        skip(f"unchanged (relative change <= {min_rel_diff:g})", job.component)
                    report(ProgressEvent("extracting", n, total, job.key))
                    continue
                if matrix:
                    rep.changed += 1
                block = family.block_of(job.key)
                for out in solved.units:
                    out.record.block = block
                    records.append(out.record)
                    rep.extracted += 1
                    for name, t in out.tensors.items():
                        spill.put(name, t)
                    if detail_spill is not None:
                        for name, t in out.detail.items():
                            detail_spill.put(name, t)
                for name, t in solved.bias.items():
                    spill.put(name, t)
                if ckpt_writer is not None and solved.full_delta is not None:
                    ckpt_writer.put(job.key, solved.full_delta)
                report(ProgressEvent("extracting", n, total, job.key))

        if not records:
            changed = sum(c.changed for c in comps.values())
            raise LorasmithError(
                f"nothing to extract: no weight of {tuned_p.name} differs from {b.path.name}"
                if changed == 0
                else "nothing to extract: every changed weight was filtered out",
                hint="check the inputs, or lower --min-rel-diff / widen --include",
            )
        _finish_components(comps, spelling, min_rel_diff)
        meta_record: dict[str, object] = {
            "base": base_p.name,
            "tuned": tuned_p.name,
            "tuned2": tuned2_p.name if tuned2_p else None,
            "mode": mode,
            "policy": {"kind": policy.kind, "value": policy.value, "max_rank": policy.max_rank},
            "conv_rank": conv_rank,
            "min_rel_diff": min_rel_diff,
        }
        if ckpt_writer is not None:
            wres = ckpt_writer.close(report)
        else:
            wres = _write_lora(spill, out_p, family, variant, records, overwrite, inputs, meta_record)
            if detail_spill is not None and detail_p is not None and len(detail_spill):
                _write_lora(
                    detail_spill,
                    detail_p,
                    family,
                    variant,
                    None,
                    overwrite,
                    inputs,
                    {**meta_record, "detail_of": out_p.name, "detail_scale": detail_scale},
                )
        errors = [r.rel_error for r in records if r.kind == "lora"]
        return ExtractResult(
            output=str(out_p),
            kind="checkpoint" if to_ckpt else "lora",
            arch=family.id,
            variant=variant,
            spelling=None if to_ckpt else spelling,
            base=str(base_p),
            tuned=str(tuned_p),
            tuned2=str(tuned2_p) if tuned2_p else None,
            mode=mode,
            modules=len(records),
            diffs=sum(r.kind == "diff" for r in records),
            ranks=sorted({r.rank for r in records if r.kind == "lora"}),
            mean_rel_error=sum(errors) / len(errors) if errors else 0.0,
            max_rel_error=max(errors, default=0.0),
            components=sorted(comps.values(), key=lambda c: c.component),
            blocks=_block_table(records),
            records=records,
            skipped=skipped,
            detail=str(detail_p)
            if detail_p is not None and detail_spill is not None and len(detail_spill)
            else None,
            file_bytes=wres.file_bytes,
            sshs_model_hash=wres.sshs_model_hash,
            warnings=warnings,
        )


# ------------------------------------------------------------------------------------------------- helpers
def _policy(
    rank: int | None,
    auto: bool,
    energy: float,
    rank_max: int,
    ratio: float | None,
    threshold: float | None,
    quantile: float | None,
) -> RankPolicy:
    from lorasmith.ops._extract_math import RankPolicy

    chosen = [
        n
        for n, v in (
            ("--auto", auto),
            ("--ratio", ratio),
            ("--threshold", threshold),
            ("--quantile", quantile),
        )
        if v not in (None, False)
    ]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} exclude each other", hint="choose one rank rule")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1", hint="use e.g. 32")
    if auto and rank is not None:
        # --rank would be silently ignored: --auto has its own cap
        raise UsageError("--rank and --auto exclude each other", hint="cap the --auto rank with --rank-max")
    if rank_max < 1:
        raise UsageError(f"--rank-max {rank_max} must be at least 1", hint="use e.g. 64")
    if auto:
        if not 0.0 < energy <= 1.0:
            raise UsageError(f"--energy {energy} is not in (0, 1]", hint="use e.g. 0.95")
        return RankPolicy("energy", energy, rank_max)
    cap = rank if rank is not None else None
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise UsageError(f"--ratio {ratio} is not in [0, 1]", hint="LyCORIS ratio: keep S > ratio * S0")
        return RankPolicy("ratio", ratio, cap)
    if threshold is not None:
        if threshold < 0:
            raise UsageError(f"--threshold {threshold} is negative", hint="a singular value threshold")
        return RankPolicy("threshold", threshold, cap)
    if quantile is not None:
        if not 0.0 <= quantile <= 1.0:
            raise UsageError(f"--quantile {quantile} is not in [0, 1]", hint="use e.g. 0.75")
        return RankPolicy("quantile", quantile, cap)
    r = 32 if rank is None else rank
    if r < 1:
        raise UsageError(f"--rank {r} must be at least 1", hint="use e.g. 32")
    return RankPolicy("fixed", float(r))


def _conv_policy(policy: RankPolicy, conv_rank: int | None) -> RankPolicy | None:
    from lorasmith.ops._extract_math import RankPolicy

    if conv_rank is None:
        return None
    if conv_rank < 1:
        raise UsageError(f"--conv-rank {conv_rank} must be at least 1", hint="use e.g. 16")
    if policy.kind == "fixed":
        return RankPolicy("fixed", float(conv_rank))
    return RankPolicy(policy.kind, policy.value, conv_rank)


def _filtered(job: _Job, include: Sequence[str], exclude: Sequence[str]) -> bool:
    names = [job.key, *(u.alias.name for u in job.units)]
    if include and not _matches(include, *names):
        return True
    return bool(exclude) and _matches(exclude, *names)


def _full_layer_job(
    key: str, comp: str | None, shape: tuple[int, ...], index: dict[str, list[Alias]]
) -> _Job | None:
    """A 1-d weight (norm) with an alias, or a bias whose weight has a whole alias."""
    if key.endswith("bias"):
        aliases = index.get(key[: -len("bias")] + "weight")
    else:
        aliases = index.get(key)
    whole = [a for a in aliases or [] if a.target.slice is None]
    if not whole:
        return None
    return _Job(key, comp, shape, [_Unit(sorted(whole, key=lambda a: a.name)[0], None)])


@dataclass(frozen=True)
class _Settings:
    """What :func:`_solve` needs besides the tensors: the inputs (for their delta rules) and the options."""

    t1: Input
    t2: Input | None
    mode: Mode | None
    alpha: float
    policy: RankPolicy
    conv_policy: RankPolicy | None
    compute: torch.dtype
    dev: torch.device
    seed: int
    svd_method: Literal["auto", "exact", "randomized"]
    clamp_quantile: float | None
    style: Literal["kohya", "peft"]
    out_dtype: torch.dtype
    min_rel_diff: float
    detail_scale: float | None  # None: no --detail
    checkpoint: Literal["lora", "full"] | None  # --as-checkpoint, --as-checkpoint-full, or a LoRA


@dataclass
class _Fetched:
    """What one job reads: the base tensor and, per tuned input, its tensor or its LoRA modules."""

    job: _Job
    base: torch.Tensor  # stored dtype, CPU
    tuned: list[torch.Tensor | LoraParts | None]  # t1 (and t2)
    real_rows: int | None
    bias: _Fetched | None = None


@dataclass
class _UnitOut:
    """One written module: its record, its tensors, and those of its ``--detail`` residual."""

    record: ModuleRecord
    tensors: dict[str, torch.Tensor]
    detail: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Solved:
    """The outcome of one job (empty ``units``: unchanged, or no delta at all when ``rel`` is None)."""

    job: _Job
    rel: float | None
    units: list[_UnitOut] = field(default_factory=list)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    full_delta: torch.Tensor | None = None  # base + this is the checkpoint's tensor (CPU)


def _weights_dtype(b: CheckpointInput, jobs: Sequence[_Job]) -> str:
    """The dtype the output is saved in by default: the most common floating dtype of the weights
    extracted (of their 2-D/4-D base weights first), not of whatever tensor the file starts with (an SDXL
    file starts with the int64 ``position_ids``).
    """
    from collections import Counter

    from lorasmith.ops._extract_io import is_float

    def most_common(keys: Sequence[str]) -> str | None:
        found = Counter(b.header.tensors[k].dtype for k in keys if is_float(b.header, k))
        return found.most_common(1)[0][0] if found else None

    matrices = [b.keys[j.key] for j in jobs if len(j.shape) in (2, 4)]
    return (
        most_common(matrices)
        or most_common([b.keys[j.key] for j in jobs])
        or most_common(list(b.header.tensors))
        or "F32"
    )


def _fetch(
    job: _Job,
    b: CheckpointInput,
    t1: Input,
    t2: Input | None,
    inv: Inventory,
    bias: _Job | None,
) -> _Fetched:
    """Read what ``job`` needs (on the calling thread: the inputs are read by one thread, in order)."""
    from lorasmith.ops._extract_io import CheckpointInput

    def read(src: Input) -> torch.Tensor | LoraParts | None:
        return src.tensor(job.key) if isinstance(src, CheckpointInput) else src.fetch(job.key)

    spec = inv.tensors.get(job.key)
    real = spec.shape[0] if spec is not None and spec.shape else None
    return _Fetched(
        job,
        b.tensor(job.key),
        [read(t1)] + ([read(t2)] if t2 is not None else []),
        real,
        _fetch(bias, b, t1, t2, inv, None) if bias is not None else None,
    )


def _solve(f: _Fetched, st: _Settings) -> _Solved:
    """The delta of one job, decomposed into its output modules (no reads: runs in a worker thread)."""
    import torch

    job = f.job
    d, w_norm = _delta(f, st)
    if d is None:
        return _Solved(job, None)
    # float32 is plenty for a threshold test and a report; zero stays zero (also over a zero base)
    d_norm = float(torch.linalg.vector_norm(d))
    rel = 0.0 if d_norm == 0.0 else (d_norm / w_norm if w_norm > 0 else math.inf)
    solved = _Solved(job, rel)
    if d_norm == 0.0 or rel <= st.min_rel_diff:
        return solved
    is_conv = len(job.shape) == 4 and job.shape[2] * job.shape[3] > 1
    pol = st.conv_policy if is_conv and st.conv_policy is not None else st.policy
    # up @ down is formed only for what needs it: the residual, or the low-rank checkpoint
    need_product = st.detail_scale is not None or st.checkpoint == "lora"
    whole = len(job.units) == 1 and job.units[0].rows is None
    full_delta = None if st.checkpoint is None or whole else torch.zeros_like(d)
    for unit in job.units:
        rows = unit.rows or (0, int(d.shape[0]))
        du = d[rows[0] : rows[1]]
        mat = du.reshape(du.shape[0], -1)
        rec, lora_delta, tensors = _encode_module(unit, job, mat, du, pol, st, need_product)
        rec.rel_change = rel
        out = _UnitOut(rec, tensors)
        if st.detail_scale is not None and rec.kind == "lora":
            assert lora_delta is not None
            resid = (mat - lora_delta) * st.detail_scale
            if bool(resid.any()):
                _drec, _dd, out.detail = _encode_module(
                    unit, job, resid, resid.reshape(du.shape), pol, st, False
                )
        solved.units.append(out)
        if st.checkpoint is not None:
            part = mat if st.checkpoint == "full" or lora_delta is None else lora_delta
            if full_delta is None:
                solved.full_delta = part.reshape(du.shape).cpu()
            else:
                full_delta[rows[0] : rows[1]] = part.reshape(du.shape)
    if full_delta is not None:
        solved.full_delta = full_delta.cpu()
    if f.bias is not None:
        bd, _ = _delta(f.bias, st)
        if bd is not None and bool(bd.any()):
            solved.bias[f.bias.job.units[0].alias.name + ".diff_b"] = bd.to(st.out_dtype).cpu()
    return solved


def _delta(f: _Fetched, st: _Settings) -> tuple[torch.Tensor | None, float]:
    """The delta of ``f.job.key`` (compute dtype, on the device) and ``||W_base||_F``; ``None`` when no
    change."""
    import torch

    from lorasmith.ops._extract_io import CheckpointInput
    from lorasmith.ops._extract_math import combine, common_component

    w = f.base.to(device=st.dev, dtype=st.compute)
    w_norm = float(torch.linalg.vector_norm(w))

    def one(src: Input, got: torch.Tensor | LoraParts | None) -> torch.Tensor | None:
        if isinstance(src, CheckpointInput):
            assert isinstance(got, torch.Tensor)
            t = got.to(device=st.dev, dtype=st.compute)
            # .to copied (another dtype or device): subtract in place, sparing one delta-sized buffer
            return t.sub_(w) if t is not got else t - w
        assert not isinstance(got, torch.Tensor)
        return src.delta_of(got, w, f.real_rows)

    d1 = one(st.t1, f.tuned[0])
    if st.t2 is None:
        return d1, w_norm
    d2 = one(st.t2, f.tuned[1])
    # A delta that is zero contributes nothing to a union and leaves no common part: skip the SVDs.
    d1 = d1 if d1 is not None and bool(d1.any()) else None
    d2 = d2 if d2 is not None and bool(d2.any()) else None
    if d1 is None and d2 is None:
        return None, w_norm
    z = torch.zeros_like(w)
    a, c = (d1 if d1 is not None else z), (d2 if d2 is not None else z)
    if st.mode == "union":
        return combine(a, c, st.alpha), w_norm
    if a.ndim == 1 or d1 is None or d2 is None:
        return (
            torch.zeros_like(w)
            if a.ndim != 1
            else torch.where(a * c > 0, torch.minimum(a.abs(), c.abs()) * a.sign(), z)
        ), w_norm
    shape = a.shape
    common = common_component(a.reshape(shape[0], -1), c.reshape(shape[0], -1), st.policy, st.seed)
    return common.reshape(shape), w_norm


def _encode_module(
    unit: _Unit,
    job: _Job,
    mat: torch.Tensor,
    du: torch.Tensor,
    policy: RankPolicy,
    st: _Settings,
    need_product: bool,
) -> tuple[ModuleRecord, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Decompose one output module; returns its record, its stored delta (2-D; ``None`` for a LoRA when
    not ``need_product``) and its tensors."""
    import torch

    from lorasmith.adapters.lora import encode_lora
    from lorasmith.ops._extract_math import clamp_factors, decompose, stored_dense

    name = unit.alias.name
    shape = [int(x) for x in du.shape]
    if du.ndim == 1:
        rec = ModuleRecord(name=name, key=job.key, component=job.component, kind="diff", shape=shape)
        return rec, mat, {name + ".diff": du.to(st.out_dtype).cpu().contiguous()}
    rows, cols = int(mat.shape[0]), int(mat.shape[1])
    dec = decompose(mat, policy, seed=st.seed, method=st.svd_method)
    s = dec.svd.S.detach().to("cpu", torch.float64)
    rec = ModuleRecord(
        name=name,
        key=job.key,
        component=job.component,
        rank=dec.rank,
        shape=shape,
        s_max=float(s[0]) if len(s) else 0.0,
        s_min=float(s[-1]) if len(s) else 0.0,
        energy=dec.energy,
        rel_error=dec.svd.rel_error or 0.0,
        method=dec.method,
    )
    if stored_dense(dec.rank, rows, cols):
        rec.kind, rec.rel_error, rec.energy = "diff", 0.0, 1.0
        return rec, mat, {name + ".diff": du.to(st.out_dtype).cpu().contiguous()}
    up, down = dec.svd.to_lora()
    clamp = st.clamp_quantile is not None and st.clamp_quantile < 1.0
    if clamp:
        assert st.clamp_quantile is not None
        up, down = clamp_factors(up, down, st.clamp_quantile)
    lora_delta = up @ down if need_product or clamp else None
    if clamp:
        assert lora_delta is not None
        # the SVD's error no longer describes the clamped pair: measure it
        fro = float(torch.linalg.vector_norm(mat))
        rec.rel_error = float(torch.linalg.vector_norm(mat - lora_delta)) / fro if fro else 0.0
    conv = du.ndim == 4
    kernel = (int(du.shape[2]), int(du.shape[3])) if conv else None
    encoded = encode_lora(
        up.cpu(), down.cpu(), float(dec.rank), suffixes=st.style, conv=conv, kernel=kernel, dtype=st.out_dtype
    )
    return rec, lora_delta, {name + sfx: t for sfx, t in encoded.items()}


def _style(spelling: str) -> Literal["kohya", "peft"]:
    from lorasmith.archs.base import SPELLINGS

    sp = SPELLINGS.get(spelling)
    return sp.suffixes if sp is not None else "kohya"


def _save_dtype(save_dtype: str | None, base_dtype: str) -> torch.dtype:
    import torch

    names = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if save_dtype is not None:
        if save_dtype.lower() not in names:
            raise UsageError(f"unknown --save-dtype {save_dtype!r}", hint="use fp16, bf16 or fp32")
        return names[save_dtype.lower()]
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(base_dtype, torch.float32)


def _finish_components(comps: dict[str, ComponentReport], spelling: str, min_rel_diff: float) -> None:
    for c in comps.values():
        if c.extracted:
            c.reason = f"{c.changed} of {c.weights} weights changed"
        elif c.weights and c.changed == 0 and c.max_rel_change > 0:
            largest = f"{c.max_rel_change:.2e}"
            c.reason = f"unchanged: largest relative change {largest} <= --min-rel-diff {min_rel_diff:g}"
        elif c.weights and c.changed == 0 and c.max_rel_change == 0 and c.component != "vae":
            c.reason = "not extracted: no weight selected, or identical to the base"
        else:
            c.reason = f"not extracted: no {spelling} LoRA names (not a LoRA target)"


def _block_table(records: Sequence[ModuleRecord]) -> list[BlockRow]:
    groups: dict[str, list[ModuleRecord]] = {}
    for r in records:
        groups.setdefault(r.block or r.component or "other", []).append(r)
    rows = []
    for block, rs in groups.items():
        lr = [r for r in rs if r.kind == "lora"] or rs
        s_max = max(r.s_max for r in lr)
        s_min = min(r.s_min for r in lr)
        rows.append(
            BlockRow(
                block=block,
                count=len(rs),
                rank_min=min(r.rank for r in rs),
                rank_max=max(r.rank for r in rs),
                s_max=s_max,
                s_min=s_min,
                ratio=s_max / s_min if s_min > 0 else math.inf,
                energy=sum(r.energy for r in rs) / len(rs),
            )
        )
    return rows


def _write_lora(
    spill: Spill,
    path: Path,
    family: Architecture,
    variant: str | None,
    records: Sequence[ModuleRecord] | None,
    overwrite: bool,
    inputs: Sequence[Path],
    record: dict[str, object],
) -> WriteResultLike:
    """Write the parked tensors as a LoRA with ``ss_*``, modelspec and lorasmith metadata."""
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops.loralib import output_metadata

    plan = spill.plan()
    linear: list[tuple[int, float]] = []
    conv: list[tuple[int, float]] = []
    for name, (_d, shape) in plan.items():
        if name.endswith((".lora_down.weight", ".lora_A.weight")):
            (conv if len(shape) == 4 and shape[2] * shape[3] > 1 else linear).append(
                (shape[0], float(shape[0]))
            )
    base_meta = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": family.base_model_version.get(variant or "", family.id),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.modelspec.get(variant or "", family.id) + "/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": path.stem,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    meta = output_metadata(base_meta, linear=linear, conv=conv, record_key="lorasmith_extract", record=record)
    writer = SafetensorsWriter(path, metadata=meta, overwrite=overwrite, inputs=inputs, plan=plan)
    try:
        for name in plan:
            writer.write(name, spill.get(name))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


if TYPE_CHECKING:
    from lorasmith.io.writer import WriteResult as WriteResultLike
else:
    WriteResultLike = object


class _CheckpointSink:
    """Streams ``base + delta`` into a checkpoint laid out like the base, in the base's file order.

    Jobs arrive in base file order, so every base tensor before a job's key is final when the job's
    delta arrives: it is copied then, and the job's tensor written with its delta added.
    """

    def __init__(self, base: CheckpointInput, path: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
        from lorasmith.io.writer import SafetensorsWriter

        self._base = base
        plan = {n: (i.dtype, tuple(i.shape)) for n, i in base.header.tensors.items()}
        meta = {
            k: v for k, v in base.header.metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))
        }
        self._writer = SafetensorsWriter(
            path, metadata=meta or None, overwrite=overwrite, inputs=inputs, plan=plan
        )
        self._order = list(base.header.tensors)
        self._pos = 0
        self._closed = False

    def _copy_until(self, file_key: str | None) -> None:
        while self._pos < len(self._order) and self._order[self._pos] != file_key:
            name = self._order[self._pos]
            self._writer.write(name, self._base.raw(name))
            self._pos += 1

    def put(self, key: str, delta: torch.Tensor) -> None:
        """Write canonical ``key`` as base + ``delta`` (after copying the tensors before it)."""
        fk = self._base.keys[key]
        self._copy_until(fk)
        t = self._base.raw(fk)
        self._writer.write(fk, (t.to(delta.dtype) + delta.reshape(t.shape)).to(t.dtype))
        self._pos += 1

    def close(self, report: ProgressCallback) -> WriteResultLike:
        """Copy what is left and finish the file."""
        self._copy_until(None)
        report(ProgressEvent("writing", 1, 1))
        self._closed = True
        return self._writer.close()

    def abort(self) -> None:
        """Drop the temporary file (no-op after close)."""
        if not self._closed:
            self._writer.abort()
