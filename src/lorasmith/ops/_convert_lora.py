"""LoRA spelling conversion: rename, fuse and split modules between a family's key spellings.

Every input module is resolved through the family's alias table to a :class:`~lorasmith.archs.base.Target`
(canonical key, optional row slice); :func:`~lorasmith.ops.loralib.plan_units` then gathers the input
modules under the output spelling's aliases of the same weight. Each output unit is written one of four
ways:

``rename``
    one whole input module under a new name. With the same suffix style (kohya -> kohya) every tensor is
    copied bit for bit, LyCORIS suffixes included (LoHa, LoKr, full, DoRA, norm, OFT...). kohya -> PEFT bakes
    ``g = alpha / rank`` into the factors, ``sqrt(g)`` into each (float tolerance); PEFT -> kohya copies the
    factors and writes ``alpha = rank`` (scale 1, bit-exact factors).
``fuse``
    split q/k/v (or q/k/v/mlp) modules into one fused module: ``down = cat(downs)``,
    ``up = blockdiag(ups)`` (each part's ``up`` at its rows, zeros elsewhere). When every part has the
    same scale ``g`` the factors are copied unscaled and ``alpha = g * sum(ranks)`` (``alpha x 3`` for
    three equal parts, FORMATS.md section 2); otherwise each part's ``g`` is folded into its ``up`` columns
    and ``alpha = sum(ranks)`` (scale 1). Either way each part's delta is kept exactly.
``split``
    a row range of a fused module: ``down`` copied, ``up``'s rows sliced. Rank columns whose ``up`` rows
    are all zero in that range are dropped (so a block-diagonal ``up`` chunks back exactly into the parts
    it was fused from) and alpha follows as ``alpha * kept / rank``; a range with an all-zero ``up`` is not
    written at all (it changes nothing).
``lossy``
    (only with ``lossy=True``) what cannot be written exactly in the target: LoHa, LoKr and full diffs into
    PEFT suffixes, or fused/split, are materialised, decomposed by an exact SVD and written as a plain LoRA
    of the smallest rank whose relative Frobenius error is at most ``lossy_tol`` (capped by
    ``lossy_rank``); the error is reported per module.

DoRA: a per-output-row magnitude is ``dora_scale [out, 1(, 1, 1)]`` in kohya/LyCORIS files and
``lora_magnitude_vector`` in PEFT files (``[out]`` for a Linear layer, ``[1, out, 1, 1]`` for a Conv2d: PEFT's
own layouts), so a DoRA LoRA renames losslessly between them; the magnitude itself is only reshaped. A
per-input-column magnitude (early LyCORIS, ``[1, in]``) has no PEFT form. LoHa/LoKr/full + DoRA into PEFT
goes through ``lossy`` with the magnitude kept (the error reported is the direction delta's). DoRA modules
cannot be fused or split (their delta depends on the base weight), not even with ``lossy``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from lorasmith.archs.base import SPELLINGS, Architecture
from lorasmith.errors import AdapterError, LorasmithError, UsageError

if TYPE_CHECKING:
    import torch

    from lorasmith.adapters.base import LowRank
    from lorasmith.ops.loralib import LoraFile, ReadModule, Unit

__all__ = [
    "COMFY_WORDS",
    "LoraConversion",
    "ModuleOutcome",
    "convert_lora_units",
    "resolve_target_spelling",
]

#: ``--to`` words that mean "what ComfyUI loads for this family" (the family's default spelling).
COMFY_WORDS = frozenset({"comfy", "comfyui"})
#: ``--to`` word for the family's literal ``comfy`` spelling (``diffusion_model.<checkpoint key>``).
COMFY_KEYS_WORD = "comfy-keys"
#: ``--to`` words with another name for a spelling.
_SYNONYMS = {"diffusers": "peft", "ai-toolkit": "aitk", "simpletuner": "lycoris"}
#: ``--to`` word that keeps the input's spelling (only the dtype changes).
KEEP_WORD = "keep"

Mode = Literal["rename", "fuse", "split", "lossy", "skipped"]

_KOHYA_EQUIV: dict[str, str] = {
    ".lora_A.weight": ".lora_down.weight",
    ".lora_B.weight": ".lora_up.weight",
    ".lora_A.default.weight": ".lora_down.weight",
    ".lora_B.default.weight": ".lora_up.weight",
    "_lora.down.weight": ".lora_down.weight",
    "_lora.up.weight": ".lora_up.weight",
    ".lora.down.weight": ".lora_down.weight",
    ".lora.up.weight": ".lora_up.weight",
    ".lora_linear_layer.down.weight": ".lora_down.weight",
    ".lora_linear_layer.up.weight": ".lora_up.weight",
    ".lora_magnitude_vector": ".dora_scale",
    ".lora_magnitude_vector.default": ".dora_scale",
}
_PEFT_EQUIV: dict[str, str] = {
    ".lora_down.weight": ".lora_A.weight",
    ".lora_up.weight": ".lora_B.weight",
    ".lora_A.default.weight": ".lora_A.weight",
    ".lora_B.default.weight": ".lora_B.weight",
    "_lora.down.weight": ".lora_A.weight",
    "_lora.up.weight": ".lora_B.weight",
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
    ".dora_scale": ".lora_magnitude_vector",
    ".lora_magnitude_vector.default": ".lora_magnitude_vector",
}
_DORA = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.default")


def resolve_target_spelling(arch: Architecture, to: str, current: str | None) -> str:
    """The family spelling id that ``--to`` names.

    ``comfy``/``comfyui`` -> the family's default spelling (``arch.spellings[0]``, the one ComfyUI loads
    for every component, text encoders included); ``comfy-keys`` -> the literal ``comfy`` spelling
    (``diffusion_model.<key>``, diffusion model only); ``diffusers`` -> ``peft``; ``keep`` -> ``current``.

    :raises UsageError: a word that is no spelling of any family.
    :raises LorasmithError: a spelling this family does not have (the message lists the family's).
    """
    word = to.strip().lower()
    have = ", ".join(arch.spellings)
    if word == KEEP_WORD:
        if current is None:
            raise LorasmithError("the input's spelling is unknown, so it cannot be kept", hint=f"--to {have}")
        return current
    if word in COMFY_WORDS:
        return arch.spellings[0]
    if word == COMFY_KEYS_WORD:
        word = "comfy"
    word = _SYNONYMS.get(word, word)
    if word not in SPELLINGS:
        known = sorted({*SPELLINGS, *COMFY_WORDS, COMFY_KEYS_WORD, *_SYNONYMS, KEEP_WORD} - {"comfy"})
        raise UsageError(f"unknown target spelling {to!r}", hint="spellings: comfy, " + ", ".join(known))
    if word not in arch.spellings:
        raise LorasmithError(
            f"{arch.name} LoRAs have no {word!r} spelling", hint=f"{arch.id} spellings: {have} (or comfy)"
        )
    return word


@dataclass(frozen=True)
class ModuleOutcome:
    """How one output module was made.

    :ivar name: the output module name.
    :ivar mode: ``rename``, ``fuse``, ``split``, ``lossy`` or ``skipped`` (an all-zero split part).
    :ivar sources: the input module names.
    :ivar rank: the output rank (``None`` for modules without one, such as full diffs kept as they are).
    :ivar rel_error: the relative Frobenius error of a lossy module (``None`` otherwise).
    """

    name: str
    mode: Mode
    sources: tuple[str, ...]
    rank: int | None = None
    rel_error: float | None = None


@dataclass
class LoraConversion:
    """The output of :func:`convert_lora_units`: tensors in order, and what happened to each module."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    outcomes: list[ModuleOutcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    linear: list[tuple[int, float]] = field(default_factory=list)
    conv: list[tuple[int, float]] = field(default_factory=list)


def _style_of_suffixes(suffixes: Sequence[str]) -> str:
    if any(s.startswith((".lora_A", ".lora_B", ".lora_magnitude")) for s in suffixes):
        return "peft"
    if any(s in (".lora_down.weight", ".lora_up.weight") for s in suffixes):
        return "kohya"
    return "other"


def convert_lora_units(
    lora: LoraFile,
    units: Sequence[Unit],
    style: Literal["kohya", "peft"],
    *,
    lossy: bool = False,
    lossy_tol: float = 0.01,
    lossy_rank: int | None = None,
    cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    on_unit: Callable[[str], None] | None = None,
) -> LoraConversion:
    """Write every unit of ``units`` (planned for one input file) in suffix ``style``.

    :param cast: applied to every written tensor (name, tensor) -> tensor (the ``--dtype`` change).
    :param on_unit: called with each output module name when it is done (progress).
    :raises LorasmithError: a module that cannot be written in ``style`` without loss and ``lossy`` is
        false, or that cannot be written at all (DoRA fused or split, OFT/GLoRA/norm into PEFT).
    """
    out = LoraConversion()
    for unit in units:
        read = [lora.read_module(c.module) for c in unit.contributions]
        _convert_unit(unit, read, style, out, lossy=lossy, lossy_tol=lossy_tol, lossy_rank=lossy_rank)
        if on_unit is not None:
            on_unit(unit.name)
    if style == "peft":
        # PEFT factors carry their scale (alpha / rank is baked into them): the effective alpha is the rank,
        # which is what the output's ss_network_alpha must say
        out.linear = [(r, float(r)) for r, _ in out.linear]
        out.conv = [(r, float(r)) for r, _ in out.conv]
    for key in lora.extra_keys:
        out.tensors[key] = lora.tensor(key)
    if cast is not None:
        out.tensors = {k: cast(k, t) for k, t in out.tensors.items()}
    return out


def _lossless_in(style: str, algo: str, has_dora: bool, in_style: str) -> bool:
    if style == "kohya":
        return True
    return algo in ("lora", "locon-tucker")


def _convert_unit(
    unit: Unit,
    read: Sequence[ReadModule],
    style: Literal["kohya", "peft"],
    out: LoraConversion,
    *,
    lossy: bool,
    lossy_tol: float,
    lossy_rank: int | None,
) -> None:
    sources = tuple(c.module for c in unit.contributions)
    first = unit.contributions[0]
    # one input module that is exactly this output module (unit.single does not compare with the unit's rows)
    single = (
        first if len(unit.contributions) == 1 and first.whole and first.rows == unit.out_features else None
    )
    where = f"module {unit.contributions[0].module!r}"
    if single is not None:
        info = single.info
        algo = info.summary.algo
        if _lossless_in(style, algo, info.summary.has_dora, _style_of_suffixes(list(info.keys))):
            _rename(unit, read[0], style, out, sources)
            return
        if unit.passthrough:
            raise LorasmithError(
                f"{where}: a {algo} module cannot be written with PEFT suffixes",
                hint="convert to a spelling with kohya-style suffixes (kohya, comfy, lycoris...)",
            )
        _check_peft_dora(where, info.summary.dora_axis)
        _require_lossy(lossy, f"{where}: a {algo} module has no exact PEFT form")
        _lossy(unit, read, style, out, sources, lossy_tol, lossy_rank, keep_dora=True)
        return
    if unit.lowrank:
        if len(unit.contributions) == 1:
            _split(unit, read[0], style, out, sources)
        else:
            _fuse(unit, read, style, out, sources)
        return
    algos = ", ".join(sorted(set(unit.algos)))
    # a whole input module placed into a larger output module (one part of a fused qkv) is a fuse too
    splits = any(c.rows < (c.info.summary.out_features or 0) for c in unit.contributions)
    what = "split" if splits else "fused"
    _require_lossy(lossy, f"{where}: {algos} modules cannot be {what} exactly")
    _lossy(unit, read, style, out, sources, lossy_tol, lossy_rank)


def _check_peft_dora(where: str, axis: int | None) -> None:
    """Refuse a DoRA magnitude PEFT cannot store: PEFT keeps one magnitude per output row."""
    if axis is not None and axis != 0:
        raise LorasmithError(
            f"{where}: its DoRA magnitude is per input column, which PEFT cannot store",
            hint="keep a kohya-style spelling for this LoRA (kohya, comfy, lycoris...)",
        )


def _peft_magnitude(unit: Unit, dora: torch.Tensor) -> torch.Tensor:
    """A per-output-row magnitude in PEFT's layout: ``[out]`` (Linear) or ``[1, out, 1, 1]`` (Conv2d)."""
    flat = dora.reshape(-1)
    if _base_is_conv(unit):
        # PEFT's Conv2d DoRA layer keeps the norm it was initialised from as [out, 1, 1, 1].transpose(0, 1)
        return flat.reshape(1, -1, 1, 1).contiguous()
    return flat.contiguous()


def _base_is_conv(unit: Unit) -> bool:
    """Whether the base weight of ``unit`` is a 4-D conv (its layer a Conv2d in diffusers), from the family's
    inventories; the factors' own shape decides when the family does not know the weight."""
    lora = unit.contributions[0].file
    arch = lora.arch
    if arch is not None and unit.base_key is not None:
        for inv in (arch.canonical_inventory(lora.variant), *arch.inventories()):
            spec = inv.tensors.get(unit.base_key)
            if spec is not None:
                return len(spec.shape) == 4
    return unit.conv_shaped


def _conv_out(unit: Unit, style: Literal["kohya", "peft"]) -> bool:
    """Whether to write conv-shaped factors.

    kohya-style files keep the input's shape (sd-scripts writes SD2's linear ``proj_in`` as a 1x1 conv, and
    its loaders reshape). PEFT factors are loaded into the diffusers layer itself, so a 1x1 module follows the
    base weight: ``[r, in]`` for a Linear (SD2's ``proj_in``/``proj_out``), ``[r, in, 1, 1]`` for a Conv2d.
    """
    if style != "peft" or not unit.conv_shaped:
        return unit.conv_shaped
    if unit.kernel is not None and math.prod(unit.kernel) > 1:
        return True
    return _base_is_conv(unit)


def _require_lossy(lossy: bool, message: str) -> None:
    if not lossy:
        raise LorasmithError(
            message, hint="pass --lossy to convert through an SVD to a plain LoRA (the error is reported)"
        )


# -------------------------------------------------------------------------------------------------- rename
def _rename(
    unit: Unit, r: ReadModule, style: Literal["kohya", "peft"], out: LoraConversion, sources: tuple[str, ...]
) -> None:
    import torch

    c = unit.contributions[0]
    info = c.info
    lora = c.file
    in_style = _style_of_suffixes(list(info.keys))
    rank = info.summary.rank
    alpha_of = r.module.alpha
    if style == "kohya":
        conv_ndim = len(info.summary.shapes.get(info.summary.roles.get("up", ""), ()))
        for suffix, key in info.keys.items():
            t = lora.tensor(key)
            new = _KOHYA_EQUIV.get(suffix, suffix)
            if new == ".dora_scale" and suffix != ".dora_scale":
                # PEFT keeps the per-output-row magnitude as [out] (Linear) or [1, out, 1, 1] (Conv2d);
                # kohya/LyCORIS as [out, 1] or [out, 1, 1, 1]: the same values, reshaped
                t = t.reshape(t.numel(), *([1] * (max(conv_ndim, 2) - 1)))
            out.tensors[unit.name + new] = t
        if in_style == "peft" and ".alpha" not in info.keys and rank is not None:
            # PEFT factors carry scale 1: alpha = rank says exactly that to every kohya loader
            out.tensors[unit.name + ".alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    elif in_style == "peft" and ".alpha" not in info.keys:
        for suffix, key in info.keys.items():
            t = lora.tensor(key)
            out.tensors[unit.name + _PEFT_EQUIV.get(suffix, suffix)] = t
    else:
        from lorasmith.adapters.lora import encode_lora

        low = r.module.lowrank()
        if low is None:
            raise AdapterError(f"module {c.module!r} has no low-rank factors")
        dtype = _factor_dtype(r)
        folded = low.fold()
        # encode_lora bakes alpha / rank: alpha = g * rank makes it bake exactly the module's own g (the
        # stored alpha when the rank is the factors', which holds for plain LoRA and folded Tucker)
        g_alpha = alpha_of if alpha_of is not None and low.mid is None else folded.scale * folded.rank
        encoded = encode_lora(
            folded.up,
            folded.down,
            g_alpha,
            suffixes="peft",
            conv=_conv_out(unit, "peft"),
            kernel=(unit.kernel or (1, 1)) if _conv_out(unit, "peft") else None,
            dtype=dtype,
        )
        for suffix, t in encoded.items():
            out.tensors[unit.name + suffix] = t
        if r.dora is not None:
            _check_peft_dora(f"module {c.module!r}", info.summary.dora_axis)
            out.tensors[unit.name + ".lora_magnitude_vector"] = _peft_magnitude(unit, r.dora)
        if r.bias is not None:
            raise LorasmithError(
                f"module {c.module!r} has a bias delta, which PEFT spellings cannot store",
                hint="keep a kohya-style spelling for this LoRA",
            )
    _record(out, unit, "rename", sources, rank, alpha_of if alpha_of is not None else rank)


def _record(
    out: LoraConversion,
    unit: Unit,
    mode: Mode,
    sources: tuple[str, ...],
    rank: int | None,
    alpha: float | None,
    rel_error: float | None = None,
) -> None:
    out.outcomes.append(ModuleOutcome(unit.name, mode, sources, rank, rel_error))
    if rank is not None:
        (out.conv if unit.is_conv else out.linear).append((rank, float(alpha if alpha is not None else rank)))


# ------------------------------------------------------------------------------------------- fuse / split
def _alpha_dtype(read: Sequence[ReadModule]) -> torch.dtype:
    import torch

    for r in read:
        a = r.module.tensors.get("alpha")
        if a is not None and a.is_floating_point():
            return a.dtype
    return torch.float32


def _emit_lowrank(
    unit: Unit,
    up: torch.Tensor,
    down: torch.Tensor,
    alpha: float,
    style: Literal["kohya", "peft"],
    dtype: torch.dtype,
    alpha_dtype: torch.dtype,
    out: LoraConversion,
) -> None:
    import torch

    from lorasmith.adapters.lora import encode_lora

    encoded = encode_lora(
        up,
        down,
        alpha,
        suffixes=style,
        conv=_conv_out(unit, style),
        kernel=(unit.kernel or (1, 1)) if _conv_out(unit, style) else None,
        dtype=dtype,
    )
    for suffix, t in encoded.items():
        if suffix == ".alpha":
            t = torch.tensor(alpha, dtype=torch.float64).to(alpha_dtype)
        out.tensors[unit.name + suffix] = t


def _factor_dtype(r: ReadModule) -> torch.dtype:
    return r.module.tensors["up"].dtype


def _split(
    unit: Unit, r: ReadModule, style: Literal["kohya", "peft"], out: LoraConversion, sources: tuple[str, ...]
) -> None:
    c = unit.contributions[0]
    low = r.module.lowrank()
    if low is None:
        raise AdapterError(f"module {c.module!r} has no low-rank factors")
    folded = low.fold()
    up = folded.up[c.src_start : c.src_start + c.rows]
    down = folded.down
    rank = int(up.shape[1])
    alpha = r.module.alpha if r.module.alpha is not None else float(rank)
    if c.dst_start != 0 or c.rows != unit.out_features:
        # the input covers only part of this output module: the rest of the rows get zeros
        import torch

        placed = torch.zeros(unit.out_features, rank, dtype=up.dtype)
        placed[c.dst_start : c.dst_start + c.rows] = up
        up = placed
    keep = (up != 0).reshape(up.shape[0], rank).any(dim=0)
    kept = int(keep.sum())
    if kept == 0:
        # an all-zero part of a fused module changes nothing: leave it out
        out.outcomes.append(ModuleOutcome(unit.name, "skipped", sources, 0))
        return
    if kept < rank:
        # chunk a block-diagonal up exactly: the dropped columns contribute nothing to these rows.
        # g = alpha / rank must be kept, so alpha scales with the rank (multiply first: exact for ints)
        up = up[:, keep]
        down = down[keep]
        alpha = alpha * kept / rank
    _emit_lowrank(unit, up, down, alpha, style, _factor_dtype(r), _alpha_dtype([r]), out)
    # a part of a fused input is a split; a whole input padded into a fused output is a fuse (of one part)
    mode: Mode = "split" if c.rows < (c.info.summary.out_features or 0) else "fuse"
    _record(out, unit, mode, sources, kept, alpha)


def _fuse(
    unit: Unit,
    read: Sequence[ReadModule],
    style: Literal["kohya", "peft"],
    out: LoraConversion,
    sources: tuple[str, ...],
) -> None:
    import torch

    from lorasmith.adapters.base import compute_dtype

    lows = []
    for c, r in zip(unit.contributions, read, strict=True):
        low = r.module.lowrank()
        if low is None:
            raise AdapterError(f"module {c.module!r} has no low-rank factors")
        lows.append(low.fold())
    ranks = [int(low.up.shape[1]) for low in lows]
    if _shared_down(unit, lows, read):
        # parts split from one fused module share its down: fuse back to that module exactly (same rank,
        # same alpha), instead of tripling the rank with copies of one down
        first = lows[0]
        up = torch.zeros(unit.out_features, ranks[0], dtype=first.up.dtype)
        for c, low in zip(unit.contributions, lows, strict=True):
            up[c.dst_start : c.dst_start + c.rows] = low.up[c.src_start : c.src_start + c.rows]
        alpha0 = read[0].module.alpha if read[0].module.alpha is not None else float(ranks[0])
        _emit_lowrank(unit, up, first.down, alpha0, style, _factor_dtype(read[0]), _alpha_dtype(read), out)
        _record(out, unit, "fuse", sources, ranks[0], alpha0)
        return
    total = sum(ranks)
    alphas = [
        r.module.alpha if r.module.alpha is not None else float(k) for r, k in zip(read, ranks, strict=True)
    ]
    scales = {Fraction(a) / k for a, k in zip(alphas, ranks, strict=True)}
    same = len(scales) == 1
    dtype = _factor_dtype(read[0])
    wide = compute_dtype(*(low.up.dtype for low in lows))
    up = torch.zeros(unit.out_features, total, dtype=dtype if same else wide)
    downs = []
    col = 0
    for c, low, a, k in zip(unit.contributions, lows, alphas, ranks, strict=True):
        part = low.up[c.src_start : c.src_start + c.rows]
        if not same:
            # parts disagree on g: fold each part's own g into its up columns; the output has scale 1
            part = part.to(wide) * (a / k)
        up[c.dst_start : c.dst_start + c.rows, col : col + k] = part
        downs.append(low.down.to(dtype if same else wide))
        col += k
    down = torch.cat(downs, dim=0)
    # equal g: alpha = g * total rank (alpha x 3 for three equal parts), factors untouched
    alpha = alphas[0] * total / ranks[0] if same else float(total)
    _emit_lowrank(unit, up, down, alpha, style, dtype, _alpha_dtype(read), out)
    _record(out, unit, "fuse", sources, total, alpha)


def _shared_down(unit: Unit, lows: Sequence[LowRank], read: Sequence[ReadModule]) -> bool:
    """Whether every part has the same down (bit for bit), rank, alpha and no overlapping rows."""
    import torch

    first = lows[0]
    alphas = {r.module.alpha for r in read}
    if len(alphas) != 1:
        return False
    for low in lows[1:]:
        if low.down.shape != first.down.shape or low.down.dtype != first.down.dtype:
            return False
        if low.up.dtype != first.up.dtype or not torch.equal(low.down, first.down):
            return False
    rows = sorted((c.dst_start, c.dst_start + c.rows) for c in unit.contributions)
    return all(a[1] <= b[0] for a, b in itertools.pairwise(rows))


# -------------------------------------------------------------------------------------------------- lossy
def lossy_rank_for(s: torch.Tensor, tol: float, cap: int | None) -> int:
    """The smallest rank whose truncation has a relative Frobenius error of at most ``tol``."""
    from lorasmith.linalg.rank import discarded_rel_error

    values = [float(v) for v in s]
    k = len(values)
    for i in range(1, len(values) + 1):
        if discarded_rel_error(values, i) <= tol:
            k = i
            break
    if cap is not None:
        k = min(k, cap)
    return max(1, k)


def _lossy(
    unit: Unit,
    read: Sequence[ReadModule],
    style: Literal["kohya", "peft"],
    out: LoraConversion,
    sources: tuple[str, ...],
    tol: float,
    cap: int | None,
    *,
    keep_dora: bool = False,
) -> None:
    import torch

    from lorasmith.linalg.svd import exact_svd
    from lorasmith.ops.loralib import unit_dense

    dora = read[0].dora if len(read) == 1 else None
    if any(r.dora is not None for r in read) and not (keep_dora and dora is not None):
        raise LorasmithError(
            f"module {sources[0]!r}: a DoRA module cannot be fused or split "
            "(its delta depends on the base weight)",
            hint="keep a spelling that names this module as the input does (kohya, comfy, lycoris...)",
        )
    dense = unit_dense(unit, read, torch.float64)
    svd = exact_svd(dense)
    k = lossy_rank_for(svd.S, tol, cap)
    cut = svd.truncate(k)
    up, down = cut.to_lora(k)
    dtype = _factor_dtype_any(read[0])
    _emit_lowrank(unit, up, down, float(k), style, dtype, torch.float32, out)
    if dora is not None:
        # the magnitude is kept as it is: the SVD only approximates the direction W + dW it re-normalises
        if style == "peft":
            out.tensors[unit.name + ".lora_magnitude_vector"] = _peft_magnitude(unit, dora)
        else:
            out.tensors[unit.name + ".dora_scale"] = dora
    bias = read[0].bias if len(read) == 1 else None
    if bias is not None:
        if style == "peft":
            out.warnings.append(f"module {unit.name!r}: its bias delta was dropped (PEFT cannot store it)")
        else:
            out.tensors[unit.name + ".diff_b"] = bias
    err = cut.rel_error if cut.rel_error is not None else math.nan
    _record(out, unit, "lossy", sources, k, float(k), err)


def _factor_dtype_any(r: ReadModule) -> torch.dtype:
    import torch

    for t in r.module.tensors.values():
        if t.is_floating_point() and t.ndim >= 2:
            return t.dtype
    return torch.float32


def lossy_errors(outcomes: Sequence[ModuleOutcome]) -> Mapping[str, float]:
    """Module name -> relative error of every lossy module."""
    return {o.name: o.rel_error for o in outcomes if o.mode == "lossy" and o.rel_error is not None}
