"""Shape arithmetic of :class:`~lorasmith.archs.base.LayoutEntry` (torch-free, no tensor values).

A layout entry says where one canonical tensor lives in another key layout: renamed, split into row blocks
along ``dim``, and/or rewritten by an exact transform. These helpers answer the shape questions only (which
keys, how many rows each, what shape before splitting), so that the family layer (part inventories in
:mod:`lorasmith.archs.parts`) and the conversion code (:mod:`lorasmith.ops.layouts`, which re-exports them)
share one definition without the family layer importing the ops layer.

Row counts in an entry are the real model's; a tensor smaller by a common factor (the shrunk test fixtures)
gets them scaled proportionally.
"""

from __future__ import annotations

from lorasmith.archs.base import LayoutEntry
from lorasmith.errors import InvalidFileError, NotAvailableError

__all__ = ["canonical_shape", "layout_parts", "layout_shape"]


def layout_parts(entry: LayoutEntry, rows_total: int) -> list[tuple[str, int]]:
    """``(layout key, rows)`` of each part for a canonical tensor with ``rows_total`` rows along ``dim``.

    :raises NotAvailableError: an entry of several parts that does not give every part's rows.
    :raises InvalidFileError: ``rows_total`` does not split in the proportions of the entry's rows.
    """
    if len(entry.parts) == 1:
        return [(entry.parts[0][0], rows_total)]
    real = [r for _, r in entry.parts]
    if any(r is None for r in real):
        raise NotAvailableError("a layout entry with several parts must give every part's rows")
    total = sum(r for r in real if r is not None)
    out = []
    for key, r in entry.parts:
        assert r is not None
        local, rem = divmod(r * rows_total, total)
        if rem:
            raise InvalidFileError(f"{key}: {rows_total} rows do not split like the model's {total}")
        out.append((key, local))
    return out


def layout_shape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    """The shape a canonical tensor of ``shape`` has in the layout (before splitting)."""
    if transform == "drop_1x1":
        return shape[:2]
    if transform == "transpose":
        return shape[::-1]
    return shape


def canonical_shape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    """The inverse of :func:`layout_shape`."""
    if transform == "drop_1x1":
        return (*shape, 1, 1)
    if transform == "transpose":
        return shape[::-1]
    return shape
