"""``lorasmith convert``: LoRA spellings, dtypes and pickles, as one library call.

:func:`convert` looks at the input and does what applies:

- a **LoRA** (``.safetensors`` with adapter modules): rewrite its module names in another spelling of its
  family (``to``; :mod:`lorasmith.ops._convert_lora` explains rename, fuse, split and ``lossy``), and/or
  cast its factors (``dtype``; alphas stay as they are);
- a **checkpoint** (``.safetensors``): cast its floating tensors, per component if asked
  (``unet_dtype``/``te_dtype``/``vae_dtype``; components from the family's canonical inventory
  prefixes), streaming tensor by tensor through a planned writer;
- a **pickle** (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): read only through ``torch.load(weights_only=True)``
  (:mod:`lorasmith.ops.pickles`), then written as safetensors like a checkpoint (or a LoRA);
- a **checkpoint** with ``to="diffusers"``, or a **diffusers folder** (its weights in one file, sharded or
  ``.bin``) or one of its weights files / shard indexes with ``to="single"``: the layout is changed
  (:mod:`lorasmith.ops.layouts`; FLUX.1, SD1/SD2, SDXL, SD3/SD3.5, Z-Image).

Every output is written atomically with the input's metadata kept (stale hashes recomputed by the writer)
and a ``lorasmith_convert`` record of what was done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from lorasmith.errors import InvalidFileError, LorasmithError, UsageError
from lorasmith.ops._convert_dtype import CastStats, cast_tensor, parse_dtype
from lorasmith.ops.layouts import LAYOUT_WORDS
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import torch

    from lorasmith.archs.base import KeyView
    from lorasmith.ops.loralib import Unit

__all__ = ["CastReport", "ConvertResult", "ModuleReport", "convert"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
RECORD_KEY = "lorasmith_convert"

#: component names of the families' inventories, grouped by the ``--*-dtype`` option that sets them.
UNET_COMPONENTS = frozenset({"unet", "transformer", "mmdit", "diffusion_model"})
TE_COMPONENTS = frozenset({"te", "te1", "te2", "te3", "clip_l", "clip_g", "t5xxl", "text_encoder"})
VAE_COMPONENTS = frozenset({"vae"})


class CastReport(BaseModel):
    """What a dtype change did.

    :ivar tensors: floating tensors whose dtype changed.
    :ivar values: values in them.
    :ivar overflowed: finite values beyond the target range, saturated to its largest finite value.
    :ivar flushed_to_zero: non-zero values that became zero.
    :ivar untouched: integer/bool tensors (and tensors already in the target dtype) written unchanged.
    """

    tensors: int = 0
    values: int = 0
    overflowed: int = 0
    flushed_to_zero: int = 0
    untouched: int = 0


class ModuleReport(BaseModel):
    """One output module of a LoRA conversion (see :class:`~lorasmith.ops._convert_lora.ModuleOutcome`)."""

    name: str
    mode: str
    sources: list[str]
    rank: int | None = None
    rel_error: float | None = None


class ConvertResult(BaseModel):
    """The result of :func:`convert`.

    :ivar kind: ``lora`` or ``checkpoint``.
    :ivar input: the input file.
    :ivar output: the output file.
    :ivar arch: the family (``None`` if unknown).
    :ivar variant: the family variant.
    :ivar from_spelling: the input LoRA spelling (LoRAs).
    :ivar to_spelling: the output LoRA spelling (LoRAs).
    :ivar counts: output modules per mode (``rename``, ``fuse``, ``split``, ``lossy``, ``skipped``).
    :ivar modules: every output module (LoRAs).
    :ivar max_rel_error: the largest relative error of a lossy module (``None`` when nothing was lossy).
    :ivar dtypes: safetensors dtype of every written tensor -> how many.
    :ivar cast: what the dtype change did.
    :ivar tensors: tensors written.
    :ivar dropped: entries of a pickle that were not tensors (dropped).
    :ivar file_bytes: size of the output.
    :ivar sshs_model_hash: the output's recomputed hash.
    :ivar warnings: things the user should know.
    """

    kind: Literal["lora", "checkpoint"]
    input: str
    output: str
    arch: str | None = None
    variant: str | None = None
    from_spelling: str | None = None
    to_spelling: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    modules: list[ModuleReport] = Field(default_factory=list)
    max_rel_error: float | None = None
    dtypes: dict[str, int] = Field(default_factory=dict)
    cast: CastReport = Field(default_factory=CastReport)
    tensors: int = 0
    dropped: list[str] = Field(default_factory=list)
    file_bytes: int = 0
    sshs_model_hash: str | None = None
    warnings: list[str] = Field(default_factory=list)


def _is_regular_file(path: Path) -> bool:
    """Whether ``path`` (links followed) is a regular file, without opening it."""
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def convert(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    to: str | None = None,
    dtype: str | None = None,
    unet_dtype: str | None = None,
    te_dtype: str | None = None,
    vae_dtype: str | None = None,
    lossy: bool = False,
    lossy_tol: float = 0.01,
    lossy_rank: int | None = None,
    arch: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert one file (see the module docstring).

    :param input: a ``.safetensors`` LoRA or checkpoint, or a pickle (``.ckpt``/``.pt``/``.pth``/``.bin``).
    :param output: the ``.safetensors`` file to write.
    :param to: LoRA target spelling (``comfy``, ``kohya``, ``peft``/``diffusers``, ``aitk``, ``musubi``,
        ``onetrainer``, ``lycoris``, ``comfy-keys``, ``keep``...). Default for a LoRA: ``comfy`` (the
        family's ComfyUI-loadable default spelling), or ``keep`` when only a dtype is asked for.
    :param dtype: ``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3fn`` or ``fp8_e5m2`` for every floating tensor
        (LoRA alphas excepted); the per-component options override it on checkpoints.
    :param lossy: allow conversions that lose information (through an SVD; the error is reported).
    :param lossy_tol: the relative Frobenius error a lossy module may have (its rank is the smallest
        that meets it).
    :param lossy_rank: the largest rank of a lossy module.
    :param arch: force the family instead of detecting it.
    :raises LorasmithError: see the ops this dispatches to; bad option values are :class:`UsageError`.
    """
    prog = progress or noop
    src = Path(input)
    if not src.is_dir() and not _is_regular_file(src):
        from lorasmith.io.header import read_header

        # the header reader's own path checks name the problem (no such file, broken link, link loop, not a
        # regular file, a parent that is not a folder...); it never opens a pipe or a device
        read_header(src)
    dtypes = {
        "all": parse_dtype(dtype),
        "unet": parse_dtype(unet_dtype, "--unet-dtype"),
        "te": parse_dtype(te_dtype, "--te-dtype"),
        "vae": parse_dtype(vae_dtype, "--vae-dtype"),
    }
    if lossy_tol < 0 or lossy_tol >= 1:
        raise UsageError(f"--lossy-tol {lossy_tol} is out of range", hint="give a fraction such as 0.01")
    if lossy_rank is not None and lossy_rank < 1:
        raise UsageError(f"--lossy-rank {lossy_rank} must be at least 1")
    if to is not None and to.strip().lower() in LAYOUT_WORDS and (src.is_dir() or _is_checkpoint(src)):
        return _convert_layout(src, Path(output), LAYOUT_WORDS[to.strip().lower()], arch, overwrite, prog)
    if src.is_dir():
        raise InvalidFileError(f"{src}: is a folder", hint="a diffusers folder converts with --to single")
    from lorasmith.io.writer import check_output_path

    check_output_path(output, overwrite=overwrite, inputs=[src])
    if _is_pickle(src):
        from lorasmith.ops.pickles import pickle_to_safetensors

        return pickle_to_safetensors(
            src, Path(output), dtypes=dtypes, arch=arch, overwrite=overwrite, progress=prog
        )
    from lorasmith.archs.base import lora_modules
    from lorasmith.io.header import read_header

    header = read_header(src)
    if lora_modules(header.tensors):
        if any(dtypes[k] is not None for k in ("unet", "te", "vae")):
            raise UsageError(
                "--unet-dtype/--te-dtype/--vae-dtype apply to checkpoints", hint="use --dtype for a LoRA"
            )
        return convert_lora(
            src,
            Path(output),
            to=to,
            dtype=dtypes["all"],
            lossy=lossy,
            lossy_tol=lossy_tol,
            lossy_rank=lossy_rank,
            arch=arch,
            overwrite=overwrite,
            progress=prog,
        )
    if to is not None:
        raise UsageError(
            f"{src}: --to {to} names a LoRA spelling, but this file is a checkpoint",
            hint="use --dtype/--unet-dtype/--te-dtype/--vae-dtype for a checkpoint",
        )
    if all(v is None for v in dtypes.values()):
        raise UsageError(
            f"{src}: nothing to do for a checkpoint",
            hint="give --dtype (or --unet-dtype/--te-dtype/--vae-dtype)",
        )
    return convert_checkpoint_dtype(
        src, Path(output), dtypes=dtypes, arch=arch, overwrite=overwrite, progress=prog
    )


