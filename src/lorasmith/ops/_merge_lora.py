"""LoRA + LoRA merges (exact rank concatenation, or SVD) and the LoRA loading shared with bake.

Internal to :mod:`lorasmith.ops.merge`; see ``docs/merge.md`` for the maths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasmith.adapters.base import AdapterModule
from lorasmith.adapters.lora import encode_lora
from lorasmith.adapters.parse import parse_module
from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Detection, lora_modules
from lorasmith.errors import AdapterError, ArchMismatchError, LorasmithError, ShapeMismatchError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.linalg import (
    LinalgError,
    exact_svd,
    factorized_svd,
    rank_energy,
    rank_fixed,
    rank_sv_cumulative,
    rank_sv_fro,
    rank_sv_ratio,
)
from lorasmith.ops.blocks import BlockWeights
from lorasmith.progress import ProgressCallback, ProgressEvent
from lorasmith.registry import get_registry

__all__ = [
    "GroupKey",
    "LoadedLora",
    "LoraMergeOutcome",
    "RankPolicy",
    "check_same_family",
    "load_lora",
    "merge_loras",
    "merged_metadata",
    "module_factors",
    "numerical_rank_lowrank",
    "parse_weighted",
    "torch_dtype_of",
]

#: ``(canonical key, row slice)`` for resolved modules; ``("module:<name>", None)`` for unresolved ones.
GroupKey = tuple[str, tuple[int, int, int] | None]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def torch_dtype_of(name: str, what: str) -> torch.dtype:
    """``float32``/``fp16``/``bf16``... -> a torch dtype.

    :raises LorasmithError: an unknown name.
    """
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise LorasmithError(
            f"unknown {what} {name!r}", hint="use float32, float16, bfloat16 or float64"
        ) from None


def parse_weighted(spec: str | os.PathLike[str], default: float | None = None) -> tuple[Path, float | None]:
    """Split ``"a.safetensors:0.7"`` into ``(Path("a.safetensors"), 0.7)``; no ratio gives ``default``.

    A colon whose tail is not a number is part of the path (``C:\\x.safetensors``).
    """
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            return Path(text), default
        if not math.isfinite(value):
            raise LorasmithError(f"{text}: the ratio {tail!r} is not finite", hint="give a finite number")
        return Path(head), value
    return Path(text), default


@dataclass
class LoadedLora:
    """One LoRA input, parsed and resolved onto its family's canonical keys."""

    path: Path
    ratio: float
    detection: Detection
    arch: Architecture
    variant: str | None
    spelling: str | None
    metadata: dict[str, str]
    modules: dict[str, AdapterModule]
    aliases: dict[str, Alias | None]
    dtype: torch.dtype
    skipped: list[str] = field(default_factory=list)

    def group_of(self, name: str) -> GroupKey:
        """The group (target) of module ``name``."""
        alias = self.aliases.get(name)
        if alias is None:
            return (f"module:{name}", None)
        return (alias.target.key, alias.target.slice)


def load_lora(path: Path, ratio: float, arch: str | None = None) -> LoadedLora:
    """Read, detect and parse one LoRA file (small: every tensor is loaded).

    :raises LorasmithError: unreadable file, no family, a checkpoint given as a LoRA, a bad module.
    """
    header = read_header(path)
    det = get_registry().detect(header, arch=arch, source=str(path))
    if det.kind not in ("lora", "mixed", "unknown"):
        raise LorasmithError(
            f"{path}: is a {det.kind}, not a LoRA",
            hint="checkpoints go to --base (bake) or --models (checkpoint merge)",
        )
    family = get_registry().get(det.arch)
    tensors = load_all(path)
    groups = lora_modules(tensors)
    if not groups:
        raise LorasmithError(f"{path}: holds no LoRA module", hint="check that this is a LoRA file")
    table = family.alias_table(det.variant)
    modules: dict[str, AdapterModule] = {}
    aliases: dict[str, Alias | None] = {}
    dtype: torch.dtype | None = None
    for name, keys in groups.items():
        try:
            mod = parse_module(name, {suffix: tensors[key] for suffix, key in keys.items()})
        except AdapterError as exc:
            raise AdapterError(f"{path}: {exc.message}", hint=exc.hint) from None
        modules[name] = mod
        aliases[name] = table.get(name)
        if dtype is None:
            for role, t in mod.tensors.items():
                if role not in ("alpha",) and t.is_floating_point():
                    dtype = t.dtype
                    break
    return LoadedLora(
        path=path,
        ratio=ratio,
        detection=det,
        arch=family,
        variant=det.variant,
        spelling=det.layout if det.layout in SPELLINGS else None,
        metadata=dict(header.metadata),
        modules=modules,
        aliases=aliases,
        dtype=dtype or torch.float16,
    )


