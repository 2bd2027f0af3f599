"""Shared helpers for the ops that read and write LoRA files (resize today; merge and convert reuse them).

The pieces, in the order an op uses them:

1. **Inputs.** :func:`expand_inputs` turns command-line items into :class:`InputSpec` values: a plain
   path, a glob (``loras/*.safetensors``, expanded and sorted), or a weighted merge spec
   ``a.safetensors:0.7,b.safetensors:0.3`` (:func:`parse_merge_spec`; a missing weight is 1).
2. **Loading.** :func:`load_lora` reads a LoRA file's header, detects its family through the registry
   (``arch`` forces one), groups its tensors into modules (torch-free
   :class:`~lorasmith.adapters.summary.ModuleSummary` per module) and resolves every module name to its
   family alias. Tensors are read lazily, module by module (:meth:`LoraFile.read_module`), so that an op
   never holds a whole LoRA plus its results. A checkpoint given as a LoRA, or a file without LoRA
   modules, is an :class:`~lorasmith.errors.InvalidFileError`.
3. **Units.** :func:`plan_units` maps the modules of one or several inputs onto the *output* modules of a
   spelling (:class:`Unit`). A unit gathers every input module whose delta lands on its rows
   (:class:`Contribution`): one module (the usual case), the same module of several merged files, the
   q/k/v parts of a fused output module (fuse), or a row range of a fused input module (split). Merge,
   fuse and split are therefore one mechanism: each contribution is placed at its rows of the unit.
4. **Deltas.** :func:`unit_lowrank` gives a unit's delta as one factor pair ``up_c @ down_c`` (ranks
   concatenated, every scale ``weight * alpha / rank`` folded into ``up_c``, Tucker cores folded, rows
   placed), exact and without forming the product; :func:`unit_dense` materialises it (LoHa, LoKr, full
   diffs). DoRA magnitudes and bias deltas come along (:class:`UnitExtras`).
5. **Writing.** :func:`lora_tensor_specs` / :func:`encode_unit` name and shape a unit's output tensors in
   kohya suffixes (``lora_down``/``lora_up``/``alpha``) or PEFT suffixes (``lora_A``/``lora_B``, alpha
   baked into the factors, see :func:`lorasmith.adapters.encode_lora`); :func:`output_metadata` builds the
   output metadata; :func:`expected_file_bytes` gives the exact size of the file the writer will produce.

Row coordinates. Family aliases give fused-weight slices in the real model's rows; a file's module may be
smaller by a common factor (the shrunk test fixtures), so rows are compared in real coordinates and mapped
to a module's own rows by the ratio ``real rows / stored rows`` (1 for real files). All contributions of
a unit must share that ratio.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from lorasmith.adapters.summary import ModuleSummary, module_summary
from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Detection, Target, lora_modules
from lorasmith.errors import (
    AdapterError,
    ArchMismatchError,
    DetectionError,
    InvalidFileError,
    LorasmithError,
    ShapeMismatchError,
)
from lorasmith.io.header import Header, read_header
from lorasmith.io.layout import encode_header, plan_layout

if TYPE_CHECKING:
    import torch

    from lorasmith.adapters.base import AdapterModule
    from lorasmith.io.reader import TensorFile

__all__ = [
    "LOWRANK_ALGOS",
    "METADATA_KEY_PREFIX",
    "Contribution",
    "InputSpec",
    "LoraFile",
    "ModuleInfo",
    "ReadModule",
    "SuffixStyle",
    "Unit",
    "UnitExtras",
    "encode_unit",
    "expand_inputs",
    "expected_file_bytes",
    "file_context",
    "format_number",
    "load_lora",
    "lora_tensor_specs",
    "output_metadata",
    "parse_merge_spec",
    "plan_units",
    "read_unit_extras",
    "rows_uncovered",
    "suffix_style_of",
    "unit_dense",
    "unit_lowrank",
    "unit_lowrank_parts",
    "unit_scale",
]

#: Algorithms whose delta is exactly a low-rank product (read as factors, never materialised).
LOWRANK_ALGOS = frozenset({"lora", "locon-tucker"})
#: Algorithms whose delta is additive and can be materialised without the base weight.
_ADDITIVE_ALGOS = frozenset({"lora", "locon-tucker", "loha", "lokr", "full"})
#: Metadata keys that lorasmith writes start with this.
METADATA_KEY_PREFIX = "lorasmith_"

SuffixStyle = Literal["kohya", "peft"]

_GLOB_CHARS = re.compile(r"[*?\[]")
_WEIGHT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def format_number(value: float) -> str:
    """A short, stable text for a number in names and metadata (``1.0`` -> ``1``, ``0.25`` -> ``0.25``)."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class InputSpec:
    """One input of an op: a single LoRA file, or a weighted merge of several.

    :ivar parts: ``(path, weight)`` pairs; a plain file is one part of weight 1.
    :ivar text: the item as the user gave it (a glob expands into one spec per file).
    """

    parts: tuple[tuple[Path, float], ...]
    text: str

    @property
    def is_merge(self) -> bool:
        """Whether this input combines several files or scales one (anything but one file at weight 1)."""
        return len(self.parts) > 1 or self.parts[0][1] != 1.0

    @property
    def label(self) -> str:
        """A name for outputs made from this input: the file stem, or ``a0.7+b0.3`` for a merge."""
        if not self.is_merge:
            return _stem(self.parts[0][0])
        return "+".join(f"{_stem(p)}{format_number(w)}" for p, w in self.parts)

    @property
    def paths(self) -> list[Path]:
        """Every file of this input."""
        return [p for p, _ in self.parts]


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else path.stem


def _split_weight(item: str) -> tuple[str, float]:
    """``"a.safetensors:0.7"`` -> ``("a.safetensors", 0.7)``; no (numeric) weight -> weight 1."""
    head, sep, tail = item.rpartition(":")
    if sep and head and _WEIGHT.match(tail.strip()):
        weight = float(tail)
        if not math.isfinite(weight):
            raise LorasmithError(
                f"merge weight {tail!r} is not a finite number", hint="use e.g. a.safetensors:0.7"
            )
        return head.strip(), weight
    return item.strip(), 1.0


