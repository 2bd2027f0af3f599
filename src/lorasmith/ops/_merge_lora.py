"""LoRA + LoRA merges (exact rank concatenation, or SVD) and the LoRA loading shared with bake.

Internal to :mod:`lorasmith.ops.merge`; see ``docs/merge.md`` for the maths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lorasmith.adapters.base import AdapterModule
from lorasmith.adapters.lora import encode_lora
from lorasmith.adapters.parse import parse_module
from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Detection
from lorasmith.errors import AdapterError, ArchMismatchError, LorasmithError, ShapeMismatchError
from lorasmith.io.dtypes import torch_dtype
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
from lorasmith.ops.loralib import LoraFile, output_metadata, parse_merge_spec
from lorasmith.ops.loralib import load_lora as loralib_load
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
    """``"a.safetensors:0.7"`` -> ``(Path("a.safetensors"), 0.7)``; no ratio written gives ``default``.

    The syntax of one item of :func:`lorasmith.ops.loralib.parse_merge_spec` (a colon whose tail is not a
    number is part of the path: ``C:\\x.safetensors``); a name with commas is taken as one path. Only "no
    ratio written" is told apart here, because a checkpoint merge's default weights depend on it.
    """
    text = os.fspath(spec)
    if "," in text:
        return Path(text), default
    [(path, weight)] = parse_merge_spec(text)
    return Path(os.path.expanduser(path)), (default if path == text.strip() else weight)


@dataclass
class LoadedLora:
    """One LoRA input: the lazily read :class:`~lorasmith.ops.loralib.LoraFile` and its ratio.

    Modules are parsed on demand (:meth:`read`), so that a bake or a merge holds one module at a time.
    """

    path: Path
    ratio: float
    file: LoraFile
    detection: Detection
    arch: Architecture

    @property
    def metadata(self) -> dict[str, str]:
        """The file's metadata."""
        return self.file.metadata

    @property
    def names(self) -> list[str]:
        """The module names, in file order."""
        return list(self.file.modules)

    @property
    def spelling(self) -> str | None:
        """The detected key spelling when it is one of :data:`~lorasmith.archs.base.SPELLINGS`."""
        sp = self.file.spelling
        return sp if sp in SPELLINGS else None

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the first module's factors (what a LoRA merge writes by default)."""
        info = next(iter(self.file.modules.values()), None)
        if info is None:
            return torch.float16
        dt = torch_dtype(info.dtype)
        return dt if dt.is_floating_point else torch.float16

    @property
    def modules(self) -> dict[str, AdapterModule]:
        """Every module, read and parsed now (prefer :meth:`read` one at a time for large files)."""
        return {name: self.read(name) for name in self.file.modules}

    @property
    def aliases(self) -> dict[str, Alias | None]:
        """Module name -> family alias."""
        return {name: info.alias for name, info in self.file.modules.items()}

    def alias(self, name: str) -> Alias | None:
        """The family alias of module ``name``."""
        return self.file.modules[name].alias

    def has_bias(self, name: str) -> bool:
        """Whether module ``name`` carries a bias delta (``diff_b``)."""
        return ".diff_b" in self.file.modules[name].keys

    def group_of(self, name: str) -> GroupKey:
        """The group (target) of module ``name``."""
        alias = self.alias(name)
        if alias is None:
            return (f"module:{name}", None)
        return (alias.target.key, alias.target.slice)

    def read(self, name: str) -> AdapterModule:
        """Read and parse module ``name`` (DoRA magnitude and bias delta included).

        :raises AdapterError: naming the file.
        """
        info = self.file.modules[name]
        try:
            return parse_module(name, {suffix: self.file.tensor(key) for suffix, key in info.keys.items()})
        except AdapterError as exc:
            raise AdapterError(f"{self.path}: {exc.message}", hint=exc.hint) from None
        finally:
            # closed after every module (reopened on the next read): no open handle outlives a call, so
            # callers never need to close a LoadedLora; a reopen reuses the parsed header, so it costs one
            # open() (parsing a big LoRA's header per module made a bake 12 s slower)
            self.file.close()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def load_lora(path: Path, ratio: float, arch: str | None = None) -> LoadedLora:
    """Open one LoRA (:func:`lorasmith.ops.loralib.load_lora`); its family must be known.

    :raises LorasmithError: unreadable file, no family, a checkpoint given as a LoRA, no module.
    """
    f = loralib_load(path, arch=arch)
    f.close()  # reopened by the first read; nothing stays open between reads (see LoadedLora.read)
    if f.arch is None or f.detection is None:
        get_registry().detect(f.header, arch=arch, source=str(path))  # raises the detection error
        raise LorasmithError(
            f"{path}: cannot tell the family", hint="force it with --arch"
        )  # pragma: no cover
    return LoadedLora(path=Path(path), ratio=ratio, file=f, detection=f.detection, arch=f.arch)


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
        for alias in arch.aliases(first.file.variant, spelling):
            reverse.setdefault((alias.target.key, alias.target.slice), alias.name)

    # group every module of every input by its target, in first-seen order
    groups: dict[GroupKey, list[tuple[int, str]]] = {}
    for i, lora in enumerate(loras):
        for name in lora.names:
            groups.setdefault(lora.group_of(name), []).append((i, name))

    out_dtype = save_dtype or first.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    big_conv: set[str] = set()  # conv modules with a kernel larger than 1x1
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
            f = module_factors(lora.read(name), compute, lora.path)
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
        if conv and kernel is not None and math.prod(kernel) > 1:
            big_conv.add(name)
        progress(ProgressEvent("merging", done, total, name))

    extra = {}
    if any(lora.metadata.get("ss_network_module") for lora in loras):
        extra["ss_network_module"] = "networks.lora"
    record: dict[str, object] = {
        "mode": "lora",
        "method": "exact" if policy is None else f"svd:{policy.method}:{policy.value:g}",
        "inputs": [{"file": lora.path.name, "ratio": lora.ratio} for lora in loras],
        "spelling": spelling,
        "blocks": blocks.notation if blocks else None,
    }
    # ss_network_dim/alpha (and conv_dim/alpha in ss_network_args) as kohya writes them; alpha = rank
    meta = output_metadata(
        merged_metadata(
            [(lora.path, lora.ratio, lora.metadata) for lora in loras], keep_ss=True, extra=extra
        ),
        linear=[(r, float(r)) for n, r in ranks.items() if n not in big_conv],
        conv=[(r, float(r)) for n, r in ranks.items() if n in big_conv],
        record_key="lorasmith_merge",
        record=record,
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
