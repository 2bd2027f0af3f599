"""The fixture factory: small checkpoints and LoRAs with a family's real key structure and exact answers.

Every fixture keeps the real tensor names of a family and shrinks its shapes consistently
(:func:`shrink_shape`, factor 64 by default), fills them with seeded random values and writes them with
``safetensors.torch.save_file``, never with lorasmith's own writer, so that fixture files do not depend on
the code under test. Factories that plant something return the exact answer in float64:

- :func:`make_checkpoint`: a base checkpoint of any inventory (layout) and variant of a family;
- :func:`make_tuned`: a fine-tune of a base, base + a known low-rank delta on chosen weights (extraction);
- :func:`make_lora`: a LoRA / LoCon-Tucker / LoHa / LoKr / full-diff / DoRA file in any spelling, with the
  exact delta of every module against its canonical target (merge, resize, convert, bake);
- :func:`write_bad_files`: the standard malformed inputs for error tests.

Random values are seeded per tensor name, so a subset (``components=("unet",)``) or a different selection of
LoRA modules has the same values for the same names.

Conventions (see also :func:`make_lora`): ``g = alpha / rank``; ``alpha`` defaults to ``rank / 2`` for kohya
suffixes and is absent (``g = 1``) for PEFT suffixes; LoKr splits each of ``out`` and ``in`` into
``(m, n)`` with ``m <= n`` as close to the square root as possible (LyCORIS' rule), ``lokr_w1`` takes the
small factors ``[m_out, m_in]`` and ``lokr_w2 = lokr_w2_a @ lokr_w2_b`` the large ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from lorasmith.archs.base import Alias, Architecture, Inventory, Target
from lorasmith.testing.views import (
    DEFAULT_FACTOR,
    Slice,
    select_aliases,
    shrink_shape,
    shrink_slice,
    shrink_target,
    sliced_shape,
    suffix_style,
    target_spec,
)

__all__ = [
    "ALGOS",
    "DTYPES",
    "ExpectedModule",
    "LoraFixture",
    "lokr_factorization",
    "make_checkpoint",
    "make_lora",
    "make_tuned",
    "resolve_inventory",
    "shrink_shape",
    "shrink_slice",
    "write_bad_files",
]

Algo = Literal["lora", "locon-tucker", "loha", "lokr", "full", "dora"]

#: The adapter algorithms :func:`make_lora` writes.
ALGOS: tuple[str, ...] = ("lora", "locon-tucker", "loha", "lokr", "full", "dora")

#: safetensors dtype strings -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

#: Standard deviation of checkpoint values, of planted low-rank deltas, and of LoRA factors.
CHECKPOINT_STD = 0.02
TUNED_STD = 0.01
FACTOR_STD = 0.1


# ------------------------------------------------------------------------------------------------ helpers
def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from ``seed`` and a tensor name (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _randn(shape: Sequence[int], gen: torch.Generator, std: float) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std


def _fill(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    if not (dtype.is_floating_point or dtype.is_complex):
        # integer tensors are indices (position_ids): 0..n-1 along the last dimension
        if not shape:
            return torch.zeros((), dtype=dtype)
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).to(dtype).contiguous()
    return _randn(shape, _generator(seed, key), CHECKPOINT_STD).to(dtype)


def resolve_inventory(arch: Architecture, variant: str | None = None, layout: str | None = None) -> Inventory:
    """The inventory named by ``layout`` (an inventory id, or a layout name of ``variant``).

    ``layout=None`` gives the canonical inventory of ``variant`` (default variant when ``None``).

    :raises ValueError: no inventory matches.
    """
    if layout is None:
        return arch.canonical_inventory(variant)
    for inv in arch.inventories():
        if inv.id == layout and (variant is None or inv.variant == variant):
            return inv
    v = arch.check_variant(variant)
    for inv in arch.inventories():
        if inv.layout == layout and inv.variant == v:
            return inv
    known = ", ".join(f"{i.id} ({i.variant}/{i.layout})" for i in arch.inventories())
    raise ValueError(f"{arch.id}: no inventory {layout!r} for variant {v!r}; known: {known}")


# ------------------------------------------------------------------------------------------- checkpoints
def make_checkpoint(
    arch: Architecture,
    path: str | Path,
    *,
    variant: str | None = None,
    layout: str | None = None,
    factor: int = DEFAULT_FACTOR,
    components: Iterable[str] | None = None,
    key_prefix_strip: str | None = None,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
    planted: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a shrunk checkpoint with every key of an inventory and return its tensors.

    :param arch: the family.
    :param path: the ``.safetensors`` file to write.
    :param variant: the variant (default: the family's default).
    :param layout: an inventory id or a layout name (default: the canonical layout of ``variant``).
    :param factor: the shrinking factor of :func:`shrink_shape` (1 keeps the real shapes).
    :param components: keep only these components (``("unet",)``); default all.
    :param key_prefix_strip: remove this prefix from the keys that have it (``"model.diffusion_model."``
        writes a bare UNet file).
    :param dtype: dtype of the floating-point tensors; ``None`` keeps each tensor's inventory dtype.
        Integer tensors (``position_ids``) always keep theirs and hold ``0..n-1`` along the last dimension.
    :param seed: the seed; floating values are ``N(0, 1) * 0.02`` seeded per (seed, inventory key).
    :param planted: inventory key -> a tensor written instead of the random one (as given: its own dtype
        and shape); keys the inventory lacks are added.
    :param metadata: the file's ``__metadata__`` (``str -> str``).
    :return: written key (after ``key_prefix_strip``) -> tensor, in file order.
    :raises ValueError: unknown layout or component.
    """
    inv = resolve_inventory(arch, variant, layout)
    keep: set[str] | None = None
    if components is not None:
        keep = set(components)
        unknown = keep - set(inv.components)
        if unknown:
            raise ValueError(
                f"{inv.id} has no component {', '.join(sorted(unknown))}; it has {', '.join(inv.components)}"
            )
    planted = dict(planted or {})

    def name(key: str) -> str:
        if key_prefix_strip and key.startswith(key_prefix_strip):
            return key[len(key_prefix_strip) :]
        return key

    tensors: dict[str, torch.Tensor] = {}
    for key, spec in inv.tensors.items():
        if keep is not None and inv.component_of(key) not in keep:
            continue
        if key in planted:
            tensors[name(key)] = planted.pop(key).detach().clone().contiguous()
            continue
        spec_dtype = DTYPES.get(spec.dtype, torch.float32)
        out_dtype = spec_dtype if dtype is None or not spec_dtype.is_floating_point else dtype
        tensors[name(key)] = _fill(key, shrink_shape(spec.shape, factor), out_dtype, seed)
    for key, value in planted.items():
        tensors[name(key)] = value.detach().clone().contiguous()
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    return tensors


