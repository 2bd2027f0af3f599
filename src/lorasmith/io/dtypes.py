"""Safetensors dtype strings <-> torch dtypes.

Torch is imported inside the functions, so importing this module stays cheap. Dtypes a torch build lacks
(older versions have no unsigned 16/32/64-bit or float8 types) are simply absent from the tables.

``F4`` (FP4 E2M1) is stored two values per byte; torch holds it as ``float4_e2m1fn_x2``, one element per
byte, so the torch shape's last dimension is half the header's (logical) one.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from lorasmith.errors import NotAvailableError

if TYPE_CHECKING:
    import torch

__all__ = ["header_shape", "safetensors_dtype", "torch_dtype", "torch_shape", "torch_table"]

_NAMES: tuple[tuple[str, str], ...] = (
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
    ("F4", "float4_e2m1fn_x2"),
)


@cache
def torch_table() -> dict[str, torch.dtype]:
    """Safetensors dtype string -> torch dtype, for every dtype this torch build has."""
    import torch

    out: dict[str, torch.dtype] = {}
    for st_name, torch_name in _NAMES:
        dt = getattr(torch, torch_name, None)
        if isinstance(dt, torch.dtype):
            out[st_name] = dt
    return out


@cache
def _reverse() -> dict[torch.dtype, str]:
    return {dt: name for name, dt in torch_table().items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string.

    :raises NotAvailableError: this torch build has no such dtype (``F6_E2M3``, or float8 on old torch).
    """
    try:
        return torch_table()[name]
    except KeyError:
        raise NotAvailableError(
            f"safetensors dtype {name} has no torch equivalent in this torch build",
            hint="upgrade torch, or convert the file with the tool that wrote it",
        ) from None


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype.

    :raises ValueError: safetensors cannot store this dtype (``complex128``, quantized types...).
    """
    try:
        return _reverse()[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store torch dtype {dtype}") from None


def header_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The header (logical) shape of a torch tensor of ``shape`` stored as ``dtype``."""
    if dtype == "F4" and shape:
        return (*shape[:-1], shape[-1] * 2)
    return shape


def torch_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a tensor whose header shape is ``shape``.

    :raises NotAvailableError: an ``F4`` tensor whose last dimension is odd (torch cannot hold it).
    """
    if dtype != "F4":
        return shape
    if not shape or shape[-1] % 2:
        raise NotAvailableError(
            f"F4 tensor of shape {list(shape)} cannot be held by torch (needs an even last dimension)",
            hint="read it with the tool that wrote it",
        )
    return (*shape[:-1], shape[-1] // 2)
