"""Header-level analysis of one adapter module: algorithm, rank, shapes. Never imports torch.

Every LoRA-family file groups its tensors by module (see :func:`lorasmith.archs.base.lora_modules`); the
suffixes and shapes of one module's tensors are enough to tell the algorithm (LoRA, LoCon Tucker, LoHa,
LoKr, full diff, norm, OFT, BOFT, GLoRA, each optionally with DoRA), the rank, the target weight's
geometry and whether the file is well formed. :func:`module_summary` does this from the safetensors
header alone, which is what ``lorasmith inspect`` needs; :func:`lorasmith.adapters.parse_module` runs the
same analysis before it builds a tensor-backed module, so both agree on every rule and every error.

Alpha *values* need the tensor data and are therefore not part of a :class:`ModuleSummary`; only whether
an alpha tensor is present (and well shaped) is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from lorasmith.errors import AdapterError

__all__ = [
    "ALGOS",
    "ROLE_OF_SUFFIX",
    "Algo",
    "HeaderEntry",
    "ModuleSummary",
    "analyze",
    "dtype_size",
    "module_summary",
    "normalize_suffix",
]

Algo = Literal["lora", "locon-tucker", "loha", "lokr", "full", "norm", "oft", "boft", "glora"]

#: Every algorithm id, in the order the documentation lists them.
ALGOS: tuple[Algo, ...] = ("lora", "locon-tucker", "loha", "lokr", "full", "norm", "oft", "boft", "glora")

#: LoRA factor spellings: suffix -> (role, spelling family).
_LORA_PAIRS: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_A.default.weight": ("down", "peft"),
    ".lora_B.default.weight": ("up", "peft"),
    "_lora.down.weight": ("down", "diffusers"),
    "_lora.up.weight": ("up", "diffusers"),
    ".lora.down.weight": ("down", "diffusers"),
    ".lora.up.weight": ("up", "diffusers"),
    ".lora_linear_layer.down.weight": ("down", "diffusers"),
    ".lora_linear_layer.up.weight": ("up", "diffusers"),
}

#: Tensor suffix -> the role it plays in its module. Several spellings share a role (``down``, ``dora``).
ROLE_OF_SUFFIX: dict[str, str] = {
    **{suffix: role for suffix, (role, _) in _LORA_PAIRS.items()},
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "dora",
    ".lora_magnitude_vector": "dora",
    ".lora_magnitude_vector.default": "dora",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".w_norm": "w_norm",
    ".b_norm": "b_norm",
    ".oft_blocks": "oft_blocks",
    ".oft_diag": "oft_diag",
    ".rescale": "rescale",
    ".a1.weight": "a1",
    ".a2.weight": "a2",
    ".b1.weight": "b1",
    ".b2.weight": "b2",
    ".bm.weight": "bm",
}

# Roles any algorithm may carry next to its own factors.
_COMMON_ROLES = frozenset({"alpha", "dora", "diff_b"})

_ALGO_ROLES: dict[str, frozenset[str]] = {
    "lora": frozenset({"down", "up", "mid"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "full": frozenset({"diff"}),
    "norm": frozenset({"w_norm", "b_norm"}),
    "oft": frozenset({"oft_blocks", "rescale"}),
    "glora": frozenset({"a1", "a2", "b1", "b2", "bm"}),
}

# Bytes per element of the safetensors dtype strings (and of torch's spellings, for convenience).
_DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FN": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E4M3FNUZ": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def dtype_size(dtype: str) -> int | None:
    """Bytes per element of a safetensors dtype string (``"F16"`` -> 2); ``None`` if unknown.

    torch spellings (``"torch.float16"``, ``"float16"``) are accepted too.
    """
    return _DTYPE_BYTES.get(dtype.removeprefix("torch."))


class HeaderEntry(Protocol):
    """A header entry with a shape and a safetensors dtype string (e.g. ``TensorSpec``)."""

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True)
class ModuleSummary:
    """What the header tells about one adapter module (no tensor data needed).

    :ivar name: the module name (the tensor keys without their suffixes).
    :ivar algo: the algorithm id, one of :data:`ALGOS`.
    :ivar rank: the rank that ``alpha`` divides (``down.shape[0]`` for LoRA, ``w1_b.shape[0]`` for LoHa,
        the factored part's rank for LoKr); ``None`` where the algorithm has none (full, norm, OFT, BOFT,
        LoKr with both Kronecker factors full).
    :ivar has_alpha: whether an ``alpha`` tensor is present (its value needs the data).
    :ivar has_dora: whether a DoRA magnitude (``dora_scale`` / ``lora_magnitude_vector``) is present.
    :ivar dora_axis: 0 when the magnitude is per output row (shape ``[out, 1, ...]`` or ``[out]``),
        1 when it is per input column (shape ``[1, in, ...]``); ``None`` without DoRA.
    :ivar needs_base: whether the delta depends on the base weight (DoRA, OFT, BOFT, GLoRA).
    :ivar out_features: rows of the target weight (output features / channels).
    :ivar in_features: columns of the target weight; for formats that store conv factors flattened
        (non-Tucker LoHa and factored LoKr on a conv) this is ``in * kh * kw`` and :attr:`kernel` is
        ``None``; ``None`` where the file does not tell (OFT, BOFT, norm).
    :ivar kernel: the conv kernel (``(3, 3)``, ``(1, 1)``) when the factors carry it, else ``None``.
    :ivar delta_shape: the shape of the dense delta as the factors give it (``None`` for OFT/BOFT,
        whose delta takes the base weight's shape).
    :ivar tucker: whether a Tucker core is present (``lora_mid``, ``hada_t1/t2``, ``lokr_t2``, ``bm``).
    :ivar spelling: for LoRA, the factor spelling family: ``kohya``, ``peft`` or ``diffusers``.
    :ivar has_bias: whether a bias delta (``diff_b`` or ``b_norm``) is present.
    :ivar shapes: suffix -> shape of every tensor of the module.
    :ivar dtypes: suffix -> dtype string of every tensor (empty when unknown).
    :ivar tensor_bytes: total bytes of the module's tensors, ``None`` if a dtype is unknown.
    :ivar roles: role -> suffix (``{"down": ".lora_A.weight", ...}``).
    """

    name: str
    algo: Algo
    rank: int | None
    has_alpha: bool
    has_dora: bool
    dora_axis: int | None
    needs_base: bool
    out_features: int | None
    in_features: int | None
    kernel: tuple[int, ...] | None
    delta_shape: tuple[int, ...] | None
    tucker: bool = False
    spelling: str | None = None
    has_bias: bool = False
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: Mapping[str, str] = field(default_factory=dict)
    tensor_bytes: int | None = None
    roles: Mapping[str, str] = field(default_factory=dict)
    #: OFT/BOFT geometry: ``(stages, blocks, block size)`` (``stages`` is 1 for OFT).
    oft_geometry: tuple[int, int, int] | None = None
    #: GLoRA factor layout: ``"lycoris"`` (a1 ``[in, r]``, a2 ``[r, in]``, b1 ``[out, r]``, b2 ``[r, in]``)
    #: or ``"lycoris-old"`` (the transposed naming of early LyCORIS releases).
    glora_layout: str | None = None


def normalize_suffix(suffix: str) -> str:
    """A suffix with its leading separator (``"alpha"`` -> ``".alpha"``; ``"_lora.up.weight"`` unchanged)."""
    return suffix if suffix.startswith((".", "_")) else "." + suffix


def _fail(name: str, problem: str, hint: str | None = None) -> AdapterError:
    return AdapterError(f"adapter module {name!r}: {problem}", hint=hint)


def _ones(dims: Sequence[int]) -> bool:
    return all(d == 1 for d in dims)


def _prod(dims: Sequence[int]) -> int:
    return math.prod(dims)


def analyze(name: str, shapes: Mapping[str, Sequence[int]]) -> ModuleSummary:
    """Classify and validate one module from its ``{suffix: shape}`` alone.

    :raises AdapterError: unknown or conflicting suffixes, a missing factor, mismatched ranks, a tensor
        of the wrong number of dimensions, an alpha that is not a scalar, an empty tensor (LoRA factors of
        rank 0), a DoRA magnitude whose shape fits neither axis, or a module whose algorithm cannot be
        told.
    """
    norm_shapes: dict[str, tuple[int, ...]] = {}
    roles: dict[str, str] = {}
    for raw, shape in shapes.items():
        suffix = normalize_suffix(raw)
        role = ROLE_OF_SUFFIX.get(suffix)
        if role is None:
            raise _fail(
                name,
                f"unknown tensor suffix {suffix!r}",
                "known suffixes are listed in lorasmith.adapters.summary.ROLE_OF_SUFFIX",
            )
        if role in roles:
            raise _fail(
                name,
                f"both {roles[role]!r} and {suffix!r} are present (same role {role!r})",
                "a module may use one spelling per tensor; the file mixes two trainers' keys",
            )
        roles[role] = suffix
        norm_shapes[suffix] = tuple(int(d) for d in shape)
    shp = {role: norm_shapes[suffix] for role, suffix in roles.items()}

    if "oft_diag" in roles:
        raise _fail(
            name,
            "pre-release LyCORIS OFT ('oft_diag') is not supported",
            "re-train or convert with a current LyCORIS (which writes 'oft_blocks')",
        )
    kinds = [algo for algo, own in _ALGO_ROLES.items() if own & roles.keys()]
    if not kinds:
        present = ", ".join(sorted(roles.values())) or "nothing"
        raise _fail(
            name,
            f"no adapter factors, only {present}",
            "a module needs e.g. lora_down+lora_up, hada_*, lokr_*, diff, oft_blocks or a1..b2",
        )
    if len(kinds) > 1:
        raise _fail(
            name,
            f"mixes tensors of several algorithms ({', '.join(kinds)})",
            "each module must hold the factors of exactly one algorithm",
        )
    kind = kinds[0]

    if "alpha" in shp and shp["alpha"] not in ((), (1,)):
        raise _fail(name, f"alpha must be a 0-d or 1-element tensor, got shape {list(shp['alpha'])}")
    _check_not_empty(name, kind, shp, roles)

    analyser: Callable[[str, Mapping[str, tuple[int, ...]]], _Info] = {
        "lora": _lora,
        "loha": _loha,
        "lokr": _lokr,
        "full": _full,
        "norm": _norm,
        "oft": _oft,
        "glora": _glora,
    }[kind]
    info = analyser(name, shp)

    dora_axis: int | None = None
    if "dora" in shp:
        if info.algo == "norm":
            raise _fail(name, "a DoRA magnitude on a norm-layer delta (w_norm) is not supported")
        if roles["dora"].startswith(".lora_magnitude_vector"):
            # PEFT's magnitude is per output row by definition, as [out] for a Linear and [1, out, 1, 1]
            # for a Conv2d; the shape alone cannot tell the latter from a per-column [1, in, 1, 1]
            dora_axis = _peft_dora_axis(name, shp["dora"], info.out)
        else:
            dora_axis = _dora_axis(name, shp["dora"], info.out, info.inp)
    if "diff_b" in shp and "b_norm" in shp:
        raise _fail(name, "both diff_b and b_norm are present (two bias deltas)")
    if "diff_b" in shp and len(shp["diff_b"]) != 1:
        raise _fail(name, f"diff_b must be 1-d (a bias delta), got shape {list(shp['diff_b'])}")
    if "diff_b" in shp and info.out is not None and shp["diff_b"][0] != info.out:
        raise _fail(name, f"diff_b has {shp['diff_b'][0]} entries but the weight has {info.out} rows")

    algo = info.algo
    lora_spelling: str | None = None
    if kind == "lora":
        fams = {_LORA_PAIRS[roles[r]][1] for r in ("down", "up")}
        if len(fams) > 1:
            raise _fail(name, f"mixes LoRA spellings {roles['down']!r} and {roles['up']!r}")
        lora_spelling = fams.pop()
    return ModuleSummary(
        name=name,
        algo=algo,
        rank=info.rank,
        has_alpha="alpha" in shp,
        has_dora="dora" in shp,
        dora_axis=dora_axis,
        needs_base="dora" in shp or algo in ("oft", "boft", "glora"),
        out_features=info.out,
        in_features=info.inp,
        kernel=info.kernel,
        delta_shape=info.delta_shape,
        tucker=info.tucker,
        spelling=lora_spelling,
        has_bias="diff_b" in shp or "b_norm" in shp,
        shapes=norm_shapes,
        roles=roles,
        oft_geometry=info.oft_geometry,
        glora_layout=info.glora_layout,
    )


# ------------------------------------------------------------------------------------------ per algorithm
@dataclass(frozen=True)
class _Info:
    """What one per-algorithm analyser found."""

    algo: Algo
    rank: int | None
    out: int | None
    inp: int | None
    kernel: tuple[int, ...] | None
    delta_shape: tuple[int, ...] | None
    tucker: bool = False
    oft_geometry: tuple[int, int, int] | None = None
    glora_layout: str | None = None


def _need(name: str, shp: Mapping[str, tuple[int, ...]], *roles: str) -> None:
    missing = [r for r in roles if r not in shp]
    if missing:
        present = ", ".join(r for r in sorted(shp) if r not in _COMMON_ROLES)
        raise _fail(
            name,
            f"missing {', '.join(missing)} (has {present})",
            "the file is truncated or was written by a tool that dropped part of the module",
        )


def _ndim(
    name: str,
    role: str,
    shape: tuple[int, ...],
    allowed: Sequence[int] | None = None,
    *,
    at_least: int | None = None,
) -> None:
    ok = (allowed is None or len(shape) in allowed) and (at_least is None or len(shape) >= at_least)
    if not ok:
        want = f"{at_least}+" if at_least is not None else "/".join(str(a) for a in allowed or ())
        raise _fail(name, f"{role} must be {want}-d, got shape {list(shape)}")


def _check_not_empty(
    name: str, kind: str, shp: Mapping[str, tuple[int, ...]], roles: Mapping[str, str]
) -> None:
    """Refuse a module with an empty tensor (a zero dimension), e.g. LoRA factors of rank 0.

    Such a module has no delta to apply or decompose, and the shape arithmetic downstream (flattening a
    0-element ``down`` to ``[0, -1]``, ``alpha / rank``) has no defined answer; every trainer writes a
    rank of at least 1, so an empty factor means a damaged file or a broken tool.
    """
    empty = [role for role, shape in shp.items() if 0 in shape]
    if not empty:
        return
    listed = ", ".join(f"{roles[role].lstrip('._')} {list(shp[role])}" for role in sorted(empty))
    up, down = shp.get("up"), shp.get("down")
    rank0 = kind == "lora" and (
        (up is not None and len(up) > 1 and up[1] == 0)
        or (down is not None and len(down) > 0 and down[0] == 0)
    )
    problem = f"rank 0 (empty factors: {listed})" if rank0 else f"empty tensor(s): {listed}"
    raise _fail(name, problem, "the file is damaged or was written by a broken tool; export it again")


def _lora(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    if "up" not in shp or "down" not in shp:
        have, miss = ("up", "down") if "up" in shp else ("down", "up")
        if have not in shp:
            raise _fail(name, "lora_mid without lora_up and lora_down")
        raise _fail(
            name,
            f"only one LoRA factor present (lora_{have} without lora_{miss})",
            "the file is truncated or was written by a tool that dropped part of the module",
        )
    up, down = shp["up"], shp["down"]
    _ndim(name, "lora_up", up, at_least=2)
    _ndim(name, "lora_down", down, at_least=2)
    if not _ones(up[2:]):
        raise _fail(name, f"lora_up must be [out, rank] or [out, rank, 1, 1], got {list(up)}")
    if "mid" in shp:
        mid = shp["mid"]
        _ndim(name, "lora_mid", mid, at_least=3)
        if not _ones(down[2:]):
            raise _fail(name, f"with lora_mid, lora_down must be 1x1, got {list(down)}")
        if up[1] != mid[0] or mid[1] != down[0]:
            raise _fail(
                name, f"rank mismatch: lora_up {list(up)}, lora_mid {list(mid)}, lora_down {list(down)}"
            )
        kernel: tuple[int, ...] | None = tuple(mid[2:])
        algo: Algo = "locon-tucker"
    else:
        if up[1] != down[0]:
            raise _fail(
                name,
                f"rank mismatch: lora_up has rank {up[1]} ({list(up)}), "
                f"lora_down has rank {down[0]} ({list(down)})",
            )
        kernel = tuple(down[2:]) if len(down) > 2 else (tuple(1 for _ in up[2:]) if len(up) > 2 else None)
        algo = "lora"
    out, inp = up[0], down[1]
    delta_shape = (out, inp, *kernel) if kernel is not None else (out, inp)
    return _Info(algo, down[0], out, inp, kernel, delta_shape, tucker=algo == "locon-tucker")


def _loha(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    _need(name, shp, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in shp) != ("hada_t2" in shp):
        raise _fail(name, "LoHa Tucker needs both hada_t1 and hada_t2, only one is present")
    w1a, w1b, w2a, w2b = (shp[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    for role, s in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
        _ndim(name, role, s, (2,))
    if "hada_t1" in shp:
        t1, t2 = shp["hada_t1"], shp["hada_t2"]
        _ndim(name, "hada_t1", t1, at_least=3)
        _ndim(name, "hada_t2", t2, at_least=3)
        # Tucker layout (LyCORIS): t [r, r, *k], w_a [r, out], w_b [r, in]
        for i, (t, wa, wb) in enumerate(((t1, w1a, w1b), (t2, w2a, w2b)), start=1):
            if t[0] != wa[0] or t[1] != wb[0]:
                raise _fail(
                    name,
                    f"rank mismatch in Tucker factor {i}: hada_t{i} {list(t)}, "
                    f"hada_w{i}_a {list(wa)}, hada_w{i}_b {list(wb)}",
                )
        if (w1a[1], w1b[1], t1[2:]) != (w2a[1], w2b[1], t2[2:]):
            raise _fail(name, "the two LoHa Tucker products have different shapes")
        kernel: tuple[int, ...] | None = tuple(t1[2:])
        out, inp = w1a[1], w1b[1]
        delta_shape: tuple[int, ...] = (out, inp, *t1[2:])
    else:
        if w1a[1] != w1b[0]:
            raise _fail(name, f"rank mismatch: hada_w1_a {list(w1a)} vs hada_w1_b {list(w1b)}")
        if w2a[1] != w2b[0]:
            raise _fail(name, f"rank mismatch: hada_w2_a {list(w2a)} vs hada_w2_b {list(w2b)}")
        if (w1a[0], w1b[1]) != (w2a[0], w2b[1]):
            raise _fail(
                name, f"the two LoHa products differ in shape: [{w1a[0]}, {w1b[1]}] vs [{w2a[0]}, {w2b[1]}]"
            )
        kernel = None
        out, inp = w1a[0], w1b[1]
        delta_shape = (out, inp)
    return _Info("loha", w1b[0], out, inp, kernel, delta_shape, tucker="hada_t1" in shp)


def _lokr(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    rank: int | None = None
    # ---- w1: [a, c], full or a product
    if "lokr_w1" in shp:
        if "lokr_w1_a" in shp or "lokr_w1_b" in shp:
            raise _fail(name, "both lokr_w1 and lokr_w1_a/lokr_w1_b are present")
        w1 = shp["lokr_w1"]
        _ndim(name, "lokr_w1", w1, (2,))
    else:
        _need(name, shp, "lokr_w1_a", "lokr_w1_b")
        w1a, w1b = shp["lokr_w1_a"], shp["lokr_w1_b"]
        _ndim(name, "lokr_w1_a", w1a, (2,))
        _ndim(name, "lokr_w1_b", w1b, (2,))
        if w1a[1] != w1b[0]:
            raise _fail(name, f"rank mismatch: lokr_w1_a {list(w1a)} vs lokr_w1_b {list(w1b)}")
        w1 = (w1a[0], w1b[1])
        rank = w1b[0]
    # ---- w2: [b, d, *k] full, [b, r] @ [r, d(*k*k)], or Tucker t2 [r, r, *k] with w2_a [r, b], w2_b [r, d]
    kernel: tuple[int, ...] | None = None
    if "lokr_w2" in shp:
        if "lokr_w2_a" in shp or "lokr_w2_b" in shp or "lokr_t2" in shp:
            raise _fail(name, "both lokr_w2 and lokr_w2_a/lokr_w2_b/lokr_t2 are present")
        w2 = shp["lokr_w2"]
        _ndim(name, "lokr_w2", w2, at_least=2)
        if len(w2) > 2:
            kernel = tuple(w2[2:])
    else:
        _need(name, shp, "lokr_w2_a", "lokr_w2_b")
        w2a, w2b = shp["lokr_w2_a"], shp["lokr_w2_b"]
        _ndim(name, "lokr_w2_a", w2a, (2,))
        _ndim(name, "lokr_w2_b", w2b, (2,))
        if "lokr_t2" in shp:
            t2 = shp["lokr_t2"]
            _ndim(name, "lokr_t2", t2, at_least=3)
            if t2[0] != w2a[0] or t2[1] != w2b[0]:
                raise _fail(
                    name, f"rank mismatch: lokr_t2 {list(t2)}, lokr_w2_a {list(w2a)}, lokr_w2_b {list(w2b)}"
                )
            kernel = tuple(t2[2:])
            w2 = (w2a[1], w2b[1], *kernel)
        else:
            if w2a[1] != w2b[0]:
                raise _fail(name, f"rank mismatch: lokr_w2_a {list(w2a)} vs lokr_w2_b {list(w2b)}")
            w2 = (w2a[0], w2b[1])
        rank = w2b[0]
    out, inp = w1[0] * w2[0], w1[1] * w2[1]
    delta_shape = (out, inp, *kernel) if kernel is not None else (out, inp)
    return _Info("lokr", rank, out, inp, kernel, delta_shape, tucker="lokr_t2" in shp)


def _full(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    _need(name, shp, "diff")
    d = shp["diff"]
    _ndim(name, "diff", d, at_least=1)
    return _Info("full", None, d[0], d[1] if len(d) > 1 else None, tuple(d[2:]) if len(d) > 2 else None, d)


def _norm(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    _need(name, shp, "w_norm")
    w = shp["w_norm"]
    _ndim(name, "w_norm", w, at_least=1)
    if "b_norm" in shp and _prod(shp["b_norm"]) != w[0]:
        raise _fail(name, f"b_norm {list(shp['b_norm'])} does not match w_norm {list(w)}")
    return _Info("norm", None, w[0], None, None, w)


def _oft(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    _need(name, shp, "oft_blocks")
    b = shp["oft_blocks"]
    algo: Algo
    if len(b) == 3:
        stages, (num, size, size2) = 1, b
        algo = "oft"
    elif len(b) == 4:
        stages, num, size, size2 = b
        algo = "boft"
    else:
        raise _fail(name, f"oft_blocks must be 3-d (OFT) or 4-d (BOFT), got shape {list(b)}")
    if size != size2:
        raise _fail(name, f"oft_blocks must hold square blocks, got shape {list(b)}")
    out = num * size
    # butterfly stage i pairs rows 2^i * size/2 apart inside groups of 2^(i+1) * size/2 rows
    if algo == "boft" and (size % 2 or out % (2**stages * (size // 2))):
        raise _fail(
            name,
            f"BOFT blocks {list(b)} do not form a butterfly over {out} rows",
            "the block size must be even and the row count divisible by 2^stages * size/2",
        )
    if "rescale" in shp and _prod(shp["rescale"]) != out:
        raise _fail(name, f"rescale {list(shp['rescale'])} does not match {out} output rows")
    return _Info(algo, None, out, None, None, None, oft_geometry=(stages, num, size))


def _glora(name: str, shp: Mapping[str, tuple[int, ...]]) -> _Info:
    _need(name, shp, "a1", "a2", "b1", "b2")
    for role in ("a1", "a2", "b1", "b2"):
        _ndim(name, role, shp[role], at_least=2)

    def flat(s: tuple[int, ...]) -> tuple[int, int]:
        return s[0], _prod(s[1:])

    a1, a2, b1, b2 = (flat(shp[k]) for k in ("a1", "a2", "b1", "b2"))
    for role in ("a1", "a2", "b1"):
        if not _ones(shp[role][2:]):
            raise _fail(name, f"GLoRA {role} must be a 1x1 factor, got {list(shp[role])}")
    # current LyCORIS: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(*k)]; delta = W a1 a2 + b1 b2
    new = a1[1] == a2[0] == b1[1] == b2[0] and a1[0] == a2[1]
    # early LyCORIS named them the other way round: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
    old = a1[0] == a2[1] == b1[0] == b2[1] and a1[1] == a2[0]
    kernel: tuple[int, ...] | None = None
    if new:
        layout, rank, out = "lycoris", a1[1], b1[0]
        inp = a2[1]
        if "bm" in shp:
            bm = shp["bm"]
            _ndim(name, "bm", bm, at_least=3)
            if not _ones(shp["b2"][2:]) or bm[0] != rank or bm[1] != b2[0]:
                raise _fail(
                    name,
                    f"GLoRA Tucker core bm {list(bm)} does not fit b1 {list(shp['b1'])}, "
                    f"b2 {list(shp['b2'])}",
                )
            kernel = tuple(bm[2:])
        elif len(shp["b2"]) > 2:
            kernel = tuple(shp["b2"][2:])
            if b2[1] != inp * _prod(kernel):
                raise _fail(name, f"GLoRA b2 {list(shp['b2'])} does not match a2 {list(shp['a2'])}")
        elif b2[1] != inp:
            raise _fail(name, f"GLoRA b2 {list(shp['b2'])} does not match a2 {list(shp['a2'])}")
    elif old:
        if "bm" in shp:
            raise _fail(name, "GLoRA Tucker core (bm) with the early-LyCORIS factor layout is not supported")
        layout, rank, out, inp = "lycoris-old", a1[0], b2[0], a1[1]
        if b1[1] != inp:
            raise _fail(name, f"GLoRA b1 {list(shp['b1'])} does not match a1 {list(shp['a1'])}")
    else:
        raise _fail(
            name,
            "GLoRA factor shapes fit no known layout: "
            + ", ".join(f"{k} {list(shp[k])}" for k in ("a1", "a2", "b1", "b2")),
        )
    delta_shape = (out, inp, *kernel) if kernel is not None else (out, inp)
    return _Info("glora", rank, out, inp, kernel, delta_shape, tucker="bm" in shp, glora_layout=layout)


def _peft_dora_axis(name: str, shape: tuple[int, ...], n_out: int | None) -> int:
    """PEFT's ``lora_magnitude_vector``: one entry per output row (``[out]`` or ``[1, out, 1, ...]``)."""
    count = 1
    for d in shape:
        count *= d
    if n_out is None or (count == n_out and sum(d != 1 for d in shape) <= 1):
        return 0
    raise _fail(name, f"PEFT DoRA magnitude of shape {list(shape)} does not have the weight's {n_out} rows")


def _dora_axis(name: str, shape: tuple[int, ...], n_out: int | None, n_in: int | None) -> int:
    """Tell per-output-row (0) from per-input-column (1) magnitudes by shape.

    ``[out]`` (PEFT ``lora_magnitude_vector``) and ``[out, 1, ...]`` (LyCORIS ``wd_on_out``) are rows;
    ``[1, in, ...]`` (early LyCORIS, ComfyUI's reading) are columns. Rows win a tie (``out == in == 1``).
    """
    if len(shape) == 1:
        if n_out is None or shape[0] == n_out:
            return 0
        if n_in is not None and shape[0] == n_in:
            return 1
    elif len(shape) >= 2:
        if (n_out is None or shape[0] == n_out) and _ones(shape[1:]):
            return 0
        # flattened-conv formats report in*kh*kw columns, the magnitude has one entry per input channel
        col_ok = n_in is None or shape[1] == n_in or n_in % max(shape[1], 1) == 0
        if shape[0] == 1 and _ones(shape[2:]) and col_ok:
            return 1
    raise _fail(
        name,
        f"DoRA magnitude of shape {list(shape)} fits neither the {n_out} output rows "
        f"nor the {n_in} input columns of the weight",
    )


def module_summary(
    name: str, suffix_shapes: Mapping[str, tuple[Sequence[int], str] | HeaderEntry]
) -> ModuleSummary:
    """Summarise one module from its header entries: ``{suffix: (shape, dtype)}``.

    ``dtype`` is the safetensors dtype string (``"F16"``); objects with ``.shape`` and ``.dtype`` (such as
    :class:`lorasmith.archs.base.TensorSpec`) are accepted in place of the tuples. Never imports torch.

    :raises AdapterError: as :func:`analyze`.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for suffix, entry in suffix_shapes.items():
        if isinstance(entry, tuple):
            shape, dtype = entry
        else:
            shape, dtype = entry.shape, entry.dtype
        shapes[normalize_suffix(suffix)] = tuple(int(d) for d in shape)
        dtypes[normalize_suffix(suffix)] = str(dtype)
    summary = analyze(name, shapes)
    total: int | None = 0
    for suffix, shape in shapes.items():
        size = dtype_size(dtypes[suffix])
        if size is None or total is None:
            total = None
            continue
        total += size * _prod(shape)
    return replace(summary, dtypes=dtypes, tensor_bytes=total)