def make_tuned(
    arch: Architecture | None,
    base_tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    modules: Sequence[str],
    rank: int,
    seed: int = 0,
    noise: float = 0.0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a fine-tune of ``base_tensors``: base + a planted rank-``rank`` delta on each of ``modules``.

    Each delta is ``a @ b * 0.01 / sqrt(rank)`` with ``a [out, rank]``, ``b [rank, in*k*k]`` seeded per key
    (entries of standard deviation 0.01, against 0.02 for the base), reshaped to the weight's shape (conv
    deltas have rank ``rank`` over the flattened ``[out, in*k*k]``), plus ``noise * N(0, 1)`` full-rank
    noise when ``noise > 0``. The file stores ``base + delta`` rounded to the base's dtype; every other
    tensor is copied unchanged.

    :param arch: the family (only named in error messages; may be ``None``).
    :param base_tensors: what :func:`make_checkpoint` returned.
    :param modules: keys of 2-D or 4-D floating weights of ``base_tensors``.
    :return: key -> the exact planted delta (float64, the weight's shape), noise included.
    :raises ValueError: an unknown key, or one that is not a 2-D/4-D floating weight.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, not {rank}")
    where = f"{arch.id}: " if arch is not None else ""
    out = dict(base_tensors)
    deltas: dict[str, torch.Tensor] = {}
    for key in modules:
        if key not in base_tensors:
            raise ValueError(f"{where}no tensor {key!r} in the base")
        w = base_tensors[key]
        if w.ndim not in (2, 4) or not w.dtype.is_floating_point:
            raise ValueError(
                f"{where}{key!r} is not a 2-D or 4-D floating weight ({tuple(w.shape)}, {w.dtype})"
            )
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        gen = _generator(seed, "tuned:" + key)
        a = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
        b = torch.randn(rank, cols, generator=gen, dtype=torch.float64)
        delta = (a @ b) * (TUNED_STD / math.sqrt(rank))
        if noise > 0:
            delta = delta + noise * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        delta = delta.reshape(w.shape)
        deltas[key] = delta
        out[key] = (w.to(torch.float64) + delta).to(w.dtype)
    save_file(
        {k: v.contiguous() for k, v in out.items()}, str(path), metadata=dict(metadata) if metadata else None
    )
    return deltas


# ------------------------------------------------------------------------------------------------ LoRAs
@dataclass(frozen=True, eq=False)
class ExpectedModule:
    """One module of a fixture LoRA and its exact effect.

    :ivar name: the LoRA module name (tensor keys are ``name + suffix``).
    :ivar alias: the family's alias (its target has the real, unshrunk slice).
    :ivar target: the canonical key and the *shrunk* slice the delta lands on.
    :ivar target_shape: the shrunk shape of the whole canonical weight ``target.key``.
    :ivar algo: the algorithm of this module (``locon-tucker`` files write plain LoRA for linears and 1x1
        convs, as LyCORIS does).
    :ivar delta: the exact delta in float64, of the shape of the target's slice. For DoRA it is the LoRA
        part only; the merged weight is :meth:`expected_weight`.
    :ivar factors: tensor suffix (``".lora_down.weight"``) -> the stored tensor in float64.
    :ivar scale: ``g`` (``alpha / rank``, or 1).
    :ivar alpha: the stored alpha, ``None`` when the file has none.
    :ivar rank: the rank (``None`` for full diffs).
    """

    name: str
    alias: Alias
    target: Target
    target_shape: tuple[int, ...]
    algo: str
    delta: torch.Tensor
    factors: Mapping[str, torch.Tensor]
    scale: float
    alpha: float | None
    rank: int | None

    def expected_weight(self, base: torch.Tensor) -> torch.Tensor:
        """The weight after merging this module at strength 1 into ``base`` (the whole canonical weight).

        Plain algorithms give ``base + delta`` on the slice; DoRA gives
        ``(W + dW) * dora_scale / rownorm(W + dW)`` on it (LyCORIS/kohya axis: one norm per output row).
        :return: a float64 copy of ``base`` with the slice replaced.
        """
        w = base.detach().to(torch.float64).clone()
        if tuple(w.shape) != self.target_shape:
            raise ValueError(f"{self.name}: base has shape {tuple(w.shape)}, expected {self.target_shape}")
        part = w if self.target.slice is None else w.narrow(*self.target.slice)
        merged = part + self.delta
        if self.algo == "dora":
            ones = (1,) * (merged.ndim - 1)
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *ones)
            merged = merged * self.factors[".dora_scale"].reshape(-1, *ones) / norm
        part.copy_(merged)
        return w


