"""The torch-free shape helpers of layout entries (lorasmith.archs.layout_shapes)."""

from __future__ import annotations

import pytest

from lorasmith.archs.base import LayoutEntry
from lorasmith.archs.layout_shapes import canonical_shape, layout_parts, layout_shape
from lorasmith.errors import InvalidFileError, NotAvailableError


def test_a_rename_keeps_every_row() -> None:
    assert layout_parts(LayoutEntry((("new.weight", None),)), 7) == [("new.weight", 7)]


def test_fused_rows_split_in_proportion() -> None:
    entry = LayoutEntry((("q", 3072), ("k", 3072), ("v", 3072)))
    assert layout_parts(entry, 96) == [("q", 32), ("k", 32), ("v", 32)]


def test_rows_that_do_not_split_are_an_invalid_file() -> None:
    with pytest.raises(InvalidFileError):
        layout_parts(LayoutEntry((("a", 2), ("b", 1))), 4)


def test_several_parts_need_their_rows() -> None:
    with pytest.raises(NotAvailableError):
        layout_parts(LayoutEntry((("a", None), ("b", 3))), 4)


@pytest.mark.parametrize(
    ("transform", "canon", "layout"),
    [
        (None, (4, 3), (4, 3)),
        ("swap_halves", (8,), (8,)),
        ("drop_1x1", (5, 5, 1, 1), (5, 5)),
        ("transpose", (2, 9), (9, 2)),
    ],
)
def test_shapes_round_trip(transform: str | None, canon: tuple[int, ...], layout: tuple[int, ...]) -> None:
    assert layout_shape(canon, transform) == layout
    assert canonical_shape(layout, transform) == canon