def parse_merge_spec(text: str) -> list[tuple[str, float]]:
    """Parse ``"a.safetensors:0.7,b.safetensors:0.3"`` into ``[("a.safetensors", 0.7), ...]``.

    Items are comma-separated; each is a path optionally followed by ``:weight`` (a decimal number, may be
    negative; default 1). The last ``:`` splits, and only when what follows is a number, so paths with
    colons (``C:\\loras\\a.safetensors``) still work. The semantics: the merged delta is the exact weighted
    sum ``sum_i weight_i * delta_i`` (FORMATS.md section 4).

    :raises LorasmithError: an empty item or a spec that names no file.
    """
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        if not item.strip():
            raise LorasmithError(
                f"empty item in merge spec {text!r}", hint="write it as a.safetensors:0.7,b.safetensors:0.3"
            )
        out.append(_split_weight(item))
    return out


def _is_merge_spec(text: str) -> bool:
    if "," in text:
        return True
    path, _weight = _split_weight(text)
    return path != text.strip() and not os.path.exists(text)


def expand_inputs(items: Sequence[str | os.PathLike[str]]) -> list[InputSpec]:
    """Expand command-line inputs into :class:`InputSpec` values, in the order given.

    - a merge spec (contains ``,`` or ends in ``:<number>``): one spec with several weighted parts;
    - a glob (``*``, ``?`` or ``[``): one spec per matching file, sorted by path;
    - anything else: one file.

    Files are not opened here; a missing file fails when it is loaded.

    :raises InvalidFileError: a glob that matches nothing.
    :raises LorasmithError: a malformed merge spec, or no input at all.
    """
    specs: list[InputSpec] = []
    for raw in items:
        text = os.fspath(raw)
        if _is_merge_spec(text):
            parts = tuple((Path(os.path.expanduser(p)), w) for p, w in parse_merge_spec(text))
            specs.append(InputSpec(parts=parts, text=text))
        elif _GLOB_CHARS.search(text) and not os.path.exists(text):
            matches = sorted(glob.glob(os.path.expanduser(text)))
            if not matches:
                raise InvalidFileError(
                    f"{text}: no file matches this pattern", hint="check the pattern and quote it"
                )
            specs.extend(InputSpec(parts=((Path(m), 1.0),), text=m) for m in matches)
        else:
            specs.append(InputSpec(parts=((Path(os.path.expanduser(text)), 1.0),), text=text))
    if not specs:
        raise LorasmithError("no input LoRA given", hint="name one or more .safetensors files")
    return specs


# ------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class ModuleInfo:
    """One adapter module of a LoRA file, as its header describes it.

    :ivar name: the module name (tensor keys without their suffixes).
    :ivar keys: tensor suffix -> full tensor key.
    :ivar summary: the torch-free analysis (algorithm, rank, shapes, DoRA, bias).
    :ivar alias: the family alias of the name, ``None`` when the family does not know it.
    """

    name: str
    keys: Mapping[str, str]
    summary: ModuleSummary
    alias: Alias | None

    @property
    def target(self) -> Target | None:
        """The canonical weight (and real row slice) the module changes, if known."""
        return None if self.alias is None else self.alias.target

    @property
    def dtype(self) -> str:
        """The safetensors dtype of the module's first factor (what outputs are written in)."""
        for suffix, dtype in self.summary.dtypes.items():
            if suffix not in (
                ".alpha",
                ".dora_scale",
                ".lora_magnitude_vector",
                ".lora_magnitude_vector.default",
            ):
                return dtype
        return next(iter(self.summary.dtypes.values()), "F32")


@dataclass(frozen=True)
class ReadModule:
    """A module read from its file: the parsed adapter, and what DoRA and bias add to it.

    :ivar module: the adapter without its DoRA magnitude (so that :meth:`~lorasmith.adapters.base.
        AdapterModule.lowrank` gives the factors of a DoRA LoRA too).
    :ivar dora: the DoRA magnitude tensor as stored, ``None`` without DoRA.
    :ivar dora_suffix: its suffix (``.dora_scale`` or ``.lora_magnitude_vector``).
    :ivar bias: the bias delta (``diff_b``), ``None`` when absent.
    """

    module: AdapterModule
    dora: torch.Tensor | None
    dora_suffix: str | None
    bias: torch.Tensor | None


_DORA_SUFFIXES = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.default")


@dataclass
class LoraFile:
    """An open LoRA file: header, family, modules; tensors read on demand.

    Use it as a context manager (or call :meth:`close`). :meth:`tensor` and :meth:`read_module` may be
    called from several threads at once (positional reads).

    :ivar path: the file.
    :ivar header: its validated header.
    :ivar detection: the registry's detection, ``None`` when no family matched (a LoRA of a family no
        plugin knows can still be resized; spelling changes and base-aware scoring need the family).
    :ivar arch: the family, ``None`` when unknown.
    :ivar variant: the family variant the names were resolved against.
    :ivar spelling: the detected key spelling (``kohya``, ``peft``...), ``None`` when unknown.
    :ivar modules: module name -> :class:`ModuleInfo`, in file order.
    :ivar extra_keys: tensors that belong to no adapter module (bundled embeddings and the like).
    :ivar warnings: things the user should know (unknown family, unresolved modules).
    """

    path: Path
    header: Header
    detection: Detection | None
    arch: Architecture | None
    variant: str | None
    spelling: str | None
    modules: dict[str, ModuleInfo]
    extra_keys: list[str]
    warnings: list[str] = field(default_factory=list)
    _tf: TensorFile | None = None

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__``."""
        return dict(self.header.metadata)

    def _file(self) -> TensorFile:
        if self._tf is None:
            from lorasmith.io.reader import open_tensors

            # the header parsed when the file was loaded: a reopen costs an open(), not a header parse
            self._tf = open_tensors(self.path, self.header)
        return self._tf

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor of the file (CPU, stored dtype)."""
        return self._file().get(key)

    def read_module(self, name: str) -> ReadModule:
        """Read and parse one module (see :class:`ReadModule`).

        :raises AdapterError: the module's tensors do not form a valid adapter module.
        """
        from lorasmith.adapters.parse import parse_module

        info = self.modules[name]
        tensors = {suffix: self.tensor(key) for suffix, key in info.keys.items()}
        dora_suffix = next((s for s in _DORA_SUFFIXES if s in tensors), None)
        dora = tensors.pop(dora_suffix) if dora_suffix is not None else None
        bias = tensors.pop(".diff_b", None)
        with file_context(self.path):
            module = parse_module(name, tensors)
        return ReadModule(module=module, dora=dora, dora_suffix=dora_suffix, bias=bias)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._tf is not None:
            self._tf.close()
            self._tf = None

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def file_context(path: str | os.PathLike[str]) -> Iterator[None]:
    """Prefix the message of an :class:`~lorasmith.errors.AdapterError` raised inside with ``path``.

    Adapter errors name the module (``adapter module 'x': rank mismatch ...``); the user needs the file
    too. A message that already starts with the path is left as it is.
    """
    try:
        yield
    except AdapterError as exc:
        where = os.fspath(path)
        if exc.message.startswith(f"{where}: "):
            raise
        raise AdapterError(f"{where}: {exc.message}", hint=exc.hint) from None