@dataclass(eq=False)
class LoraFixture:
    """A fixture LoRA file and the exact answer for each of its modules.

    :ivar path: the written file.
    :ivar arch: the family id.
    :ivar variant: the variant its names were taken from.
    :ivar spelling: the spelling of its module names.
    :ivar algo: the algorithm asked for.
    :ivar rank: the rank (``None`` for full diffs).
    :ivar alpha: the alpha written (``None`` if none).
    :ivar factor: the shrinking factor.
    :ivar modules: module name -> :class:`ExpectedModule`, in file order.
    :ivar tensors: every tensor written, by key.
    :ivar metadata: the metadata written.
    """

    path: Path
    arch: str
    variant: str
    spelling: str
    algo: str
    rank: int | None
    alpha: float | None
    factor: int
    modules: dict[str, ExpectedModule]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def deltas(self) -> dict[tuple[str, Slice | None], torch.Tensor]:
        """``{(canonical key, shrunk slice or None): exact float64 delta}`` over all modules."""
        return {(m.target.key, m.target.slice): m.delta for m in self.modules.values()}

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        """Canonical key -> the summed delta over the whole (shrunk) weight, zero outside the slices."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            full = out.setdefault(m.target.key, torch.zeros(m.target_shape, dtype=torch.float64))
            part = full if m.target.slice is None else full.narrow(*m.target.slice)
            part += m.delta
        return out

    def expected_weights(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical key -> the merged weight (float64) for every key the LoRA touches, at strength 1.

        :param base: canonical key -> base tensor (what :func:`make_checkpoint` returned without
            ``key_prefix_strip``).
        """
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            current = out.get(m.target.key)
            out[m.target.key] = m.expected_weight(base[m.target.key] if current is None else current)
        return out


