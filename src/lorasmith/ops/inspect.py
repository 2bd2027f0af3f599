"""``inspect``: what a file is, whether its keys load, and (optionally) per-block spectra.

The header-level part (everything but ``blocks`` and ``verify_hash``) reads only the safetensors header
and a few alpha scalars, and never imports torch, so a multi-GB checkpoint answers in milliseconds.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lorasmith.archs.base import Architecture, Detection, lora_modules
from lorasmith.errors import AdapterError, DetectionError, InvalidFileError
from lorasmith.io.header import Header, TensorInfo, read_header
from lorasmith.progress import ProgressCallback, ProgressEvent, noop
from lorasmith.registry import detect_part, get_registry

HashStatus = Literal["match", "mismatch", "missing", "lycoris-0x", "not-checked"]


class ModuleRow(BaseModel):
    """One LoRA module of the file."""

    name: str
    algo: str
    rank: int | None = None
    alpha: float | None = None
    spelling: str | None = None
    component: str | None = None
    target: str | None = None
    slice: tuple[int, int, int] | None = None
    block: str | None = None
    comfyui_loads: bool | None = None
    dora: bool = Field(default=False, description="whether the module has a DoRA magnitude")


class BlockRow(BaseModel):
    """Spectral summary of one (block, module type) group of a LoRA."""

    block: str
    type: str
    count: int
    mean_rank: float
    sv_max: float
    sv_min: float
    ratio: float | None = Field(description="sv_max / sv_min (None when sv_min is 0)")
    energy_half: float = Field(description="mean share of energy in the top half of each module's rank")


class LoraSummary(BaseModel):
    """LoRA-specific facts."""

    module_count: int
    algos: dict[str, int]
    ranks: dict[str, int]
    alphas: dict[str, int]
    spellings: dict[str, int]
    components: dict[str, int]
    parameters: int
    dora: int = Field(default=0, description="modules with a DoRA magnitude (any algorithm)")
    unresolved: list[str] = Field(default_factory=list, description="module names the family does not know")
    comfyui_unloaded: list[str] = Field(
        default_factory=list, description="modules ComfyUI would skip ('lora key not loaded')"
    )


class HashInfo(BaseModel):
    """Stored hashes and, with ``--verify-hash``, what recomputing them gave."""

    sshs_model_hash: str | None = None
    sshs_legacy_hash: str | None = None
    modelspec_hash_sha256: str | None = None
    status: HashStatus = "not-checked"
    computed_model_hash: str | None = None
    computed_legacy_hash: str | None = None


class InspectResult(BaseModel):
    """Everything ``inspect`` reports about one file."""

    path: str
    file_bytes: int
    kind: str
    arch: str | None
    arch_name: str | None = None
    variant: str | None
    confidence: float
    reason: str
    layout: str | None
    components: list[str]
    tensor_count: int
    parameters: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    training: dict[str, str] = Field(default_factory=dict, description="ss_* keys, JSON values shortened")
    modelspec: dict[str, str] = Field(default_factory=dict)
    hashes: HashInfo
    lora: LoraSummary | None = None
    modules: list[ModuleRow] | None = None
    blocks: list[BlockRow] | None = None
    unknown_keys: int = 0
    used_by: list[str] = Field(
        default_factory=list, description="a separate part (kind 'part'): the families that use it"
    )
    shards: int | None = Field(
        default=None, description="a shard index: how many shard files hold the model (None for a file)"
    )
    warnings: list[str] = Field(default_factory=list)


#: PEFT's DoRA magnitude suffixes (ComfyUI reads only ``.dora_scale``)
_PEFT_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.default")
#: metadata keys that hash one file's tensors
_FILE_HASH_KEYS = frozenset({"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"})
#: algorithms whose delta depends on the base weight (``--blocks`` has no spectrum for them)
_BASE_DEPENDENT = frozenset({"oft", "boft", "glora"})


# ------------------------------------------------------------------------------------------ scalars
_SCALAR_FORMATS = {
    "F64": "<d",
    "F32": "<f",
    "F16": "<e",
    "I64": "<q",
    "I32": "<i",
    "I16": "<h",
    "I8": "<b",
    "U8": "<B",
    "U16": "<H",
    "U32": "<I",
    "U64": "<Q",
}


def _e4m3fn(byte: int) -> float:
    """The value of one FP8 E4M3FN byte (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no inf)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _read_scalars(header: Header, names: list[str]) -> dict[str, float]:
    """Read small scalar tensors (alphas) straight from the file, without torch."""
    out: dict[str, float] = {}
    if not names:
        return out
    with open(header.path, "rb") as fh:
        for name in names:
            info: TensorInfo = header.tensors[name]
            if info.numel != 1:
                continue
            fh.seek(header.data_offset + info.start)
            raw = fh.read(info.end - info.start)
            if info.dtype == "BF16":
                value = struct.unpack("<f", b"\x00\x00" + raw)[0]
            elif info.dtype == "F8_E5M2":  # the high byte of a float16
                value = struct.unpack("<e", b"\x00" + raw)[0]
            elif info.dtype == "F8_E4M3":
                value = _e4m3fn(raw[0])
            elif info.dtype in _SCALAR_FORMATS:
                value = struct.unpack(_SCALAR_FORMATS[info.dtype], raw)[0]
            else:
                continue
            out[name] = float(value)
    return out


