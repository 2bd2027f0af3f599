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
- a **checkpoint** (safetensors, pickle, or shards with their index) with ``to="diffusers"``, or a
  **diffusers folder** (its weights in one file, sharded or ``.bin``) or one of its weights files, pickles
  or shard indexes with ``to="single"``: the layout is changed (:mod:`lorasmith.ops.layouts`; FLUX.1,
  SD1/SD2, SDXL, SD3/SD3.5, Z-Image), dtypes are cast per component on the way, and ``shard_size``
  writes each model of the folder as ``save_pretrained`` shards with an index
  (:class:`~lorasmith.ops._diffusers_weights.ModelWeightsWriter`);
- a **diffusers folder** with ``to="diffusers"`` and a dtype and/or ``shard_size``: recast and/or
  resharded into another folder, every other file copied unchanged.

Whatever is stored in safetensors files (one file, shards, the models of a folder) is streamed part by
part through :func:`~lorasmith.ops._convert_dtype.cast_stream` (:data:`PIPELINE`); pickles are read a
whole tensor at a time.

Every input kind meets every ``to`` value with a result or a one-line error (``docs/convert.md`` has
the table; ``tests/ops/test_convert_matrix.py`` runs it).

Every output is written atomically with the input's metadata kept (stale hashes recomputed by the writer)
and a ``lorasmith_convert`` record of what was done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from lorasmith.errors import InvalidFileError, LorasmithError, UsageError
from lorasmith.ops._convert_dtype import CastStats, Recipe, cast_stream, cast_tensor, parse_dtype, whole_piece
from lorasmith.ops.layouts import LAYOUT_WORDS
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import torch

    from lorasmith.archs.base import Architecture, KeyView
    from lorasmith.io.header import Header
    from lorasmith.io.reader import TensorFile
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops._diffusers_weights import ModelWeights
    from lorasmith.ops.loralib import Unit

__all__ = ["CastReport", "ConvertResult", "ModuleReport", "convert"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
RECORD_KEY = "lorasmith_convert"

#: Stream tensors stored in safetensors files (one file, shards, the models of a diffusers folder) part by
#: part through :func:`~lorasmith.ops._convert_dtype.cast_stream`. ``False`` reads whole tensors instead:
#: the byte-identical reference the tests and ``benchmarks/bench_convert.py --before`` compare with.
PIPELINE = True

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
    :ivar sshs_model_hash: the output's recomputed hash (of the main model's weights file for a folder;
        ``None`` when those are sharded).
    :ivar shards: for a diffusers folder output, subfolder -> number of weights files (1: unsharded;
        ``.`` for weights at the top of the folder).
    :ivar copied: files of an input diffusers folder copied unchanged into the output folder (configs,
        tokenizers, scheduler...), when a folder is resharded or recast.
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
    shards: dict[str, int] = Field(default_factory=dict)
    copied: int = 0
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
    shard_size: str | int | None = None,
) -> ConvertResult:
    """Convert one file (see the module docstring).

    :param input: a ``.safetensors`` LoRA or checkpoint, a pickle (``.ckpt``/``.pt``/``.pth``/``.bin``),
        a shard index (``*.safetensors.index.json``, ``*.bin.index.json``) or a diffusers folder.
    :param output: the ``.safetensors`` file to write (a folder for ``to="diffusers"``).
    :param to: LoRA target spelling (``comfy``, ``kohya``, ``peft``/``diffusers``, ``aitk``, ``musubi``,
        ``onetrainer``, ``lycoris``, ``comfy-keys``, ``keep``...). Default for a LoRA: ``comfy`` (the
        family's ComfyUI-loadable default spelling), or ``keep`` when only a dtype is asked for. On a
        checkpoint: ``diffusers`` (a folder) or ``single`` (also ``original``, ``bfl``), the layout to
        write; ``keep`` (or nothing) keeps the layout.
    :param dtype: ``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3fn`` or ``fp8_e5m2`` for every floating tensor
        (LoRA alphas excepted); the per-component options override it on checkpoints.
    :param lossy: allow conversions that lose information (through an SVD; the error is reported).
    :param lossy_tol: the relative Frobenius error a lossy module may have (its rank is the smallest
        that meets it).
    :param lossy_rank: the largest rank of a lossy module.
    :param arch: force the family instead of detecting it.
    :param shard_size: with ``to="diffusers"`` (a checkpoint or a diffusers folder), the largest weights
        file of each model (bytes, or ``"5GB"``, ``"500MB"``, ``"10GiB"``...; see
        :func:`~lorasmith.ops._diffusers_weights.parse_shard_size`): larger models are written as
        ``save_pretrained`` shards with an index. Default: one file per model (a folder input keeps its
        shards). A single-file output is never sharded (its loaders read one file): a :class:`UsageError`.
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
        raise UsageError(f"--lossy-rank {lossy_rank} must be at least 1", hint="give a rank such as 16")
    word = to.strip().lower() if to is not None else None
    layout = LAYOUT_WORDS.get(word) if word is not None else None
    shard: int | None = None
    if shard_size is not None:
        from lorasmith.ops._diffusers_weights import parse_shard_size

        shard = parse_shard_size(shard_size)
        if layout != "diffusers":
            # Why no sharded single file: its loaders (ComfyUI, A1111/Forge, diffusers' from_single_file)
            # read one file, and the loaders that join shards through an index (from_pretrained) need the
            # diffusers layout and configs: a folder is the sharded form of a checkpoint.
            raise UsageError(
                "--shard-size applies to --to diffusers: a single-file output is written as one file",
                hint="ComfyUI, A1111/Forge and from_single_file load no shards; drop --shard-size, or write "
                "a diffusers folder with --to diffusers --shard-size SIZE",
            )
    if src.is_dir():
        if layout is not None:
            return _convert_layout(src, Path(output), layout, dtypes, arch, shard, overwrite, prog)
        if word is not None and word != "keep":
            raise UsageError(
                f"{src}: --to {to} names a LoRA spelling, but this folder is a diffusers checkpoint",
                hint="use --to single to write the folder as one file",
            )
        raise InvalidFileError(f"{src}: is a folder", hint="a diffusers folder converts with --to single")
    kind = _input_kind(src)
    is_lora = False
    if kind == "safetensors":
        from lorasmith.archs.base import lora_modules
        from lorasmith.io.header import read_header

        is_lora = bool(lora_modules(read_header(src).tensors))
    if layout is not None and not is_lora:
        return _convert_layout(src, Path(output), layout, dtypes, arch, shard, overwrite, prog)
    if kind == "index":
        raise UsageError(
            f"{src}: a shard index is converted with --to single (or --to diffusers)",
            hint="add --to single to write the sharded model as one file",
        )
    from lorasmith.io.writer import check_output_path

    check_output_path(output, overwrite=overwrite, inputs=[src])
    if kind == "pickle":
        if word is not None and word != "keep":
            raise UsageError(
                f"{src}: --to {to} names a LoRA spelling, which a pickle cannot be converted to directly",
                hint=f"convert it to .safetensors first (-o x.safetensors), then convert that with --to {to}",
            )
        from lorasmith.ops.pickles import pickle_to_safetensors

        return pickle_to_safetensors(
            src, Path(output), dtypes=dtypes, arch=arch, overwrite=overwrite, progress=prog
        )
    if is_lora:
        if layout is not None and layout != "diffusers":
            raise UsageError(
                f"{src}: --to {to} is a checkpoint layout, but this file is a LoRA",
                hint="give a LoRA spelling: comfy, kohya, peft, aitk, musubi, onetrainer, lycoris, keep",
            )
        if shard is not None:
            raise UsageError(
                "--shard-size applies to checkpoints written as diffusers folders, and this file is a LoRA",
                hint="drop --shard-size",
            )
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
    if word is not None and word != "keep":
        raise UsageError(
            f"{src}: --to {to} names a LoRA spelling, but this file is a checkpoint",
            hint="use --to diffusers or single for a layout, --dtype (or a per-component dtype) to cast",
        )
    if all(v is None for v in dtypes.values()):
        raise UsageError(
            f"{src}: nothing to do for a checkpoint",
            hint="give --dtype (or --unet-dtype/--te-dtype/--vae-dtype), or --to diffusers",
        )
    return convert_checkpoint_dtype(
        src, Path(output), dtypes=dtypes, arch=arch, overwrite=overwrite, progress=prog
    )


def _input_kind(src: Path) -> Literal["pickle", "index", "safetensors"]:
    """What a file input is, from its name: a pickle, a shard index, or (else) a safetensors file."""
    if src.name.endswith(".index.json"):
        return "index"  # the shard index of one model of a diffusers folder (safetensors or .bin shards)
    return "pickle" if _is_pickle(src) else "safetensors"


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.(?P<ext>safetensors|bin)$")


def _refuse_lone_shard(src: Path) -> None:
    """A layout conversion of one shard of a sharded model would miss the other shards' tensors."""
    m = _SHARD_NAME.match(src.name)
    if m is None:
        return
    index = src.parent / f"{m.group('stem')}.{m.group('ext')}.index.json"
    if index.is_file():
        raise UsageError(
            f"{src}: one shard of a sharded model", hint=f"give its index {index.name} or the whole folder"
        )