def lokr_factorization(n: int) -> tuple[int, int]:
    """``(m, k)`` with ``m * k == n``, ``m <= k`` and ``m`` the largest divisor not above ``sqrt(n)``."""
    if n < 1:
        raise ValueError(f"cannot factorise {n}")
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m, n // m


def _default_filter(algo: str) -> Callable[[tuple[int, ...]], bool]:
    if algo == "locon-tucker":
        return lambda shape: len(shape) == 4 and math.prod(shape[2:]) > 1
    return lambda shape: len(shape) == 2 or (len(shape) == 4 and math.prod(shape[2:]) == 1)


def _spread(items: list[Alias], limit: int | None) -> list[Alias]:
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    if limit == 1:
        return [items[0]]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def make_lora(
    arch: Architecture,
    path: str | Path,
    *,
    variant: str | None = None,
    spelling: str | None = None,
    algo: Algo = "lora",
    rank: int = 4,
    alpha: float | None = None,
    factor: int = DEFAULT_FACTOR,
    modules: Callable[[Alias], bool] | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> LoraFixture:
    """Write a shrunk LoRA (or LyCORIS) file of ``arch`` and return the exact delta of each module.

    Module selection: ``modules`` is a predicate on :class:`~lorasmith.archs.base.Alias` (applied to the
    aliases of ``spelling``), or a list of module names (the spelling is then theirs), or ``None``: every
    alias of ``spelling`` whose target is a linear weight or a 1x1 conv (for ``locon-tucker``: every conv
    with a kernel larger than 1x1). ``limit`` keeps that many, spread evenly over the family's alias order
    (so across blocks). Aliases whose target no inventory of the family knows are skipped unless named.

    Tensors per module (conv weights ``[out, in, k, k]``; linears drop the kernel dims):

    ========== ==================================================================================
    lora       ``.lora_down.weight [r, in, k, k]``, ``.lora_up.weight [out, r, 1, 1]``, ``.alpha``
               (PEFT spellings: ``.lora_A.weight`` / ``.lora_B.weight``, no alpha)
    locon-     ``.lora_down.weight [r, in, 1, 1]``, ``.lora_mid.weight [r, r, k, k]``,
    tucker     ``.lora_up.weight [out, r, 1, 1]``, ``.alpha`` (linears and 1x1 convs: plain lora)
    loha       ``.hada_w1_a [out, r]``, ``.hada_w1_b [r, in*k*k]``, ``.hada_w2_a``, ``.hada_w2_b``, ``.alpha``
    lokr       ``.lokr_w1 [m_out, m_in]``, ``.lokr_w2_a [n_out, r]``, ``.lokr_w2_b [r, n_in*k*k]``, ``.alpha``
    full       ``.diff`` (the delta itself)
    dora       lora + ``.dora_scale [out, 1]`` (``[out, 1, 1, 1]`` for convs)
    ========== ==================================================================================

    Exact deltas (float64, from the stored values): lora ``g * up @ down``;
    Tucker ``W[p, q, k, l] = g * sum_ij up[p, i] mid[i, j, k, l] down[j, q]``;
    LoHa ``g * (w1a @ w1b) * (w2a @ w2b)``; LoKr ``g * kron(w1, w2a @ w2b)``; full ``diff``;
    with ``g = alpha / rank`` (1 without alpha).

    :param alpha: ``None`` writes ``rank / 2`` for kohya suffixes and nothing for PEFT suffixes; a value is
        written for either.
    :param factor: the shrinking factor (the same as the base checkpoint's).
    :param seed: factors are ``N(0, 1) * 0.1`` seeded per (seed, module name); ``full`` diffs ``* 0.01``.
    :param dtype: dtype of every stored tensor (alpha included).
    :raises ValueError: unknown algo, spelling or module names; a PEFT spelling with another algo than
        ``lora``; no module selected.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; known: {', '.join(ALGOS)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, not {rank}")
    variant = arch.check_variant(variant)
    named = modules is not None and not callable(modules)
    if modules is not None and not callable(modules):
        aliases = select_aliases(arch, variant, None, modules)
        used = {a.spelling for a in aliases}
        if spelling is not None and used - {spelling}:
            raise ValueError(f"the named modules have spellings {', '.join(sorted(used))}, not {spelling!r}")
        if spelling is None:
            if len(used) > 1:
                raise ValueError(
                    f"the named modules mix spellings ({', '.join(sorted(used))}); pass spelling="
                )
            spelling = next(iter(used), arch.spellings[0])
    else:
        spelling = spelling or arch.spellings[0]
        if spelling not in arch.spellings:
            raise ValueError(f"{arch.id} has no spelling {spelling!r}; it has {', '.join(arch.spellings)}")
        aliases = select_aliases(arch, variant, spelling, modules)
    style = suffix_style(spelling)
    if style == "peft" and algo != "lora":
        raise ValueError(
            f"algo {algo!r} needs kohya-style suffixes; spelling {spelling!r} uses PEFT suffixes"
        )

    keep = _default_filter(algo)
    chosen: list[tuple[Alias, tuple[int, ...]]] = []
    # without a list of names, only targets some fixture checkpoint of the family holds (a FLUX.1 LoRA made
    # here applies to make_checkpoint's FLUX.1 file, which has no text encoder)
    shipped: set[str] = set()
    if not named:
        for inv in arch.inventories():
            shipped.update(inv.tensors)
    for a in aliases:
        spec = target_spec(arch, variant, a.target)
        if spec is not None and not named and a.target.key not in shipped:
            spec = None
        if spec is None:
            if named:
                raise ValueError(f"{arch.id}: target {a.target.key!r} of {a.name!r} is in no inventory")
            continue
        if len(spec.shape) not in (2, 4):
            if named:
                raise ValueError(f"{arch.id}: target of {a.name!r} has shape {spec.shape}; need 2-D or 4-D")
            continue
        if modules is None and not keep(tuple(spec.shape)):
            continue
        chosen.append((a, tuple(spec.shape)))
    picked = {id(a) for a in _spread([a for a, _ in chosen], limit)}
    chosen = [c for c in chosen if id(c[0]) in picked]
    if not chosen:
        raise ValueError(f"{arch.id}/{variant}: no {algo} module selected for spelling {spelling!r}")

    if algo == "full":
        alpha_value: float | None = None
    elif alpha is None:
        alpha_value = rank / 2 if style == "kohya" else None
    else:
        alpha_value = float(alpha)

    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, ExpectedModule] = {}
    for a, real_shape in chosen:
        full_shape = shrink_shape(real_shape, factor)
        target = shrink_target(a.target, real_shape, factor)
        part = sliced_shape(full_shape, target.slice)
        mod_algo = algo
        if algo == "locon-tucker" and (len(part) == 2 or math.prod(part[2:]) == 1):
            mod_algo = "lora"
        written, delta, factors, scale, stored_alpha = _module(
            mod_algo, part, rank, alpha_value, style, dtype, _generator(seed, "lora:" + a.name)
        )
        for suffix, t in written.items():
            tensors[a.name + suffix] = t
        expected[a.name] = ExpectedModule(
            name=a.name,
            alias=a,
            target=target,
            target_shape=full_shape,
            algo=mod_algo,
            delta=delta,
            factors=factors,
            scale=scale,
            alpha=stored_alpha,
            rank=None if mod_algo == "full" else rank,
        )
    meta = dict(metadata or {})
    save_file(tensors, str(path), metadata=meta or None)
    return LoraFixture(
        path=Path(path),
        arch=arch.id,
        variant=variant,
        spelling=spelling,
        algo=algo,
        rank=None if algo == "full" else rank,
        alpha=alpha_value if alpha_value is None else float(torch.tensor(alpha_value, dtype=dtype).item()),
        factor=factor,
        modules=expected,
        tensors=tensors,
        metadata=meta,
    )


def _module(
    algo: str,
    part: tuple[int, ...],
    rank: int,
    alpha: float | None,
    style: str,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], float, float | None]:
    """Factors of one module: (stored tensors, exact delta, float64 factors, g, stored alpha)."""
    out_dim, in_dim = part[0], part[1]
    kernel = tuple(part[2:])
    flat_in = in_dim * math.prod(kernel)
    conv = len(part) == 4
    stored: dict[str, torch.Tensor] = {}

    def put(suffix: str, shape: Sequence[int], std: float = FACTOR_STD) -> torch.Tensor:
        stored[suffix] = _randn(shape, gen, std).to(dtype)
        return stored[suffix].to(torch.float64)

    if algo == "full":
        delta = put(".diff", part, TUNED_STD)
        return stored, delta, {".diff": delta}, 1.0, None

    g, stored_alpha = 1.0, None
    if alpha is not None:
        stored[".alpha"] = torch.tensor(alpha, dtype=dtype)
        stored_alpha = float(stored[".alpha"].to(torch.float64))
        g = stored_alpha / rank

    if algo in ("lora", "dora"):
        if style == "kohya":
            down_sfx, up_sfx = ".lora_down.weight", ".lora_up.weight"
        else:
            down_sfx, up_sfx = ".lora_A.weight", ".lora_B.weight"
        down = put(down_sfx, (rank, in_dim, *kernel))
        up = put(up_sfx, (out_dim, rank, 1, 1) if conv else (out_dim, rank))
        delta = g * (up.reshape(out_dim, rank) @ down.reshape(rank, flat_in)).reshape(part)
        if algo == "dora":
            # a positive magnitude per output row, near the row norm of a base of std 0.02
            mag = (0.5 + torch.rand((out_dim, 1), generator=gen, dtype=torch.float32)) * CHECKPOINT_STD
            mag = mag * math.sqrt(flat_in)
            stored[".dora_scale"] = mag.reshape(out_dim, *(1,) * (len(part) - 1)).to(dtype)
    elif algo == "locon-tucker":
        down = put(".lora_down.weight", (rank, in_dim, 1, 1))
        mid = put(".lora_mid.weight", (rank, rank, *kernel))
        up = put(".lora_up.weight", (out_dim, rank, 1, 1))
        delta = g * torch.einsum(
            "pi,ijkl,jq->pqkl", up.reshape(out_dim, rank), mid, down.reshape(rank, in_dim)
        )
    elif algo == "loha":
        w1a = put(".hada_w1_a", (out_dim, rank))
        w1b = put(".hada_w1_b", (rank, flat_in))
        w2a = put(".hada_w2_a", (out_dim, rank))
        w2b = put(".hada_w2_b", (rank, flat_in))
        delta = (g * (w1a @ w1b) * (w2a @ w2b)).reshape(part)
    elif algo == "lokr":
        m_out, n_out = lokr_factorization(out_dim)
        m_in, n_in = lokr_factorization(in_dim)
        w1 = put(".lokr_w1", (m_out, m_in))
        w2a = put(".lokr_w2_a", (n_out, rank))
        w2b = put(".lokr_w2_b", (rank, n_in * math.prod(kernel)))
        w2 = (w2a @ w2b).reshape(n_out, n_in, *kernel)
        w1k = w1.reshape(m_out, m_in, *(1,) * len(kernel))
        delta = g * torch.kron(w1k, w2)
    else:  # pragma: no cover - guarded by ALGOS
        raise ValueError(algo)
    factors = {k: v.to(torch.float64) for k, v in stored.items()}
    return stored, delta, factors, g, stored_alpha


# -------------------------------------------------------------------------------------------- bad files
def _safetensors_bytes(header: Any, data: bytes = b"", *, declared_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", length) + raw + data


def write_bad_files(directory: str | Path) -> dict[str, Path]:
    """Write the standard malformed inputs into ``directory`` and return ``{name: path}``.

    Every entry is rejected by a correct safetensors reader:

    ``empty`` (0 bytes), ``short`` (fewer than the 8 length bytes), ``truncated`` (the header promises 16
    data bytes, 8 are present), ``header_past_end`` (header length beyond the end of the file),
    ``corrupt_json``, ``not_utf8``, ``json_list`` (a JSON list instead of an object), ``overlapping_offsets``,
    ``unknown_dtype``, ``nonstring_metadata`` (a metadata value that is a number), ``byte_count_mismatch``
    (shape and dtype need 16 bytes, the offsets give 12), ``pickle`` (a ``torch.save`` zip, ``.ckpt``),
    ``pickle_renamed`` (the same bytes named ``.safetensors``), ``random_bytes``, ``directory`` (a folder
    named ``*.safetensors``). All but ``pickle`` are named ``<name>.safetensors``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    w16 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    contents: dict[str, bytes] = {
        "empty": b"",
        "short": b"\x10\x00\x00",
        "truncated": _safetensors_bytes({"w": w16}, b"\x00" * 8),
        "header_past_end": _safetensors_bytes(b'{"w": {"dtype": "F32"', declared_len=4096),
        "corrupt_json": _safetensors_bytes(
            b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offs', b"\x00" * 16
        ),
        "not_utf8": _safetensors_bytes(
            b'{"\xff\xfe": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', b"\0" * 4
        ),
        "json_list": _safetensors_bytes(
            [{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}], b"\x00" * 16
        ),
        "overlapping_offsets": _safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\x00" * 24,
        ),
        "unknown_dtype": _safetensors_bytes(
            {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
        ),
        "nonstring_metadata": _safetensors_bytes(
            {"__metadata__": {"ss_network_dim": 4}, "w": w16}, b"\x00" * 16
        ),
        "byte_count_mismatch": _safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\x00" * 12
        ),
        "random_bytes": random.Random(0).randbytes(4096),
    }
    out: dict[str, Path] = {}
    for name, blob in contents.items():
        p = d / f"{name}.safetensors"
        p.write_bytes(blob)
        out[name] = p
    pickle_path = d / "pickle.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2, 2)}}, pickle_path)
    out["pickle"] = pickle_path
    renamed = d / "pickle_renamed.safetensors"
    renamed.write_bytes(pickle_path.read_bytes())
    out["pickle_renamed"] = renamed
    folder = d / "directory.safetensors"
    folder.mkdir(exist_ok=True)
    out["directory"] = folder
    return out
