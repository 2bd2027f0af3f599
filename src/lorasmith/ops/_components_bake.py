"""Bake LoRAs into a model whose text encoders (or other parts) are separate files.

The same per-tensor arithmetic as ``merge --base`` (the job, low-rank band and whole-tensor helpers of
:mod:`lorasmith.ops._merge_ckpt`, imported, not copied), applied to several files: the diffusion model and
each part file given, each streamed tensor by tensor and written atomically to its own output. A part file's
keys are mapped onto the family's canonical key space through the slot's single-file prefix
(``text_model.*`` in ``clip_l.safetensors`` is ``text_encoders.clip_l.transformer.text_model.*`` for FLUX),
so the LoRA aliases resolve exactly as against an assembled checkpoint, and the result equals baking the
assembled checkpoint and splitting it. Text-encoder modules whose file was not given are reported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorasmith.archs.base import STRIP_PREFIXES, Architecture
from lorasmith.errors import ArchMismatchError, InvalidFileError, LorasmithError, UsageError
from lorasmith.io.dtypes import safetensors_dtype
from lorasmith.io.header import Header, read_header
from lorasmith.io.reader import open_tensors
from lorasmith.io.writer import SafetensorsWriter, check_output_path
from lorasmith.ops._components_layouts import MAIN, Slot, layout_for
from lorasmith.ops._merge_ckpt import (
    _bake_chunked,
    _bake_whole,
    _detect_ckpt,
    _fit_slice,
    _Job,
    _lowrank_jobs,
)
from lorasmith.ops._merge_lora import (
    LoadedLora,
    check_same_family,
    load_lora,
    merged_metadata,
    parse_weighted,
    torch_dtype_of,
)
from lorasmith.ops.components import (
    ComponentsResult,
    PartReport,
    _check_part,
    _outer_keys,
    _single_key,
)
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

__all__ = ["bake_parts"]

PathLike = str | os.PathLike[str]


def _main_index(header: Header, main: Slot) -> dict[str, str]:
    """Canonical key -> file key of the diffusion model file (bare, prefixed, or holding other parts)."""
    index: dict[str, str] = {}
    for name in header.tensors:
        index.setdefault(name, name)
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                index.setdefault(name[len(prefix) :], name)
        index.setdefault(main.prefix + name, name)
    return index


def _bake_tensor(
    t: torch.Tensor, jobs: list[_Job], bias_jobs: list[_Job], compute: torch.dtype, final: torch.dtype
) -> torch.Tensor:
    """One tensor exactly as ``merge --base`` bakes it (low-rank bands when possible, else whole)."""
    factors = _lowrank_jobs(jobs, t, compute) if not bias_jobs else None
    if factors is not None:
        return _bake_chunked(t, factors, compute, final)
    return _bake_whole(t, jobs, bias_jobs, compute)


def _target_spec_shape(family: Architecture, variant: str | None, key: str) -> tuple[int, ...] | None:
    spec = family.canonical_inventory(variant).tensors.get(key)
    if spec is None:
        finder = getattr(family, "target_spec", None)
        spec = finder(key, variant) if callable(finder) else None
    return tuple(spec.shape) if spec is not None else None


def bake_parts(
    base: PathLike,
    loras: Sequence[PathLike],
    output: PathLike,
    *,
    parts: Mapping[str, tuple[PathLike, PathLike]],
    arch: str | None = None,
    blocks: str | None = None,
    precision: str = "float32",
    save_dtype: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ComponentsResult:
    """Bake ``loras`` into ``base`` and into the separate part files of ``parts``.

    :param base: the diffusion model file (its text encoders may be in it or in ``parts``).
    :param loras: LoRA files, each ``path[:ratio]`` (default ratio 1).
    :param output: where the baked diffusion model goes.
    :param parts: slot (``clip_l``, ``clip_g``, ``t5xxl``, ``text_encoder``) -> ``(input file, output file)``.
    :param arch: force the family.
    :param blocks: block weights (see :mod:`lorasmith.ops.blocks`).
    :param precision: compute dtype (``float32`` or ``float64``).
    :param save_dtype: output dtype of float tensors (default: as each input).
    :param strict: LoRA modules that match no weight of any given file are an error (text-encoder modules
        whose file was not given included).
    :raises LorasmithError: every user error.
    """
    from lorasmith.ops.blocks import parse_blocks

    cb = progress or noop
    base_path = Path(base)
    out = Path(output)
    if not loras:
        raise UsageError("--base needs at least one LoRA to bake", hint="--base CKPT a.safetensors:0.8")
    specs = [parse_weighted(s, 1.0) for s in loras]
    part_paths = {name: (Path(i), Path(o)) for name, (i, o) in parts.items()}
    outputs = [out, *(o for _i, o in part_paths.values())]
    if len({os.path.abspath(p) for p in outputs}) != len(outputs):
        raise UsageError("two outputs have the same path", hint="give every --*-out a file of its own")
    inputs = [base_path, *(p for p, _r in specs), *(i for i, _o in part_paths.values())]
    for o in outputs:
        check_output_path(o, overwrite=overwrite, inputs=inputs)
    compute = torch_dtype_of(precision, "--precision")
    save = torch_dtype_of(save_dtype, "--save-dtype") if save_dtype is not None else None
    loaded: list[LoadedLora] = [load_lora(p, float(r if r is not None else 1.0), arch) for p, r in specs]
    check_same_family(loaded)
    header = read_header(base_path)
    family, variant = _detect_ckpt(base_path, header, arch)
    if loaded[0].detection.arch != family.id:
        raise ArchMismatchError(
            f"{loaded[0].path.name} is a {loaded[0].detection.arch} LoRA, "
            f"{base_path.name} a {family.id} model",
            hint="bake a LoRA into a model of its own family",
        )
    slots = layout_for(family.id, variant)
    by_name = {s.name: s for s in slots}
    warnings: list[str] = []
    # file 0 is the diffusion model; then one per part
    files: list[tuple[Slot, Path, Path, Header, dict[str, str]]] = [
        (by_name[MAIN], base_path, out, header, _main_index(header, by_name[MAIN]))
    ]
    for name, (src, dst) in part_paths.items():
        slot = by_name.get(name)
        if slot is None or slot.name == MAIN:
            raise UsageError(
                f"{family.id} has no separate {name} part",
                hint="its parts: " + ", ".join(s.option for s in slots[1:]),
            )
        if not src.is_file():
            raise InvalidFileError(f"{src}: no such file", hint=f"check the path given to {slot.option}")
        if any(k.startswith(slot.prefix) for k in header.tensors):
            raise InvalidFileError(
                f"{slot.option} {src.name}: {base_path.name} already holds the {slot.name}",
                hint=f"drop {slot.option}, or bake the single file with merge --base",
            )
        part_header = read_header(src)
        warn = _check_part(slot, src, part_header, family.id)
        if warn:
            warnings.append(warn)
        outer = _outer_keys(slot)
        index = {_single_key(k, slot, outer): k for k in part_header.tensors}
        files.append((slot, src, dst, part_header, index))
    bw = parse_blocks(blocks, family) if blocks else None
    jobs: list[dict[str, list[_Job]]] = [{} for _ in files]
    bias_jobs: list[dict[str, list[_Job]]] = [{} for _ in files]
    unmatched: list[str] = []
    skipped: dict[str, int] = {}
    te_slots = [s for s in slots[1:] if s.group == "te"]
    for lora in loaded:
        for name, mod in lora.modules.items():
            alias = lora.aliases.get(name)
            where = None
            if alias is not None:
                where = next(
                    ((i, f[4][alias.target.key]) for i, f in enumerate(files) if alias.target.key in f[4]),
                    None,
                )
            if alias is None or where is None:
                slot = (
                    next((s for s in te_slots if alias.target.key.startswith(s.prefix)), None)
                    if alias
                    else None
                )
                if slot is not None:
                    skipped[slot.name] = skipped.get(slot.name, 0) + 1
                else:
                    unmatched.append(f"{lora.path.name}: {name}")
                continue
            i, file_key = where
            part_header = files[i][3]
            info = part_header.tensors[file_key]
            sl = alias.target.slice
            if sl is not None:
                real = _target_spec_shape(family, variant, alias.target.key)
                sl = _fit_slice(sl, real[sl[0]] if real else None, int(info.shape[sl[0]]), name)
            weight = bw.weight(family, alias.target.key) if bw is not None else 1.0
            job = _Job(mod, lora.ratio * weight, sl, f"{lora.path.name}: {name}")
            jobs[i].setdefault(file_key, []).append(job)
            if mod.bias is not None and file_key.endswith(".weight"):
                bkey = file_key[: -len("weight")] + "bias"
                if bkey in part_header.tensors:
                    bias_jobs[i].setdefault(bkey, []).append(job)
    if strict and (unmatched or skipped):
        first = unmatched[0] if unmatched else f"{sum(skipped.values())} {', '.join(skipped)} module(s)"
        raise LorasmithError(
            f"{len(unmatched) + sum(skipped.values())} LoRA module(s) match no weight of the given files, "
            f"e.g. {first}",
            hint="drop --strict to skip them, or give the text-encoder files they need",
        )
    for name, n in skipped.items():
        warnings.append(
            f"{n} LoRA module(s) of the {name} text encoder skipped: its file was not given "
            f"({by_name[name].option} FILE --{name.replace('_', '-')}-out OUT)"
        )
    if unmatched:
        warnings.append(f"{len(unmatched)} LoRA module(s) matched no weight")
    save_st = safetensors_dtype(save) if save is not None else None
    total = sum(len(f[3].tensors) for f in files)
    done = 0
    reports: list[PartReport] = []
    for i, (slot, src, dst, part_header, _index) in enumerate(files):
        meta = merged_metadata(
            [(src, None, dict(part_header.metadata))] + [(x.path, x.ratio, x.metadata) for x in loaded],
            keep_ss=False,
        )
        plan = {
            k: (
                save_st if (save_st is not None and v.dtype in {"F64", "F32", "F16", "BF16"}) else v.dtype,
                v.shape,
            )
            for k, v in part_header.tensors.items()
        }
        changed = 0
        writer = SafetensorsWriter(
            dst, metadata=meta, overwrite=overwrite, inputs=[src, *(x.path for x in loaded)], plan=plan
        )
        try:
            with open_tensors(src) as f:
                for key in part_header.tensors:
                    t = f.get(key)
                    final = save if (save is not None and t.is_floating_point()) else t.dtype
                    todo, btodo = jobs[i].get(key, []), bias_jobs[i].get(key, [])
                    if todo or btodo:
                        t = _bake_tensor(t, todo, btodo, compute, final)
                        changed += 1
                    if t.dtype != final:
                        t = t.to(final)
                    writer.write(key, t)
                    del t
                    done += 1
                    cb(ProgressEvent("baking", done, total, key))
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        reports.append(
            PartReport(
                slot=slot.name,
                kind=slot.kind,
                path=str(dst),
                tensors=len(part_header.tensors),
                changed=changed,
                file_bytes=written.file_bytes,
            )
        )
    return ComponentsResult(
        mode="bake",
        arch=family.id,
        variant=variant,
        inputs=[
            PartReport(slot=f[0].name, kind=f[0].kind, path=str(f[1]), tensors=len(f[3].tensors))
            for f in files
        ]
        + [PartReport(slot="lora", path=str(x.path)) for x in loaded],
        outputs=reports,
        unmatched=unmatched,
        skipped=skipped,
        warnings=warnings,
    )