def _is_checkpoint(src: Path) -> bool:
    from lorasmith.archs.base import lora_modules
    from lorasmith.io.header import read_header

    if src.name.endswith(".safetensors.index.json"):
        return True  # the shard index of one model of a diffusers folder
    return src.suffix == ".safetensors" and not lora_modules(read_header(src).tensors)


def _convert_layout(
    src: Path, output: Path, word: str, arch: str | None, overwrite: bool, progress: ProgressCallback
) -> ConvertResult:
    """Single file <-> diffusers folder through the family's layout map (:mod:`lorasmith.ops.layouts`)."""
    from lorasmith.ops.layouts import canonical_to_layout, layout_to_canonical, main_header
    from lorasmith.registry import get_registry

    reg = get_registry()
    header = main_header(src)  # every shard's tensors together; .bin weights through the safe loader
    weights = header.path
    det = reg.detect(header, arch=arch, source=str(weights))
    if det.kind == "lora":
        raise InvalidFileError(
            f"{src}: this is a LoRA, not a checkpoint", hint="use --to with a LoRA spelling"
        )
    family = reg.get(det.arch)
    canonical = family.canonical_inventory(det.variant).layout == det.layout
    if word == "diffusers":
        if not canonical:
            raise UsageError(f"{src}: already in the {det.layout} layout", hint="use --to single to go back")
        return canonical_to_layout(
            src, output, arch=family, variant=det.variant, overwrite=overwrite, progress=progress
        )
    if canonical:
        raise UsageError(f"{src}: already a single-file checkpoint", hint="use --to diffusers")
    from lorasmith.io.writer import check_output_path

    check_output_path(output, overwrite=overwrite, inputs=[weights])
    return layout_to_canonical(
        src, output, arch=family, variant=det.variant, overwrite=overwrite, progress=progress
    )


