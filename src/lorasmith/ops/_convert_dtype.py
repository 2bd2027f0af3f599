"""Dtype conversion of single tensors, with counts of what the cast lost.

Policy (documented in ``docs/convert.md``):

- only floating tensors are cast; integer and bool tensors are written unchanged;
- a finite value beyond the target's largest finite value is **saturated** to that value (with its sign)
  and counted as *overflowed*: an ``inf`` in a weight poisons every activation it touches, a clamped
  value only perturbs one, and FP8 E4M3FN has no ``inf`` at all (torch turns such values into NaN);
- a non-zero value that becomes zero is counted as *flushed to zero* (underflow below the target's
  smallest subnormal);
- ``nan`` and ``inf`` already in the input are kept as they are (and not counted).

Streaming (:func:`cast_stream`): an output tensor is described by a :class:`Recipe`, the ranges of stored
tensors (:class:`Piece`\\ s, in any number of safetensors files) whose concatenation is its values, and is
cast part by part through :func:`lorasmith.io.pipeline.run_steps` (reading, casting, writing and hashing
overlap, in buffers of bounded size). Every count is per value, so the counts of the parts add up to those
of a whole-tensor :func:`cast_tensor`, and the bytes written are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorasmith.errors import UsageError

if TYPE_CHECKING:
    import torch

    from lorasmith.io.pipeline import Step
    from lorasmith.io.reader import TensorFile
    from lorasmith.io.writer import NonFiniteTensor, SafetensorsWriter

__all__ = [
    "DTYPE_WORDS",
    "CastStats",
    "Piece",
    "Recipe",
    "cast_into",
    "cast_stream",
    "cast_tensor",
    "parse_dtype",
    "select",
    "whole_piece",
]

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


# ------------------------------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + count)`` of the stored tensor ``name`` of ``file`` (flattened).

    :ivar file: the open safetensors file.
    :ivar name: the tensor in it.
    :ivar start: first element.
    :ivar count: number of elements.
    """

    file: TensorFile
    name: str
    start: int
    count: int


def whole_piece(file: TensorFile, name: str) -> Piece:
    """Every element of tensor ``name`` of ``file``."""
    return Piece(file, name, 0, _numel(file.info(name).shape))


def select(pieces: Sequence[Piece], ranges: Sequence[tuple[int, int]]) -> tuple[Piece, ...]:
    """Elements ``[a, b)`` of each range, in order, of the flat sequence the ``pieces`` make end to end.

    Nothing selected (an empty tensor) gives one empty piece, so that a recipe always names its source.
    """
    out: list[Piece] = []
    for a, b in ranges:
        offset = 0
        for p in pieces:
            lo, hi = max(a, offset), min(b, offset + p.count)
            if lo < hi:
                out.append(Piece(p.file, p.name, p.start + lo - offset, hi - lo))
            offset += p.count
    if not out and pieces:
        out.append(Piece(pieces[0].file, pieces[0].name, pieces[0].start, 0))
    return tuple(out)


#: ``combine(inputs)``: the values of an output tensor from its pieces (1-d tensors, read whole).
Combine = Callable[[list["torch.Tensor"]], "torch.Tensor"]


