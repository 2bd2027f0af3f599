"""LoRA + LoRA merges (exact rank concatenation, or SVD) and the LoRA loading shared with bake.

Internal to :mod:`lorasmith.ops.merge`; see ``docs/merge.md`` for the maths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lorasmith.adapters.base import AdapterModule
from lorasmith.adapters.parse import parse_module
from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Detection, Target
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
from lorasmith.ops.loralib import (
    Contribution,
    LoraFile,
    ModuleInfo,
    Unit,
    UnitExtras,
    encode_unit,
    file_context,
    output_metadata,
    parse_merge_spec,
    plan_units,
    rows_uncovered,
    suffix_style_of,
)
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
            raise LorasmithError(
                f"bad --dynamic value {dynamic!r}: {value!r} is not a number",
                hint=f"write {method}:NUMBER ({method}:{'4' if method == 'sv_ratio' else '0.9'})",
            ) from None
        policy = cls(method, v, rank)
        policy.choose(torch.ones(1, dtype=torch.float64))  # the parameter's range, before any file is read
        return policy

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
            limits = "at least 1" if self.method == "sv_ratio" else "between 0 and 1"
            raise LorasmithError(
                f"bad --dynamic value {self.method}:{self.value:g}: {exc}",
                hint=f"{self.method} takes a number {limits}",
            ) from None


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


#: ``ss_network_args`` algorithms whose files hold plain LoRA / LoCon modules.
_PLAIN_ALGOS = frozenset({"lora", "locon"})


def plain_lora_metadata(meta: dict[str, str]) -> dict[str, str]:
    """Metadata of an output whose every module is now a plain LoRA (a merge, or a resized LoHa/LoKr).

    A LyCORIS algorithm that ``ss_network_args`` still names (``"algo": "loha"``) no longer describes the
    file: it is dropped, and ``ss_network_module`` ``lycoris.*`` becomes ``networks.lora`` with it.
    Anything else is kept.
    """
    raw = meta.get("ss_network_args")
    if not raw:
        return meta
    try:
        args = json.loads(raw)
    except json.JSONDecodeError:
        return meta
    if not isinstance(args, dict) or "algo" not in args or str(args["algo"]).lower() in _PLAIN_ALGOS:
        return meta
    out = dict(meta)
    out["ss_network_args"] = json.dumps({k: v for k, v in args.items() if k != "algo"})
    if out.get("ss_network_module", "").startswith("lycoris"):
        out["ss_network_module"] = "networks.lora"
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


def dedupe_units(units: Sequence[Unit]) -> list[Unit]:
    """Units with each input module's rows counted once.

    A spelling may have several names for one weight (SDXL PEFT: ``attn1.to_k`` and
    ``attn1.processor.to_k``); :func:`~lorasmith.ops.loralib.plan_units` then opens an output module for
    each and places a new input module on all of them, which would add its delta twice. The first of such
    units keeps the contribution, the others lose it, and units left without any are dropped.
    """
    seen: set[tuple[str, int, str, int, int, int]] = set()
    out: list[Unit] = []
    for unit in units:
        if unit.base_key is None:
            out.append(unit)
            continue
        kept = []
        for c in unit.contributions:
            # the real rows of the weight this contribution fills (the unit's rows are its slice's)
            start = 0 if unit.base_slice is None else unit.base_slice[1]
            mark = (unit.base_key, id(c.file), c.module, c.src_start, start + c.dst_start, c.rows)
            if mark in seen:
                continue
            seen.add(mark)
            kept.append(c)
        if len(kept) == len(unit.contributions):
            out.append(unit)
        elif kept:
            out.append(dataclasses.replace(unit, contributions=tuple(kept)))
    return out


def views(units: Sequence[Unit], files: Sequence[LoraFile]) -> list[LoraFile]:
    """The files the units read from that are not among ``files``: views that :func:`plan_files` opened
    (the caller closes them)."""
    out: dict[int, LoraFile] = {}
    for u in units:
        for c in u.contributions:
            if not any(c.file is f for f in files):
                out.setdefault(id(c.file), c.file)
    return list(out.values())


def _real_rows(arch: Architecture, variant: str | None, target: Target) -> tuple[int, int] | None:
    """The real row range ``[start, end)`` a target covers; ``None`` when unknown."""
    if target.slice is not None:
        dim, start, length = target.slice
        return (start, start + length) if dim == 0 else None
    spec = arch.target_spec(target.key, variant)
    return (0, int(spec.shape[0])) if spec is not None and spec.shape else None


def plan_merge(
    loras: Sequence[LoadedLora], to: str | None, origins: dict[int, LoraFile] | None = None
) -> list[Unit]:
    """The output modules of a LoRA merge: :func:`plan_files` of the inputs at weight 1 (the caller applies
    each input's ratio, so that a norm module, whose 1-d delta is additive, may be scaled too)."""
    return plan_files([(lora.file, 1.0) for lora in loras], to, origins)


def plan_files(
    inputs: Sequence[tuple[LoraFile, float]],
    to: str | None,
    origins: dict[int, LoraFile] | None = None,
) -> list[Unit]:
    """The output modules of files merged with weights (:func:`~lorasmith.ops.loralib.plan_units`,
    deduplicated with :func:`dedupe_units`).

    Without ``to`` the first input's names are kept and later inputs' modules are placed on them, or named
    in the first input's spelling. A later module that spelling has no name for (a text-encoder module
    against a UNet-only spelling such as SD1 ``kohya-ldm``) keeps its own name, as a module of its own.
    Such a split input is planned as two views of its file, each with its own open handle: the caller
    closes the :func:`views` of the units when done; ``origins`` (when given) receives ``id(view)`` -> the
    input file it was made from.
    """
    inputs = list(inputs)
    first = inputs[0][0]
    if to is not None or len(inputs) == 1 or first.arch is None:
        return dedupe_units(plan_units(inputs, spelling=to))
    arch, variant = first.arch, first.variant
    spans: dict[str, list[tuple[int, int]]] = {}
    targets = [i.target for i in first.modules.values() if i.target is not None]
    if first.spelling is not None and first.spelling in arch.spellings:
        targets += [a.target for a in arch.aliases(variant, spelling=first.spelling)]
    for target in targets:
        span = _real_rows(arch, variant, target)
        if span is not None:
            spans.setdefault(target.key, []).append(span)
    placed: list[tuple[LoraFile, float]] = [inputs[0]]
    rest: list[tuple[LoraFile, float]] = []
    made: dict[int, LoraFile] = {} if origins is None else origins
    try:
        return _plan_split(inputs, arch, variant, spans, placed, rest, made)
    except BaseException:
        for v in [f for f, _ in placed + rest if id(f) in made]:
            v.close()
        raise


def _plan_split(
    inputs: Sequence[tuple[LoraFile, float]],
    arch: Architecture,
    variant: str | None,
    spans: dict[str, list[tuple[int, int]]],
    placed: list[tuple[LoraFile, float]],
    rest: list[tuple[LoraFile, float]],
    origins: dict[int, LoraFile],
) -> list[Unit]:
    """:func:`plan_files` once the first input's row spans are known (``placed``, ``rest`` and ``origins``
    are filled here, so that the caller can close the views opened so far when anything fails)."""
    from lorasmith.io.reader import open_tensors

    for f, weight in inputs[1:]:
        keep: dict[str, ModuleInfo] = {}
        left: dict[str, ModuleInfo] = {}
        for name, info in f.modules.items():
            t = info.target
            rows = None if t is None else _real_rows(arch, variant, t)
            if t is None or rows is None or not rows_uncovered(rows, spans.get(t.key, [])):
                keep[name] = info
            else:
                left[name] = info
        if not left:
            placed.append((f, weight))
            continue
        for part, into in ((keep, placed), (left, rest)):
            if part:
                view = dataclasses.replace(f, modules=part, _tf=open_tensors(f.path, f.header))
                origins[id(view)] = f
                into.append((view, weight))
    units = plan_units(placed)
    if rest:
        names = {u.name for u in units}
        extra = plan_units(rest)
        clash = next((u.name for u in extra if u.name in names), None)
        if clash is not None:
            raise LorasmithError(
                f"module name {clash!r} names different weights in the inputs",
                hint="write the output in one spelling with --to",
            )
        units += extra
    return dedupe_units(units)


def _refuse_base_dependent(loras: Sequence[LoadedLora]) -> None:
    """DoRA, OFT, BOFT and GLoRA modules cannot become a plain LoRA without a base weight.

    :raises AdapterError: naming the file and the first such module, with the bake hint.
    """
    for lora in loras:
        for info in lora.file.modules.values():
            summary = info.summary
            if summary.has_dora or summary.needs_base:
                kind = f"a DoRA {summary.algo}" if summary.has_dora else f"an {summary.algo.upper()}"
                raise AdapterError(
                    f"{lora.path}: module {info.name!r} is {kind} module, whose delta depends on the base "
                    "weight",
                    hint="bake it into a checkpoint with --base instead of merging LoRAs",
                )


def _owner(loras: Sequence[LoadedLora], f: LoraFile, origins: dict[int, LoraFile]) -> LoadedLora:
    """The input a file of the plan belongs to (a view of :func:`plan_files` through ``origins``)."""
    f = origins.get(id(f), f)
    return next(lora for lora in loras if lora.file is f)


def _place_rows(up: torch.Tensor, c: Contribution, rows: int) -> torch.Tensor:
    """``up``'s rows of contribution ``c`` at their rows of a unit with ``rows`` rows (zeros elsewhere)."""
    if c.whole and up.shape[0] == rows:
        return up
    placed = torch.zeros(rows, up.shape[1], dtype=up.dtype)
    placed[c.dst_start : c.dst_start + c.rows] = up[c.src_start : c.src_start + c.rows]
    return placed


def _norm_tensors(
    unit: Unit, lookup: dict[int, LoadedLora], bw: float, compute: torch.dtype, out_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A norm unit (``w_norm`` / ``b_norm``, additive 1-d deltas): the weighted sum, as one norm module."""
    sums: dict[str, torch.Tensor] = {}
    for c in unit.contributions:
        lora = lookup[id(c.file)]
        try:
            with file_context(lora.path):
                for suffix, key in c.info.keys.items():
                    if suffix in (".w_norm", ".b_norm"):
                        t = c.file.tensor(key).to(compute) * (lora.ratio * c.weight * bw)
                        sums[suffix] = sums[suffix] + t if suffix in sums else t
        finally:
            c.file.close()
    return {unit.name + suffix: t.to(out_dtype).contiguous() for suffix, t in sums.items()}


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
    """Merge LoRAs into one LoRA: exact rank concatenation, or an SVD merge when ``policy`` is given.

    Output modules are the :func:`~lorasmith.ops.loralib.plan_units` of the inputs: the first input's names
    (or those of ``to``), with every input module placed on the rows it covers, so that fused and split
    layouts (FLUX ``qkv`` and ``to_q``/``to_k``/``to_v``) meet exactly and ``to`` splits or fuses them.
    """
    from lorasmith.io.writer import SafetensorsWriter

    check_same_family(loras)
    first = loras[0]
    arch = first.arch
    if to is not None:
        # the words convert takes: comfy (the family's default spelling), diffusers (peft), keep
        from lorasmith.ops._convert_lora import resolve_target_spelling

        to = resolve_target_spelling(arch, to, first.spelling)
    spelling = to or first.spelling
    _refuse_base_dependent(loras)
    style = suffix_style_of(spelling, [i for lora in loras for i in lora.file.modules.values()])
    origins: dict[int, LoraFile] = {}
    units = plan_merge(loras, to, origins)
    lookup = {id(c.file): _owner(loras, c.file, origins) for u in units for c in u.contributions}

    opened = views(units, [lora.file for lora in loras])
    try:
        out_dtype = save_dtype or first.dtype
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        big_conv: set[str] = set()  # conv modules with a kernel larger than 1x1
        errors: dict[str, float] = {}
        warnings: list[str] = []
        total = len(units)
        for done, unit in enumerate(units, 1):
            name = unit.name
            bw = 1.0
            if blocks is not None and unit.base_key is not None:
                bw = blocks.weight(arch, unit.base_key)
            if unit.passthrough:  # norm modules (the base-dependent ones were refused above)
                tensors.update(_norm_tensors(unit, lookup, bw, compute, out_dtype))
                progress(ProgressEvent("merging", done, total, name))
                continue
            ups: list[torch.Tensor] = []
            downs: list[torch.Tensor] = []
            bias: torch.Tensor | None = None
            for c in unit.contributions:
                lora = lookup[id(c.file)]
                try:
                    with file_context(lora.path):
                        read = c.file.read_module(c.module)
                finally:
                    c.file.close()  # nothing stays open between reads (see LoadedLora.read)
                s = lora.ratio * c.weight * bw
                if read.bias is not None and s != 0.0:
                    part = read.bias.to(compute).reshape(-1)[c.src_start : c.src_start + c.rows] * s
                    if bias is None:
                        bias = torch.zeros(unit.out_features, dtype=compute)
                    bias[c.dst_start : c.dst_start + c.rows] += part
                f = module_factors(read.module, compute, lora.path)
                if f.down.shape[1] != unit.in_flat:
                    raise ShapeMismatchError(
                        f"module {c.module!r} of {lora.path.name} has {f.down.shape[1]} input columns, the "
                        f"output module {name!r} has {unit.in_flat}",
                        hint="the LoRAs were made for different models of the family",
                    )
                s *= f.scale
                if s == 0.0:
                    continue
                root = math.sqrt(abs(s))
                ups.append(_place_rows(f.up, c, unit.out_features) * root)
                downs.append(f.down * math.copysign(root, s))
            if not ups:  # every contribution is 0: a zero module of rank 1 keeps the key set
                ups = [torch.zeros(unit.out_features, 1, dtype=compute)]
                downs = [torch.zeros(1, unit.in_flat, dtype=compute)]
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
            extras = (
                None
                if bias is None
                else UnitExtras(scale=1.0, dora=None, dora_suffix=None, bias=bias.to(out_dtype))
            )
            try:
                encoded = encode_unit(unit, up, down, float(r), style, out_dtype, extras)
            except AdapterError as exc:
                raise AdapterError(f"module {name!r}: {exc.message}", hint=exc.hint) from None
            tensors.update(encoded)
            ranks[name] = r
            if unit.is_conv:
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
        if not any(u.passthrough for u in units):  # every module is a LoRA now
            meta = plain_lora_metadata(meta)
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
    finally:
        for v in opened:
            v.close()
