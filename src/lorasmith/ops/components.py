"""Checkpoint components: assemble separate part files into one checkpoint, split one into parts, and bake
LoRAs into text encoders kept in separate files.

- :func:`assemble`: a diffusion model file plus its VAE and text-encoder files -> one single-file checkpoint
  in the family's native layout (:mod:`lorasmith.ops._components_layouts`), per-component dtypes optional.
- :func:`split`: the reverse, one file per part, named and keyed as the separate distributions are.
- :func:`bake_parts`: ``merge --base`` for a model whose text encoders are separate files
  (:mod:`lorasmith.ops._components_bake`).

Every part is identified from its keys (:func:`lorasmith.archs.parts.detect_part`), kind and form, and
checked against the slot it is given for; a wrong or missing part is a one-line error naming it. A part in
another form than the single file stores (an HF-form CLIP-G for SDXL, a diffusers VAE) is converted on the
way (:mod:`lorasmith.ops._components_forms`, values moved only). The slots come from the family
(:meth:`lorasmith.archs.base.Architecture.part_slots`), so plugin families work the same way. Everything
streams: one tensor (or the few pieces of one fused tensor) is held at a time, and each output is written
atomically through a planned writer.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from lorasmith.archs.parts import PartCatalog, PartMatch
from lorasmith.errors import DetectionError, InvalidFileError, UsageError
from lorasmith.ops._components_forms import (
    Conversion,
    convert_keys,
    from_canonical,
    output_shapes,
    to_canonical,
)
from lorasmith.ops._components_layouts import MAIN, Slot, layout_for
from lorasmith.ops._convert_dtype import CastStats, parse_dtype
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    from lorasmith.archs.base import Architecture
    from lorasmith.io.header import Header

__all__ = ["ComponentsResult", "PartReport", "assemble", "bake_parts", "split"]

PathLike = str | os.PathLike[str]

#: Metadata key of the record of what :func:`assemble` / :func:`split` did.
RECORD_KEY = "lorasmith_components"
#: Metadata key (main part of a split) listing keys that sat outside every part prefix; kept verbatim.
VERBATIM_KEY = "lorasmith.components.verbatim"
_STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_DTYPE_WORD = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}


class PartReport(BaseModel):
    """One part file read or written.

    :ivar slot: ``transformer``, ``vae``, ``clip_l``, ``clip_g``, ``t5xxl`` or ``text_encoder``.
    :ivar kind: the part kind (``vae16``, ``clip_l``...); ``None`` for the diffusion model.
    :ivar path: the file.
    :ivar tensors: tensors in it (of this part).
    :ivar changed: tensors a bake changed (bake only).
    :ivar file_bytes: size of a written file (0 for an input).
    """

    slot: str
    kind: str | None = None
    path: str
    tensors: int = 0
    changed: int = 0
    file_bytes: int = 0


class ComponentsResult(BaseModel):
    """The result of :func:`assemble`, :func:`split` or :func:`bake_parts`.

    :ivar mode: ``assemble``, ``split`` or ``bake``.
    :ivar arch: the family.
    :ivar variant: its variant.
    :ivar inputs: the files read.
    :ivar outputs: the files written.
    :ivar dtypes: safetensors dtype -> tensors written.
    :ivar cast: tensors whose dtype changed, and how many values overflowed or flushed to zero.
    :ivar unmatched: bake: LoRA modules that match no weight of any given file.
    :ivar skipped: bake: text-encoder slot whose file was not given -> LoRA modules skipped for it.
    :ivar warnings: things the user should know.
    """

    mode: Literal["assemble", "split", "bake"]
    arch: str
    variant: str | None = None
    inputs: list[PartReport] = Field(default_factory=list)
    outputs: list[PartReport] = Field(default_factory=list)
    dtypes: dict[str, int] = Field(default_factory=dict)
    cast: dict[str, int] = Field(default_factory=dict)
    unmatched: list[str] = Field(default_factory=list)
    skipped: dict[str, int] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers
def _dtypes(
    dtype: str | None, unet_dtype: str | None, te_dtype: str | None, vae_dtype: str | None
) -> dict[str, str | None]:
    return {
        "all": parse_dtype(dtype),
        "unet": parse_dtype(unet_dtype, "--unet-dtype"),
        "te": parse_dtype(te_dtype, "--te-dtype"),
        "vae": parse_dtype(vae_dtype, "--vae-dtype"),
    }


def _target(slot: Slot, dtypes: Mapping[str, str | None], stored: str) -> str:
    choice = dtypes.get(slot.group) or dtypes.get("all")
    return choice if choice is not None and stored in _FLOATS else stored


def _slot_of(key: str, slots: Sequence[Slot]) -> Slot | None:
    """The slot whose prefix (or outer prefix) is the longest match of a single-file key."""
    best: tuple[int, Slot | None] = (-1, None)
    for slot in slots:
        for prefix in (slot.prefix, slot.outer):
            if prefix and key.startswith(prefix) and len(prefix) > best[0]:
                best = (len(prefix), slot)
    return best[1]


def _part_key(key: str, slot: Slot) -> str:
    """Single-file key -> the key in the slot's separate file."""
    if key.startswith(slot.prefix):
        return key[len(slot.prefix) :]
    assert slot.outer is not None and key.startswith(slot.outer)
    return key[len(slot.outer) :]