def check_same_family(loras: Sequence[LoadedLora], what: str = "inputs") -> None:
    """All inputs of one family.

    :raises ArchMismatchError: naming both files and families.
    """
    first = loras[0]
    for other in loras[1:]:
        if other.detection.arch != first.detection.arch:
            raise ArchMismatchError(
                f"{what} of different families: {first.path.name} is {first.detection.arch}, "
                f"{other.path.name} is {other.detection.arch}",
                hint="merge only files of one family (or force it with --arch if detection is wrong)",
            )


# ----------------------------------------------------------------------------------------- rank policy
@dataclass(frozen=True)
class RankPolicy:
    """How an SVD merge picks each module's rank: ``fixed`` N, or a dynamic rule with a parameter."""

    method: str
    value: float
    max_rank: int | None = None

    @classmethod
    def parse(cls, rank: int | None, dynamic: str | None) -> RankPolicy | None:
        """From ``--rank N`` and ``--dynamic METHOD:VALUE`` (``--rank`` then caps the dynamic rank)."""
        if rank is not None and rank < 1:
            raise LorasmithError(f"--rank must be at least 1, not {rank}", hint="give a positive rank")
        if dynamic is None:
            return None if rank is None else cls("fixed", float(rank))
        method, sep, value = dynamic.partition(":")
        methods = ("sv_ratio", "sv_fro", "sv_cumulative", "energy")
        if not sep or method not in methods:
            raise LorasmithError(
                f"bad --dynamic value {dynamic!r}",
                hint=f"write METHOD:VALUE with METHOD one of {', '.join(methods)} (sv_fro:0.99)",
            )
        try:
            v = float(value)
        except ValueError:
            raise LorasmithError(f"bad --dynamic value {dynamic!r}: {value!r} is not a number") from None
        return cls(method, v, rank)

    def choose(self, s: torch.Tensor) -> int:
        """The rank to keep for singular values ``s`` (descending)."""
        try:
            if self.method == "fixed":
                return rank_fixed(s, int(self.value))
            if self.method == "sv_ratio":
                return rank_sv_ratio(s, self.value, max_rank=self.max_rank)
            if self.method == "sv_fro":
                return rank_sv_fro(s, self.value, max_rank=self.max_rank)
            if self.method == "sv_cumulative":
                return rank_sv_cumulative(s, self.value, max_rank=self.max_rank)
            return rank_energy(s, self.value, max_rank=self.max_rank)
        except LinalgError as exc:
            raise LorasmithError(f"--dynamic {self.method}: {exc}") from None


# ------------------------------------------------------------------------------------------- factors
@dataclass
class _Factors:
    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in*k*k]
    scale: float
    kernel: tuple[int, ...] | None