def _family_of(
    header: Header, path: Path, arch: str | None
) -> tuple[Detection | None, Architecture | None, str | None]:
    """Detect the family; returns ``(detection, family, warning)``. Raises on a checkpoint."""
    from lorasmith.registry import get_registry

    reg = get_registry()
    try:
        det = reg.detect(header, arch=arch, source=str(path))
    except DetectionError as exc:
        return None, None, f"{path.name}: {exc.message}; module names are kept as they are"
    if det.kind == "checkpoint":
        fam = reg.get(det.arch)
        raise InvalidFileError(
            f"{path}: this is a {fam.name} checkpoint, not a LoRA",
            hint="give a LoRA file here; a base checkpoint goes to --base",
        )
    family = reg.get(det.arch)
    if det.kind == "unknown":
        return (
            det,
            family,
            f"{path.name}: no module name is a known {family.name} name (family forced with --arch)",
        )
    return det, family, None


def load_lora(path: str | os.PathLike[str], *, arch: str | None = None) -> LoraFile:
    """Open a LoRA file: header, family, modules and aliases (tensors are read later, on demand).

    :param path: the ``.safetensors`` file.
    :param arch: force the family (``--arch``) instead of detecting it.
    :raises InvalidFileError: not a valid safetensors file, a checkpoint, or a file without LoRA modules.
    :raises UnknownArchError: ``arch`` names no loaded family.
    :raises AdapterError: a module whose tensors do not fit together (mismatched ranks, one factor only,
        an alpha that is not a scalar, an empty factor such as rank 0...), naming the file and the module.
    """
    p = Path(path)
    header = read_header(p)
    groups = lora_modules(header.tensors)
    if not groups:
        det = None
        try:
            from lorasmith.registry import get_registry

            det = get_registry().detect(header, arch=arch, source=str(p))
        except DetectionError:
            det = None
        if det is not None and det.kind == "checkpoint":
            _family_of(header, p, arch)  # raises the "checkpoint, not a LoRA" error
        raise InvalidFileError(
            f"{p}: no LoRA modules in this file",
            hint="lorasmith reads kohya, PEFT/diffusers and LyCORIS LoRA files; check that this is one",
        )
    det, family, warning = _family_of(header, p, arch)
    warnings = [warning] if warning else []
    variant = det.variant if det is not None else None
    spelling = det.layout if det is not None and det.kind == "lora" else None
    if det is not None and det.kind == "mixed" and det.layout:
        spelling = det.layout.split("+")[-1]
    modules: dict[str, ModuleInfo] = {}
    grouped_keys: set[str] = set()
    unresolved: list[str] = []
    for name, keys in groups.items():
        # every structure rule (rank mismatch, one factor, alpha shape, rank 0...) is checked here, from the
        # header, before any op reads a tensor: each command refuses a broken module the same way
        with file_context(p):
            summary = module_summary(name, {suffix: header.tensors[key] for suffix, key in keys.items()})
        alias = family.resolve(name, variant) if family is not None else None
        if family is not None and alias is None:
            unresolved.append(name)
        modules[name] = ModuleInfo(name=name, keys=dict(keys), summary=summary, alias=alias)
        grouped_keys.update(keys.values())
    if unresolved and family is not None and det is not None and det.kind != "unknown":
        more = " ..." if len(unresolved) > 3 else ""
        warnings.append(
            f"{p.name}: {len(unresolved)} module(s) are not {family.name} module names and keep their names: "
            + ", ".join(unresolved[:3])
            + more
        )
    extra = [k for k in header.tensors if k not in grouped_keys]
    from lorasmith.io.reader import open_tensors

    # opened now, not on first use: worker threads read tensors concurrently (positional reads); with the
    # header parsed above (parsing it again cost 13 ms for a 3000-tensor LoRA)
    return LoraFile(
        path=p,
        header=header,
        detection=det,
        arch=family,
        variant=variant,
        spelling=spelling,
        modules=modules,
        extra_keys=extra,
        warnings=warnings,
        _tf=open_tensors(p, header),
    )


def suffix_style_of(spelling: str | None, modules: Iterable[ModuleInfo] = ()) -> SuffixStyle:
    """The tensor suffix style to write for ``spelling``; for an unknown spelling, the modules' own style.

    A LoRA factor spelling ``peft`` means PEFT suffixes; ``kohya`` and the old diffusers spellings
    (``_lora.down.weight``...) are written with kohya suffixes.
    """
    if spelling is not None and spelling in SPELLINGS:
        return SPELLINGS[spelling].suffixes
    styles = {m.summary.spelling for m in modules if m.summary.spelling}
    return "peft" if styles == {"peft"} else "kohya"