def _single_key(key: str, slot: Slot) -> str:
    """Separate-file key -> the single-file key (``logit_scale`` and the like go under ``outer``)."""
    if slot.outer and key in slot.outer_keys:
        return slot.outer + key
    return slot.prefix + key


def _clean_meta(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k not in _STALE and k != VERBATIM_KEY and k != RECORD_KEY}


def _describe(path: Path, header: Header) -> str:
    """What a file that is no part looks like, for an error message."""
    from lorasmith.registry import get_registry

    try:
        det = get_registry().detect(header, source=str(path))
    except DetectionError:
        return "no known model part"
    what = "LoRA" if det.kind == "lora" else "checkpoint"
    comps = f" ({', '.join(det.components)})" if det.components else ""
    return f"a {det.arch} {what}{comps}"


def _needs(slot: Slot, catalog: PartCatalog) -> str:
    return "the diffusion model" if slot.kind is None else f"the {catalog.kinds[slot.kind].name}"


def _check_part(
    slot: Slot, path: Path, header: Header, family: str, catalog: PartCatalog
) -> tuple[PartMatch | None, str | None]:
    """Check that ``path`` is the part ``slot`` needs.

    :return: ``(match, warning)``: the detected part (its form), or ``None`` with a warning for a part
        accepted as an opaque component (copied as it is).
    :raises InvalidFileError: the file is another part, or no part at all.
    """
    from lorasmith.archs.parts import detect_part

    assert slot.kind is not None
    found = detect_part(header, catalog)
    if found is not None and found.kind == slot.kind:
        return found, None
    option = slot.option.split("/")[0]
    needs = _needs(slot, catalog)
    if found is not None:
        raise InvalidFileError(
            f"{option} {path.name}: is the {found.reason}; {family} needs {needs} here",
            hint=f"give {needs} to {option}",
        )
    if catalog.kinds[slot.kind].accept_opaque and _describe(path, header) == "no known model part":
        # Qwen3-4B: keys unknown to this package's data are accepted as an opaque component
        return None, f"{path.name}: not verified as the {catalog.kinds[slot.kind].name}; copied as it is"
    raise InvalidFileError(
        f"{option} {path.name}: is not {needs} (it looks like {_describe(path, header)})",
        hint=f"give {needs} to {option}",
    )


@dataclass(frozen=True)
class _Unit:
    """Tensors to write from one input file: ``conv.reads`` (input keys) become ``writes`` (output keys),
    through the part kind's canonical tensor when the forms differ (:mod:`._components_forms`)."""

    file: int
    conv: Conversion
    writes: tuple[str, ...]
    slot: Slot


def _units(
    file: int, convs: Sequence[Conversion], slot: Slot, rename: Callable[[str], str] | None = None
) -> list[_Unit]:
    return [_Unit(file, c, tuple(rename(w) for w in c.writes) if rename else c.writes, slot) for c in convs]