def _convert_layout(
    src: Path,
    output: Path,
    word: str,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    shard: int | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Change a checkpoint's layout: single file <-> diffusers folder (see :mod:`lorasmith.ops.layouts`).

    ``word`` is ``diffusers`` or ``single``. The input is a safetensors file, a pickle, a shard index or a
    diffusers folder; its family and layout are detected from its (main model's) tensors.
    """
    from lorasmith.ops._diffusers_weights import open_weights
    from lorasmith.ops.layouts import main_header
    from lorasmith.registry import get_registry

    if src.is_dir() and word == "diffusers":
        if shard is None and all(v is None for v in dtypes.values()):
            raise UsageError(
                f"{src}: already a diffusers folder",
                hint="give --dtype or --shard-size to recast or reshard it into another folder, "
                "or use --to single to write it as one file",
            )
        return _reshard_folder(src, output, dtypes, arch, shard, overwrite, progress)
    _refuse_lone_shard(src)
    if word == "diffusers":
        from lorasmith.ops.layouts import check_folder_output

        check_folder_output(output, overwrite, src)
    else:
        from lorasmith.io.writer import check_output_path

        check_output_path(output, overwrite=overwrite, inputs=[src])
    reg = get_registry()
    weights: ModelWeights | None = None
    try:
        if src.is_dir():
            header = main_header(src)
        else:
            # a safetensors header, every shard's header, or the pickle loaded once (through the safe loader)
            weights = open_weights(src)
            header = weights.header
        det = reg.detect(header, arch=arch, source=str(header.path))
        if det.kind == "lora":
            raise InvalidFileError(
                f"{src}: this is a LoRA, not a checkpoint",
                hint="--to diffusers/single are checkpoint layouts; "
                + (
                    "a LoRA pickle converts to .safetensors first (no --to)"
                    if _is_pickle(src)
                    else "give a LoRA spelling with --to"
                ),
            )
        family = reg.get(det.arch)
        canonical = family.canonical_inventory(det.variant).layout == det.layout
        if word == "diffusers":
            if not canonical:
                raise UsageError(
                    f"{src}: already in the {det.layout} layout", hint="use --to single to go back"
                )
            assert weights is not None
            return _to_diffusers(
                src, output, weights, family, det.variant, dtypes, shard, overwrite, progress
            )
        if not canonical:
            if weights is not None:
                weights.close()  # LayoutSource reads the file again, tensor by tensor
                weights = None
            return _to_single(src, output, family, det.variant, dtypes, overwrite, progress)
        assert weights is not None
        if weights.kind == "pickle":
            weights.close()
            weights = None
            from lorasmith.ops.pickles import pickle_to_safetensors

            # a single-file checkpoint in a pickle: written as safetensors, exactly as without --to
            result = pickle_to_safetensors(
                src, output, dtypes=dtypes, arch=arch, overwrite=overwrite, progress=progress
            )
            result.to_spelling = "single"
            return result
        if weights.kind == "safetensors":
            if all(v is None for v in dtypes.values()):
                raise UsageError(
                    f"{src}: already a single-file checkpoint",
                    hint="use --to diffusers, or --dtype to cast it",
                )
            weights.close()
            weights = None
            result = convert_checkpoint_dtype(
                src, output, dtypes=dtypes, arch=arch, overwrite=overwrite, progress=progress
            )
            result.to_spelling = "single"
            return result
        # the shards of a single-file checkpoint: joined into one file
        return _join_shards(src, output, weights, family.id, det.variant, dtypes, overwrite, progress)
    finally:
        if weights is not None:
            weights.close()


def _components(family: Architecture, variant: str | None, keys: Iterable[str]) -> dict[str, str | None]:
    """Component of every canonical key (from the family's canonical inventory prefixes)."""
    inv = family.canonical_inventory(variant)
    return {k: inv.component_of(k) for k in keys}


def _dtype_record(dtypes: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in dtypes.items() if v is not None}


def _join_shards(
    src: Path,
    output: Path,
    weights: ModelWeights,
    family: str,
    variant: str | None,
    dtypes: Mapping[str, str | None],
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write a single-file checkpoint stored as shards (``src`` is their index) as one file."""
    from lorasmith.registry import get_registry

    keys = weights.order()
    targets = component_dtypes(keys, dtypes, _components(get_registry().get(family), variant, keys))
    record: dict[str, object] = {"layout": "single"}
    if _dtype_record(dtypes):
        record["dtype"] = _dtype_record(dtypes)
    result = write_streaming(
        src,
        output,
        keys=keys,
        specs={k: (i.dtype, tuple(i.shape)) for k, i in weights.tensors.items()},
        get=weights.get,
        targets=targets,
        metadata=weights.metadata,
        record=record,
        family=family,
        variant=variant,
        overwrite=overwrite,
        progress=progress,
        inputs=weights.files,
        recipes=_weights_recipes(weights, keys),
        input_bytes=_files_bytes(weights.files),
    )
    result.to_spelling = "single"
    return result


def _weights_recipes(weights: ModelWeights, keys: Iterable[str]) -> dict[str, Recipe] | None:
    """Each tensor of ``weights`` whole, for :func:`~lorasmith.ops._convert_dtype.cast_stream`; ``None``
    for pickles (read whole, one tensor at a time) or when the pipeline is off."""
    if not (weights.streamable and PIPELINE):
        return None
    return {k: Recipe((weights.piece(k),)) for k in keys}


def _to_single(
    src: Path,
    output: Path,
    family: Architecture,
    variant: str | None,
    dtypes: Mapping[str, str | None],
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write a diffusers folder (or one of its weights files, shard indexes or pickles) as the canonical
    single file, casting per component on the way (the counterpart of :func:`_to_diffusers`).

    Every model of the folder that the family maps is read (a UNet-only folder gives a UNet-only file);
    ``lorasmith_extras.safetensors`` puts back what the diffusers layout has no place for.
    """
    from lorasmith.ops.layouts import LayoutSource, diffusers_inventory

    inv = diffusers_inventory(family, variant)
    with LayoutSource(src, family, inv) as source:
        if not source.keys:
            raise InvalidFileError(f"{src}: no {family.name} tensors found", hint="give a diffusers folder")
        meta = {k: v for k, v in source.metadata.items() if k != RECORD_KEY}
        record: dict[str, object] = {"layout": "single"}
        if _dtype_record(dtypes):
            record["dtype"] = _dtype_record(dtypes)
        # storage order: each shard is read once; the writer's plan fixes the output's layout anyway
        keys = source.read_order()
        result = write_streaming(
            src,
            output,
            keys=keys,
            specs=source.specs,
            get=source.get,
            targets=component_dtypes(keys, dtypes, _components(family, variant, keys)),
            metadata=meta,
            record=record,
            family=family.id,
            variant=variant,
            overwrite=overwrite,
            progress=progress,
            inputs=source.paths,
            recipes=source.recipes() if source.streamable and PIPELINE else None,
            input_bytes=_files_bytes(source.paths),
        )
    canonical = family.canonical_inventory(variant)
    missing = [k for k in canonical.tensors if k not in source.specs and k not in canonical.optional]
    if missing:
        result.warnings.append(
            f"{len(missing)} single-file tensor(s) were not in the input, e.g. {missing[0]}"
        )
    result.to_spelling = "single"
    return result


def _to_diffusers(
    src: Path,
    output: Path,
    weights: ModelWeights,
    family: Architecture,
    variant: str | None,
    dtypes: Mapping[str, str | None],
    shard: int | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write the single-file checkpoint ``weights`` (a safetensors file, its shards or a pickle) as a
    diffusers folder ``output``, casting per component and sharding each model's weights on the way.

    The folder's files, configs and extras are those of :mod:`lorasmith.ops.layouts`; each model's
    weights go through a :class:`~lorasmith.ops._diffusers_weights.ModelWeightsWriter` (one file, or
    shards of at most ``shard`` bytes with their index), inside a
    :class:`~lorasmith.ops.layouts.TempFolder` that appears whole on success and vanishes on any error or
    interrupt.
    """
    from lorasmith.ops._diffusers_configs import folder_configs
    from lorasmith.ops._diffusers_weights import ModelWeightsWriter, write_json
    from lorasmith.ops.layouts import (
        EXTRAS_NAME,
        TempFolder,
        default_subfolder,
        diffusers_inventory,
        layout_parts,
        layout_recipes,
        plan_folder,
        split_layout_key,
        to_layout,
        weights_file_name,
    )

    inv = diffusers_inventory(family, variant)
    mapping = family.layout_map(inv.id)
    default = default_subfolder(inv)
    # a key of any variant's single file is known (an SD3.5 file with SD3 Medium's text encoders); those
    # without a place in the layout are kept in the extras file
    known = {k for i in family.inventories() if i.canonical for k in i.tensors}
    unknown = [k for k in weights.tensors if k not in mapping and k not in known]
    if unknown and scaled_fp8_weights(weights.tensors):
        raise InvalidFileError(
            f"{src}: a scaled FP8 checkpoint (weights stored as FP8 times their '.scale_weight'), which the "
            "diffusers layout has no place for",
            hint="dequantize it first (convert FILE -o plain.safetensors --dtype bf16), then convert that",
        )
    if unknown:
        raise InvalidFileError(
            f"{src}: {len(unknown)} tensor(s) are not {family.name} single-file keys, e.g. {unknown[0]!r}",
            hint="give the family's original single-file checkpoint (no prefix)",
        )
    keys = list(weights.tensors)
    stored = {k: (i.dtype, tuple(i.shape)) for k, i in weights.tensors.items()}
    targets = component_dtypes(keys, dtypes, _components(family, variant, keys))
    specs = {k: (_cast_target(st, targets.get(k)), shape) for k, (st, shape) in stored.items()}
    plans, order, extras = plan_folder(family, mapping, default, specs)
    record: dict[str, object] = {"layout": inv.layout}
    if _dtype_record(dtypes):
        record["dtype"] = _dtype_record(dtypes)
    if shard is not None:
        record["shard_size"] = shard
    record_json = json.dumps(record, separators=(",", ":"), sort_keys=True)
    main_meta = {
        k: v
        for k, v in weights.metadata.items()
        if k not in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", RECORD_KEY)
    }
    main_meta[RECORD_KEY] = record_json
    # the configs come from the planned shapes alone: made first, so that an incomplete checkpoint fails
    # before anything is written
    shapes = {sub: {k: s for k, (_, s) in plan.items()} for sub, plan in plans.items()}
    config_dtypes = {sub: _first_float(plan) for sub, plan in plans.items() if plan}
    try:
        configs = folder_configs(family.id, variant, shapes, config_dtypes)
    except KeyError as exc:
        raise InvalidFileError(
            f"{src}: an incomplete {family.name} checkpoint: {exc.args[0]!r} is missing "
            "(the diffusers configs are read from the shapes of every model's tensors)",
            hint="give the complete single-file checkpoint",
        ) from None
    file_bytes = 0
    main_hash: str | None = None
    shards: dict[str, int] = {}
    stats = CastStats()
    # progress per output tensor (a fused tensor's parts each count), streamed or not
    tick = _ticker(progress, sum(len(p) for p in plans.values()) + len(extras))
    streamed = weights.streamable and PIPELINE
    memory = 0
    if streamed:
        from lorasmith.io.pipeline import memory_budget

        memory = memory_budget(_files_bytes(weights.files))

    def read(key: str) -> torch.Tensor:
        t, cs = cast_tensor(weights.get(key), specs[key][0] if specs[key][0] != stored[key][0] else None)
        stats.add(cs)
        return t

    def fill(recipes: Mapping[str, Recipe]) -> Callable[[SafetensorsWriter], None]:
        return lambda writer: cast_stream(writer, recipes, stats, memory=memory, on_tensor=tick)

    # built under a hidden name and renamed into place; any exit before that removes it (TempFolder)
    with TempFolder(output) as folder:
        tmp = folder.path
        for sub, plan in plans.items():
            (tmp / sub).mkdir()
            meta = main_meta if sub == default else {RECORD_KEY: record_json}
            with ModelWeightsWriter(
                tmp / sub, weights_file_name(sub), plan=plan, metadata=meta, max_shard_size=shard
            ) as w:
                if streamed:
                    # each layout tensor is a few element ranges of its canonical tensor: streamed in parts
                    recipes: dict[str, Recipe] = {}
                    for key in order[sub]:
                        for part, recipe in layout_recipes(mapping[key], weights.piece(key), stored[key][1]):
                            recipes[split_layout_key(part, default)[1]] = recipe
                    w.stream(fill(recipes))
                else:
                    for key in order[sub]:
                        entry = mapping[key]
                        t = to_layout(read(key), entry)
                        start = 0
                        for part, rows in layout_parts(entry, t.shape[entry.dim]):
                            name = split_layout_key(part, default)[1]
                            w.write(name, t.narrow(entry.dim, start, rows).contiguous())
                            start += rows
                            tick(name)
                        del t
                written = w.close()
            file_bytes += written.file_bytes
            shards[sub] = len(written.files)
            if sub == default:
                main_hash = written.sshs_model_hash
        if extras:
            from lorasmith.io.writer import SafetensorsWriter

            plan = {k: specs[k] for k in extras}
            with SafetensorsWriter(tmp / EXTRAS_NAME, metadata={RECORD_KEY: record_json}, plan=plan) as ew:
                if streamed:
                    fill({k: Recipe((weights.piece(k),)) for k in extras})(ew)
                else:
                    for key in extras:
                        ew.write(key, read(key))
                        tick(key)
                file_bytes += ew.close().file_bytes
        for rel, cfg in configs.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write_json(tmp / rel, cfg)
        folder.commit()
    untouched = sum(1 for k in keys if specs[k][0] == stored[k][0])
    return ConvertResult(
        kind="checkpoint",
        input=str(src),
        output=str(output),
        arch=family.id,
        variant=variant,
        to_spelling=inv.layout,
        tensors=sum(len(p) for p in plans.values()) + len(extras),
        dtypes=_plan_dtype_counts(
            [spec for p in plans.values() for spec in p.values()] + [specs[k] for k in extras]
        ),
        cast=_report(stats, untouched),
        file_bytes=file_bytes,
        sshs_model_hash=main_hash,
        shards=shards,
        warnings=_folder_warnings(family.id, plans, extras, EXTRAS_NAME),
    )


# ------------------------------------------------------------------------------- folder -> folder
def _model_component(name: str) -> str | None:
    """The ``--*-dtype`` group of a diffusers model by its subfolder name (``None``: ``--dtype`` only)."""
    if name in UNET_COMPONENTS:
        return "unet"
    if name.startswith("text_encoder"):
        return "te"
    return "vae" if name in VAE_COMPONENTS else None


def _folder_family(
    models: Mapping[str, ModelWeights], arch: str | None
) -> tuple[Architecture | None, str | None, str | None]:
    """``(family, variant, layout)`` of a diffusers folder from its main model; ``None``\\ s when unknown
    (a folder of another model type is resharded and recast all the same). A given ``arch`` must fit."""
    from lorasmith.errors import DetectionError
    from lorasmith.ops.layouts import MAIN_SUBFOLDERS
    from lorasmith.registry import get_registry

    main = next((models[s] for s in (*MAIN_SUBFOLDERS, ".") if s in models), None)
    if main is None:
        return None, None, None
    reg = get_registry()
    try:
        det = reg.detect(main.header, arch=arch, source=str(main.path))
    except DetectionError:
        if arch is not None:
            raise
        return None, None, None
    if det.kind != "checkpoint":
        raise InvalidFileError(
            f"{main.path}: this is a LoRA, not a checkpoint", hint="give a diffusers folder"
        )
    return reg.get(det.arch), det.variant, det.layout


def _reshard_folder(
    src: Path,
    output: Path,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    shard: int | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write diffusers folder ``src`` as folder ``output``: each model's weights recast and/or resharded,
    every other file copied unchanged (``docs/convert.md``, "Resharding or recasting a diffusers folder").

    The models are the folder itself and its immediate subfolders that hold weights (in any form
    :func:`~lorasmith.ops._diffusers_weights.find_weights` reads). Each is written as safetensors under
    ``save_pretrained``'s name for its kind, in shards of at most ``shard`` bytes, or, without ``shard``,
    in the same shards as the input (a model in one file stays one file). ``lorasmith_extras.safetensors``
    is recast like a model. Everything is written inside a :class:`~lorasmith.ops.layouts.TempFolder`, so
    the output appears whole or not at all.
    """
    from lorasmith.ops._diffusers_weights import find_weights, open_weights
    from lorasmith.ops.layouts import EXTRAS_NAME, check_folder_output

    check_folder_output(output, overwrite, src)
    models: dict[str, ModelWeights] = {}
    extras: TensorFile | None = None
    try:
        for folder in [src, *sorted(p for p in src.iterdir() if p.is_dir())]:
            found = find_weights(folder)
            if found is not None:
                models["." if folder == src else folder.name] = open_weights(*found)
        if (src / EXTRAS_NAME).is_file():
            from lorasmith.io.reader import open_tensors

            extras = open_tensors(src / EXTRAS_NAME)
        if not models:
            raise InvalidFileError(
                f"{src}: no model weights in this folder",
                hint="give a diffusers folder (a subfolder per model) or one model's folder",
            )
        family, variant, layout = _folder_family(models, arch)
        return _write_resharded(
            src,
            output,
            models,
            extras,
            (family, variant, layout),
            dtypes,
            shard,
            progress,
        )
    finally:
        for w in models.values():
            w.close()
        if extras is not None:
            extras.close()


def _write_resharded(
    src: Path,
    output: Path,
    models: Mapping[str, ModelWeights],
    extras: TensorFile | None,
    detected: tuple[Architecture | None, str | None, str | None],
    dtypes: Mapping[str, str | None],
    shard: int | None,
    progress: ProgressCallback,
) -> ConvertResult:
    """The body of :func:`_reshard_folder`, with the models (subfolder, ``.`` for the folder itself) open."""
    from lorasmith.io.pipeline import memory_budget
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops._diffusers_weights import ModelWeightsWriter, safetensors_name
    from lorasmith.ops.layouts import EXTRAS_NAME, MAIN_SUBFOLDERS, TempFolder

    family, variant, layout = detected
    record: dict[str, object] = {"layout": layout or "diffusers"}
    if _dtype_record(dtypes):
        record["dtype"] = _dtype_record(dtypes)
    if shard is not None:
        record["shard_size"] = shard
    record_json = json.dumps(record, separators=(",", ":"), sort_keys=True)
    stale = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", RECORD_KEY)
    stats = CastStats()
    counts: dict[str, int] = {}
    untouched = 0
    files = [p for w in models.values() for p in w.files] + ([extras.path] if extras is not None else [])
    memory = memory_budget(_files_bytes(files))
    total = sum(len(w.tensors) for w in models.values()) + (len(extras) if extras is not None else 0)
    tick = _ticker(progress, total)
    main = next((s for s in (*MAIN_SUBFOLDERS, ".") if s in models), None)
    file_bytes = 0
    main_hash: str | None = None
    shards: dict[str, int] = {}

    def plan_of(
        keys: list[str], specs: Mapping[str, tuple[str, tuple[int, ...]]], comps: Mapping[str, str | None]
    ) -> dict[str, tuple[str, tuple[int, ...]]]:
        nonlocal untouched
        targets = component_dtypes(keys, dtypes, comps)
        plan = {k: (_cast_target(specs[k][0], targets.get(k)), specs[k][1]) for k in keys}
        for k in keys:
            counts[plan[k][0]] = counts.get(plan[k][0], 0) + 1
            untouched += plan[k][0] == specs[k][0]
        return plan

    def whole(
        get: Callable[[str], torch.Tensor], plan: Mapping[str, tuple[str, tuple[int, ...]]]
    ) -> Callable[[str], torch.Tensor]:
        def read(key: str) -> torch.Tensor:
            t = get(key)
            new, cs = cast_tensor(t, plan[key][0] if plan[key][0] != _st_dtype(t) else None)
            stats.add(cs)
            return new

        return read

    with TempFolder(output) as folder:
        tmp = folder.path
        for sub, weights in models.items():
            keys = weights.order()  # storage order: shard by shard, as save_pretrained filled them
            specs = {k: (weights.tensors[k].dtype, tuple(weights.tensors[k].shape)) for k in keys}
            comp = _model_component(src.name if sub == "." else sub)
            plan = plan_of(keys, specs, dict.fromkeys(keys, comp))
            groups = None
            if shard is None and weights.kind.endswith("shards"):
                by_file: dict[Path, list[str]] = {}
                for k in keys:
                    by_file.setdefault(weights.file_of(k), []).append(k)
                groups = list(by_file.values())
            meta = {k: v for k, v in weights.metadata.items() if k not in stale}
            meta[RECORD_KEY] = record_json
            target = tmp if sub == "." else tmp / sub
            target.mkdir(exist_ok=True)
            with ModelWeightsWriter(
                target,
                safetensors_name(weights.path),
                plan=plan,
                metadata=meta,
                max_shard_size=shard,
                groups=groups,
            ) as w:
                if weights.streamable and PIPELINE:
                    recipes = {k: Recipe((weights.piece(k),)) for k in keys}

                    def fill(writer: SafetensorsWriter, recipes: Mapping[str, Recipe] = recipes) -> None:
                        cast_stream(writer, recipes, stats, memory=memory, on_tensor=tick)

                    w.stream(fill)
                else:
                    read = whole(weights.get, plan)
                    for k in keys:  # storage order: each pickle shard is loaded once
                        w.write(k, read(k))
                        tick(k)
                written = w.close()
            file_bytes += written.file_bytes
            shards[sub] = len(written.files)
            if sub == main:
                main_hash = written.sshs_model_hash
        if extras is not None:
            keys = list(extras.keys())
            specs = {k: (extras.info(k).dtype, tuple(extras.info(k).shape)) for k in keys}
            comps = _components(family, variant, keys) if family is not None else dict.fromkeys(keys)
            plan = plan_of(keys, specs, comps)
            meta = {k: v for k, v in extras.metadata.items() if k not in stale}
            meta[RECORD_KEY] = record_json
            with SafetensorsWriter(tmp / EXTRAS_NAME, metadata=meta, plan=plan) as ew:
                if PIPELINE:
                    recipes = {k: Recipe((whole_piece(extras, k),)) for k in keys}
                    cast_stream(ew, recipes, stats, memory=memory, on_tensor=tick)
                else:
                    read = whole(extras.get, plan)
                    for k in keys:
                        ew.write(k, read(k))
                        tick(k)
                file_bytes += ew.close().file_bytes
        copied, warnings = _copy_other_files(src, tmp, models, progress)
        folder.commit()
    return ConvertResult(
        kind="checkpoint",
        input=str(src),
        output=str(output),
        arch=family.id if family is not None else None,
        variant=variant,
        to_spelling=layout or "diffusers",
        tensors=total,
        dtypes=dict(sorted(counts.items())),
        cast=_report(stats, untouched),
        file_bytes=file_bytes,
        sshs_model_hash=main_hash,
        shards=shards,
        copied=copied,
        warnings=warnings,
    )


def _st_dtype(t: torch.Tensor) -> str:
    from lorasmith.io.dtypes import safetensors_dtype

    return safetensors_dtype(t.dtype)


def _copy_other_files(
    src: Path, dst: Path, models: Mapping[str, ModelWeights], progress: ProgressCallback
) -> tuple[int, list[str]]:
    """Copy every file of folder ``src`` into ``dst`` but the models' weights; ``(files copied, warnings)``.

    Links are followed (a Hugging Face cache snapshot is links into its blob store): their content is
    copied, with the mode and times of what they point to. Weights files of a model that were not read (a
    variant beside the untagged weights) are left out, with a warning. A broken link is an error; anything
    that is no file (a pipe, a socket) is left out with a warning.
    """
    import shutil
    import stat

    from lorasmith.ops._diffusers_weights import is_weights_name
    from lorasmith.ops.layouts import EXTRAS_NAME

    read = {p.resolve() for w in models.values() for p in w.files}
    model_dirs = {(src if sub == "." else src / sub).resolve() for sub in models}
    todo: list[tuple[Path, Path]] = []
    left_out: list[str] = []
    odd: list[str] = []
    seen: set[Path] = set()
    for root, dirs, names in os.walk(src, followlinks=True):
        here = Path(root)
        real = here.resolve()
        if real in seen:  # a folder link back up the tree: copied once
            dirs[:] = []
            continue
        seen.add(real)
        rel = here.relative_to(src)
        (dst / rel).mkdir(exist_ok=True)
        for name in sorted(names):
            path = here / name
            if path.resolve() in read or (rel == Path(".") and name == EXTRAS_NAME):
                continue
            if real in model_dirs and is_weights_name(name):
                left_out.append((rel / name).as_posix())
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                raise InvalidFileError(
                    f"{path}: cannot be read ({exc.strerror or exc})",
                    hint="a broken link is an incomplete download: download the folder again",
                ) from None
            if not stat.S_ISREG(mode):
                odd.append((rel / name).as_posix())
                continue
            todo.append((path, dst / rel / name))
    for i, (a, b) in enumerate(todo):
        try:
            shutil.copy2(a, b)
        except OSError as exc:
            raise InvalidFileError(
                f"{a}: cannot be copied ({exc.strerror or exc})", hint="check the file and free disk space"
            ) from None
        progress(ProgressEvent("copying", i + 1, len(todo), b.relative_to(dst).as_posix()))
    warnings = []
    if left_out:
        warnings.append(
            f"{len(left_out)} weights file(s) of another variant not copied, e.g. {left_out[0]} "
            "(only the weights that were read are written)"
        )
    if odd:
        warnings.append(
            f"{len(odd)} entr{'y' if len(odd) == 1 else 'ies'} that are no files not copied, e.g. {odd[0]}"
        )
    return len(todo), warnings


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def _cast_target(stored: str, target: str | None) -> str:
    """The dtype a tensor stored as ``stored`` is written in: ``target`` for floating tensors."""
    return target if target is not None and stored in _FLOAT_DTYPES else stored


def _first_float(plan: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    dtypes = [dtype for dtype, _shape in plan.values()]
    return next((d for d in dtypes if d in _FLOAT_DTYPES), dtypes[0])


def _plan_dtype_counts(specs: list[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dtype, _shape in specs:
        out[dtype] = out.get(dtype, 0) + 1
    return dict(sorted(out.items()))


def _folder_warnings(
    family: str, plans: Mapping[str, object], extras: list[str], extras_name: str
) -> list[str]:
    """What a user of a freshly written diffusers folder should know (extras kept, what is not written)."""
    warnings = []
    if extras:
        warnings.append(
            f"{len(extras)} tensor(s) have no place in diffusers (e.g. {extras[0]}); kept in {extras_name}, "
            "which diffusers ignores and --to single restores"
        )
    if family in ("sd1", "sdxl", "sd3"):
        warnings.append("no tokenizer folders written: pass tokenizer= to from_pretrained or copy them")
    if family == "sd3":
        absent = [s for s in ("text_encoder", "text_encoder_2", "text_encoder_3") if s not in plans]
        if absent:
            # SD3.5 files ship without text encoders; SD3 Medium's come with CLIPs only, or with T5 too
            warnings.append(
                f"the file has no {'/'.join(absent)} (listed as [null, null] in model_index.json): pass "
                "them to from_pretrained, or text_encoder_3=None, tokenizer_3=None to run without T5"
            )
    return warnings


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
    from lorasmith.ops._convert_lora import KEEP_WORD, convert_lora_units, resolve_target_spelling
    from lorasmith.ops.loralib import load_lora, output_metadata, plan_units

    word = to if to is not None else ("keep" if dtype is not None else "comfy")
    # "keep" keeps every module's own name, not the detected (majority) spelling: a file that mixes
    # spellings (diffusers' convert_state_dict_to_kohya writes SDXL UNet modules over the diffusers tree and
    # text-encoder modules in kohya names) is cast as it is, none of its modules renamed
    keep = word.strip().lower() == KEEP_WORD
    stats = CastStats()
    with load_lora(src, arch=arch) as lora:
        family = lora.arch
        if family is None or keep:
            if family is None and not keep:
                # the detection's own words (no family matched, or which families match equally)
                why = next(iter(lora.warnings), "").removesuffix("; module names are kept as they are")
                for prefix in (f"{src.name}: ", f"{src}: "):
                    why = why.removeprefix(prefix)
                raise DetectionError(
                    f"{src}: the LoRA's family is unknown, so it cannot be written in another spelling"
                    + (f" ({why})" if why else ""),
                    hint="pass --arch to name the family",
                )
            spelling = lora.spelling
        else:
            spelling = resolve_target_spelling(family, word, lora.spelling)
        units = _dedupe(plan_units([(lora, 1.0)], spelling=None if keep or family is None else spelling))
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

        with _names_file(src):
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


@contextlib.contextmanager
def _names_file(src: Path) -> Iterator[None]:
    """Prefix a module's conversion error (``module 'x': a loha module has no exact PEFT form``) with the
    file it is in, as every other error of ``convert`` names its file."""
    from lorasmith.errors import AdapterError

    try:
        yield
    except LorasmithError as exc:
        if type(exc) not in (LorasmithError, AdapterError) or exc.message.startswith(f"{src}: "):
            raise
        raise type(exc)(f"{src}: {exc.message}", hint=exc.hint) from None


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
        raise InvalidFileError(
            "this is a LoRA, not a checkpoint",
            hint="convert a LoRA without --unet-dtype/--te-dtype/--vae-dtype",
        )
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
    scaled = scaled_fp8_weights(header.tensors)
    if scaled:
        return _dequantize_scaled(
            src, output, header, scaled, dtypes=dtypes, arch=arch, overwrite=overwrite, progress=progress
        )
    keys = list(header.tensors)
    comps, family, variant = key_components(keys, header, arch)
    targets = component_dtypes(keys, dtypes, comps)

    with open_tensors(src, header) as tf:
        return write_streaming(
            src,
            output,
            keys=keys,
            specs={k: (header.tensors[k].dtype, tuple(header.tensors[k].shape)) for k in keys},
            get=tf.get,
            recipes={k: Recipe((whole_piece(tf, k),)) for k in keys},
            input_bytes=header.file_size,
            targets=targets,
            metadata=dict(header.metadata),
            record={"dtype": {k: v for k, v in dtypes.items() if v is not None}},
            family=family,
            variant=variant,
            overwrite=overwrite,
            progress=progress,
        )


#: ComfyUI's scaled FP8 checkpoints: a ``scaled_fp8`` marker tensor, and beside a weight stored in FP8 its
#: ``scale_weight`` (the real weight is ``weight * scale_weight``) and ``scale_input`` (an activation scale)
SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def scaled_fp8_weights(tensors: Mapping[str, object]) -> dict[str, str]:
    """Weight key -> its ``scale_weight`` key, for every scaled weight of a ComfyUI scaled FP8 checkpoint
    (empty for any other file)."""
    out = {}
    for key in tensors:
        if key.endswith(".scale_weight"):
            weight = key[: -len(".scale_weight")] + ".weight"
            if weight in tensors:
                out[weight] = key
    return out


def _dequantize_scaled(
    src: Path,
    output: Path,
    header: Header,
    scaled: Mapping[str, str],
    *,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Cast a scaled FP8 checkpoint: each scaled weight is dequantized (``weight * scale_weight``, in float32)
    and cast to its target dtype; the scales and the marker are dropped, since the output holds plain weights
    that every loader reads. A tensor at a time (the scales make the streamed path inapplicable).

    :raises LorasmithError: a scaled weight without a non-FP8 target dtype (nothing to dequantize into), or a
        scale whose shape fits no row of its weight.
    """
    import torch

    from lorasmith.archs.base import SimpleKeyView, TensorSpec
    from lorasmith.io.reader import open_tensors

    drop = {k for k in header.tensors if k == SCALED_FP8_MARKER or k.endswith(_SCALE_SUFFIXES)}
    keys = [k for k in header.tensors if k not in drop]
    view = SimpleKeyView(
        {k: TensorSpec(tuple(header.tensors[k].shape), header.tensors[k].dtype) for k in keys}
    )
    comps, family, variant = key_components(keys, view, arch)
    targets = component_dtypes(keys, dtypes, comps)
    for weight in scaled:
        target = targets.get(weight)
        if target is None or target.startswith("F8"):
            raise LorasmithError(
                f"{src}: a scaled FP8 checkpoint ({len(scaled)} weights are stored as FP8 times their "
                f"'.scale_weight'), and {weight!r} has no wider target dtype to dequantize into",
                hint="give --dtype bf16 (or fp16/fp32) for every component: the weights are then multiplied "
                "by their scales and written as plain weights",
            )

    with open_tensors(src, header) as tf:

        def get(key: str) -> torch.Tensor:
            t = tf.get(key)
            scale_key = scaled.get(key)
            if scale_key is None:
                return t
            scale = tf.get(scale_key).to(torch.float32)
            w = t.to(torch.float32)
            if scale.numel() == 1:
                return w * scale.reshape(())
            if w.ndim >= 1 and scale.numel() == w.shape[0]:
                return w * scale.reshape(-1, *([1] * (w.ndim - 1)))
            raise LorasmithError(
                f"{src}: {scale_key!r} has shape {list(scale.shape)}, which fits no row of {key!r} "
                f"{list(w.shape)}",
                hint="only per-tensor and per-row scales are dequantized",
            )

        result = write_streaming(
            src,
            output,
            keys=keys,
            specs={k: (header.tensors[k].dtype, tuple(header.tensors[k].shape)) for k in keys},
            get=get,
            targets=targets,
            metadata=dict(header.metadata),
            record={"dtype": {k: v for k, v in dtypes.items() if v is not None}, "dequantized": len(scaled)},
            family=family,
            variant=variant,
            overwrite=overwrite,
            progress=progress,
            dropped=sorted(drop),
        )
    result.warnings.append(
        f"dequantized {len(scaled)} scaled FP8 weights (weight x scale_weight); dropped {len(drop)} scale "
        "tensors and markers"
    )
    return result


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
    inputs: Iterable[Path] | None = None,
    recipes: Mapping[str, Recipe] | None = None,
    input_bytes: int = 0,
) -> ConvertResult:
    """Write ``keys`` (read one at a time with ``get``) cast to ``targets`` through a planned writer.

    :param inputs: every file read (the output may be none of them); default ``[src]``.
    :param recipes: where every key's values are stored, when they all are in safetensors files (one
        file, shards, the models of a diffusers folder): the tensors then stream part by part through
        :func:`~lorasmith.ops._convert_dtype.cast_stream` (reading, casting, writing and hashing overlap)
        instead of whole tensors through ``get``; the output is the same, byte for byte.
    :param input_bytes: the size of the files read (sizes the pipeline's buffers).
    """
    from lorasmith.io.writer import SafetensorsWriter

    float_names = _FLOAT_DTYPES
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
    files = [src] if inputs is None else list(inputs)
    with SafetensorsWriter(output, metadata=meta, overwrite=overwrite, inputs=files, plan=plan) as writer:
        if recipes is not None and PIPELINE:
            from lorasmith.io.pipeline import memory_budget

            cast_stream(
                writer,
                recipes,
                stats,
                memory=memory_budget(input_bytes),
                on_tensor=_ticker(progress, len(keys)),
            )
        else:
            for i, k in enumerate(keys):
                t = get(k)
                new, cs = cast_tensor(t, plan[k][0] if plan[k][0] != specs[k][0] else None)
                del t  # one input tensor alive at a time (a pickle's state dict gives them up as read)
                stats.add(cs)
                writer.write(k, new)
                del new
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


def _ticker(progress: ProgressCallback, total: int, done: int = 0) -> Callable[[str], None]:
    """A per-tensor progress callback for the pipeline: ``("writing", done, total, name)`` events."""
    count = done

    def tick(name: str) -> None:
        nonlocal count
        count += 1
        progress(ProgressEvent("writing", count, total, name))

    return tick


def _files_bytes(paths: Iterable[Path]) -> int:
    """Total size of ``paths`` (0 for one that cannot be read: it only sizes buffers)."""
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total
