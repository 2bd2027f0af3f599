"""The canonical safetensors layout, torch-free.

The reference writer (``safetensors.torch.save``) orders tensors by dtype descending (the declaration order
of its ``Dtype`` enum, :data:`~lorasmith.io.header.DTYPE_ORDER`) and then by name ascending (byte order of
the UTF-8 names), places them back to back from offset 0, and writes the header as compact JSON
(``"__metadata__"`` first, then the tensors in data order, keys ``dtype``, ``shape``, ``data_offsets``),
padded with spaces to a multiple of 8 bytes. This module reproduces that layout byte for byte.

The one freedom: the reference writes ``__metadata__`` keys in hash-map order, which changes from run to
run; lorasmith writes them sorted, so that its output is reproducible.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence

from lorasmith.io.header import DTYPE_BITS, DTYPE_ORDER, TensorInfo, dtype_nbytes

__all__ = ["encode_header", "plan_layout", "serialize_prefix", "sort_key"]

_RANK = {name: i for i, name in enumerate(DTYPE_ORDER)}


def sort_key(name: str, dtype: str) -> tuple[int, bytes]:
    """Sort key of one tensor in the canonical data order (widest dtype first, then name)."""
    return (-_RANK[dtype], name.encode("utf-8"))


def plan_layout(specs: Iterable[tuple[str, str, Sequence[int]]]) -> list[TensorInfo]:
    """Lay ``(name, dtype, shape)`` triples out in the canonical order with back-to-back offsets.

    :raises ValueError: a duplicate name, the reserved name ``__metadata__``, an unknown dtype, a negative
        dimension, or sub-byte elements that do not fill whole bytes.
    """
    items: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot be a tensor name")
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        if dtype not in DTYPE_BITS:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {dims}")
        seen.add(name)
        items.append((name, dtype, dims))
    items.sort(key=lambda t: sort_key(t[0], t[1]))
    out: list[TensorInfo] = []
    offset = 0
    for name, dtype, dims in items:
        numel = 1
        for d in dims:
            numel *= d
        nbytes = dtype_nbytes(dtype, numel)
        if nbytes is None:
            raise ValueError(f"tensor {name!r}: {numel} elements of {dtype} do not fill whole bytes")
        out.append(TensorInfo(name=name, dtype=dtype, shape=dims, start=offset, end=offset + nbytes))
        offset += nbytes
    return out


def encode_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header for ``tensors`` (in the order given) and ``metadata``, padded to a multiple of 8.

    ``metadata=None`` writes no ``__metadata__`` entry; an empty mapping writes ``"__metadata__":{}`` (as
    the reference writer does for an empty dict).

    :raises ValueError: a metadata key or value that is not a string.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata must map strings to strings, got {key!r}: {type(value).__name__}")
        obj["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def serialize_prefix(tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the padded header: everything of the file before the data section."""
    header = encode_header(tensors, metadata)
    return struct.pack("<Q", len(header)) + header