def _plan(
    paths: Sequence[Path],
    units: Sequence[_Unit],
    headers: Sequence[Header],
    dtypes: Mapping[str, str | None],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Output key -> (dtype, shape) of every tensor the units write."""
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for u in units:
        infos = [headers[u.file].tensors[k] for k in u.conv.reads]
        stored = infos[0].dtype
        if any(i.dtype != stored for i in infos):
            raise InvalidFileError(
                f"{paths[u.file].name}: the parts of one tensor have different dtypes "
                f"({', '.join(u.conv.reads)})",
                hint="give a file with one dtype per tensor",
            )
        shapes = output_shapes(u.conv, [tuple(i.shape) for i in infos])
        for name, shape in zip(u.writes, shapes, strict=True):
            if name in plan:
                raise InvalidFileError(
                    f"{paths[u.file].name}: tensor {name!r} comes from two inputs",
                    hint="give each part once (the diffusion model file may already hold it)",
                )
            plan[name] = (_target(u.slot, dtypes, stored), shape)
    return plan


def _stream(
    paths: Sequence[Path],
    units: Sequence[_Unit],
    headers: Sequence[Header],
    output: Path,
    *,
    dtypes: Mapping[str, str | None],
    metadata: Mapping[str, str],
    overwrite: bool,
    stats: CastStats,
    counts: dict[str, int],
    progress: Callable[[str], None],
) -> int:
    """Write ``units`` (read one canonical tensor at a time) to ``output``; returns the file size."""
    from contextlib import ExitStack

    from lorasmith.io.reader import open_tensors
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops._convert_dtype import cast_tensor

    plan = _plan(paths, units, headers, dtypes)
    with (
        SafetensorsWriter(
            output, metadata=dict(metadata), overwrite=overwrite, inputs=list(paths), plan=plan
        ) as writer,
        ExitStack() as stack,
    ):
        files = [stack.enter_context(open_tensors(p)) for p in paths]
        for u in units:
            stored = headers[u.file].tensors[u.conv.reads[0]].dtype
            canon = to_canonical([files[u.file].get(k) for k in u.conv.reads], u.conv.entry_in)
            for name, t in zip(u.writes, from_canonical(canon, u.conv.entry_out), strict=True):
                target = plan[name][0]
                new, cs = cast_tensor(t, target if target != stored else None)
                stats.add(cs)
                writer.write(name, new)
                counts[target] = counts.get(target, 0) + 1
                del t, new
            del canon
            progress(u.writes[0])
        return writer.close().file_bytes


def _cast_report(stats: CastStats) -> dict[str, int]:
    return {
        "tensors": stats.tensors,
        "values": stats.values,
        "overflowed": stats.overflowed,
        "flushed_to_zero": stats.flushed,
    }


def _detect_main(
    path: Path, header: Header, arch: str | None, catalog: PartCatalog
) -> tuple[Architecture, str | None]:
    """The family of a diffusion model file (bare or prefixed keys, maybe with other parts in it)."""
    from lorasmith.archs.parts import detect_part
    from lorasmith.registry import get_registry

    part = detect_part(header, catalog)
    if part is not None and arch is None:
        raise InvalidFileError(
            f"--transformer {path.name}: is the {part.reason}, not a diffusion model",
            hint="give the diffusion model (UNet/transformer) file to --transformer/--unet",
        )
    reg = get_registry()
    det = reg.detect(header, arch=arch, source=str(path))
    if det.kind in ("lora", "mixed"):
        raise InvalidFileError(f"{path.name}: is a LoRA, not a checkpoint", hint="give a model file")
    family = reg.get(det.arch)
    canonical = family.canonical_inventory(det.variant)
    if det.layout is not None and det.layout != canonical.layout:
        raise InvalidFileError(
            f"{path.name}: is in the {det.layout} layout, not the {family.id} single-file layout",
            hint="convert it first: lorasmith convert FILE --to single",
        )
    return family, det.variant


def _verbatim(header: Header, family: Architecture, variant: str | None) -> set[str]:
    """Main-part keys that keep their full name: listed by a split, or outside every inventory component."""
    out: set[str] = set()
    raw = header.metadata.get(VERBATIM_KEY)
    if raw:
        with contextlib.suppress(ValueError, TypeError):
            out.update(str(k) for k in json.loads(raw))
    inv = family.canonical_inventory(variant)
    out.update(k for k in header.tensors if k in inv.tensors and inv.component_of(k) is None)
    return out


# ---------------------------------------------------------------------------------------------- assemble
def assemble(
    parts: Mapping[str, PathLike | None],
    output: PathLike,
    *,
    arch: str | None = None,
    dtype: str | None = None,
    unet_dtype: str | None = None,
    te_dtype: str | None = None,
    vae_dtype: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ComponentsResult:
    """Assemble separate part files into one single-file checkpoint of the family's native layout.

    :param parts: slot -> file: ``transformer`` (or ``unet``: the diffusion model, which decides the
        family), ``vae``, ``clip_l``, ``clip_g``, ``t5xxl``, ``text_encoder`` (or a plugin family's own slot
        names); ``None`` values are ignored. Each part may be in any form of its kind (HF or OpenCLIP
        CLIP-G/CLIP-H, ldm or diffusers VAE). The diffusion model file may already hold other parts (SD3's
        ``sd3_medium.safetensors`` holds the VAE); a part given twice is an error.
    :param output: the ``.safetensors`` file to write.
    :param arch: force the family of the diffusion model.
    :param dtype: dtype of every floating tensor; ``unet_dtype``/``te_dtype``/``vae_dtype`` per component.
    :raises InvalidFileError: a part that is not what its slot needs, a missing required part, a part
        given twice.
    :raises UsageError: a slot the family does not have, no diffusion model.
    """
    from lorasmith.io.header import read_header
    from lorasmith.io.writer import check_output_path
    from lorasmith.registry import part_catalog

    cb = progress or noop
    dts = _dtypes(dtype, unet_dtype, te_dtype, vae_dtype)
    given = {("transformer" if k == "unet" else k): Path(v) for k, v in parts.items() if v is not None}
    if MAIN not in given:
        raise UsageError(
            "assemble needs the diffusion model", hint="give --transformer FILE (or --unet FILE)"
        )
    for slot_name, p in given.items():
        if not p.is_file():
            raise InvalidFileError(f"{p}: no such file", hint=f"check the path given for the {slot_name}")
    out = Path(output)
    check_output_path(out, overwrite=overwrite, inputs=list(given.values()))
    catalog = part_catalog()
    main_path = given[MAIN]
    main_header = read_header(main_path)
    family, variant = _detect_main(main_path, main_header, arch, catalog)
    slots = layout_for(family, variant)
    by_name = {s.name: s for s in slots}
    for name in given:
        if name not in by_name:
            raise UsageError(
                f"{family.id} has no {name} part",
                hint="its parts: " + ", ".join(s.option for s in slots),
            )
    paths: list[Path] = [main_path]
    headers: list[Header] = [main_header]
    reports = [PartReport(slot=MAIN, path=str(main_path), tensors=len(main_header.tensors))]
    units: list[_Unit] = []
    warnings: list[str] = []
    # the diffusion model file: bare keys get the model prefix; keys already under a slot prefix stay
    verbatim = _verbatim(main_header, family, variant)
    present: set[str] = set()
    main_slot = by_name[MAIN]
    for key in main_header.tensors:
        copy = Conversion((key,), None, (key,), None)
        if key in verbatim:
            units.append(_Unit(0, copy, (key,), main_slot))
            continue
        slot = _slot_of(key, slots)
        if slot is None:
            slot, name = main_slot, main_slot.prefix + key
        else:
            name = key
        present.add(slot.name)
        units.append(_Unit(0, copy, (name,), slot))
    for slot in slots[1:]:
        path = given.get(slot.name)
        if path is None:
            continue
        if slot.name in present:
            raise InvalidFileError(
                f"{slot.option} {path.name}: {main_path.name} already holds the {slot.name}",
                hint=f"drop {slot.option}, or give a diffusion model file without it",
            )
        header = read_header(path)
        found, warn = _check_part(slot, path, header, family.id, catalog)
        if warn:
            warnings.append(warn)
        # a part in another form than the single file stores (HF CLIP-G for SDXL, a diffusers VAE) is
        # converted on the way; an opaque part is copied as it is
        kind = catalog.kinds[slot.kind] if found is not None and slot.kind is not None else None
        convs = convert_keys(
            kind,
            found.form if found is not None else None,
            slot.form,
            list(header.tensors),
            f"{slot.option.split('/')[0]} {path.name}",
        )
        idx = len(paths)
        paths.append(path)
        headers.append(header)
        reports.append(
            PartReport(slot=slot.name, kind=slot.kind, path=str(path), tensors=len(header.tensors))
        )
        units.extend(_units(idx, convs, slot, partial(_single_key, slot=slot)))
        present.add(slot.name)
    for slot in slots:
        if slot.required and slot.name not in present:
            raise InvalidFileError(
                f"{family.id} needs {_needs(slot, catalog)}: give {slot.option} FILE",
                hint=f"a {family.id} single file holds " + ", ".join(s.name for s in slots if s.required),
            )
    meta = _clean_meta(main_header.metadata)
    meta[RECORD_KEY] = json.dumps(
        {"assembled": {r.slot: Path(r.path).name for r in reports}}, separators=(",", ":"), sort_keys=True
    )
    stats = CastStats()
    counts: dict[str, int] = {}
    total = len(units)
    done = 0

    def tick(name: str) -> None:
        nonlocal done
        done += 1
        cb(ProgressEvent("assembling", done, total, name))

    size = _stream(
        paths,
        units,
        headers,
        out,
        dtypes=dts,
        metadata=meta,
        overwrite=overwrite,
        stats=stats,
        counts=counts,
        progress=tick,
    )
    return ComponentsResult(
        mode="assemble",
        arch=family.id,
        variant=variant,
        inputs=reports,
        outputs=[
            PartReport(
                slot="checkpoint", path=str(out), tensors=sum(len(u.writes) for u in units), file_bytes=size
            )
        ],
        dtypes=dict(sorted(counts.items())),
        cast=_cast_report(stats),
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------------------- split
def _file_name(slot: Slot, stem: str, dtype_word: str | None) -> str:
    if slot.filename is None:
        return f"{stem}.safetensors"
    if slot.name == "t5xxl" and dtype_word:
        return f"t5xxl_{dtype_word}.safetensors"
    return slot.filename


def split(
    checkpoint: PathLike,
    output_dir: PathLike,
    *,
    arch: str | None = None,
    dtype: str | None = None,
    unet_dtype: str | None = None,
    te_dtype: str | None = None,
    vae_dtype: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ComponentsResult:
    """Split a single-file checkpoint into one file per part, keyed and named as the separate distributions.

    The diffusion model is written as ``<checkpoint name>.safetensors`` with bare keys (and the checkpoint's
    metadata); the others as ``ae.safetensors``/``vae.safetensors``, ``clip_l.safetensors``,
    ``clip_g.safetensors``, ``clip_h.safetensors``, ``t5xxl_<dtype>.safetensors``, ``qwen_3_4b.safetensors``
    (see :mod:`lorasmith.ops._components_layouts`), each in its kind's file form (SDXL's OpenCLIP-G and
    SD2's OpenCLIP-H in HF form). Keys outside every part (schedule buffers) stay with the diffusion model
    under their full names, listed in its metadata so that :func:`assemble` restores them.

    :raises InvalidFileError: not a checkpoint, or no diffusion model in it.
    :raises OutputExistsError: an output file exists (without ``overwrite``).
    """
    from lorasmith.io.header import read_header
    from lorasmith.io.writer import check_output_path
    from lorasmith.registry import get_registry, part_catalog

    cb = progress or noop
    dts = _dtypes(dtype, unet_dtype, te_dtype, vae_dtype)
    src = Path(checkpoint)
    if not src.is_file():
        raise InvalidFileError(f"{src}: no such file", hint="check the path")
    folder = Path(output_dir)
    if not folder.is_dir():
        raise InvalidFileError(f"{folder}: output folder does not exist", hint="create the folder first")
    header = read_header(src)
    reg = get_registry()
    det = reg.detect(header, arch=arch, source=str(src))
    if det.kind in ("lora", "mixed"):
        raise InvalidFileError(f"{src.name}: is a LoRA, not a checkpoint", hint="split takes a checkpoint")
    family = reg.get(det.arch)
    catalog = part_catalog()
    slots = layout_for(family, det.variant)
    groups: dict[str, list[str]] = {}
    verbatim: list[str] = []
    for key in header.tensors:
        slot = _slot_of(key, slots)
        if slot is None:
            verbatim.append(key)
            slot = slots[0]
        groups.setdefault(slot.name, []).append(key)
    if not any(k.startswith(slots[0].prefix) for k in groups.get(MAIN, [])):
        if len(verbatim) == len(header.tensors) and det.kind == "checkpoint":
            raise InvalidFileError(
                f"{src.name}: is already a separate {family.id} diffusion model (bare keys): "
                "nothing to split",
                hint="split takes a single-file checkpoint holding the diffusion model and other parts",
            )
        raise InvalidFileError(
            f"{src.name}: holds no diffusion model under {slots[0].prefix!r}",
            hint="split takes a single-file checkpoint (model.diffusion_model.* keys)",
        )
    jobs: list[tuple[Slot, Path, list[_Unit]]] = []
    for slot in slots:
        keys = groups.get(slot.name)
        if not keys:
            continue
        if slot.kind is None:
            units = [
                _Unit(
                    0, Conversion((k,), None, (k,), None), (k if k in verbatim else _part_key(k, slot),), slot
                )
                for k in keys
            ]
        else:
            # the part as the separate distributions key it: the kind's file form (HF CLIP for SDXL's
            # OpenCLIP-G and SD2's OpenCLIP-H), converted from the form the single file stores
            full = {_part_key(k, slot): k for k in keys}
            convs = convert_keys(catalog.kinds[slot.kind], slot.form, None, list(full), src.name)
            units = [
                _Unit(
                    0,
                    Conversion(tuple(full[r] for r in c.reads), c.entry_in, c.writes, c.entry_out),
                    c.writes,
                    slot,
                )
                for c in convs
            ]
        word = None
        if slot.name == "t5xxl":
            stored = [_target(slot, dts, header.tensors[k].dtype) for k in keys]
            common = max(set(stored), key=stored.count)
            word = _DTYPE_WORD.get(common)
        jobs.append((slot, folder / _file_name(slot, src.stem, word), units))
    for _slot, path, _todo in jobs:
        check_output_path(path, overwrite=overwrite, inputs=[src])
    stats = CastStats()
    counts: dict[str, int] = {}
    total = sum(len(u) for _s, _p, u in jobs)
    done = 0

    def tick(name: str) -> None:
        nonlocal done
        done += 1
        cb(ProgressEvent("splitting", done, total, name))

    from lorasmith.io.writer import _signals_deferred
    from lorasmith.ops.layouts import TempFolder

    outputs: list[PartReport] = []
    # all or nothing: the parts are written into a hidden folder inside the output folder and moved into
    # place together once every one is complete; an error or an interrupt half way (a NaN in the third
    # part, Ctrl-C) leaves none of them behind
    staging = TempFolder(folder / f"{src.stem}.split")
    try:
        for slot, path, units in jobs:
            is_main = slot.name == MAIN
            meta = _clean_meta(header.metadata) if is_main else {}
            kept = [k for u in units for k in u.writes if is_main and k in verbatim]
            if kept:
                meta[VERBATIM_KEY] = json.dumps(kept, separators=(",", ":"))
            meta[RECORD_KEY] = json.dumps({"split_from": src.name, "part": slot.name}, separators=(",", ":"))
            size = _stream(
                [src],
                units,
                [header],
                staging.path / path.name,
                dtypes=dts,
                metadata=meta,
                overwrite=False,
                stats=stats,
                counts=counts,
                progress=tick,
            )
            outputs.append(
                PartReport(
                    slot=slot.name,
                    kind=slot.kind,
                    path=str(path),
                    tensors=sum(len(u.writes) for u in units),
                    file_bytes=size,
                )
            )
        with _signals_deferred():
            for _slot, path, _units in jobs:
                try:
                    os.replace(staging.path / path.name, path)
                except OSError as exc:
                    raise InvalidFileError(
                        f"{path}: cannot move the finished file into place ({exc.strerror or exc})",
                        hint="check the folder's permissions",
                    ) from exc
        _rename_recorded(staging.path, folder)
    finally:
        staging.discard()
    return ComponentsResult(
        mode="split",
        arch=family.id,
        variant=det.variant,
        inputs=[PartReport(slot="checkpoint", path=str(src), tensors=len(header.tensors))],
        outputs=outputs,
        dtypes=dict(sorted(counts.items())),
        cast=_cast_report(stats),
    )


def _rename_recorded(staged: Path, final: Path) -> None:
    """Name the moved files, not their staging copies, in the non-finite tensors written with
    ``--allow-nonfinite`` (the CLI warns about each by its file)."""
    from dataclasses import replace

    from lorasmith.io.writer import _POLICY

    policy = _POLICY.get()
    if policy is None:
        return
    policy.nonfinite[:] = [
        replace(t, path=final / t.path.name) if t.path.parent == staged else t for t in policy.nonfinite
    ]


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
    """Bake LoRAs into a diffusion model and into its separate part files (text encoders), each streamed
    and written atomically to its own output; see :func:`lorasmith.ops._components_bake.bake_parts`."""
    from lorasmith.ops._components_bake import bake_parts as impl

    return impl(
        base,
        loras,
        output,
        parts=parts,
        arch=arch,
        blocks=blocks,
        precision=precision,
        save_dtype=save_dtype,
        strict=strict,
        overwrite=overwrite,
        progress=progress,
    )
