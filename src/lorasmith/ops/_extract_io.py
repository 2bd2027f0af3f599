"""Inputs and scratch storage of ``extract``: checkpoints and LoRAs read as per-key deltas, one key at a time.

A checkpoint is read under canonical keys whatever its layout: a single file (with or without wrapper
prefixes) through :func:`canonical_map`; a diffusers folder, or one file in a family's diffusers layout (a
diffusers UNet, a FLUX/Z-Image diffusers transformer), through the family's
:meth:`~lorasmith.archs.base.Architecture.layout_map` (:class:`~lorasmith.ops.layouts.LayoutSource`:
split q/k/v parts are concatenated back into the fused canonical weight on read), whatever the storage of
its weights (one file, shards with an index, ``.bin`` pickles). Base and tuned may so be in two different
layouts.

Reads happen on the calling thread only (:meth:`CheckpointInput.tensor`, :meth:`LoraInput.fetch`); the
computations on what was read (:meth:`LoraInput.delta_of`) are safe to run in worker threads.

Internal to :mod:`lorasmith.ops.extract`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasmith.archs.base import STRIP_PREFIXES, Architecture, Detection, Inventory, Target, lora_modules
from lorasmith.errors import (
    ArchMismatchError,
    DetectionError,
    InvalidFileError,
    NotAvailableError,
    ShapeMismatchError,
)
from lorasmith.io.dtypes import safetensors_dtype, torch_dtype
from lorasmith.io.header import Header, TensorInfo
from lorasmith.io.reader import TensorFile, open_tensors
from lorasmith.ops.layouts import LayoutSource, diffusers_inventory, main_header
from lorasmith.registry import get_registry

__all__ = ["CheckpointInput", "LoraInput", "LoraParts", "Spill", "canonical_map", "open_input"]

_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})


def canonical_map(header: Header, inventory: Inventory) -> dict[str, str]:
    """Canonical key -> the file's key, for a single-file, bare or prefixed layout of one family.

    A key is canonical as it is; otherwise wrapper prefixes (``model.diffusion_model.``, ``unet.``...) are
    stripped and the inventory's component prefixes tried, so that a bare UNet / transformer file maps
    onto the canonical single-file names.
    """
    canon = inventory.tensors
    prefixes = ["", *inventory.components.values()]
    out: dict[str, str] = {}
    for name in header.tensors:
        candidates = [name] + [name[len(p) :] for p in STRIP_PREFIXES if name.startswith(p)]
        found = next((p + c for c in candidates for p in prefixes if p + c in canon), None)
        if found is not None:
            out.setdefault(found, name)
    return out


@dataclass
class CheckpointInput:
    """A checkpoint opened for extraction: family, variant, canonical key map; tensors on demand.

    For a checkpoint in a diffusers layout (``source`` set), ``header`` is a virtual header in canonical
    names and shapes (the fused weights assembled), so ``keys`` is the identity and ``raw`` reads canonical
    tensors; ``--as-checkpoint`` then writes the single-file layout.
    """

    path: Path
    header: Header
    arch: Architecture
    variant: str | None
    keys: dict[str, str]
    _tf: TensorFile | None = None
    source: LayoutSource | None = None
    #: the family the file's keys name by themselves when it was read in another, forced one (a tuned
    #: checkpoint is read in the base's family; see :func:`check_pair`)
    own_arch: str | None = None

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor of canonical ``key`` (stored dtype, CPU)."""
        return self.raw(self.keys[key])

    def raw(self, file_key: str) -> torch.Tensor:
        """The tensor stored under the file's own ``file_key``."""
        if self.source is not None:
            return self.source.get(file_key)
        if self._tf is None:
            self._tf = open_tensors(self.path)
        return self._tf.get(file_key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of canonical ``key``."""
        return tuple(self.header.tensors[self.keys[key]].shape)

    def close(self) -> None:
        """Close the file."""
        if self._tf is not None:
            self._tf.close()
            self._tf = None
        if self.source is not None:
            self.source.close()


def _layout_input(path: Path, weights: Path, family: Architecture, det: Detection) -> CheckpointInput | None:
    """``path`` read through the family's diffusers layout map; ``None`` if it is not in that layout.

    A folder always is; a single file is when detection names a non-canonical layout the family maps.
    """
    canonical = family.canonical_inventory(det.variant if det.variant in family.variants else None)
    if not path.is_dir() and (det.layout is None or det.layout == canonical.layout):
        return None
    try:
        inv = diffusers_inventory(family, canonical.variant)
        family.layout_map(inv.id)
    except NotAvailableError:
        if path.is_dir():
            raise
        return None
    if not path.is_dir() and det.layout != inv.layout:
        return None
    source = LayoutSource(path, family, inv)
    tensors = {k: TensorInfo(k, d, s, 0, 0) for k in source.keys for d, s in [source.specs[k]]}
    header = Header(weights, 0, 0, source.metadata, tensors)
    return CheckpointInput(path, header, family, det.variant, {k: k for k in tensors}, source=source)


#: The modules of a LoRA that land on one canonical key, as read by :meth:`LoraInput.fetch`:
#: ``(module name, target, suffix -> tensor)`` each.
LoraParts = list[tuple[str, Target, dict[str, torch.Tensor]]]


@dataclass
class LoraInput:
    """A LoRA whose materialised delta stands for a fine-tune (``--tuned`` / ``--tuned2`` given a LoRA).

    :ivar targets: canonical key -> ``(module name, target)`` of every module that lands on it.
    :ivar own_arch: the family the LoRA's own keys name, detected without forcing one (``None`` when
        detection alone cannot tell); ``arch`` is the family it is read as (the base's).
    """

    path: Path
    arch: Architecture
    variant: str | None
    lora: object  # a lorasmith.ops.loralib.LoraFile (kept untyped to avoid importing it at module level)
    targets: dict[str, list[tuple[str, Target]]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    own_arch: str | None = None

    def delta(self, key: str, base: torch.Tensor, real_rows: int | None) -> torch.Tensor | None:
        """The LoRA's delta on canonical ``key`` given the base weight (compute dtype), ``None`` if none.

        Computed as ``apply(W) - W`` per module, so DoRA and OFT modules give their true effect on this
        base; fused-weight slices land on their rows (scaled for shrunk test models). The same as
        :meth:`delta_of` of :meth:`fetch`.
        """
        return self.delta_of(self.fetch(key), base, real_rows)

    def fetch(self, key: str) -> LoraParts | None:
        """Read the tensors of the modules that land on canonical ``key`` (``None`` if none).

        The file is read here and only here, so that :meth:`delta_of` (pure computation) may run in a
        worker thread while the reads stay sequential in the caller's.
        """
        from lorasmith.ops.loralib import LoraFile

        mods = self.targets.get(key)
        if not mods:
            return None
        lf = self.lora
        assert isinstance(lf, LoraFile)
        parts: LoraParts = []
        for name, target in mods:
            info = lf.modules[name]
            tensors = {suffix: lf.tensor(k) for suffix, k in info.keys.items()}
            tensors.pop(".diff_b", None)
            parts.append((name, target, tensors))
        return parts

    def delta_of(
        self, parts: LoraParts | None, base: torch.Tensor, real_rows: int | None
    ) -> torch.Tensor | None:
        """The delta of modules read by :meth:`fetch` on ``base`` (compute dtype); ``None`` for no modules.

        Reads nothing: safe to call from a worker thread.
        """
        from lorasmith.adapters.parse import parse_module
        from lorasmith.ops.loralib import file_context

        if not parts:
            return None
        total = torch.zeros_like(base)
        for name, target, tensors in parts:
            with file_context(self.path):
                module = parse_module(name, dict(tensors))
            part_base, part_out = base, total
            if target.slice is not None:
                dim, start, length = target.slice
                actual = int(base.shape[dim])
                if real_rows is not None and real_rows != actual:
                    if real_rows % actual:
                        raise ShapeMismatchError(
                            f"{self.path.name}: module {name!r} does not fit the base's {actual} rows",
                            hint="the LoRA was made for another model of the family",
                        )
                    f = real_rows // actual
                    start, length = start // f, length // f
                part_base, part_out = base.narrow(dim, start, length), total.narrow(dim, start, length)
            with file_context(self.path):
                new = module.apply(part_base, 1.0, dtype=base.dtype)
            part_out += new.reshape(part_base.shape) - part_base
        return total

    def close(self) -> None:
        """Close the file."""
        from lorasmith.ops.loralib import LoraFile

        if isinstance(self.lora, LoraFile):
            self.lora.close()


Input = CheckpointInput | LoraInput


def open_input(path: Path, *, role: str, arch: str | None, allow_lora: bool) -> Input:
    """Open ``path`` as a checkpoint (or, when ``allow_lora``, a LoRA) and detect its family.

    :raises InvalidFileError: a LoRA where a checkpoint is needed, or a file without known keys.
    :raises DetectionError: no family matches.
    """
    # every shard's tensors together, .bin weights through the safe loader (as convert reads them)
    header = main_header(path)
    weights = header.path
    reg = get_registry()
    try:
        det = reg.detect(header, arch=arch, source=str(weights))
    except DetectionError as exc:
        raise DetectionError(f"{role} {exc.message}", hint=exc.hint) from None
    family = reg.get(det.arch)
    is_lora = det.kind == "lora"
    own: str | None = det.arch
    if allow_lora and arch is not None and lora_modules(header.tensors):
        # the family the LoRA's keys name by themselves: ``arch`` is usually the base's, forced, and a
        # forced family reads any LoRA, or sees no LoRA at all in another family's keys (see check_pair)
        try:
            found: Detection | None = reg.detect(header, source=str(weights))
        except DetectionError:
            found = None
        own = found.arch if found is not None and found.kind == "lora" else None
        is_lora = is_lora or own is not None
    if is_lora:
        if not allow_lora:
            raise InvalidFileError(
                f"{path}: --{role} is a {family.name} LoRA, not a checkpoint",
                hint="--base must be a full checkpoint; a LoRA may be given as --tuned",
            )
        from lorasmith.ops.loralib import load_lora

        lf = load_lora(path, arch=det.arch)
        targets: dict[str, list[tuple[str, Target]]] = {}
        unresolved: list[str] = []
        for name, info in lf.modules.items():
            if info.alias is None:
                unresolved.append(name)
                continue
            targets.setdefault(info.alias.target.key, []).append((name, info.alias.target))
        return LoraInput(path, family, lf.variant, lf, targets, unresolved, own_arch=own)
    layout = _layout_input(path, weights, family, det)
    if layout is not None:
        if not layout.keys:
            raise InvalidFileError(f"{path}: no {family.name} checkpoint keys", hint="check the file")
        return layout
    inv = family.canonical_inventory(det.variant) if det.variant in family.variants else None
    inv = inv or family.canonical_inventory(None)
    keys = canonical_map(header, inv)
    if not keys:
        raise InvalidFileError(f"{path}: no {family.name} checkpoint keys", hint="check the file")
    own_ckpt: str | None = None
    if allow_lora and arch is not None:
        # a tuned checkpoint is read in the base's family: tell its own, so that one of another family is
        # refused as such rather than by the first shape that differs
        try:
            mine: Detection | None = reg.detect(header, source=str(weights))
        except DetectionError:
            mine = None
        own_ckpt = mine.arch if mine is not None and mine.kind != "lora" else None
    return CheckpointInput(path, header, family, det.variant, keys, own_arch=own_ckpt)


def check_pair(base: CheckpointInput, other: Input, role: str, *, forced: bool = False) -> None:
    """Same family (and variant) for base and a tuned input.

    A LoRA is read in the base's family; when its own keys name another family it is refused, unless
    the family was ``forced`` (``--arch``: the user says how to read the files).

    :raises ArchMismatchError: different families or variants.
    """
    if (
        isinstance(other, LoraInput)
        and not forced
        and other.own_arch is not None
        and other.own_arch != base.arch.id
    ):
        raise ArchMismatchError(
            f"--{role} {other.path.name} is a {other.own_arch} LoRA, --base {base.path.name} a "
            f"{base.arch.id} checkpoint",
            hint="extract with the base checkpoint of the LoRA's family (or force one with --arch)",
        )
    if (
        isinstance(other, CheckpointInput)
        and not forced
        and other.own_arch is not None
        and other.own_arch != base.arch.id
    ):
        raise ArchMismatchError(
            f"checkpoints of different families: --{role} {other.path.name} is a {other.own_arch} "
            f"checkpoint, --base {base.path.name} a {base.arch.id} checkpoint",
            hint="extract from two models of the same family (or force one with --arch)",
        )
    if other.arch.id != base.arch.id:
        raise ArchMismatchError(
            f"--{role} {other.path.name} is {other.arch.name}, --base {base.path.name} is {base.arch.name}",
            hint="extract from two models of the same family",
        )
    if (
        isinstance(other, CheckpointInput)
        and other.variant is not None
        and base.variant is not None
        and other.variant != base.variant
    ):
        raise ArchMismatchError(
            f"--{role} {other.path.name} is variant {other.variant}, "
            f"--base {base.path.name} is {base.variant}",
            hint="extract from two models of the same variant",
        )


def is_float(header: Header, name: str) -> bool:
    """Whether tensor ``name`` of ``header`` is floating point."""
    return header.tensors[name].dtype in _FLOATS


class Spill:
    """Output tensors parked in an unnamed temporary file until the output can be planned.

    A LoRA's shapes are known only once every module's rank is chosen, and keeping all factors in RAM
    would make the peak memory grow with the output; parking them on disk keeps it at one tensor.
    """

    def __init__(self, folder: Path) -> None:
        # closed by close(); an unnamed temporary file vanishes even on a crash
        self._fh = tempfile.TemporaryFile(dir=folder if os.access(folder, os.W_OK) else None)  # noqa: SIM115
        self._index: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        self._end = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Park ``tensor`` (CPU, contiguous) under ``name``."""
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._fh.seek(self._end)
        self._fh.write(raw)
        self._index[name] = (self._end, len(raw), safetensors_dtype(t.dtype), tuple(int(d) for d in t.shape))
        self._end += len(raw)

    def plan(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> ``(dtype, shape)`` of everything parked."""
        return {n: (d, s) for n, (_o, _l, d, s) in self._index.items()}

    def get(self, name: str) -> torch.Tensor:
        """Read a parked tensor back."""
        offset, length, dtype, shape = self._index[name]
        self._fh.seek(offset)
        data = bytearray(self._fh.read(length))
        if not data:
            return torch.empty(shape, dtype=torch_dtype(dtype))
        return torch.frombuffer(data, dtype=torch_dtype(dtype)).reshape(shape).clone()

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Drop the scratch file."""
        self._fh.close()