@dataclass(frozen=True)
class Recipe:
    """How one output tensor is made from stored tensors.

    :ivar pieces: input ranges (all of one dtype); end to end they are the output's values, flattened,
        unless ``combine`` is given.
    :ivar combine: for a rewrite that is no concatenation (a transpose): the pieces are read whole and
        this returns the output's values (any shape, as many elements as the output). The step is then
        the whole tensor, so only small tensors should need it.
    :ivar counted: whether a cast of this output counts as a cast tensor (``False`` for all but one part
        of a canonical tensor written as several layout tensors, which the whole-tensor path casts once).
    :ivar values: values the cast counts (``None``: the output's own).
    """

    pieces: tuple[Piece, ...]
    combine: Combine | None = None
    counted: bool = True
    values: int | None = None

    @property
    def numel(self) -> int:
        """Elements of the output."""
        return sum(p.count for p in self.pieces)

    @property
    def dtype(self) -> str:
        """The safetensors dtype of the pieces."""
        return self.pieces[0].file.info(self.pieces[0].name).dtype

    def materialize(self) -> torch.Tensor:
        """The output's values (flattened, the stored dtype), read whole: for error messages."""
        import torch

        parts = [p.file.read_part(p.name, p.start, p.count) for p in self.pieces]
        if self.combine is not None:
            return self.combine(parts).reshape(-1)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _st_itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype (at least 1)."""
    from lorasmith.io.dtypes import torch_dtype

    return max(1, torch_dtype(st_dtype).itemsize)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _recipe_steps(
    name: str, recipe: Recipe, out_st: str, stats: CastStats, part_bytes: int
) -> Iterator[Step]:
    """The pipeline steps of one output tensor (see :func:`cast_stream`)."""
    from lorasmith.io.pipeline import Source, Step, part_elements, split_range

    in_st = recipe.dtype
    casting = out_st != in_st
    total = recipe.numel
    values = total if recipe.values is None else recipe.values

    def cast(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        stats.add(cast_into(inputs[0], out))

    def first(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        # once per tensor, on its first part (an empty tensor has one empty part); on the computing
        # thread only, so no lock is needed
        if recipe.counted:
            stats.tensors += 1
            stats.values += values
        cast(inputs, out)

    if recipe.combine is not None:
        combine = recipe.combine

        def whole(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
            t = combine(inputs).reshape(-1)
            if casting:
                first([t], out)
            else:
                out.copy_(t)

        sources = [Source(p.file, p.name, p.start, p.count) for p in recipe.pieces]
        yield Step(name, 0, total, sources, whole, True)
        return
    per = part_elements(_st_itemsize(in_st), _st_itemsize(out_st), buffer_bytes=part_bytes)
    pieces = [p for p in recipe.pieces if p.count] or list(recipe.pieces[:1])
    done = 0
    for p in pieces:
        for start, length, _last in split_range(p.count, per):
            compute = (first if done == 0 else cast) if casting else None
            yield Step(
                name,
                done,
                length,
                [Source(p.file, p.name, p.start + start, length)],
                compute,
                done + length == total,
            )
            done += length


def cast_stream(
    writer: SafetensorsWriter,
    recipes: Mapping[str, Recipe],
    stats: CastStats,
    *,
    memory: int,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Write every planned tensor of ``writer`` from its recipe, cast to its planned dtype, streaming.

    The tensors are made in the writer's data order (so that ``sshs_model_hash`` runs as the parts
    arrive), each in parts of at most :data:`lorasmith.io.pipeline.BUFFER_BYTES` through
    :func:`~lorasmith.io.pipeline.run_steps`, whose buffer pools hold ``memory`` bytes. A part whose
    dtype does not change is copied byte for byte; any other is cast by :func:`cast_into`; ``stats``
    gets the counts. ``on_tensor(name)`` is called as each tensor's last part is computed. The caller
    closes (or, on an error, aborts) the writer.

    :raises NonFiniteError: a cast tensor holds NaN/Inf and they are not allowed; the counts are those of
        the whole tensor, as a whole-tensor write reports them.
    """
    from lorasmith.io import pipeline
    from lorasmith.io.writer import NonFiniteError

    # read at call time (not bound as a default) so that tests can shrink the parts to split small tensors
    part_bytes = pipeline.BUFFER_BYTES

    def steps() -> Iterator[Step]:
        for name in writer.planned_names:
            yield from _recipe_steps(name, recipes[name], writer.planned_dtype(name), stats, part_bytes)

    try:
        pipeline.run_steps(steps(), writer, on_tensor=on_tensor, buffer_bytes=part_bytes, memory=memory)
    except NonFiniteError as exc:
        # The pipeline checks part by part, so its counts are those of the first bad part; the message
        # names the whole tensor's counts (a rare path: reading the tensor again is fine).
        found = exc.tensor
        raise NonFiniteError(_whole_nonfinite(recipes[found.name], writer, found)) from None


def _whole_nonfinite(recipe: Recipe, writer: SafetensorsWriter, found: NonFiniteTensor) -> NonFiniteTensor:
    """``found`` with the counts of the whole cast tensor instead of one part's."""
    from lorasmith.io.writer import NonFiniteTensor, nonfinite_counts

    target = writer.planned_dtype(found.name)
    new, _ = cast_tensor(recipe.materialize(), target if target != recipe.dtype else None)
    nan, inf = nonfinite_counts(new)
    return NonFiniteTensor(found.path, found.name, nan, inf)
