"""Dtype conversion of single tensors, with counts of what the cast lost.

Policy (documented in ``docs/convert.md``):

- only floating tensors are cast; integer and bool tensors are written unchanged;
- a finite value beyond the target's largest finite value is **saturated** to that value (with its sign)
  and counted as *overflowed*: an ``inf`` in a weight poisons every activation it touches, a clamped
  value only perturbs one, and FP8 E4M3FN has no ``inf`` at all (torch turns such values into NaN);
- a non-zero value that becomes zero is counted as *flushed to zero* (underflow below the target's
  smallest subnormal);
- ``nan`` and ``inf`` already in the input are kept as they are (and not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorasmith.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_WORDS", "CastStats", "cast_into", "cast_tensor", "parse_dtype"]

#: ``--dtype`` words -> safetensors dtype strings.
DTYPE_WORDS: dict[str, str] = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8": "F8_E4M3",
    "float8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
    "float8_e5m2": "F8_E5M2",
}


def parse_dtype(word: str | None, option: str = "--dtype") -> str | None:
    """The safetensors dtype a ``--dtype`` word names (``None`` stays ``None``).

    :raises UsageError: an unknown word.
    """
    if word is None:
        return None
    st = DTYPE_WORDS.get(word.strip().lower())
    if st is None:
        raise UsageError(f"unknown {option} {word!r}", hint="use fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2")
    return st


@dataclass
class CastStats:
    """Counts over every tensor cast so far.

    :ivar tensors: floating tensors whose dtype changed.
    :ivar values: values in those tensors.
    :ivar overflowed: finite values beyond the target's range (saturated to its largest finite value).
    :ivar flushed: non-zero values that became zero.
    """

    tensors: int = 0
    values: int = 0
    overflowed: int = 0
    flushed: int = 0

    def add(self, other: CastStats) -> None:
        """Add ``other``'s counts to these."""
        self.tensors += other.tensors
        self.values += other.values
        self.overflowed += other.overflowed
        self.flushed += other.flushed


def cast_tensor(t: torch.Tensor, st_dtype: str | None) -> tuple[torch.Tensor, CastStats]:
    """Cast ``t`` to the safetensors dtype ``st_dtype`` (see the module docstring for the policy)."""
    import torch

    from lorasmith.io.dtypes import torch_dtype

    stats = CastStats()
    if st_dtype is None or not t.is_floating_point():
        return t, stats
    target = torch_dtype(st_dtype)
    if t.dtype == target:
        return t, stats
    # empty_like keeps t's layout, as ``t.to(target)`` did before this shared cast_into
    out = torch.empty_like(t, dtype=target)
    stats = cast_into(t, out)
    stats.tensors = 1
    stats.values = t.numel()
    return out, stats


def cast_into(src: torch.Tensor, out: torch.Tensor) -> CastStats:
    """Cast floating ``src`` into ``out`` (same shape, another floating dtype) by the module's policy.

    Works on any part of a tensor: every count is per value, so the counts of a tensor's parts add up to
    those of the whole tensor. Only ``overflowed`` and ``flushed`` are set: a tensor cast in parts is
    one tensor, so ``tensors`` and ``values`` are the caller's to count.
    """
    import torch

    stats = CastStats()
    info = torch.finfo(out.dtype)
    source = torch.finfo(src.dtype)
    values = src
    if source.max > info.max and src.numel():
        # Why aminmax first: one pass without allocating answers "nothing out of range" for nearly every
        # part; a NaN makes both comparisons false and falls through to the exact count.
        lo, hi = torch.aminmax(src)
        if not (float(lo) >= -info.max and float(hi) <= info.max):
            # compare in the source dtype: every finite target value is representable there
            big = src.isfinite() & (src.abs() > info.max)
            n_big = int(big.sum())
            if n_big:
                stats.overflowed = n_big
                values = src.clamp(min=-info.max, max=info.max).where(src.isfinite(), src)
    out.copy_(values)
    if source.tiny < info.tiny or source.bits > info.bits:
        # values rounding below half the smallest subnormal of the target become 0; a zero stays a zero,
        # so the non-zeros that became zero are the output's zeros less the input's
        stats.flushed = int(torch.count_nonzero(out == 0)) - int(torch.count_nonzero(src == 0))
    return stats
