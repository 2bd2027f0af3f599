"""Bake LoRAs into a model whose text encoders (or other parts) are separate files.

The same per-tensor arithmetic as ``merge --base`` (the job, low-rank band and whole-tensor helpers of
:mod:`lorasmith.ops._merge_ckpt`, imported, not copied), applied to several files: the diffusion model and
each part file given, each streamed tensor by tensor and written atomically to its own output. A part file's
keys are mapped onto the family's canonical key space through the slot's single-file prefix
(``text_model.*`` in ``clip_l.safetensors`` is ``text_encoders.clip_l.transformer.text_model.*`` for FLUX),
and a part in another form than the single file stores is converted on the way in and back on the way out
(SDXL's HF-form ``clip_g.safetensors``: q/k/v joined into the OpenCLIP ``in_proj_weight`` the LoRA aliases
target, then cut again), so the LoRA aliases resolve exactly as against an assembled checkpoint and the
result equals baking the assembled checkpoint and splitting it. Each output keeps its input's form. Text-
encoder modules whose file was not given are reported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lorasmith.archs.base import STRIP_PREFIXES, Architecture
from lorasmith.errors import ArchMismatchError, InvalidFileError, LorasmithError, UsageError
from lorasmith.io.dtypes import safetensors_dtype
from lorasmith.io.header import Header, read_header
from lorasmith.io.reader import open_tensors
from lorasmith.io.writer import SafetensorsWriter, check_output_path
from lorasmith.ops._components_forms import (
    Conversion,
    convert_keys,
    from_canonical,
    output_shapes,
    to_canonical,
)
from lorasmith.ops._components_layouts import MAIN, Slot, layout_for

# Private helpers of the merge code: the bake arithmetic must be the very same code as ``merge --base`` (so
# that baking separate files equals baking the assembled checkpoint bit for bit). Kept in this one import so
# that a rename there breaks one line here; they should become public names of that module.
from lorasmith.ops._merge_ckpt import BakeJob, bake_tensor, fit_slice
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
    _detect_main,
    _single_key,
)
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

__all__ = ["bake_parts"]

PathLike = str | os.PathLike[str]
_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass
class _File:
    """One file to bake: its tensors as conversions from its own keys (``reads``) to single-file keys
    (``writes``), and the jobs on those single-file keys."""

    slot: Slot
    src: Path
    dst: Path
    header: Header
    convs: list[Conversion]
    #: canonical single-file key -> key of ``writes`` (the diffusion model file may be bare or prefixed)
    index: dict[str, str]
    #: key of ``writes`` -> its shape
    shapes: dict[str, tuple[int, ...]]


def _main_file(slot: Slot, src: Path, dst: Path, header: Header) -> _File:
    """The diffusion model file (bare, prefixed, or holding other parts), copied key for key."""
    index: dict[str, str] = {}
    for name in header.tensors:
        index.setdefault(name, name)
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                index.setdefault(name[len(prefix) :], name)
        index.setdefault(slot.prefix + name, name)
    convs = [Conversion((k,), None, (k,), None) for k in header.tensors]
    shapes = {k: tuple(i.shape) for k, i in header.tensors.items()}
    return _File(slot, src, dst, header, convs, index, shapes)


def _part_file(slot: Slot, src: Path, dst: Path, header: Header, convs: list[Conversion]) -> _File:
    """A part file whose conversions' ``writes`` are relative part keys in the single file's form."""
    named = [
        Conversion(c.reads, c.entry_in, tuple(_single_key(w, slot) for w in c.writes), c.entry_out)
        for c in convs
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    for c in named:
        for w, shape in zip(
            c.writes, output_shapes(c, [tuple(header.tensors[r].shape) for r in c.reads]), strict=True
        ):
            shapes[w] = shape
    return _File(slot, src, dst, header, named, {k: k for k in shapes}, shapes)


def _real_rows(family: Architecture, variant: str | None, key: str, dim: int) -> int | None:
    """Size along ``dim`` of the real (unshrunk) weight ``key``, for fitting a fused slice."""
    spec = family.target_spec(key, variant)
    return int(spec.shape[dim]) if spec is not None and len(spec.shape) > dim else None


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
    from lorasmith.registry import part_catalog

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
    catalog = part_catalog()
    header = read_header(base_path)
    family, variant = _detect_main(base_path, header, arch, catalog)
    if loaded[0].detection.arch != family.id:
        raise ArchMismatchError(
            f"{loaded[0].path.name} is a {loaded[0].detection.arch} LoRA, "
            f"{base_path.name} a {family.id} model",
            hint="bake a LoRA into a model of its own family",
        )
    slots = layout_for(family, variant)
    by_name = {s.name: s for s in slots}
    warnings: list[str] = []
    files: list[_File] = [_main_file(by_name[MAIN], base_path, out, header)]
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
        found, warn = _check_part(slot, src, part_header, family.id, catalog)
        if warn:
            warnings.append(warn)
        kind = catalog.kinds[slot.kind] if found is not None and slot.kind is not None else None
        convs = convert_keys(
            kind,
            found.form if found else None,
            slot.form,
            list(part_header.tensors),
            f"{slot.option} {src.name}",
        )
        files.append(_part_file(slot, src, dst, part_header, convs))
    bw = parse_blocks(blocks, family) if blocks else None
    jobs: list[dict[str, list[BakeJob]]] = [{} for _ in files]
    bias_jobs: list[dict[str, list[BakeJob]]] = [{} for _ in files]
    unmatched: list[str] = []
    skipped: dict[str, int] = {}
    te_slots = [s for s in slots[1:] if s.group == "te"]
    for lora in loaded:
        for name in lora.names:
            alias = lora.alias(name)
            where = None
            if alias is not None:
                where = next(
                    (
                        (i, f.index[alias.target.key])
                        for i, f in enumerate(files)
                        if alias.target.key in f.index
                    ),
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
            i, key = where
            sl = alias.target.slice
            if sl is not None:
                real = _real_rows(family, variant, alias.target.key, sl[0])
                sl = fit_slice(sl, real, files[i].shapes[key][sl[0]], name)
            weight = bw.weight(family, alias.target.key) if bw is not None else 1.0
            job = BakeJob(partial(lora.read, name), lora.ratio * weight, sl, f"{lora.path.name}: {name}")
            jobs[i].setdefault(key, []).append(job)
            if lora.has_bias(name) and key.endswith(".weight"):
                bkey = key[: -len("weight")] + "bias"
                if bkey in files[i].shapes:
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
    total = sum(len(f.convs) for f in files)
    done = 0
    reports: list[PartReport] = []
    for i, f in enumerate(files):
        meta = merged_metadata(
            [(f.src, None, dict(f.header.metadata))] + [(x.path, x.ratio, x.metadata) for x in loaded],
            keep_ss=False,
        )
        plan = {
            k: (save_st if (save_st is not None and v.dtype in _FLOATS) else v.dtype, tuple(v.shape))
            for k, v in f.header.tensors.items()
        }
        changed = 0
        writer = SafetensorsWriter(
            f.dst, metadata=meta, overwrite=overwrite, inputs=[f.src, *(x.path for x in loaded)], plan=plan
        )
        try:
            with open_tensors(f.src, f.header) as tf:
                for conv in f.convs:
                    # the tensor(s) as the single file holds them, baked there, then back to this file's form
                    canon = to_canonical([tf.get(k) for k in conv.reads], conv.entry_in)
                    held = from_canonical(canon, conv.entry_out)
                    del canon
                    baked = []
                    for key, t in zip(conv.writes, held, strict=True):
                        final = save if (save is not None and t.is_floating_point()) else t.dtype
                        todo, btodo = jobs[i].get(key, []), bias_jobs[i].get(key, [])
                        if todo or btodo:
                            t = bake_tensor(t, todo, btodo, compute, final)
                            for job in (*todo, *btodo):
                                job.release()
                            changed += 1
                        baked.append(t if t.dtype == final else t.to(final))
                        del t
                    held.clear()
                    back = from_canonical(to_canonical(baked, conv.entry_out), conv.entry_in)
                    del baked
                    for key, t in zip(conv.reads, back, strict=True):
                        writer.write(key, t)
                    del back
                    done += 1
                    cb(ProgressEvent("baking", done, total, conv.reads[0]))
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        reports.append(
            PartReport(
                slot=f.slot.name,
                kind=f.slot.kind,
                path=str(f.dst),
                tensors=len(f.header.tensors),
                changed=changed,
                file_bytes=written.file_bytes,
            )
        )
    return ComponentsResult(
        mode="bake",
        arch=family.id,
        variant=variant,
        inputs=[
            PartReport(slot=f.slot.name, kind=f.slot.kind, path=str(f.src), tensors=len(f.header.tensors))
            for f in files
        ]
        + [PartReport(slot="lora", path=str(x.path)) for x in loaded],
        outputs=reports,
        unmatched=unmatched,
        skipped=skipped,
        warnings=warnings,
    )