# -------------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Contribution:
    """One input module's share of a :class:`Unit`.

    The module's delta rows ``[src_start, src_start + rows)`` are added, times ``weight``, to the unit's rows
    ``[dst_start, dst_start + rows)``.

    :ivar file: the input file.
    :ivar module: the module name in that file.
    :ivar weight: the merge weight (1 for a plain input).
    """

    file: LoraFile
    module: str
    weight: float
    src_start: int
    dst_start: int
    rows: int

    @property
    def info(self) -> ModuleInfo:
        """The module's header-level description."""
        return self.file.modules[self.module]

    @property
    def whole(self) -> bool:
        """Whether the contribution is the whole module placed over the whole unit (no split, no fuse)."""
        out = self.info.summary.out_features
        return self.src_start == 0 and self.dst_start == 0 and out == self.rows


@dataclass(frozen=True)
class Unit:
    """One module of the output: its name, where its delta lands, and what contributes to it.

    :ivar name: the output module name (tensor keys are ``name + suffix``).
    :ivar alias: its family alias, ``None`` when names are kept as they are (unknown family or module).
    :ivar out_features: rows of the delta.
    :ivar in_features: input features (channels for a conv).
    :ivar kernel: the conv kernel, ``None`` for a linear layer.
    :ivar conv_shaped: write conv-shaped factors (4-D; also for 1x1 convs such as SD1 ``proj_in``).
    :ivar base_key: the canonical weight key the delta lands on, ``None`` when unknown.
    :ivar base_slice: the row slice of that weight in the file's own coordinates (see the module
        docstring), ``None`` for the whole weight.
    :ivar base_rows: rows of the whole canonical weight in the file's coordinates (``None`` if unknown).
    :ivar contributions: the input modules, in input order.
    :ivar passthrough: the unit copies one module that cannot be decomposed (norm, OFT, BOFT, GLoRA).
    """

    name: str
    alias: Alias | None
    out_features: int
    in_features: int
    kernel: tuple[int, ...] | None
    conv_shaped: bool
    base_key: str | None
    base_slice: tuple[int, int, int] | None
    base_rows: int | None
    contributions: tuple[Contribution, ...]
    passthrough: bool = False

    @property
    def in_flat(self) -> int:
        """Columns of the delta as a matrix: ``in * kh * kw``."""
        return self.in_features * (math.prod(self.kernel) if self.kernel else 1)

    @property
    def is_conv(self) -> bool:
        """A convolution with a kernel larger than 1x1 (what ``--conv-rank`` applies to)."""
        return self.kernel is not None and math.prod(self.kernel) > 1

    @property
    def algos(self) -> list[str]:
        """The algorithms of the contributing modules (``lora``, ``loha``...; DoRA shows as ``+dora``)."""
        out = []
        for c in self.contributions:
            s = c.info.summary
            out.append(s.algo + ("+dora" if s.has_dora else ""))
        return out

    @property
    def lowrank(self) -> bool:
        """Whether the delta is exactly a low-rank product of its contributions' factors."""
        return all(c.info.summary.algo in LOWRANK_ALGOS for c in self.contributions)

    @property
    def single(self) -> Contribution | None:
        """The one contribution when the unit is exactly one input module at weight 1, else ``None``."""
        if (
            len(self.contributions) == 1
            and self.contributions[0].whole
            and self.contributions[0].weight == 1.0
        ):
            return self.contributions[0]
        return None

    @property
    def input_rank(self) -> int | None:
        """The stored rank of the input (summed over contributions), ``None`` for full diffs."""
        ranks = [c.info.summary.rank for c in self.contributions]
        if any(r is None for r in ranks):
            return None
        return sum(r for r in ranks if r is not None)

    @property
    def dtype(self) -> str:
        """The safetensors dtype the output factors are written in: the first contribution's."""
        return self.contributions[0].info.dtype


def _rows_of(info: ModuleInfo, path: Path) -> int:
    out = info.summary.out_features
    if out is None:
        raise AdapterError(f"{path}: module {info.name!r} ({info.summary.algo}) has no known row count")
    return out


def _real_range(target: Target, full_rows: int | None) -> tuple[int, int] | None:
    """Real row range ``[start, end)`` of a target; ``None`` when the whole weight's size is unknown."""
    if target.slice is not None:
        dim, start, length = target.slice
        if dim != 0:
            return None
        return start, start + length
    return None if full_rows is None else (0, full_rows)


def _real_full_rows(arch: Architecture, variant: str | None, key: str) -> int | None:
    """Rows of the real weight ``key`` names (:meth:`Architecture.target_spec`); ``None`` if unknown."""
    spec = arch.target_spec(key, variant)
    return int(spec.shape[0]) if spec is not None and spec.shape else None


@dataclass
class _Geometry:
    """Mapping between real rows of one canonical weight and a file's rows (``real = local * ratio``)."""

    ratio: Fraction

    def local(self, real: int, what: str) -> int:
        value = Fraction(real) / self.ratio
        if value.denominator != 1:
            raise ShapeMismatchError(
                f"{what}: rows do not line up with the fused weight's parts",
                hint="the LoRA's shapes do not fit its family; pass --arch or check the file",
            )
        return int(value)


def _output_index(arch: Architecture, variant: str | None, spelling: str) -> dict[str, list[Alias]]:
    index: dict[str, list[Alias]] = {}
    for alias in arch.aliases(variant, spelling=spelling):
        index.setdefault(alias.target.key, []).append(alias)
    return index


