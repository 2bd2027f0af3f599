"""Consistent shrinking of real shapes, and key views built from them (torch-free).

Test fixtures keep the real key structure of a family but divide every dimension that is a multiple of
``factor`` (64 by default) by it. Ratios between the model's dimensions survive, so shape-based detection
(which must be scale-invariant) still works, and fused weights stay consistent with their row slices:
FLUX ``single_blocks.N.linear1`` rows ``[3072, 3072, 3072, 12288]`` become ``[48, 48, 48, 192]`` of 336.

The views built here (:func:`checkpoint_view`, :func:`lora_view`) are what detection sees of a fixture file,
without writing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Inventory, SimpleKeyView, Target, TensorSpec

#: The default shrinking factor of every fixture.
DEFAULT_FACTOR = 64

Slice = tuple[int, int, int]
SuffixStyle = Literal["kohya", "peft"]


def shrink_dim(n: int, factor: int = DEFAULT_FACTOR) -> int:
    """``n // factor`` when ``factor`` divides ``n`` (and ``n > 0``), else ``n`` unchanged."""
    if factor < 1:
        raise ValueError(f"shrinking factor must be >= 1, not {factor}")
    return n // factor if n > 0 and n % factor == 0 else n


def shrink_shape(shape: Sequence[int], factor: int = DEFAULT_FACTOR) -> tuple[int, ...]:
    """Divide every dimension of ``shape`` that is a multiple of ``factor`` by it; keep the others.

    >>> shrink_shape((1280, 2560, 3, 3))
    (20, 40, 3, 3)
    >>> shrink_shape((77, 768))
    (77, 12)
    """
    return tuple(shrink_dim(int(n), factor) for n in shape)


