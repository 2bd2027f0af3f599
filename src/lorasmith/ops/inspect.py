"""``inspect``: what a file is, whether its keys load, and (optionally) per-block spectra.

The header-level part (everything but ``blocks`` and ``verify_hash``) reads only the safetensors header
and a few alpha scalars, and never imports torch, so a multi-GB checkpoint answers in milliseconds.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lorasmith.archs.base import Architecture, Detection, lora_modules
from lorasmith.errors import AdapterError, DetectionError
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
    warnings: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------ scalars
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i"}


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


# ------------------------------------------------------------------------------------------- main
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
    :raises lorasmith.errors.InvalidFileError: the file is not a valid safetensors file.
    """
    header = read_header(Path(path))
    reg = get_registry()
    warnings: list[str] = []
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
    result = InspectResult(
        path=str(path),
        file_bytes=header.file_size,
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
            warnings.append(f"{result.unknown_keys} tensor names are not in any known {family.name} layout")

    modules = lora_modules(header.tensors)
    if modules:
        problems: list[str] = []
        rows = _module_rows(header, modules, family, det.variant if det else None, problems)
        warnings.extend(problems[:10])
        if len(problems) > 10:
            warnings.append(f"... and {len(problems) - 10} more invalid modules")
        result.lora = _lora_summary(header, rows)
        if result.lora.unresolved:
            warnings.append(
                f"{len(result.lora.unresolved)} LoRA modules match no {family.name if family else 'known'} "
                f"module and would not load: {', '.join(result.lora.unresolved[:5])}"
                + (" ..." if len(result.lora.unresolved) > 5 else "")
            )
        if result.lora.comfyui_unloaded:
            warnings.append(
                f"{len(result.lora.comfyui_unloaded)} LoRA modules use a spelling ComfyUI does not load "
                f"('lora key not loaded'); {family.name if family else 'the family'} needs the "
                f"'{family.spellings[0] if family else 'kohya'}' spelling there"
            )
        if keys:
            result.modules = rows
        if blocks:
            from lorasmith.ops._spectra import block_spectra

            result.blocks = block_spectra(header, modules, rows, device=device, progress=progress)
    elif blocks:
        warnings.append("--blocks summarises LoRA spectra; this file has no LoRA modules")

    if "sshs_model_hash" in metadata and metadata["sshs_model_hash"].startswith("0x"):
        result.hashes.status = "lycoris-0x"
        warnings.append("sshs_model_hash is a LyCORIS-style '0x...' value that A1111 does not use")
    if verify_hash:
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


def _module_rows(
    header: Header,
    modules: Mapping[str, Mapping[str, str]],
    family: Architecture | None,
    variant: str | None,
    problems: list[str],
) -> list[ModuleRow]:
    from lorasmith.adapters.summary import module_summary

    alpha_keys = [keys[".alpha"] for keys in modules.values() if ".alpha" in keys]
    alphas = _read_scalars(header, alpha_keys)
    table = family.alias_table(variant) if family is not None else {}
    rejects = family.comfyui_rejects if family is not None else frozenset()
    rows = []
    # most modules of a file share a handful of (suffix, shape, dtype) signatures, and the algorithm and
    # rank depend on nothing else: analyse each signature once (errors are not cached: they name the module)
    known: dict[tuple[tuple[str, tuple[int, ...], str], ...], tuple[str, int | None]] = {}
    for name, suffix_keys in sorted(modules.items()):
        shapes = {
            suffix: (header.tensors[key].shape, header.tensors[key].dtype)
            for suffix, key in suffix_keys.items()
        }
        signature = tuple(sorted((suffix, tuple(shape), dtype) for suffix, (shape, dtype) in shapes.items()))
        algo: str
        rank: int | None
        if signature in known:
            algo, rank = known[signature]
        else:
            try:
                summary = module_summary(name, shapes)
                algo, rank = known[signature] = (summary.algo, summary.rank)
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
                comfyui_loads=(alias.spelling not in rejects) if alias else False,
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
        unresolved=[r.name for r in rows if r.target is None],
        comfyui_unloaded=[r.name for r in rows if r.target is not None and not r.comfyui_loads],
    )