def plan_units(
    inputs: Sequence[tuple[LoraFile, float]],
    *,
    spelling: str | None = None,
) -> list[Unit]:
    """Map the modules of ``inputs`` (file, merge weight) onto output modules.

    :param inputs: the files in order (the first decides names and, without ``spelling``, the spelling).
    :param spelling: write names in this spelling of the family (``--to``); ``None`` keeps the first
        input's names and maps later inputs' modules onto them (or onto the first input's spelling).
    :returns: the units, in the order their first module appears.
    :raises LorasmithError: a module that cannot be placed (no counterpart in the spelling, rows that do
        not line up, shapes that differ between inputs, an algorithm that cannot be merged or converted).
    """
    if not inputs:
        raise LorasmithError("no input LoRA given")
    first = inputs[0][0]
    family = first.arch
    variant = first.variant
    if spelling is not None:
        if family is None:
            raise DetectionError(
                f"{first.path}: the family is unknown, so its modules cannot be renamed to {spelling!r}",
                hint="pass --arch to name the family, or leave out --to",
            )
        if spelling not in family.spellings:
            raise LorasmithError(
                f"family {family.id!r} has no LoRA spelling {spelling!r}",
                hint="spellings: " + ", ".join(family.spellings),
            )
    out_spelling = spelling or first.spelling
    index = (
        _output_index(family, variant, out_spelling)
        if family is not None and out_spelling is not None
        else {}
    )
    for f, _ in inputs[1:]:
        if (f.arch is None) != (family is None) or (
            family is not None and f.arch is not None and f.arch.id != family.id
        ):
            a = family.id if family is not None else "unknown"
            b = f.arch.id if f.arch is not None else "unknown"
            raise ArchMismatchError(
                f"cannot merge LoRAs of different families: {first.path.name} is {a}, {f.path.name} is {b}",
                hint="merge LoRAs made for the same model; pass --arch if detection is wrong",
            )
        if family is not None and f.variant is not None and variant is not None and f.variant != variant:
            raise ArchMismatchError(
                f"cannot merge LoRAs of different {family.name} variants: {first.path.name} is {variant}, "
                f"{f.path.name} is {f.variant}",
                hint="merge LoRAs made for the same model variant",
            )

    builder = _UnitBuilder(family, variant, index, keep_names=spelling is None, spelling=out_spelling)
    for f, weight in inputs:
        for info in f.modules.values():
            builder.add(f, info, weight, is_first=f is first)
    return builder.units()


@dataclass
class _Slot:
    """A unit under construction."""

    name: str
    alias: Alias | None
    key: str | None
    real: tuple[int, int] | None
    geometry: _Geometry | None
    contributions: list[Contribution] = field(default_factory=list)


