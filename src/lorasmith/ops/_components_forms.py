"""Converting a part between its key layouts (:class:`~lorasmith.archs.parts.PartForm`), bit-exactly.

A conversion is planned key by key (torch-free): each canonical tensor of the part kind is read from its
key(s) in the source form (several keys when the source splits a fused tensor into row blocks: HF CLIP's
``q_proj``/``k_proj``/``v_proj`` of OpenCLIP's ``in_proj_weight``) and written as its key(s) in the target
form. The tensor work moves values only (:func:`lorasmith.ops.layouts.to_canonical` /
:func:`~lorasmith.ops.layouts.to_layout`: concatenation, row slices, a transpose, a dropped 1x1), so a
round trip gives back the same bytes. The row counts of a layout entry are the real model's and scale with
a shrunk file, as in ``convert``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorasmith.archs.base import LayoutEntry
from lorasmith.errors import InvalidFileError
from lorasmith.ops.layouts import canonical_shape, layout_parts, layout_shape

if TYPE_CHECKING:
    import torch

    from lorasmith.archs.parts import PartKind

__all__ = ["Conversion", "convert_keys", "from_canonical", "output_shapes", "to_canonical"]


@dataclass(frozen=True)
class Conversion:
    """One canonical tensor: read ``reads`` (joined by ``entry_in``), write ``writes`` (cut by ``entry_out``).

    ``entry_in``/``entry_out`` are ``None`` when the tensor is stored under one key as it is.
    """

    reads: tuple[str, ...]
    entry_in: LayoutEntry | None
    writes: tuple[str, ...]
    entry_out: LayoutEntry | None


def _identity(keys: Sequence[str]) -> list[Conversion]:
    return [Conversion((k,), None, (k,), None) for k in keys]


def convert_keys(
    kind: PartKind | None, source: str | None, target: str | None, keys: Sequence[str], where: str
) -> list[Conversion]:
    """Plan the conversion of a part file's ``keys`` from form ``source`` to form ``target`` (``None``: the
    kind's file form), in the order of ``keys``.

    Same forms (or ``kind`` ``None``: an opaque part) copy every key as it is.

    :param where: names the file in errors (``"--clip-g clip_g.safetensors"``).
    :raises InvalidFileError: a key that is not the kind's in ``source``, or a fused tensor with only some
        of its parts.
    """
    if kind is None:
        return _identity(keys)
    src, dst = kind.form(source), kind.form(target)
    if src == dst:
        return _identity(keys)
    map_in: Mapping[str, LayoutEntry] = src.layout() if src.layout is not None else {}
    map_out: Mapping[str, LayoutEntry] = dst.layout() if dst.layout is not None else {}
    canonical = kind.tensors()
    owner = {part: key for key, entry in map_in.items() for part, _rows in entry.parts}
    present = set(keys)
    done: set[str] = set()
    out: list[Conversion] = []
    for key in keys:
        canon = owner.get(key)
        if canon is None:
            # canonical tensors the form leaves out keep their own name in it (logit_scale)
            if key not in canonical or key in map_in:
                raise InvalidFileError(
                    f"{where}: {key!r} is not a tensor of the {kind.name} in the {src.label}",
                    hint=f"give a complete {kind.name} file",
                )
            canon = key
        if canon in done:
            continue
        done.add(canon)
        entry_in = map_in.get(canon)
        reads = tuple(p for p, _ in entry_in.parts) if entry_in is not None else (canon,)
        missing = [r for r in reads if r not in present]
        if missing:
            raise InvalidFileError(
                f"{where}: has {reads[0] if reads[0] in present else key!r} but not {missing[0]!r}, "
                "parts of one tensor",
                hint=f"give a complete {kind.name} file",
            )
        entry_out = map_out.get(canon)
        writes = tuple(p for p, _ in entry_out.parts) if entry_out is not None else (canon,)
        out.append(Conversion(reads, entry_in, writes, entry_out))
    return out


def output_shapes(conv: Conversion, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes of ``conv.writes`` for reads of ``shapes``."""
    if conv.entry_in is None:
        canon = tuple(shapes[0])
    else:
        joined = list(shapes[0])
        if len(shapes) > 1:
            joined[conv.entry_in.dim] = sum(int(s[conv.entry_in.dim]) for s in shapes)
        canon = canonical_shape(tuple(joined), conv.entry_in.transform)
    if conv.entry_out is None:
        return [canon]
    e = conv.entry_out
    shape = layout_shape(canon, e.transform)
    if len(e.parts) == 1:  # a rename (maybe of a 0-d tensor): nothing to cut
        return [shape]
    return [(*shape[: e.dim], rows, *shape[e.dim + 1 :]) for _k, rows in layout_parts(e, shape[e.dim])]


def to_canonical(tensors: Sequence[torch.Tensor], entry: LayoutEntry | None) -> torch.Tensor:
    """The canonical tensor from the tensors read for one :class:`Conversion` (values moved only)."""
    if entry is None:
        return tensors[0]
    import torch

    from lorasmith.ops import layouts

    t = tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=entry.dim)
    return layouts.to_canonical(t, entry).contiguous()


def from_canonical(t: torch.Tensor, entry: LayoutEntry | None) -> list[torch.Tensor]:
    """The tensors to write for one :class:`Conversion` from its canonical tensor (values moved only)."""
    if entry is None:
        return [t]
    from lorasmith.ops import layouts

    t = layouts.to_layout(t, entry)
    if len(entry.parts) == 1:
        return [t.contiguous()]
    out = []
    start = 0
    for _key, rows in layout_parts(entry, int(t.shape[entry.dim])):
        out.append(t.narrow(entry.dim, start, rows).contiguous())
        start += rows
    return out