def _fmt_num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _short(value: str, limit: int = 200) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _training_view(metadata: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if not key.startswith("ss_"):
            continue
        if key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_bucket_info"):
            try:
                parsed = json.loads(value)
                size = len(parsed) if hasattr(parsed, "__len__") else 1
                out[key] = f"<{size} entries>"
                continue
            except (ValueError, TypeError):
                pass
        out[key] = _short(value)
    return out


# --------------------------------------------------------------------------- folders, shards, indexes
#: one shard of a sharded model: ``model-00001-of-00002.safetensors``
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def inspect_targets(path: str | Path) -> list[Path]:
    """What inspecting ``path`` describes: the file itself, or each model of a diffusers folder.

    A folder gives the weights of every model it holds (its own, then each subfolder's, by name), as
    ``convert`` finds them: the weights file, or the shard index of a sharded model (``unet/diffusion_
    pytorch_model.safetensors.index.json``), or a pickle (reported, not read).

    :raises InvalidFileError: a folder that holds no model weights (it is named as a directory).
    """
    p = Path(path)
    if not p.is_dir():
        return [p]
    from lorasmith.ops._diffusers_weights import find_weights

    out = []
    for folder in (p, *sorted(c for c in p.iterdir() if c.is_dir())):
        found = find_weights(folder)
        if found is not None:
            out.append(found[0])
    if not out:
        raise InvalidFileError(
            f"{p}: is a directory, not a file (and not a diffusers folder: no model weights in it)",
            hint="give a .safetensors file, or a diffusers folder (unet/, transformer/, vae/...)",
        )
    return out


def _index_header(path: Path) -> tuple[Header, int, int]:
    """The header of a sharded model (every shard's tensors), the bytes of its files and its shard count.

    :raises InvalidFileError: not a safetensors shard index, a missing shard, a tensor in two shards...
    """
    from lorasmith.ops._diffusers_weights import open_weights

    if ".bin.index" in path.name:
        raise InvalidFileError(
            f"{path}: the index of pickle (.bin) shards; inspect reads safetensors headers",
            hint="convert the model to safetensors first (convert FOLDER --to diffusers --dtype ...)",
        )
    with open_weights(path, "safetensors-shards") as weights:
        header = weights.header
        size = sum(f.stat().st_size for f in weights.files)
        return header, size, len(weights.files) - 1


def _lone_shard_warning(path: Path) -> str | None:
    """A warning for one shard of a model whose index lies next to it (it holds only part of the model)."""
    m = _SHARD_NAME.match(path.name)
    if m is None:
        return None
    index = path.with_name(f"{m.group('stem')}.safetensors.index.json")
    if not index.is_file():
        return None
    return (
        f"this is shard {int(m.group('index'))} of {int(m.group('count'))} of a sharded model: it holds only "
        f"part of the model; inspect {index.name} (or the folder) for the whole model"
    )


def _pickle_result(path: Path) -> InspectResult:
    """What inspect says of a pickle weights file of a diffusers folder (it reads no pickle)."""
    return InspectResult(
        path=str(path),
        file_bytes=path.stat().st_size,
        kind="unknown",
        arch=None,
        variant=None,
        confidence=0.0,
        reason="a pickle weights file: inspect reads safetensors headers only",
        layout=None,
        components=[],
        tensor_count=0,
        parameters=0,
        dtypes={},
        metadata={},
        hashes=HashInfo(),
        warnings=[
            "a pickle (.bin) is not read by inspect; lorasmith convert FOLDER --to diffusers --dtype ... "
            "writes the folder as safetensors"
        ],
    )


# ------------------------------------------------------------------------------------------- main
def inspect_path(
    path: str | Path,
    *,
    arch: str | None = None,
    keys: bool = False,
    verify_hash: bool = False,
    blocks: bool = False,
    device: str = "cpu",
    progress: ProgressCallback = noop,
) -> list[InspectResult]:
    """Describe a file, a shard index, or every model of a diffusers folder (:func:`inspect_targets`).

    The options are :func:`inspect_file`'s; a pickle weights file found in a folder is listed as such
    (kind ``unknown``, with a warning), not read.

    :raises lorasmith.errors.InvalidFileError: see :func:`inspect_file` and :func:`inspect_targets`.
    """
    p = Path(path)
    out = []
    for target in inspect_targets(p):
        if p.is_dir() and target.suffix == ".bin":
            out.append(_pickle_result(target))
            continue
        out.append(
            inspect_file(
                target,
                arch=arch,
                keys=keys,
                verify_hash=verify_hash,
                blocks=blocks,
                device=device,
                progress=progress,
            )
        )
    return out


def inspect_file(
    path: str | Path,
    *,
    arch: str | None = None,
    keys: bool = False,
    verify_hash: bool = False,
    blocks: bool = False,
    device: str = "cpu",
    progress: ProgressCallback = noop,
) -> InspectResult:
    """Describe one safetensors file.

    :param path: the file.
    :param arch: force the family instead of detecting it.
    :param keys: list every LoRA module (``modules`` in the result).
    :param verify_hash: recompute ``sshs_model_hash`` / ``sshs_legacy_hash`` and compare.
    :param blocks: per block group and module type spectra of a LoRA (loads tensors; needs torch).
    :param device: where ``blocks`` computes.
    :param progress: progress callback.
    :raises lorasmith.errors.InvalidFileError: the file is not a valid safetensors file (or shard index).
    """
    p = Path(path)
    warnings: list[str] = []
    index = p.name.endswith(".index.json") and p.is_file()
    if index:
        # a sharded model: the shards' headers together are the model (detection sees every tensor)
        header, file_bytes, shards = _index_header(p)
    else:
        shards = None
        header = read_header(p)
        file_bytes = header.file_size
        shard_warning = _lone_shard_warning(p)
        if shard_warning is not None:
            warnings.append(shard_warning)
    reg = get_registry()
    det: Detection | None = None
    # a separate part (VAE, text encoder) is reported as such, with every family that uses it: a CLIP-L
    # file matching SD1, SDXL, FLUX and SD3 alike is no ambiguity (lorasmith.archs.parts)
    part = detect_part(header) if arch is None else None
    try:
        det = reg.detect(header, arch=arch, source=str(path)) if part is None else None
    except DetectionError as exc:
        warnings.append(exc.message + (f" ({exc.hint})" if exc.hint else ""))
    family: Architecture | None = reg.get(det.arch) if det is not None and det.arch else None

    dtypes = Counter(info.dtype for info in header.tensors.values())
    params = sum(info.numel for info in header.tensors.values())
    metadata = dict(header.metadata)
    if index:
        # the first shard's metadata: its hashes are that shard's, not the model's
        metadata = {k: v for k, v in metadata.items() if k not in _FILE_HASH_KEYS}
    result = InspectResult(
        path=str(path),
        file_bytes=file_bytes,
        kind=det.kind if det else ("lora" if lora_modules(header.tensors) else "unknown"),
        arch=det.arch if det else None,
        arch_name=family.name if family else None,
        variant=det.variant if det else None,
        confidence=round(det.score, 4) if det else 0.0,
        reason=det.reason if det else "no family matched",
        layout=det.layout if det else None,
        components=list(det.components) if det else [],
        tensor_count=len(header.tensors),
        parameters=params,
        dtypes=dict(sorted(dtypes.items())),
        metadata={k: _short(v, 2000) for k, v in metadata.items()},
        training=_training_view(metadata),
        modelspec={
            k.removeprefix("modelspec."): _short(v) for k, v in metadata.items() if k.startswith("modelspec.")
        },
        hashes=HashInfo(
            sshs_model_hash=metadata.get("sshs_model_hash"),
            sshs_legacy_hash=metadata.get("sshs_legacy_hash"),
            modelspec_hash_sha256=metadata.get("modelspec.hash_sha256"),
        ),
        warnings=warnings,
        shards=shards,
    )
    if part is not None:
        result.kind = "part"
        owner = reg.archs().get(part.users[0]) if len(part.users) == 1 else None
        result.arch = owner.id if owner is not None else None
        result.arch_name = owner.name if owner is not None else None
        result.confidence = round(part.score, 4)
        result.reason = part.reason
        result.layout = "separate"
        result.components = [part.kind]
        result.used_by = list(part.users)
    if det is not None and det.kind == "checkpoint" and family is not None and det.total:
        result.unknown_keys = det.total - det.matched
        if result.unknown_keys:
            _claim_parts(result, header, family, det)
        scales = [
            k for k in header.tensors if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input"))
        ]
        if scales and any(k.endswith(".scale_weight") for k in scales):
            result.unknown_keys = max(0, result.unknown_keys - len(scales))
            result.confidence = round(min(1.0, (det.total - result.unknown_keys) / det.total), 4)
            n_scaled = sum(k.endswith(".scale_weight") for k in scales)
            warnings.append(
                f"a scaled FP8 checkpoint (ComfyUI): {n_scaled} weights "
                "are stored as FP8 times their '.scale_weight'; tools that ignore the scales read them wrong "
                "(convert --dtype bf16 writes plain weights)"
            )
        if result.unknown_keys:
            warnings.append(f"{result.unknown_keys} tensor names are not in any known {family.name} layout")

    modules = lora_modules(header.tensors)
    if modules:
        problems: list[str] = []
        rows = _module_rows(header, modules, family, det.variant if det else None, problems, index)
        warnings.extend(problems[:10])
        if len(problems) > 10:
            warnings.append(f"... and {len(problems) - 10} more invalid modules")
        result.lora = _lora_summary(header, rows)
        if family is None:
            # no family (none matched, or several match equally): no module is known to be unloadable
            result.lora.unresolved = []
        if result.lora.unresolved:
            warnings.append(
                f"{len(result.lora.unresolved)} LoRA modules match no {family.name if family else 'known'} "
                f"module and would not load: {', '.join(result.lora.unresolved[:5])}"
                + (" ..." if len(result.lora.unresolved) > 5 else "")
            )
        magnitudes = {
            r.name
            for r in rows
            if any(s in modules[r.name] for s in _PEFT_MAGNITUDE) and r.target is not None
        }
        rejected = [n for n in result.lora.comfyui_unloaded if n not in magnitudes]
        if rejected:
            warnings.append(
                f"{len(rejected)} LoRA modules use a spelling ComfyUI does not load "
                f"('lora key not loaded'); {family.name if family else 'the family'} needs the "
                f"'{family.spellings[0] if family else 'kohya'}' spelling there"
            )
        if magnitudes:
            warnings.append(
                f"{len(magnitudes)} DoRA modules keep their magnitude as PEFT's lora_magnitude_vector, "
                "which ComfyUI does not read (it would apply them as plain LoRA); "
                "convert --to comfy writes dora_scale"
            )
        if keys:
            result.modules = rows
        if blocks and index:
            warnings.append("--blocks reads one LoRA file, not a shard index")
        elif blocks:
            from lorasmith.ops._spectra import block_spectra

            result.blocks = block_spectra(header, modules, rows, device=device, progress=progress)
            based = sum(1 for r in rows if r.dora or r.algo in _BASE_DEPENDENT)
            if based:
                warnings.append(
                    f"--blocks left out {based} module(s) whose delta depends on the base weight "
                    "(DoRA, OFT, GLoRA)"
                )
    elif blocks:
        warnings.append("--blocks summarises LoRA spectra; this file has no LoRA modules")

    if "sshs_model_hash" in metadata and metadata["sshs_model_hash"].startswith("0x"):
        result.hashes.status = "lycoris-0x"
        warnings.append("sshs_model_hash is a LyCORIS-style '0x...' value that A1111 does not use")
    if verify_hash and index:
        warnings.append("--verify-hash checks one file: give each shard to check its hashes")
    elif verify_hash:
        from lorasmith.io.hashes import sshs_hashes_of_file

        model_hash, legacy_hash = sshs_hashes_of_file(Path(path))
        result.hashes.computed_model_hash = model_hash
        result.hashes.computed_legacy_hash = legacy_hash
        stored = metadata.get("sshs_model_hash")
        if stored is None:
            result.hashes.status = "missing"
        elif stored.startswith("0x"):
            result.hashes.status = "lycoris-0x"
        else:
            ok = stored == model_hash and metadata.get("sshs_legacy_hash", legacy_hash) == legacy_hash
            result.hashes.status = "match" if ok else "mismatch"
            if not ok:
                warnings.append("stored sshs hashes do not match the file's tensors")
    result.warnings = warnings  # pydantic copied the list at construction
    progress(ProgressEvent("inspect", 1, 1, str(path)))
    return result


def _claim_parts(result: InspectResult, header: Header, family: Architecture, det: Detection) -> None:
    """Name the parts of an all-in-one checkpoint that the family's inventories leave out.

    A FLUX.1 or Z-Image single file as ComfyUI saves it (``model.diffusion_model.``, ``vae.``,
    ``text_encoders.clip_l.transformer.``...) holds parts that the family's layouts (the bare diffusion
    model) do not list; its single-file part slots (:attr:`Architecture.component_parts`, what ``convert
    --split`` writes) say where they live. Keys under a slot's prefix that no inventory of the family holds
    are that part's: it is added to ``components`` and they no longer count as unknown.
    """
    known: set[str] = set()
    for inv in family.inventories():
        known.update(inv.tensors)
    claimed: list[str] = []
    count = 0
    for slot in family.component_parts:
        if slot.kind is None:
            continue  # the diffusion model: what the layouts describe
        keys = [k for k in header.tensors if k.startswith(slot.prefix) and k not in known]
        if slot.outer is not None:
            keys += [
                slot.outer + k
                for k in slot.outer_keys
                if slot.outer + k in header.tensors and slot.outer + k not in known
            ]
        if keys:
            count += len(keys)
            claimed.append(slot.name)
    if not claimed:
        return
    result.unknown_keys = max(0, result.unknown_keys - count)
    result.components = [*result.components, *(c for c in claimed if c not in result.components)]
    if det.total:
        result.confidence = round(min(1.0, (det.matched + count) / det.total), 4)
    result.reason += f"; {count} more are its {', '.join(claimed)} part(s)"


def _module_rows(
    header: Header,
    modules: Mapping[str, Mapping[str, str]],
    family: Architecture | None,
    variant: str | None,
    problems: list[str],
    index: bool = False,
) -> list[ModuleRow]:
    from lorasmith.adapters.summary import module_summary

    alpha_keys = [keys[".alpha"] for keys in modules.values() if ".alpha" in keys]
    # a shard index's header has no file offsets to read alphas at
    alphas = {} if index else _read_scalars(header, alpha_keys)
    table = family.alias_table(variant) if family is not None else {}
    rejects = family.comfyui_rejects if family is not None else frozenset()
    rows = []
    # most modules of a file share a handful of (suffix, shape, dtype) signatures, and the algorithm and
    # rank depend on nothing else: analyse each signature once (errors are not cached: they name the module)
    known: dict[tuple[tuple[str, tuple[int, ...], str], ...], tuple[str, int | None, bool]] = {}
    for name, suffix_keys in sorted(modules.items()):
        shapes = {
            suffix: (header.tensors[key].shape, header.tensors[key].dtype)
            for suffix, key in suffix_keys.items()
        }
        signature = tuple(sorted((suffix, tuple(shape), dtype) for suffix, (shape, dtype) in shapes.items()))
        algo: str
        rank: int | None
        dora = False
        if signature in known:
            algo, rank, dora = known[signature]
        else:
            try:
                summary = module_summary(name, shapes)
                algo, rank, dora = known[signature] = (summary.algo, summary.rank, summary.has_dora)
            except AdapterError as exc:
                algo, rank = "invalid", None
                problems.append(exc.message)
        alias = table.get(name)
        alpha = alphas.get(suffix_keys[".alpha"]) if ".alpha" in suffix_keys else None
        rows.append(
            ModuleRow(
                name=name,
                algo=algo,
                rank=rank,
                alpha=None if alpha is None or math.isnan(alpha) else alpha,
                spelling=alias.spelling if alias else None,
                component=alias.component if alias else None,
                target=alias.target.key if alias else None,
                slice=alias.target.slice if alias else None,
                block=family.block_of(alias.target.key) if alias and family else None,
                # ComfyUI reads a DoRA magnitude only as kohya/LyCORIS ``.dora_scale``: PEFT's
                # ``.lora_magnitude_vector`` is "not loaded" and the module applied as a plain LoRA
                comfyui_loads=(
                    alias.spelling not in rejects and not any(s in suffix_keys for s in _PEFT_MAGNITUDE)
                )
                if alias
                else False,
                dora=dora,
            )
        )
    return rows


def _lora_summary(header: Header, rows: list[ModuleRow]) -> LoraSummary:
    params = 0
    for info in header.tensors.values():
        params += info.numel
    return LoraSummary(
        module_count=len(rows),
        algos=dict(Counter(r.algo for r in rows).most_common()),
        ranks={str(k): v for k, v in sorted(Counter(r.rank for r in rows if r.rank is not None).items())},
        alphas={
            _fmt_num(k): v for k, v in sorted(Counter(r.alpha for r in rows if r.alpha is not None).items())
        },
        spellings=dict(Counter(r.spelling or "unknown" for r in rows).most_common()),
        components=dict(Counter(r.component or "unknown" for r in rows).most_common()),
        parameters=params,
        dora=sum(1 for r in rows if r.dora),
        unresolved=[r.name for r in rows if r.target is None],
        comfyui_unloaded=[r.name for r in rows if r.target is not None and not r.comfyui_loads],
    )