class _UnitBuilder:
    def __init__(
        self,
        family: Architecture | None,
        variant: str | None,
        index: dict[str, list[Alias]],
        keep_names: bool,
        spelling: str | None = None,
    ) -> None:
        self.family = family
        self.variant = variant
        self.index = index
        self.keep_names = keep_names
        self.spelling = spelling
        self.slots: dict[str, _Slot] = {}
        self.by_key: dict[str, list[_Slot]] = {}

    # ---- helpers
    def _slot(
        self,
        name: str,
        alias: Alias | None,
        key: str | None,
        real: tuple[int, int] | None,
        geometry: _Geometry | None,
    ) -> _Slot:
        slot = self.slots.get(name)
        if slot is None:
            slot = _Slot(name, alias, key, real, geometry)
            self.slots[name] = slot
            if key is not None:
                self.by_key.setdefault(key, []).append(slot)
        return slot

    def _full_rows(self, key: str) -> int | None:
        assert self.family is not None
        return _real_full_rows(self.family, self.variant, key)

    def add(self, f: LoraFile, info: ModuleInfo, weight: float, *, is_first: bool) -> None:
        rows = _rows_of(info, f.path)
        target = info.target
        where = f"{f.path.name}: module {info.name!r}"
        if target is None or self.family is None:
            # Unknown family or module: names are kept, and merged inputs meet by name.
            if not self.keep_names:
                raise LorasmithError(
                    f"{where} is not a known module name, so it cannot be written in another spelling",
                    hint="leave out --to, or pass --arch if the family was detected wrongly",
                )
            slot = self._slot(info.name, None, None, None, None)
            self._place(slot, f, info, weight, 0, 0, rows)
            return
        real = _real_range(target, self._full_rows(target.key))
        if real is None:
            raise LorasmithError(f"{where}: its target {target.key} has no known row range")
        geometry = _Geometry(Fraction(real[1] - real[0], rows))
        if is_first and self.keep_names and not any(s.real == real for s in self.by_key.get(target.key, [])):
            # The first input keeps its own module names (and its own granularity).
            slot = self._slot(info.name, info.alias, target.key, real, geometry)
            self._place(slot, f, info, weight, 0, 0, rows)
            return
        covering = self._covering(target.key, real)
        if rows_uncovered(real, [s.real for s in covering if s.real is not None]):
            # New output modules: the output spelling's aliases of this weight that cover these rows.
            for alias in self._aliases_for(target, real, where):
                if alias.name in self.slots:
                    continue
                a_real = _real_range(alias.target, self._full_rows(alias.target.key))
                assert a_real is not None
                for s in self.by_key.get(target.key, []):
                    if s.real is not None and _overlap(s.real, a_real) and s.real != a_real:
                        raise LorasmithError(
                            f"{where}: its rows overlap output module {s.name!r} only in part",
                            hint="merge LoRAs whose fused/split layouts agree, or pass --to",
                        )
                self._slot(alias.name, alias, target.key, a_real, geometry)
            covering = self._covering(target.key, real)
        for slot in covering:
            assert slot.real is not None and slot.geometry is not None
            if slot.geometry.ratio != geometry.ratio:
                raise ShapeMismatchError(
                    f"{where}: its shapes are scaled differently from the other inputs' "
                    f"({rows} rows for {real[1] - real[0]} rows of the model)",
                    hint="merge LoRAs made for the same model",
                )
            lo, hi = max(slot.real[0], real[0]), min(slot.real[1], real[1])
            src = geometry.local(lo - real[0], where)
            dst = geometry.local(lo - slot.real[0], where)
            self._place(slot, f, info, weight, src, dst, geometry.local(hi - lo, where))

    def _covering(self, key: str, real: tuple[int, int]) -> list[_Slot]:
        return [s for s in self.by_key.get(key, []) if s.real is not None and _overlap(s.real, real)]

    def _aliases_for(self, target: Target, real: tuple[int, int], where: str) -> list[Alias]:
        candidates = []
        for alias in self.index.get(target.key, []):
            a_real = _real_range(alias.target, self._full_rows(alias.target.key))
            if a_real is not None and _overlap(a_real, real):
                candidates.append((a_real, alias))
        if not candidates or rows_uncovered(real, [r for r, _ in candidates]):
            raise LorasmithError(
                f"{where} has no counterpart in the output spelling"
                + (f" {self.spelling!r}" if self.spelling else ""),
                hint=self._spellings_naming(target),
            )
        return [a for _, a in sorted(candidates, key=lambda t: t[0])]

    def _spellings_naming(self, target: Target) -> str:
        """A hint naming the family's spellings that have a name for ``target``'s weight."""
        have: list[str] = []
        if self.family is not None:
            for spelling in self.family.spellings:
                if spelling != self.spelling and any(
                    a.target.key == target.key for a in self.family.aliases(self.variant, spelling=spelling)
                ):
                    have.append(spelling)
        if not have:
            return "leave out --to to keep the input's spelling"
        return f"spellings that name it: {', '.join(have)}; or leave out --to to keep the input's names"

    def _place(
        self, slot: _Slot, f: LoraFile, info: ModuleInfo, weight: float, src: int, dst: int, n: int
    ) -> None:
        slot.contributions.append(
            Contribution(file=f, module=info.name, weight=weight, src_start=src, dst_start=dst, rows=n)
        )

    def units(self) -> list[Unit]:
        out = []
        for slot in self.slots.values():
            out.append(_finish(slot))
        return out


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def rows_uncovered(real: tuple[int, int], ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether some row of ``real`` (``[start, stop)``) lies in none of ``ranges``."""
    pos = real[0]
    for lo, hi in sorted(ranges):
        if lo > pos:
            return True
        pos = max(pos, hi)
        if pos >= real[1]:
            return False
    return pos < real[1]


def _finish(slot: _Slot) -> Unit:
    first = slot.contributions[0]
    s = first.info.summary
    where = f"output module {slot.name!r}"
    if s.algo not in _ADDITIVE_ALGOS and (
        len(slot.contributions) > 1 or not first.whole or first.weight != 1.0
    ):
        raise LorasmithError(
            f"{where}: {s.algo} modules cannot be merged, scaled, split or fused",
            hint="give such a LoRA alone, without a merge weight or --to",
        )
    for c in slot.contributions:
        cs = c.info.summary
        if cs.has_dora and (len(slot.contributions) > 1 or not c.whole or c.weight != 1.0):
            raise LorasmithError(
                f"{where}: DoRA modules cannot be merged, scaled, split or fused (their delta depends on the "
                "base weight)",
                hint="give a DoRA LoRA alone, without a merge weight or a spelling change that splits/fuses",
            )
        if cs.algo not in _ADDITIVE_ALGOS and c is not first:
            raise LorasmithError(f"{where}: {cs.algo} modules cannot be merged")
    in_features, kernel = _geometry_of(first)
    for c in slot.contributions[1:]:
        inf, ker = _geometry_of(c)
        flat_a = in_features * (math.prod(kernel) if kernel else 1)
        flat_b = inf * (math.prod(ker) if ker else 1)
        if flat_a != flat_b:
            raise ShapeMismatchError(
                f"{where}: {c.file.path.name} module {c.module!r} has {flat_b} input columns, "
                f"{first.file.path.name} module {first.module!r} has {flat_a}",
                hint="merge LoRAs made for the same model",
            )
    if slot.real is not None and slot.geometry is not None:
        out_rows = slot.geometry.local(slot.real[1] - slot.real[0], where)
    else:
        out_rows = _rows_of(first.info, first.file.path)
    for c in slot.contributions:
        if c.dst_start + c.rows > out_rows or c.src_start + c.rows > _rows_of(c.info, c.file.path):
            raise ShapeMismatchError(
                f"{where}: {c.file.path.name} module {c.module!r} has {_rows_of(c.info, c.file.path)} rows, "
                f"the output module has {out_rows}",
                hint="merge LoRAs made for the same model",
            )
    base_slice: tuple[int, int, int] | None = None
    base_rows: int | None = None
    if slot.alias is not None and slot.geometry is not None:
        tgt = slot.alias.target
        full = _real_full_rows(first.file.arch, first.file.variant, tgt.key) if first.file.arch else None
        if full is not None:
            base_rows = (
                slot.geometry.local(full, where) if Fraction(full) % slot.geometry.ratio == 0 else None
            )
        if tgt.slice is not None:
            dim, start, length = tgt.slice
            base_slice = (dim, slot.geometry.local(start, where), slot.geometry.local(length, where))
    conv_shaped = len(s.shapes.get(s.roles.get("up", ""), ())) == 4 or (
        kernel is not None and math.prod(kernel) > 1
    )
    return Unit(
        name=slot.name,
        alias=slot.alias,
        out_features=out_rows,
        in_features=in_features,
        kernel=kernel,
        conv_shaped=conv_shaped,
        base_key=slot.key,
        base_slice=base_slice,
        base_rows=base_rows,
        contributions=tuple(slot.contributions),
        passthrough=s.algo not in _ADDITIVE_ALGOS,
    )


def _geometry_of(c: Contribution) -> tuple[int, tuple[int, ...] | None]:
    """``(in_features, kernel)`` of a contribution's delta.

    LoHa and factored LoKr store a conv delta flattened (``[out, in*kh*kw]``); the kernel then comes from
    the target weight's shape in the family's inventory, so that the output can be written conv-shaped.
    """
    s = c.info.summary
    if s.delta_shape is not None and len(s.delta_shape) > 2:
        return int(s.delta_shape[1]), tuple(int(d) for d in s.delta_shape[2:])
    flat = (
        int(s.delta_shape[1])
        if s.delta_shape is not None and len(s.delta_shape) == 2
        else int(s.in_features or 0)
    )
    family, alias = c.file.arch, c.info.alias
    if family is not None and alias is not None and s.algo in ("loha", "lokr", "full"):
        spec = None
        for inv in (family.canonical_inventory(c.file.variant), *family.inventories()):
            spec = inv.tensors.get(alias.target.key)
            if spec is not None:
                break
        if spec is not None and len(spec.shape) == 4:
            kernel = tuple(int(d) for d in spec.shape[2:])
            k = math.prod(kernel)
            if k > 1 and flat % k == 0:
                return flat // k, kernel
    return flat, None


# ------------------------------------------------------------------------------------------------- deltas
@dataclass(frozen=True)
class UnitExtras:
    """What a unit carries besides its weight delta.

    :ivar scale: the output scale ``g = alpha / rank`` to keep: the contributions' common ``g`` (their
        ``alpha / rank``; 1 for full diffs), or 1 when merged modules disagree.
    :ivar dora: the DoRA magnitude to write unchanged (single-module units only), with its suffix.
    :ivar bias: the summed bias delta ``sum_i weight_i * diff_b_i`` over the unit's rows, or ``None``.
    """

    scale: float
    dora: torch.Tensor | None
    dora_suffix: str | None
    bias: torch.Tensor | None


def unit_scale(modules: Sequence[AdapterModule]) -> float:
    """The output scale of a unit of ``modules``: their common ``scale``, else 1 (see :class:`UnitExtras`)."""
    scales = {float(m.scale) for m in modules}
    return scales.pop() if len(scales) == 1 else 1.0


def read_unit_extras(unit: Unit, read: Sequence[ReadModule]) -> UnitExtras:
    """Collect the output scale, DoRA magnitude and bias delta of ``unit`` from its read modules."""
    import torch

    dora = read[0].dora if len(read) == 1 else None
    bias: torch.Tensor | None = None
    for c, r in zip(unit.contributions, read, strict=True):
        if r.bias is None:
            continue
        if bias is None:
            bias = torch.zeros(unit.out_features, dtype=torch.float64)
        part = r.bias.to(torch.float64).reshape(-1)[c.src_start : c.src_start + c.rows]
        bias[c.dst_start : c.dst_start + c.rows] += c.weight * part
    if bias is not None:
        bias = bias.to(read[0].bias.dtype if read[0].bias is not None else torch.float32)
    return UnitExtras(
        scale=unit_scale([r.module for r in read]),
        dora=dora,
        dora_suffix=read[0].dora_suffix if dora is not None else None,
        bias=bias,
    )


def unit_lowrank_parts(
    unit: Unit, read: Sequence[ReadModule], dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unit's delta as ``(up [out, R], down [R, in*kh*kw], scale [R])``, ``delta = (up * scale) @ down``.

    ``R`` is the sum of the contributions' ranks; ``scale`` holds each contribution's
    ``weight * alpha / rank`` on its columns (kept apart so that no pass over ``up`` is spent on it; see
    :func:`unit_lowrank` for the product form). LoCon Tucker cores are folded into their down factor
    first (:meth:`~lorasmith.adapters.base.LowRank.fold`, never ignored); each contribution's rows are
    placed at its rows of the unit (zeros elsewhere). The product is never formed.

    :raises AdapterError: a contribution that is not a low-rank module.
    """
    import torch

    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for c, r in zip(unit.contributions, read, strict=True):
        low = r.module.lowrank()
        if low is None:
            raise AdapterError(f"module {c.module!r} ({c.info.summary.algo}) has no low-rank factors")
        folded = low.fold(dtype)
        up = folded.up.to(device=device, dtype=dtype).reshape(folded.up.shape[0], -1)
        down = folded.down.to(device=device, dtype=dtype).reshape(folded.down.shape[0], -1)
        if not (c.whole and up.shape[0] == unit.out_features):
            placed = torch.zeros(unit.out_features, up.shape[1], dtype=dtype, device=up.device)
            placed[c.dst_start : c.dst_start + c.rows] = up[c.src_start : c.src_start + c.rows]
            up = placed
        ups.append(up)
        downs.append(down)
        scales.append(torch.full((up.shape[1],), c.weight * folded.scale, dtype=dtype, device=up.device))
    if len(ups) == 1:
        return ups[0], downs[0], scales[0]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0), torch.cat(scales)