def shrink_slice(sl: Slice, factor: int = DEFAULT_FACTOR, *, dim_size: int | None = None) -> Slice:
    """Shrink a row slice ``(dim, start, length)`` the way :func:`shrink_shape` shrinks its dimension.

    :param sl: the slice of the real (unshrunk) weight.
    :param factor: the shrinking factor.
    :param dim_size: the real size of dimension ``sl[0]``; when it is not a multiple of ``factor`` the
        dimension is kept, and so is the slice. ``None`` means "a multiple of ``factor``".
    :raises ValueError: the dimension shrinks but ``start`` or ``length`` is not a multiple of ``factor``
        (the shrunk slice would not line up with the shrunk weight).
    """
    dim, start, length = sl
    if dim_size is not None and shrink_dim(dim_size, factor) == dim_size:
        return sl
    if factor == 1:
        return sl
    if start % factor or length % factor:
        raise ValueError(
            f"slice {sl} of a dimension of size {dim_size} cannot be shrunk by {factor}: "
            "start and length must be multiples of the factor"
        )
    return (dim, start // factor, length // factor)


def shrink_target(target: Target, shape: Sequence[int], factor: int = DEFAULT_FACTOR) -> Target:
    """``target`` with its slice shrunk to match ``shrink_shape(shape, factor)`` (``shape``: the real one)."""
    if target.slice is None:
        return target
    dim = target.slice[0]
    size = shape[dim] if 0 <= dim < len(shape) else None
    return Target(target.key, shrink_slice(target.slice, factor, dim_size=size))


def sliced_shape(shape: Sequence[int], sl: Slice | None) -> tuple[int, ...]:
    """The shape of the part of a weight of shape ``shape`` that the slice ``sl`` covers."""
    out = tuple(int(n) for n in shape)
    if sl is None:
        return out
    dim, _start, length = sl
    return (*out[:dim], length, *out[dim + 1 :])


def lora_shapes(
    module_shape: Sequence[int], rank: int, suffixes: SuffixStyle = "kohya", *, alpha: bool | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor suffix -> shape of a plain LoRA module over a weight (part) of shape ``module_shape``.

    A 2-D weight ``[out, in]`` gets ``down [r, in]`` and ``up [out, r]``; a 4-D conv ``[out, in, k, k]`` gets
    ``down [r, in, k, k]`` and ``up [out, r, 1, 1]``. ``alpha`` (a 0-d tensor) is included for kohya suffixes
    unless ``alpha`` is False; PEFT suffixes get it only when ``alpha`` is True.
    """
    shape = tuple(module_shape)
    if len(shape) == 2:
        down: tuple[int, ...] = (rank, shape[1])
        up: tuple[int, ...] = (shape[0], rank)
    elif len(shape) == 4:
        down = (rank, *shape[1:])
        up = (shape[0], rank, 1, 1)
    else:
        raise ValueError(f"a LoRA needs a 2-D or 4-D weight, not shape {shape}")
    if suffixes == "kohya":
        out = {".lora_down.weight": down, ".lora_up.weight": up}
        with_alpha = alpha is not False
    else:
        out = {".lora_A.weight": down, ".lora_B.weight": up}
        with_alpha = alpha is True
    if with_alpha:
        out[".alpha"] = ()
    return out


def checkpoint_view(
    inventory: Inventory,
    factor: int = DEFAULT_FACTOR,
    *,
    components: Iterable[str] | None = None,
    key_prefix_strip: str | None = None,
) -> SimpleKeyView:
    """What detection sees of a shrunk fixture checkpoint of ``inventory`` (see ``make_checkpoint``)."""
    keep = None if components is None else set(components)
    tensors: dict[str, TensorSpec] = {}
    for key, spec in inventory.tensors.items():
        if keep is not None and inventory.component_of(key) not in keep:
            continue
        name = key
        if key_prefix_strip and key.startswith(key_prefix_strip):
            name = key[len(key_prefix_strip) :]
        tensors[name] = TensorSpec(shrink_shape(spec.shape, factor), spec.dtype)
    return SimpleKeyView(tensors)


def target_spec(arch: Architecture, variant: str | None, target: Target) -> TensorSpec | None:
    """The real shape and dtype of the weight ``target`` lands on (``None`` if the family does not know it).

    A thin wrapper kept for plugin tests: it is :meth:`Architecture.target_spec
    <lorasmith.archs.base.Architecture.target_spec>` (``arch.target_spec(target.key, variant)``), the one
    lookup every command uses; call that directly in new code.
    """
    return arch.target_spec(target.key, variant)


def select_aliases(
    arch: Architecture,
    variant: str | None = None,
    spelling: str | None = None,
    modules: Callable[[Alias], bool] | Iterable[str] | None = None,
) -> list[Alias]:
    """Aliases of one spelling: all of them, those a predicate keeps, or the named ones (table order)."""
    table = arch.alias_table(variant)
    if modules is not None and not callable(modules):
        names = list(modules)
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"{arch.id}: unknown LoRA module name(s): {', '.join(missing[:5])}")
        return [table[n] for n in names]
    return [
        a
        for a in table.values()
        if (spelling is None or a.spelling == spelling) and (modules is None or modules(a))
    ]


def lora_view(
    arch: Architecture,
    variant: str | None = None,
    spelling: str | None = None,
    *,
    modules: Callable[[Alias], bool] | Iterable[str] | None = None,
    rank: int = 4,
    factor: int = DEFAULT_FACTOR,
    dtype: str = "F16",
) -> SimpleKeyView:
    """What detection sees of a shrunk plain-LoRA fixture of ``arch`` (default: every alias of ``spelling``).

    Aliases whose target is unknown or not 2-D/4-D are skipped (conformance reports them separately).
    """
    variant = arch.check_variant(variant)
    spelling = spelling or arch.spellings[0]
    tensors: dict[str, TensorSpec] = {}
    for alias in select_aliases(arch, variant, spelling, modules):
        spec = target_spec(arch, variant, alias.target)
        if spec is None or len(spec.shape) not in (2, 4):
            continue
        target = shrink_target(alias.target, spec.shape, factor)
        part = sliced_shape(shrink_shape(spec.shape, factor), target.slice)
        suffixes = suffix_style(alias.spelling)
        for suffix, shape in lora_shapes(part, rank, suffixes).items():
            tensors[alias.name + suffix] = TensorSpec(shape, dtype)
    return SimpleKeyView(tensors)


def suffix_style(spelling: str) -> SuffixStyle:
    """The tensor suffix style (``kohya`` or ``peft``) of a spelling id; unknown ids count as kohya."""
    known = SPELLINGS.get(spelling)
    return known.suffixes if known is not None else "kohya"