# ----------------------------------------------------------------------------------------------- LoRAs
def convert_lora(
    src: Path,
    output: Path,
    *,
    to: str | None,
    dtype: str | None,
    lossy: bool,
    lossy_tol: float,
    lossy_rank: int | None,
    arch: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Convert a LoRA file's spelling and/or dtype (see :func:`convert`)."""
    from lorasmith.errors import DetectionError
    from lorasmith.io.writer import save_file
    from lorasmith.ops._convert_lora import convert_lora_units, resolve_target_spelling
    from lorasmith.ops.loralib import load_lora, output_metadata, plan_units

    word = to if to is not None else ("keep" if dtype is not None else "comfy")
    stats = CastStats()
    with load_lora(src, arch=arch) as lora:
        family = lora.arch
        if family is None:
            if word != "keep":
                raise DetectionError(
                    f"{src}: the LoRA's family is unknown, so it cannot be written in another spelling",
                    hint="pass --arch to name the family",
                )
            spelling = lora.spelling
        else:
            spelling = resolve_target_spelling(family, word, lora.spelling)
        units = _dedupe(plan_units([(lora, 1.0)], spelling=spelling if family is not None else None))
        style = _style(spelling, lora)
        done = 0

        def on_unit(name: str) -> None:
            nonlocal done
            done += 1
            progress(ProgressEvent("converting", done, len(units), name))

        def cast(name: str, t: torch.Tensor) -> torch.Tensor:
            if name.endswith(".alpha"):
                return t
            new, st = cast_tensor(t, dtype)
            stats.add(st)
            return new

        conv = convert_lora_units(
            lora,
            units,
            style,
            lossy=lossy,
            lossy_tol=lossy_tol,
            lossy_rank=lossy_rank,
            cast=cast,
            on_unit=on_unit,
        )
        record: dict[str, object] = {
            "from": lora.spelling,
            "to": spelling,
            "dtype": dtype,
            "lossy": sum(1 for o in conv.outcomes if o.mode == "lossy"),
        }
        meta = output_metadata(
            lora.metadata, linear=conv.linear, conv=conv.conv, record_key=RECORD_KEY, record=record
        )
        if not conv.tensors:
            raise LorasmithError(
                f"{src}: nothing to write", hint="the LoRA has no module left after conversion"
            )
        written = save_file(conv.tensors, output, metadata=meta, overwrite=overwrite, inputs=[src])
        untouched = sum(
            1
            for k, t in conv.tensors.items()
            if dtype is None or not t.is_floating_point() or k.endswith(".alpha")
        )
        counts: dict[str, int] = {}
        for o in conv.outcomes:
            counts[o.mode] = counts.get(o.mode, 0) + 1
        errors = [o.rel_error for o in conv.outcomes if o.rel_error is not None]
        return ConvertResult(
            kind="lora",
            input=str(src),
            output=str(output),
            arch=family.id if family is not None else None,
            variant=lora.variant,
            from_spelling=lora.spelling,
            to_spelling=spelling,
            counts=counts,
            modules=[
                ModuleReport(
                    name=o.name, mode=o.mode, sources=list(o.sources), rank=o.rank, rel_error=o.rel_error
                )
                for o in conv.outcomes
            ],
            max_rel_error=max(errors) if errors else None,
            dtypes=_dtype_counts(conv.tensors),
            cast=_report(stats, untouched),
            tensors=len(conv.tensors),
            file_bytes=written.file_bytes,
            sshs_model_hash=written.sshs_model_hash,
            warnings=[*lora.warnings, *conv.warnings],
        )


def _dedupe(units: list[Unit]) -> list[Unit]:
    """Keep one unit per (weight, rows): a spelling may have two names for one module.

    (SDXL's PEFT spelling also knows the old ``attn1.processor.to_out`` name for ``attn1.to_out.0``;
    :func:`~lorasmith.ops.loralib.plan_units` places the module under both, and writing both would apply
    its delta twice. The first is the family's preferred name.)
    """
    seen: set[tuple[str, tuple[int, int, int] | None]] = set()
    out = []
    for u in units:
        if u.base_key is not None:
            key = (u.base_key, u.base_slice)
            if key in seen:
                continue
            seen.add(key)
        out.append(u)
    return out


def _style(spelling: str | None, lora: object) -> Literal["kohya", "peft"]:
    from lorasmith.ops.loralib import LoraFile, suffix_style_of

    assert isinstance(lora, LoraFile)
    return suffix_style_of(spelling, lora.modules.values())


def _dtype_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    from lorasmith.io.dtypes import safetensors_dtype

    out: dict[str, int] = {}
    for t in tensors.values():
        name = safetensors_dtype(t.dtype)
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def _report(stats: CastStats, untouched: int) -> CastReport:
    return CastReport(
        tensors=stats.tensors,
        values=stats.values,
        overflowed=stats.overflowed,
        flushed_to_zero=stats.flushed,
        untouched=untouched,
    )


# ------------------------------------------------------------------------------------------ checkpoints
def component_dtypes(
    keys: list[str], dtypes: Mapping[str, str | None], components: Mapping[str, str | None]
) -> dict[str, str | None]:
    """Target safetensors dtype per key: the component's option if set, else ``dtypes["all"]``.

    :param components: key -> component name (``unet``, ``te1``, ``vae``...; ``None`` if none).
    """
    out: dict[str, str | None] = {}
    for key in keys:
        comp = components.get(key)
        choice = None
        if comp in UNET_COMPONENTS:
            choice = dtypes.get("unet")
        elif comp in TE_COMPONENTS or (comp is not None and comp.startswith("te")):
            choice = dtypes.get("te")
        elif comp in VAE_COMPONENTS:
            choice = dtypes.get("vae")
        out[key] = choice if choice is not None else dtypes.get("all")
    return out


def key_components(
    keys: list[str], header: KeyView, arch: str | None
) -> tuple[dict[str, str | None], str | None, str | None]:
    """Component of every key from the detected family's inventory prefixes; ``(map, family, variant)``.

    Keys of an undetected file (or outside every prefix) map to ``None``.
    """
    from lorasmith.errors import DetectionError
    from lorasmith.registry import get_registry

    reg = get_registry()
    try:
        det = reg.detect(header, arch=arch)
    except DetectionError:
        return dict.fromkeys(keys), None, None
    if det.kind == "lora":
        raise InvalidFileError("this is a LoRA, not a checkpoint")
    family = reg.get(det.arch)
    invs = [
        i
        for i in family.inventories()
        if i.layout == det.layout and (det.variant is None or i.variant == det.variant)
    ]
    inv = invs[0] if invs else family.canonical_inventory(det.variant)
    return {k: inv.component_of(k) for k in keys}, family.id, det.variant


def convert_checkpoint_dtype(
    src: Path,
    output: Path,
    *,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Cast a safetensors checkpoint's floating tensors, streaming (see :func:`convert`)."""
    from lorasmith.io.header import read_header
    from lorasmith.io.reader import open_tensors

    header = read_header(src)
    keys = list(header.tensors)
    comps, family, variant = key_components(keys, header, arch)
    targets = component_dtypes(keys, dtypes, comps)

    with open_tensors(src) as tf:
        return write_streaming(
            src,
            output,
            keys=keys,
            specs={k: (header.tensors[k].dtype, tuple(header.tensors[k].shape)) for k in keys},
            get=tf.get,
            targets=targets,
            metadata=dict(header.metadata),
            record={"dtype": {k: v for k, v in dtypes.items() if v is not None}},
            family=family,
            variant=variant,
            overwrite=overwrite,
            progress=progress,
        )


def write_streaming(
    src: Path,
    output: Path,
    *,
    keys: list[str],
    specs: Mapping[str, tuple[str, tuple[int, ...]]],
    get: Callable[[str], torch.Tensor],
    targets: Mapping[str, str | None],
    metadata: Mapping[str, str],
    record: Mapping[str, object],
    family: str | None,
    variant: str | None,
    overwrite: bool,
    progress: ProgressCallback,
    dropped: list[str] | None = None,
) -> ConvertResult:
    """Write ``keys`` (read one at a time with ``get``) cast to ``targets`` through a planned writer."""
    from lorasmith.io.writer import SafetensorsWriter

    float_names = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    untouched = 0
    for k in keys:
        st, shape = specs[k]
        tgt = targets.get(k)
        if tgt is not None and st in float_names and st != tgt:
            plan[k] = (tgt, shape)
        else:
            plan[k] = (st, shape)
            untouched += 1
    meta = {
        k: v
        for k, v in metadata.items()
        if k not in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
    }
    meta[RECORD_KEY] = json.dumps(dict(record), separators=(",", ":"), sort_keys=True)
    stats = CastStats()
    with SafetensorsWriter(output, metadata=meta, overwrite=overwrite, inputs=[src], plan=plan) as writer:
        for i, k in enumerate(keys):
            t = get(k)
            new, cs = cast_tensor(t, plan[k][0] if plan[k][0] != specs[k][0] else None)
            stats.add(cs)
            writer.write(k, new)
            progress(ProgressEvent("writing", i + 1, len(keys), k))
        written = writer.close()
    counts: dict[str, int] = {}
    for st_name, _shape in plan.values():
        counts[st_name] = counts.get(st_name, 0) + 1
    return ConvertResult(
        kind="checkpoint",
        input=str(src),
        output=str(output),
        arch=family,
        variant=variant,
        dtypes=dict(sorted(counts.items())),
        cast=_report(stats, untouched),
        tensors=len(keys),
        dropped=list(dropped or []),
        file_bytes=written.file_bytes,
        sshs_model_hash=written.sshs_model_hash,
    )