def unit_lowrank(
    unit: Unit, read: Sequence[ReadModule], dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's delta as one exact factor pair ``(up_c [out, R], down_c [R, in*kh*kw])``.

    ``delta = up_c @ down_c``: :func:`unit_lowrank_parts` with the scales multiplied into ``up_c``'s
    columns (each contribution's ``weight * alpha / rank``). The product is never formed.

    :raises AdapterError: a contribution that is not a low-rank module.
    """
    up, down, scale = unit_lowrank_parts(unit, read, dtype, device)
    return up * scale, down


def unit_dense(
    unit: Unit, read: Sequence[ReadModule], dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """The unit's delta materialised as a matrix ``[out, in*kh*kw]`` (every additive algorithm).

    :raises AdapterError: a module whose delta depends on the base weight.
    """
    import torch

    total = torch.zeros(unit.out_features, unit.in_flat, dtype=dtype, device=device)
    for c, r in zip(unit.contributions, read, strict=True):
        d = r.module.delta(dtype=dtype, device=device)
        d = d.reshape(d.shape[0], -1)
        total[c.dst_start : c.dst_start + c.rows] += c.weight * d[c.src_start : c.src_start + c.rows]
    return total


# ------------------------------------------------------------------------------------------------ writing
_STYLE_SUFFIXES: dict[str, tuple[str, str]] = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
}


def _factor_shapes(unit: Unit, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if unit.conv_shaped:
        kernel = unit.kernel or (1, 1)
        return (rank, unit.in_features, *kernel), (unit.out_features, rank, *([1] * len(kernel)))
    return (rank, unit.in_flat), (unit.out_features, rank)


def lora_tensor_specs(
    unit: Unit,
    rank: int,
    style: SuffixStyle,
    dtype: str,
    extras: UnitExtras | None = None,
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> ``(safetensors dtype, shape)`` of what :func:`encode_unit` writes for ``unit`` at ``rank``.

    kohya: ``.lora_down.weight``, ``.lora_up.weight`` (``dtype``) and a 0-d F32 ``.alpha``; PEFT:
    ``.lora_A.weight`` and ``.lora_B.weight``. Plus the DoRA magnitude and the bias delta when ``extras``
    has them. Conv units get ``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]``.
    """
    down_sfx, up_sfx = _STYLE_SUFFIXES[style]
    down_shape, up_shape = _factor_shapes(unit, rank)
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        unit.name + down_sfx: (dtype, down_shape),
        unit.name + up_sfx: (dtype, up_shape),
    }
    if style == "kohya":
        out[unit.name + ".alpha"] = ("F32", ())
    out.update(_extra_specs(unit, style, extras))
    return out


def _dora_suffix_for(style: SuffixStyle, given: str | None) -> str:
    if style == "peft":
        return ".lora_magnitude_vector"
    return ".dora_scale" if given is None or given.startswith(".lora_magnitude") else given


def _extra_specs(
    unit: Unit, style: SuffixStyle, extras: UnitExtras | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    from lorasmith.io.dtypes import safetensors_dtype

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    if extras is None:
        return out
    if extras.dora is not None:
        shape = _dora_shape(extras.dora, style)
        out[unit.name + _dora_suffix_for(style, extras.dora_suffix)] = (
            safetensors_dtype(extras.dora.dtype),
            shape,
        )
    if extras.bias is not None:
        out[unit.name + ".diff_b"] = (safetensors_dtype(extras.bias.dtype), tuple(extras.bias.shape))
    return out


def _dora_shape(dora: torch.Tensor, style: SuffixStyle) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dora.shape)
    # PEFT stores the per-output-row magnitude as a vector [out]; LyCORIS/kohya as [out, 1, ...].
    if style == "peft" and len(shape) > 1 and all(d == 1 for d in shape[1:]):
        return (shape[0],)
    return shape


def encode_unit(
    unit: Unit,
    up: torch.Tensor,
    down: torch.Tensor,
    alpha: float,
    style: SuffixStyle,
    dtype: torch.dtype,
    extras: UnitExtras | None = None,
) -> dict[str, torch.Tensor]:
    """The output tensors of ``unit`` with factors ``up [out, r]``, ``down [r, in*kh*kw]`` and ``alpha``.

    The delta a loader computes is ``alpha / r * up @ down``. kohya style stores that as is (0-d F32
    alpha); PEFT style bakes ``alpha / r`` into the factors (:func:`lorasmith.adapters.encode_lora`). The
    DoRA magnitude is written unchanged (reshaped to ``[out]`` for PEFT) and the bias delta as
    ``.diff_b``. Shapes and dtypes equal :func:`lora_tensor_specs`.
    """
    from lorasmith.adapters.lora import encode_lora

    encoded = encode_lora(
        up,
        down,
        alpha,
        suffixes=style,
        conv=unit.conv_shaped,
        kernel=(unit.kernel or (1, 1)) if unit.conv_shaped else None,
        dtype=dtype,
    )
    out = {unit.name + suffix: t for suffix, t in encoded.items()}
    if extras is not None:
        if extras.dora is not None:
            out[unit.name + _dora_suffix_for(style, extras.dora_suffix)] = extras.dora.reshape(
                _dora_shape(extras.dora, style)
            ).contiguous()
        if extras.bias is not None:
            out[unit.name + ".diff_b"] = extras.bias.contiguous()
    return out


_HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
_STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def expected_file_bytes(
    specs: Iterable[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str], *, hashes: bool = True
) -> int:
    """The exact size of the file :class:`~lorasmith.io.writer.SafetensorsWriter` writes for ``specs``.

    :param specs: ``(name, safetensors dtype, shape)`` of every tensor.
    :param metadata: the metadata handed to the writer.
    :param hashes: whether the writer adds the sshs hashes (it does by default); their values have a
        fixed length, so placeholders give the exact header size.
    """
    layout = plan_layout(specs)
    meta = dict(metadata)
    if hashes:
        meta.update(_HASH_PLACEHOLDERS)
        if "modelspec.sai_model_spec" in meta:
            meta["modelspec.hash_sha256"] = "0x" + "0" * 64
    header = encode_header(layout, meta)
    data = layout[-1].end if layout else 0
    return 8 + len(header) + data


def _common(values: Sequence[float | int]) -> str:
    distinct = {float(v) for v in values}
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct.pop()
    return str(int(value)) if value.is_integer() else format_number(value)


def output_metadata(
    base: Mapping[str, str],
    *,
    linear: Sequence[tuple[int, float]],
    conv: Sequence[tuple[int, float]],
    record_key: str,
    record: Mapping[str, object],
) -> dict[str, str]:
    """Metadata of an output LoRA: the input's, updated.

    - every input key is kept, except stale hashes (``sshs_*``, ``modelspec.hash_sha256``), which the
      writer recomputes;
    - ``ss_network_dim`` / ``ss_network_alpha``: the rank and alpha of the linear modules (of the conv
      modules when there are no linear ones), ``"Dynamic"`` when they differ between modules, as kohya
      writes it (alphas as kohya writes them: ``"8.0"`` style becomes ``"8"``);
    - ``ss_network_args`` (a JSON object): ``conv_dim`` / ``conv_alpha`` updated the same way when the
      input has them or the output has conv modules;
    - ``record_key`` (a ``lorasmith_*`` key): ``record`` as compact JSON (what was done, with what inputs).

    :param linear: ``(rank, alpha)`` of every linear (and 1x1 conv) module written.
    :param conv: ``(rank, alpha)`` of every conv module with a kernel larger than 1x1.
    """
    if not record_key.startswith(METADATA_KEY_PREFIX):
        raise ValueError(f"record key {record_key!r} must start with {METADATA_KEY_PREFIX!r}")
    meta = {k: v for k, v in base.items() if k not in _STALE_KEYS}
    main = list(linear) or list(conv)
    if main:
        meta["ss_network_dim"] = _common([r for r, _ in main])
        meta["ss_network_alpha"] = _common([a for _, a in main])
    args_text = meta.get("ss_network_args")
    args: dict[str, object] | None = None
    if args_text:
        try:
            parsed = json.loads(args_text)
            args = parsed if isinstance(parsed, dict) else None
        except ValueError:
            args = None
    if conv and (args is not None or linear):
        args = dict(args or {})
        args["conv_dim"] = _common([r for r, _ in conv])
        args["conv_alpha"] = _common([a for _, a in conv])
        meta["ss_network_args"] = json.dumps(args)
    elif args is not None and not conv and ("conv_dim" in args or "conv_alpha" in args):
        args = {k: v for k, v in args.items() if k not in ("conv_dim", "conv_alpha")}
        meta["ss_network_args"] = json.dumps(args)
    meta[record_key] = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return meta


def iter_extra_tensors(f: LoraFile) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``f`` that belong to no adapter module (bundled embeddings...), read one by one."""
    for key in f.extra_keys:
        yield key, f.tensor(key)