def numerical_rank_lowrank(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact low-rank pair of a dense 2-D delta: its SVD at numerical rank (``up @ down == delta``)."""
    svd = exact_svd(delta)
    s = svd.S
    if s.numel() == 0 or float(s[0]) == 0.0:
        k = 1
    else:
        tol = float(s[0]) * max(delta.shape) * torch.finfo(s.dtype).eps
        k = max(1, int((s > tol).sum()))
    up, down = svd.to_lora(k, kernel=None)
    return up, down


def module_factors(mod: AdapterModule, dtype: torch.dtype, source: Path) -> _Factors:
    """Low-rank factors of one module in ``dtype`` (materialised algorithms: exact SVD of the delta).

    :raises AdapterError: a module whose delta needs the base weight (DoRA, OFT, GLoRA).
    """
    lr = mod.lowrank()
    if lr is not None:
        folded = lr.fold(dtype)
        up = folded.up.to(dtype).reshape(folded.up.shape[0], -1)
        down = folded.down.to(dtype).reshape(folded.down.shape[0], -1)
        return _Factors(up, down, lr.scale, mod.kernel)
    if mod.needs_base:
        raise AdapterError(
            f"{source}: module {mod.name!r} is {mod._kind_label()}, whose delta depends on the base weight",
            hint="bake it into a checkpoint with --base instead of merging LoRAs",
        )
    delta = mod.delta(dtype=dtype)
    flat = delta.reshape(delta.shape[0], -1)
    up, down = numerical_rank_lowrank(flat)
    return _Factors(up, down, 1.0, mod.kernel)


# ------------------------------------------------------------------------------------------- metadata
def _merge_tag_frequency(metas: Sequence[dict[str, str]]) -> str | None:
    merged: dict[str, dict[str, int]] = {}
    seen = False
    for meta in metas:
        raw = meta.get("ss_tag_frequency")
        if not raw:
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        seen = True
        for dataset, tags in data.items():
            if not isinstance(tags, dict):
                continue
            bucket = merged.setdefault(str(dataset), {})
            for tag, count in tags.items():
                if isinstance(count, int | float):
                    bucket[str(tag)] = bucket.get(str(tag), 0) + int(count)
    return json.dumps(merged, ensure_ascii=False) if seen else None


def merged_metadata(
    inputs: Sequence[tuple[Path, float | None, dict[str, str]]],
    *,
    keep_ss: bool,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Output metadata: the first input's ``ss_*`` (and ``modelspec.*``) kept, ``ss_tag_frequency`` merged,
    every input's metadata under ``lorasmith.merge.inputs`` (JSON list of ``{file, ratio, metadata}``),
    ``modelspec.merged_from`` (file names, comma-separated). Old hashes are dropped (the writer recomputes).
    """
    first = inputs[0][2] if inputs else {}
    out: dict[str, str] = {}
    for key, value in first.items():
        if key.startswith("sshs_") or key == "modelspec.hash_sha256":
            continue
        if key.startswith("ss_") and not keep_ss:
            continue
        out[key] = value
    tags = _merge_tag_frequency([m for _, _, m in inputs])
    if tags is not None:
        out["ss_tag_frequency"] = tags
    out["lorasmith.merge.inputs"] = json.dumps(
        [{"file": p.name, "ratio": r, "metadata": m} for p, r, m in inputs], ensure_ascii=False
    )
    out["modelspec.merged_from"] = ", ".join(p.name for p, _, _ in inputs)
    out.update(extra or {})
    return out


# ---------------------------------------------------------------------------------------------- merge
@dataclass
class LoraMergeOutcome:
    """What :func:`merge_loras` did (turned into the public result by :mod:`lorasmith.ops.merge`)."""

    modules: int
    ranks: dict[str, int]
    spelling: str | None
    rel_errors: dict[str, float]
    notation: str | None
    warnings: list[str]
    write: object


def merge_loras(
    loras: Sequence[LoadedLora],
    output: Path,
    *,
    policy: RankPolicy | None,
    to: str | None,
    blocks: BlockWeights | None,
    compute: torch.dtype,
    save_dtype: torch.dtype | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> LoraMergeOutcome:
    """Merge LoRAs into one LoRA: exact rank concatenation, or an SVD merge when ``policy`` is given."""
    from lorasmith.io.writer import SafetensorsWriter

    check_same_family(loras)
    first = loras[0]
    arch = first.arch
    spelling = to or first.spelling
    if to is not None and to not in arch.spellings:
        raise LorasmithError(
            f"{arch.id} has no spelling {to!r}", hint=f"spellings: {', '.join(arch.spellings)}"
        )
    style = SPELLINGS[spelling].suffixes if spelling in SPELLINGS else "kohya"
    reverse: dict[tuple[str, tuple[int, int, int] | None], str] = {}
    if spelling is not None:
        for alias in arch.aliases(first.variant, spelling):
            reverse.setdefault((alias.target.key, alias.target.slice), alias.name)

    # group every module of every input by its target, in first-seen order
    groups: dict[GroupKey, list[tuple[int, str]]] = {}
    for i, lora in enumerate(loras):
        for name in lora.modules:
            groups.setdefault(lora.group_of(name), []).append((i, name))

    out_dtype = save_dtype or first.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    warnings: list[str] = []
    total = len(groups)
    for done, (gkey, members) in enumerate(groups.items(), 1):
        ups: list[torch.Tensor] = []
        downs: list[torch.Tensor] = []
        kernel: tuple[int, ...] | None = None
        shape: tuple[int, int] | None = None
        for i, name in members:
            lora = loras[i]
            f = module_factors(lora.modules[name], compute, lora.path)
            bw = 1.0
            if blocks is not None and not gkey[0].startswith("module:"):
                bw = blocks.weight(arch, gkey[0])
            s = lora.ratio * bw * f.scale
            this = (int(f.up.shape[0]), int(f.down.shape[1]))
            if shape is None:
                shape = this
            elif this != shape:
                raise ShapeMismatchError(
                    f"module {name!r} of {lora.path.name} has delta shape {list(this)}, other inputs "
                    f"have {list(shape)} for the same target",
                    hint="the LoRAs were made for different models of the family",
                )
            if kernel is None and f.kernel is not None:
                kernel = f.kernel
            if s == 0.0:
                continue
            root = math.sqrt(abs(s))
            ups.append(f.up * root)
            downs.append(f.down * math.copysign(root, s))
        # output name: the first input's own name if it has the module, else the target spelling's alias
        i0, n0 = members[0]
        name = n0 if (i0 == 0 and to is None) else reverse.get(gkey, n0)
        if name != n0 and name in tensors:
            name = n0
        assert shape is not None
        if not ups:  # every contribution is 0: a zero module of rank 1 keeps the key set
            ups = [torch.zeros(shape[0], 1, dtype=compute)]
            downs = [torch.zeros(1, shape[1], dtype=compute)]
        up = torch.cat(ups, dim=1)
        down = torch.cat(downs, dim=0)
        if policy is not None:
            svd = factorized_svd(up, down)
            k = policy.choose(svd.S)
            cut = svd.truncate(k)
            up, down = cut.to_lora(None, kernel=None)
            if cut.rel_error is not None:
                errors[name] = float(cut.rel_error)
        r = int(up.shape[1])
        conv = kernel is not None and len(kernel) > 0
        try:
            encoded = encode_lora(
                up,
                down,
                float(r),
                suffixes=style,
                conv=conv,
                kernel=kernel if conv else None,
                dtype=out_dtype,
            )
        except AdapterError as exc:
            raise AdapterError(f"module {name!r}: {exc.message}", hint=exc.hint) from None
        for suffix, t in encoded.items():
            tensors[name + suffix] = t
        ranks[name] = r
        progress(ProgressEvent("merging", done, total, name))

    distinct = set(ranks.values())
    extra = {
        "ss_network_dim": str(next(iter(distinct))) if len(distinct) == 1 else "Dynamic",
        "ss_network_alpha": str(next(iter(distinct))) if len(distinct) == 1 else "Dynamic",
    }
    if any(lora.metadata.get("ss_network_module") for lora in loras):
        extra["ss_network_module"] = "networks.lora"
    meta = merged_metadata(
        [(lora.path, lora.ratio, lora.metadata) for lora in loras], keep_ss=True, extra=extra
    )
    writer = SafetensorsWriter(
        output, metadata=meta, overwrite=overwrite, inputs=[lora.path for lora in loras]
    )
    try:
        for key, t in tensors.items():
            writer.write(key, t)
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    return LoraMergeOutcome(
        modules=len(ranks),
        ranks=ranks,
        spelling=spelling,
        rel_errors=errors,
        notation=blocks.notation if blocks else None,
        warnings=warnings,
        write=result,
    )
