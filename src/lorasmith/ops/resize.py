"""``resize``: lower the rank of LoRAs, exactly, from their factors.

One public function, :func:`resize`, returning a :class:`ResizeResult`. The method, per output module
(a :class:`~lorasmith.ops.loralib.Unit`: one input module, or several merged / fused / split ones):

1. **Decompose** the module's effective delta ``dW`` (alpha / rank, merge weights, Tucker core all applied)
   into singular triplets ``dW = sum_i s_i u_i v_i^T``.

   - Low-rank modules (LoRA, LoCon, LoCon Tucker, DoRA's low-rank part, weighted merges of those) use the
     factors ``dW = up_c @ down_c`` (``R`` columns) and never form the ``out x in`` product. With the Gram
     matrices ``G_u = up_c^T up_c`` and ``G_d = down_c down_c^T`` and any ``R x R`` factors with
     ``R_u^T R_u = G_u`` and ``R_d^T R_d = G_d``, ``up_c = Q_u R_u`` and ``down_c^T = Q_d R_d`` for some
     orthonormal ``Q_u``, ``Q_d``, so the small core ``C = R_u R_d^T = U_c S V_c^T`` has the singular values
     ``S`` of ``dW``; and the singular vectors follow without ``Q``: ``u_i = up_c (R_d^T V_c)_i / s_i`` and
     ``v_i = down_c^T (R_u^T U_c)_i / s_i`` (because ``down_c Q_d = R_d^T`` and ``up_c^T Q_u = R_u^T``).
     This is the Gram route of :func:`lorasmith.linalg.gram_factorized_svd` (maths in
     :mod:`lorasmith.linalg.gram`): ``R_d`` from a Cholesky factorisation and the eigenpairs of
     ``C^T C = R_d G_u R_d^T``, so ``R_u`` is never needed. Cost: two ``R x R`` Gram products,
     ``O((out + in) R^2)``, one Cholesky and one ``R x R`` eigensolver, then one ``out x R x k`` product per
     kept factor. On CPUs this is several times faster than Householder QR of the factors
     (``factorized_svd(method="qr")``), which costs the same order but runs at a fraction of GEMM speed.
   - LoHa, LoKr and full-diff modules are materialised and decomposed exactly
     (:func:`lorasmith.linalg.exact_svd`) and written out as LoRA.

2. **Choose** which triplets to keep: a fixed rank, a kohya dynamic rule (exact minimal rank, or
   sd-scripts' count with ``kohya_compat``), or a base-aware score recipe (threshold or byte budget).
3. **Write** ``up' = U_k sqrt(S_k / g)`` and ``down' = sqrt(S_k / g) V_k^T`` with ``alpha' = g * k``, where
   ``g`` is the module's own ``alpha / rank`` (see :class:`~lorasmith.ops.loralib.UnitExtras`): a loader's
   ``alpha' / k * up' @ down'`` is exactly the kept part of ``dW`` and the module keeps its strength.
   PEFT spellings bake ``g`` into the factors. A module whose every triplet is kept is copied unchanged.

Precision: everything runs in the compute dtype, float32 by default. A Gram matrix squares the factors'
condition number, so in float32 singular values below about ``3e-4 * s_0`` of a module carry a relative
error that grows as they shrink (they are the ones truncation discards; the kept part and the discarded
norm are accurate). ``float64`` pushes that limit to about ``1e-8 * s_0`` (the tests use it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lorasmith.errors import (
    ArchMismatchError,
    DetectionError,
    InvalidFileError,
    LorasmithError,
    ShapeMismatchError,
)
from lorasmith.io.header import Header, read_header
from lorasmith.ops._device import compute_device
from lorasmith.ops._parallel import compute_threads, ordered
from lorasmith.ops.loralib import (
    InputSpec,
    LoraFile,
    SuffixStyle,
    Unit,
    UnitExtras,
    encode_unit,
    expand_inputs,
    expected_file_bytes,
    format_number,
    load_lora,
    lora_tensor_specs,
    output_metadata,
    read_unit_extras,
    suffix_style_of,
    unit_dense,
    unit_lowrank_parts,
)
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import torch

    from lorasmith.io.reader import TensorFile
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.linalg.gram import GramEig

    #: ``(up [out, R], down [R, in*kh*kw], column scale [R])`` with ``delta = (up * scale) @ down``.
    _Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = [
    "BASE_METHODS",
    "SCORE_METHODS",
    "DynamicMethod",
    "ModuleRecord",
    "OutputRecord",
    "OutputSummary",
    "Precision",
    "Recipe",
    "ResizeResult",
    "parse_recipes",
    "resize",
]

DynamicMethod = Literal["sv_ratio", "sv_fro", "sv_cumulative"]
Precision = Literal["float32", "float64"]

#: Recipe scoring methods (weights of the geometric mean), FORMATS.md section 3.
SCORE_METHODS: tuple[str, ...] = ("spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "params")
#: The methods that need ``--base``.
BASE_METHODS = frozenset({"spn_ckpt", "fro_ckpt", "subspace"})
_RECIPE_KEYS = (*SCORE_METHODS, "thr", "size", "rescale")

#: Metadata key recording what resize did.
RECORD_KEY = "lorasmith_resize"

#: Units decomposed per batch on a GPU (same-shape problems are stacked); 1 on the CPU.
GPU_BATCH = 64


# ------------------------------------------------------------------------------------------------ recipes
class Recipe(BaseModel):
    """One base-aware score recipe (elias-gaeros semantics, FORMATS.md section 3).

    ``score_i = log10(s_i) + log10(rescale) - sum_m w_m log10(ref_m)``, with the weights normalised to sum 1
    and the references ``spn_ckpt`` (spectral norm of the base layer), ``fro_ckpt`` (its Frobenius norm),
    ``spn_lora`` (``s_0``), ``fro_lora`` (``||s||_2``), ``subspace`` (``|u_i^T W_base v_i|``, one per
    triplet) and ``params`` (bytes one rank costs: ``(out + in*kh*kw) * bytes per element``).

    :ivar text: the recipe as given.
    :ivar weights: method -> normalised weight (non-zero ones only).
    :ivar threshold: ``thr=X``: keep the triplets with ``score >= X``.
    :ivar size_mib: ``size=M``: keep the highest scores over all modules while the output file (tensors,
        alphas, header and metadata) stays within ``M`` MiB.
    :ivar rescale: multiply the output delta by this (and shift the scores by ``log10(rescale)``).
    """

    model_config = ConfigDict(frozen=True)

    text: str
    weights: dict[str, float]
    threshold: float | None = None
    size_mib: float | None = None
    rescale: float = 1.0

    @property
    def needs_base(self) -> list[str]:
        """The methods of this recipe that need the base checkpoint."""
        return [m for m in self.weights if m in BASE_METHODS]

    @property
    def slug(self) -> str:
        """The recipe's part of output names: ``frockpt1``, ``spnlora0.5_subspace0.5_size32``..."""
        parts = [f"{k.replace('_', '')}{format_number(round(w, 4))}" for k, w in sorted(self.weights.items())]
        if self.rescale != 1.0:
            parts.append(f"scale{format_number(self.rescale)}")
        if self.size_mib is not None:
            parts.append(f"size{format_number(self.size_mib)}")
        return "_".join(parts)


def _recipe_error(text: str, problem: str) -> LorasmithError:
    return LorasmithError(
        f"recipe {text!r}: {problem}",
        hint="write e.g. 'fro_ckpt=1,thr=-3.5' or 'spn_lora=1,size=32'; keys: " + ", ".join(_RECIPE_KEYS),
    )


def parse_recipes(text: str) -> list[Recipe]:
    """Parse ``--recipe`` text: ``:``-separated recipes of ``,``-separated ``key=value`` pairs.

    A method key without a value has weight 1 (``spn_lora,thr=-1``). Weights are normalised to sum 1
    (their sum must not be 0). Exactly one of ``thr`` and ``size`` is required; ``rescale`` defaults to 1.

    :raises LorasmithError: an unknown key, a value that is not a number, a missing or doubled selector,
        a non-positive size or rescale, or weights summing to 0.
    """
    out: list[Recipe] = []
    for chunk in text.split(":"):
        chunk = chunk.strip()
        if not chunk:
            raise _recipe_error(text, "empty recipe")
        weights: dict[str, float] = {}
        values: dict[str, float] = {}
        for part in chunk.split(","):
            key, sep, raw = part.strip().partition("=")
            key = key.strip()
            if key not in _RECIPE_KEYS:
                raise _recipe_error(chunk, f"unknown key {key!r}")
            if key in weights or key in values:
                raise _recipe_error(chunk, f"key {key!r} given twice")
            if not sep or not raw.strip():
                if key in SCORE_METHODS:
                    weights[key] = 1.0
                    continue
                raise _recipe_error(chunk, f"{key} needs a value ({key}=...)")
            try:
                value = float(raw)
            except ValueError:
                raise _recipe_error(chunk, f"{key}={raw.strip()!r} is not a number") from None
            if not math.isfinite(value):
                raise _recipe_error(chunk, f"{key}={raw.strip()} is not a finite number")
            if key in SCORE_METHODS:
                weights[key] = value
            else:
                values[key] = value
        total = sum(weights.values())
        if not weights or total == 0.0:
            raise _recipe_error(chunk, "name at least one scoring method with a non-zero total weight")
        if ("thr" in values) == ("size" in values):
            raise _recipe_error(chunk, "give exactly one of thr= (score threshold) and size= (MiB)")
        if "size" in values and values["size"] <= 0:
            raise _recipe_error(chunk, "size must be positive (MiB)")
        rescale = values.get("rescale", 1.0)
        if rescale <= 0:
            raise _recipe_error(chunk, "rescale must be positive")
        out.append(
            Recipe(
                text=chunk,
                weights={k: v / total for k, v in weights.items() if v != 0.0},
                threshold=values.get("thr"),
                size_mib=values.get("size"),
                rescale=rescale,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ results
ModuleStatus = Literal["resized", "unchanged", "dropped", "copied"]


class ModuleRecord(BaseModel):
    """What happened to one output module.

    :ivar status: ``resized`` (re-factored at ``new_rank``), ``unchanged`` (every triplet kept; the input
        tensors are copied as they are), ``dropped`` (a recipe kept no triplet; the module is left out),
        ``copied`` (an algorithm resize does not decompose: norm, OFT, BOFT, GLoRA).
    :ivar rel_error_lora: ``||discarded singular values|| / ||all singular values||``, i.e.
        ``||dW - dW'||_F / ||dW||_F``.
    :ivar rel_error_base: ``||discarded|| / ||W_base||_F`` of the base layer (slice), with ``--base``.
    """

    name: str
    algo: str
    kind: Literal["linear", "conv"]
    target: str | None = None
    status: ModuleStatus
    old_rank: int | None
    new_rank: int
    available_rank: int
    old_alpha: float | None = None
    new_alpha: float | None = None
    sv_max: float = 0.0
    rel_error_lora: float = 0.0
    rel_error_base: float | None = None


class OutputSummary(BaseModel):
    """Totals of one output file."""

    modules: int
    resized: int
    unchanged: int
    dropped: int
    copied: int
    rank_min: int
    rank_max: int
    rank_mean: float
    rel_error_lora: float = Field(description="||all discarded|| / ||all singular values|| over every module")
    rel_error_base_max: float | None = None
    input_bytes: int
    output_bytes: int


class OutputRecord(BaseModel):
    """One written file and its modules."""

    input: str
    path: str
    policy: str = Field(description="what chose the ranks: 'rank 32', 'sv_fro 0.9 (cap 64)', a recipe")
    recipe: str | None = None
    threshold: float | None = Field(default=None, description="score threshold (given, or found by size=)")
    target_bytes: int | None = None
    file_bytes: int
    network_dim: str | None = None
    network_alpha: str | None = None
    sshs_model_hash: str | None = None
    sshs_legacy_hash: str | None = None
    modules: list[ModuleRecord]
    summary: OutputSummary


class BaseNormsInfo(BaseModel):
    """The base checkpoint used for scoring and errors."""

    path: str
    arch: str | None
    identity: str
    cache_file: str | None
    cache_hits: int
    computed: int


class ResizeResult(BaseModel):
    """Everything :func:`resize` did."""

    outputs: list[OutputRecord]
    device: str
    precision: str
    decompositions: int = Field(description="modules decomposed (each once, whatever the number of outputs)")
    seconds: float
    base: list[BaseNormsInfo] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class _Policy:
    """One way of choosing ranks (one output per input)."""

    name: str
    slug: str
    rank: int | None = None
    conv_rank: int | None = None
    dynamic: DynamicMethod | None = None
    param: float | None = None
    kohya_compat: bool = False
    recipe: Recipe | None = None

    def cap(self, unit: Unit) -> int | None:
        if unit.is_conv and self.conv_rank is not None:
            return self.conv_rank
        return self.rank

    @property
    def is_global(self) -> bool:
        return self.recipe is not None and self.recipe.size_mib is not None

    @property
    def rescale(self) -> float:
        return self.recipe.rescale if self.recipe is not None else 1.0


def _check_options(
    rank: int | None,
    conv_rank: int | None,
    dynamic: str | None,
    param: float | None,
    recipes: list[Recipe],
    kohya_compat: bool,
) -> None:
    from lorasmith.linalg import LinalgError, rank_sv_cumulative, rank_sv_fro, rank_sv_ratio

    for opt, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise LorasmithError(f"{opt} must be at least 1, got {value}", hint="a LoRA needs rank 1 or more")
    if dynamic is not None:
        if dynamic not in ("sv_ratio", "sv_fro", "sv_cumulative"):
            raise LorasmithError(
                f"unknown dynamic method {dynamic!r}", hint="use sv_ratio, sv_fro or sv_cumulative"
            )
        if param is None:
            raise LorasmithError(
                f"--dynamic {dynamic} needs --param", hint="e.g. --dynamic sv_fro --param 0.9"
            )
        check = {"sv_ratio": rank_sv_ratio, "sv_fro": rank_sv_fro, "sv_cumulative": rank_sv_cumulative}[
            dynamic
        ]
        try:
            check([1.0], param)
        except LinalgError as exc:
            raise LorasmithError(
                f"--param: {exc}",
                hint="sv_ratio takes a ratio >= 1; sv_fro and sv_cumulative a fraction in [0, 1]",
            ) from None
    elif param is not None:
        raise LorasmithError(
            "--param is given without --dynamic", hint="add --dynamic sv_ratio|sv_fro|sv_cumulative"
        )
    if recipes and dynamic is not None:
        raise LorasmithError(
            "--recipe and --dynamic cannot be combined", hint="choose one way of picking ranks"
        )
    if kohya_compat and dynamic is None:
        raise LorasmithError("--kohya-compat only changes --dynamic rank counts", hint="add --dynamic ...")
    if not recipes and dynamic is None and rank is None and conv_rank is None:
        raise LorasmithError(
            "nothing to do: give --rank, --conv-rank, --dynamic or --recipe",
            hint="e.g. lorasmith resize in.safetensors -o out.safetensors --rank 32",
        )


def _policies(
    rank: int | None,
    conv_rank: int | None,
    dynamic: DynamicMethod | None,
    param: float | None,
    kohya_compat: bool,
    recipes: list[Recipe],
) -> list[_Policy]:
    caps = ""
    if rank is not None:
        caps += f"_r{rank}"
    if conv_rank is not None:
        caps += f"_c{conv_rank}"
    cap_text = []
    if rank is not None:
        cap_text.append(f"rank <= {rank}")
    if conv_rank is not None:
        cap_text.append(f"conv rank <= {conv_rank}")
    suffix = f" ({', '.join(cap_text)})" if cap_text else ""
    if recipes:
        return [
            _Policy(
                name=f"recipe {r.text}{suffix}", slug=r.slug + caps, rank=rank, conv_rank=conv_rank, recipe=r
            )
            for r in recipes
        ]
    if dynamic is not None:
        assert param is not None
        slug = f"{dynamic.replace('_', '')}{format_number(param)}{caps}" + ("_kohya" if kohya_compat else "")
        name = f"{dynamic} {format_number(param)}{suffix}" + (" (kohya-compat)" if kohya_compat else "")
        return [
            _Policy(
                name=name,
                slug=slug,
                rank=rank,
                conv_rank=conv_rank,
                dynamic=dynamic,
                param=param,
                kohya_compat=kohya_compat,
            )
        ]
    text = ", ".join(
        ([f"rank {rank}"] if rank is not None else []) + ([f"conv rank {conv_rank}"] if conv_rank else [])
    )
    return [_Policy(name=text, slug=caps.lstrip("_"), rank=rank, conv_rank=conv_rank)]


# ---------------------------------------------------------------------------------------- decompositions
@dataclass(eq=False)
class _Decomp:
    """The decomposition of one unit, kept between the selection and the writing.

    ``S`` (float64, CPU) holds the ``available`` singular values, descending. Low-rank units keep
    ``left = R_d^T V_c`` and ``right = R_u^T U_c`` (``[R, cols]``); dense units keep ``U [out, cols]`` and
    ``Vh [cols, in]``. Only the first ``cols`` columns are kept (all that any output can use). Until the
    selection, a low-rank unit holds its :class:`~lorasmith.linalg.gram.GramEig` instead (``eig``): the
    coefficients are then computed for those ``cols`` columns only.
    """

    S: torch.Tensor
    scale: float
    extras: UnitExtras
    eig: GramEig | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    subspace: torch.Tensor | None = None
    alpha_in: float | None = None
    out_tensors: dict[str, torch.Tensor] | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    selections: dict[int, list[int]] = field(default_factory=dict)

    @property
    def available(self) -> int:
        return int(self.S.shape[0])


def _gram_batch(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> list[GramEig]:
    """The Gram-route factorized SVD of same-shape ``(up * scale) @ down``, batched, up to the eigensolver.

    :func:`lorasmith.linalg.gram.gram_factorized_eig` (the maths, its cost and its float32 accuracy limit
    are in :mod:`lorasmith.linalg.gram`): per problem the singular values ``S [L]`` (``L = min(out, in,
    R)``) and, on demand (:meth:`~lorasmith.linalg.gram.GramEig.coefficients`), the coefficients
    ``left = R_d^T V_c`` and ``right = R_u^T U_c`` of the first triplets, in ``dtype`` on the factors'
    device: ``u_i = up_c left_i / s_i`` and ``v_i = down_c^T right_i / s_i``.

    :raises NonFiniteFactorsError: NaN or inf in the factors (they show up in the Gram matrices); the caller
        names the modules and files.
    """
    from lorasmith.linalg import gram_resolution
    from lorasmith.linalg.gram import gram_factorized_eig

    # Triplets below the route's resolution (s_0 * sqrt(eps)) are rounding noise: zero them, or their
    # vectors, scaled by 1/s, blow up (a LoRA merged with itself has half its triplets at that level).
    rcond = gram_resolution(dtype)
    return gram_factorized_eig(ups, downs, scales, dtype, rcond=rcond)


def _select_local(policy: _Policy, unit: Unit, d: _Decomp, scores: torch.Tensor | None) -> list[int]:
    """Kept triplet indices (ascending) of one unit under a per-module policy."""
    from lorasmith.linalg import rank_fixed, rank_sv_cumulative, rank_sv_fro, rank_sv_ratio

    cap = policy.cap(unit)
    n = d.available
    if policy.recipe is not None:
        assert scores is not None and policy.recipe.threshold is not None
        thr = policy.recipe.threshold
        keep = [i for i in range(n) if float(scores[i]) >= thr]
        if cap is not None and len(keep) > cap:
            keep = sorted(sorted(keep, key=lambda i: (-float(scores[i]), i))[:cap])
        return keep
    if policy.dynamic is not None:
        assert policy.param is not None
        fn = {"sv_ratio": rank_sv_ratio, "sv_fro": rank_sv_fro, "sv_cumulative": rank_sv_cumulative}[
            policy.dynamic
        ]
        # sd-scripts decomposes the unscaled up @ down; its MIN_SV test needs those values
        values = d.S / abs(d.scale) if policy.kohya_compat else d.S
        k = fn(values, policy.param, max_rank=cap, kohya_compat=policy.kohya_compat)
        return list(range(k))
    k = n if cap is None else rank_fixed(d.S, cap)
    return list(range(k))


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def _scores(
    recipe: Recipe, unit: Unit, d: _Decomp, base_norms: tuple[float, float] | None, elem: int
) -> torch.Tensor:
    """Per-triplet scores of a recipe (float64, CPU); triplets with ``s_i = 0`` score ``-inf``."""
    import torch

    s = d.S
    logs = torch.where(s > 0, torch.log10(s.clamp_min(1e-300)), torch.full_like(s, -math.inf))
    shift = math.log10(recipe.rescale)
    w = recipe.weights
    ref = 0.0
    for method, weight in w.items():
        if method == "spn_lora":
            ref += weight * _log10(float(s[0]))
        elif method == "fro_lora":
            ref += weight * _log10(float(torch.linalg.vector_norm(s)))
        elif method == "params":
            ref += weight * _log10(float((unit.out_features + unit.in_flat) * elem))
        elif method in ("spn_ckpt", "fro_ckpt"):
            assert base_norms is not None
            ref += weight * _log10(base_norms[0] if method == "spn_ckpt" else base_norms[1])
    if math.isinf(ref):
        # a zero reference (an all-zero module or base weight): every triplet of the module scores -inf
        # or +inf; keep the zero-module case at -inf, which is what its zero singular values say anyway
        ref = math.copysign(1e300, ref)
    score = logs + shift - ref
    if "subspace" in w:
        assert d.subspace is not None
        sub = d.subspace.abs().clamp_min(1e-300).log10()
        score = score - w["subspace"] * sub
    return torch.where(s > 0, score, torch.full_like(s, -math.inf))


# ----------------------------------------------------------------------------------------------- bases
@dataclass
class _Base:
    path: Path
    header: Header
    arch: str | None
    variant: str | None


def _open_base(path: Path, lora: LoraFile) -> _Base:
    from lorasmith.registry import get_registry

    header = read_header(path)
    if lora.arch is None:
        raise DetectionError(
            f"{lora.path}: the LoRA's family is unknown, so its modules cannot be matched to base weights",
            hint="pass --arch to name the family",
        )
    try:
        det = get_registry().detect(header, source=str(path))
    except DetectionError as exc:
        raise DetectionError(exc.message, hint="give the base checkpoint of the LoRA's family") from None
    if det.kind == "lora":
        raise InvalidFileError(
            f"{path}: this is a LoRA, not a base checkpoint", hint="--base takes a checkpoint"
        )
    if det.arch != lora.arch.id:
        other = get_registry().get(det.arch).name
        raise ArchMismatchError(
            f"base {path.name} is a {other} checkpoint but {lora.path.name} is a {lora.arch.name} LoRA",
            hint="give the base model the LoRA was trained for",
        )
    if lora.variant is not None and det.variant is not None and det.variant != lora.variant:
        raise ArchMismatchError(
            f"base {path.name} is {lora.arch.name} {det.variant} but the LoRA is for {lora.variant}",
            hint="give the base model the LoRA was trained for",
        )
    return _Base(path=path, header=header, arch=det.arch, variant=det.variant)


def _base_key(base: _Base, unit: Unit) -> str:
    """The tensor key of the unit's target weight in the base file (prefix variants tried)."""
    from lorasmith.archs.base import STRIP_PREFIXES

    key = unit.base_key
    if key is None:
        raise LorasmithError(
            f"module {unit.name!r} is not a known module name, so it has no base weight",
            hint="pass --arch if the family was detected wrongly, or leave out the base-aware recipe",
        )
    tensors = base.header.tensors
    if key in tensors:
        return key
    stripped = next((key[len(p) :] for p in STRIP_PREFIXES if key.startswith(p)), key)
    for cand in (stripped, *(p + stripped for p in STRIP_PREFIXES)):
        if cand in tensors:
            return cand
    raise LorasmithError(
        f"base {base.path.name} has no weight {key!r} (needed for module {unit.name!r})",
        hint="give the single-file checkpoint of the model the LoRA was trained for",
    )


def _check_base_shape(base: _Base, key: str, unit: Unit) -> None:
    info = base.header.tensors[key]
    shape = list(info.shape)
    rows = unit.base_slice[2] if unit.base_slice is not None else (shape[0] if shape else 0)
    numel = info.numel // max(shape[0], 1) if shape else 0
    if rows != unit.out_features or numel != unit.in_flat:
        raise ShapeMismatchError(
            f"base weight {key!r} {shape} does not fit module {unit.name!r} "
            f"({unit.out_features} x {unit.in_flat})",
            hint="the base checkpoint is not the model this LoRA was made for",
        )


# ------------------------------------------------------------------------------------------------- run
@dataclass
class _Job:
    spec: InputSpec
    files: list[LoraFile]
    units: list[Unit]
    style: SuffixStyle
    decomps: dict[str, _Decomp]
    base_norms: dict[str, tuple[float, float]]
    by_name: dict[str, Unit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {u.name: u for u in self.units}


def resize(
    inputs: Sequence[str | Path],
    *,
    output: str | Path | None = None,
    output_dir: str | Path | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: DynamicMethod | None = None,
    param: float | None = None,
    kohya_compat: bool = False,
    base: str | Path | None = None,
    recipe: str | None = None,
    to: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    precision: Precision = "float32",
    norms_cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback = noop,
) -> ResizeResult:
    """Resize LoRA files (see the module docstring and ``docs/resize.md``).

    :param inputs: files, globs and weighted merge specs (``a.safetensors:0.7,b.safetensors:0.3``).
    :param output: the output file (one input, one recipe at most).
    :param output_dir: the output folder; names are ``<input>_<policy>.safetensors`` (``docs/resize.md``).
    :param rank: the rank of linear modules, or with ``dynamic`` / ``recipe`` a cap.
    :param conv_rank: the same for convolutions with a kernel larger than 1x1 (default: ``rank``).
    :param dynamic: ``sv_ratio``, ``sv_fro`` or ``sv_cumulative`` with ``param``.
    :param kohya_compat: count dynamic ranks as sd-scripts does (one more than needed, at least 2).
    :param base: the base checkpoint: needed by recipes using ``spn_ckpt``, ``fro_ckpt`` or ``subspace``;
        otherwise it adds the error against the base layer to the records.
    :param recipe: ``:``-separated score recipes (:func:`parse_recipes`); each writes one output.
    :param to: write module names and suffixes in this spelling of the family (``peft`` bakes alpha).
    :param arch: force the family.
    :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    :param overwrite: replace existing outputs.
    :param precision: ``float32`` (default) or ``float64`` (see the module docstring).
    :param norms_cache: use the on-disk base-norm cache (:mod:`lorasmith.ops.norms`).
    :param cache_dir: the cache folder (default :func:`lorasmith.ops.norms.default_cache_dir`).
    :param progress: progress callback (stages ``decompose``, ``norms``, ``write``).
    :raises LorasmithError: every user error (bad options, files, families, shapes), with a hint.
    """
    import torch

    from lorasmith.io.writer import check_output_path
    from lorasmith.ops._convert_lora import resolve_target_spelling
    from lorasmith.ops._merge_lora import plan_files, views

    started = time.perf_counter()
    recipes = parse_recipes(recipe) if recipe is not None else []
    _check_options(rank, conv_rank, dynamic, param, recipes, kohya_compat)
    if (output is None) == (output_dir is None):
        raise LorasmithError(
            "give exactly one of -o/--output and --output-dir",
            hint="-o names one output file; --output-dir writes one file per input and recipe",
        )
    base_path = Path(base) if base is not None else None
    needing = sorted({m for r in recipes for m in r.needs_base})
    if needing and base_path is None:
        raise LorasmithError(
            f"the recipe uses {', '.join(needing)}, which needs the base checkpoint",
            hint="pass --base CKPT (the model the LoRA was trained for)",
        )
    specs = expand_inputs([str(i) for i in inputs])
    for spec in specs:
        for path, _weight in spec.parts:
            _check_weight_suffix(path)
    policies = _policies(rank, conv_rank, dynamic, param, kohya_compat, recipes)
    all_inputs = [p for s in specs for p in s.paths] + ([base_path] if base_path else [])
    if output is not None:
        if len(specs) > 1:
            raise LorasmithError(
                f"-o names one output but {len(specs)} inputs were given",
                hint="use --output-dir to resize several LoRAs",
            )
        if len(policies) > 1:
            raise LorasmithError(
                f"-o names one output but the recipe gives {len(policies)}",
                hint="use --output-dir to write one file per recipe",
            )
        check_output_path(output, overwrite=overwrite, inputs=all_inputs)
    else:
        assert output_dir is not None
        out_folder = Path(output_dir)
        if out_folder.exists() and not out_folder.is_dir():
            raise InvalidFileError(
                f"{out_folder}: --output-dir is not a directory", hint="give a folder (or -o for one file)"
            )
        if not out_folder.is_dir():
            raise InvalidFileError(f"{out_folder}: output folder does not exist", hint="create it first")
    dev = compute_device(device)
    cdtype = torch.float64 if precision == "float64" else torch.float32

    result = ResizeResult(outputs=[], device=str(dev), precision=precision, decompositions=0, seconds=0.0)
    planned: set[Path] = set()
    for spec in specs:
        with ExitStack() as stack, torch.no_grad():
            files = [stack.enter_context(load_lora(p, arch=arch)) for p in spec.paths]
            for f in files:  # load_lora already refused broken modules (rank 0 included)
                result.warnings.extend(f.warnings)
            weights = [w for _, w in spec.parts]
            # the words convert takes (comfy: the family's default spelling, diffusers: peft, keep)
            spec_to = to
            if to is not None and files[0].arch is not None:
                spec_to = resolve_target_spelling(files[0].arch, to, files[0].spelling)
            # one module per weight rows (a spelling's alternate names are not counted twice); a later
            # input's module the first spelling cannot name keeps its name (views of its file are closed here)
            units = plan_files(list(zip(files, weights, strict=True)), spec_to)
            for view in views(units, files):
                stack.callback(view.close)
            style = suffix_style_of(spec_to or files[0].spelling, files[0].modules.values())
            paths: list[Path | None] = []
            for pol in policies:
                if output is not None:
                    paths.append(Path(output))
                elif pol.is_global:
                    paths.append(None)  # named once size= has found its threshold
                else:
                    assert output_dir is not None
                    thr = pol.recipe.threshold if pol.recipe is not None else None
                    named = Path(output_dir) / _output_name(spec.label, pol, thr, spec_to)
                    _claim(named, planned)
                    check_output_path(named, overwrite=overwrite, inputs=all_inputs)
                    paths.append(named)
            if len(files) > 1 and any(f.extra_keys for f in files[1:]):
                result.warnings.append(
                    f"{spec.text}: tensors outside adapter modules are kept from {files[0].path.name} only"
                )
            base_info: _Base | None = None
            if base_path is not None:
                base_info = _open_base(base_path, files[0])
            job = _Job(spec=spec, files=files, units=units, style=style, decomps={}, base_norms={})
            _decompose_all(job, policies, base_info, dev, cdtype, progress, result, norms_cache, cache_dir)
            folder = Path(output_dir) if output_dir is not None else None
            for i, (policy, out_path) in enumerate(zip(policies, paths, strict=True)):
                record = _write_output(
                    job,
                    i,
                    policy,
                    out_path,
                    folder,
                    dev,
                    cdtype,
                    overwrite,
                    all_inputs,
                    planned,
                    base_info,
                    spec_to,
                    progress,
                )
                result.outputs.append(record)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _check_weight_suffix(path: Path) -> None:
    """``a.safetensors:abc`` is read as a path (a colon may be part of a name); when it does not exist but
    the part before the last colon does, the user wrote a merge weight that is not a number.

    :raises LorasmithError: naming the item and the weight.
    """
    text = str(path)
    head, sep, tail = text.rpartition(":")
    if sep and head and not path.exists() and Path(head).exists():
        raise LorasmithError(
            f"{text}: merge weight {tail!r} is not a number",
            hint="write FILE:WEIGHT with a number (a.safetensors:0.7)",
        )


def _claim(path: Path, planned: set[Path]) -> None:
    key = path.resolve()
    if key in planned:
        raise LorasmithError(
            f"two outputs of this run would be written to {path}",
            hint="give different inputs or recipes, or resize them in separate runs",
        )
    planned.add(key)


def _decompose_all(
    job: _Job,
    policies: list[_Policy],
    base: _Base | None,
    dev: torch.device,
    cdtype: torch.dtype,
    progress: ProgressCallback,
    result: ResizeResult,
    norms_cache: bool,
    cache_dir: str | Path | None,
) -> None:
    """Pass 1: decompose every unit once, score it, and choose its triplets for the per-module policies."""
    from lorasmith.ops.norms import compute_norms

    units = [u for u in job.units if not u.passthrough]
    need_subspace = any(p.recipe is not None and "subspace" in p.recipe.weights for p in policies)
    need_base_norms = base is not None
    base_keys: dict[str, str] = {}
    if base is not None:
        strict = any(p.recipe is not None and p.recipe.needs_base for p in policies)
        for u in units:
            try:
                key = _base_key(base, u)
                _check_base_shape(base, key, u)
            except LorasmithError:
                if strict:
                    raise
                continue
            base_keys[u.name] = key
        if need_base_norms and base_keys:
            report = compute_norms(
                base.path,
                [(base_keys[u.name], u.base_slice) for u in units if u.name in base_keys],
                device=str(dev),
                progress=progress,
                cache_dir=cache_dir,
                use_cache=norms_cache,
            )
            for u in units:
                if u.name in base_keys:
                    n = report.norms[(base_keys[u.name], u.base_slice)]
                    job.base_norms[u.name] = (n.spectral, n.frobenius)
            result.base.append(
                BaseNormsInfo(
                    path=str(base.path),
                    arch=base.arch,
                    identity=report.identity,
                    cache_file=str(report.cache_file) if report.cache_file else None,
                    cache_hits=report.hits,
                    computed=report.computed,
                )
            )
    base_file = None
    if base is not None and need_subspace:
        from lorasmith.io.reader import open_tensors

        base_file = open_tensors(base.path)
    subspace_keys = base_keys if base_file is not None else {}

    # One per-module policy (fixed rank, dynamic, a thr= recipe): each module's output tensors are made
    # right after its decomposition, while its factors are in memory, instead of re-reading them later.
    single_pass = len(policies) == 1 and not policies[0].is_global

    def finish(u: Unit, d: _Decomp, factors: _Factors | None) -> None:
        _select_all(job, policies, u, d, cdtype)
        if single_pass:
            plan = _make_plan(job, policies[0], {u.name: d.selections[0]})
            d.out_tensors = _unit_tensors(job, u, plan, policies[0].rescale, dev, cdtype, d, factors)
            d.left = d.right = d.U = d.Vh = None

    def work(chunk: list[Unit]) -> list[tuple[Unit, _Decomp]]:
        return _decompose_chunk(chunk, dev, cdtype, base_file, subspace_keys, finish)

    batch = _batch_size(dev)
    chunks = [units[i : i + batch] for i in range(0, len(units), batch)]
    done = 0
    try:
        with compute_threads(dev) as workers:
            for solved in ordered(work, chunks, workers):
                for u, d in solved:
                    job.decomps[u.name] = d
                    done += 1
                    progress(ProgressEvent("decompose", done, len(units), u.name))
                result.decompositions += len(solved)
    finally:
        if base_file is not None:
            base_file.close()


def _decompose_chunk(
    chunk: list[Unit],
    dev: torch.device,
    cdtype: torch.dtype,
    base_file: TensorFile | None,
    base_keys: dict[str, str],
    finish: Callable[[Unit, _Decomp, _Factors | None], None],
) -> list[tuple[Unit, _Decomp]]:
    """Read and decompose a few units (one on a CPU; up to :data:`GPU_BATCH` on a GPU, stacked by shape).

    ``finish(unit, decomposition, factors or None)`` runs on each while its factors are alive.
    """
    import torch

    from lorasmith.linalg import NonFiniteFactorsError, exact_svd

    out: dict[str, _Decomp] = {}
    groups: dict[tuple[int, ...], list[tuple[Unit, _Factors, UnitExtras]]] = {}
    alphas: dict[str, float | None] = {}
    for u in chunk:
        reads = [c.file.read_module(c.module) for c in u.contributions]
        extras = read_unit_extras(u, reads)
        alphas[u.name] = reads[0].module.alpha if u.single is not None else None
        if u.lowrank:
            up, down, scale = unit_lowrank_parts(u, reads, cdtype, dev)
            groups.setdefault((*up.shape, *down.shape), []).append((u, (up, down, scale), extras))
        else:
            dense = unit_dense(u, reads, cdtype, dev)
            _check_finite(u, dense)
            svd = exact_svd(dense)
            d = _Decomp(
                S=svd.S.to("cpu", torch.float64), scale=extras.scale, extras=extras, U=svd.U, Vh=svd.Vh
            )
            if base_file is not None and u.name in base_keys:
                d.subspace = _subspace_dense(base_file, base_keys[u.name], u, d)
            d.alpha_in = alphas[u.name]
            finish(u, d, None)
            out[u.name] = d
    for items in groups.values():
        try:
            solved = _gram_batch(
                [t[1][0] for t in items], [t[1][1] for t in items], [t[1][2] for t in items], cdtype
            )
        except NonFiniteFactorsError:
            # name the units whose own factors hold NaN/Inf (a GPU batch stacks several); if none does,
            # the Gram products overflowed, and every unit of the batch is a suspect
            bad = [t[0] for t in items if not all(bool(torch.isfinite(x).all()) for x in t[1])]
            bad = (bad or [t[0] for t in items])[:3]
            names = ", ".join(repr(u.name) for u in bad)
            raise LorasmithError(
                f"{_unit_files(bad)}: module {names} has NaN or infinite values",
                hint="the LoRA is corrupt or was saved from a diverged training run",
            ) from None
        for (u, factors, extras), eig in zip(items, solved, strict=True):
            d = _Decomp(S=eig.S.to("cpu", torch.float64), scale=extras.scale, extras=extras, eig=eig)
            if base_file is not None and u.name in base_keys:
                # the subspace score needs every triplet's vectors: all coefficients, now
                d.left, d.right = eig.coefficients()
                d.eig = None
                d.subspace = _subspace_lowrank(
                    base_file, base_keys[u.name], u, factors, d.left, d.right, eig.S
                )
            d.alpha_in = alphas[u.name]
            finish(u, d, factors)
            out[u.name] = d
    return [(u, out[u.name]) for u in chunk]


def _batch_size(dev: torch.device) -> int:
    """Units per decomposition task: :data:`GPU_BATCH` on a GPU (stacked, batched kernels), 1 on a CPU."""
    return GPU_BATCH if dev.type == "cuda" else 1


T = TypeVar("T")
R = TypeVar("R")


def _unit_files(units: Sequence[Unit]) -> str:
    """The input files the ``units`` read from, for a message (``a.safetensors, b.safetensors``)."""
    paths = dict.fromkeys(str(c.file.path) for u in units for c in u.contributions)
    return ", ".join(paths)


def _check_finite(unit: Unit, *tensors: torch.Tensor) -> None:
    import torch

    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise LorasmithError(
                f"{_unit_files([unit])}: module {unit.name!r} has NaN or infinite values",
                hint="the LoRA is corrupt or was saved from a diverged training run",
            )


def _base_matrix(base_file: TensorFile, key: str, unit: Unit, like: torch.Tensor) -> torch.Tensor:
    w = base_file.get(key)
    if unit.base_slice is not None:
        w = w.narrow(*unit.base_slice)
    return w.reshape(unit.out_features, -1).to(device=like.device, dtype=like.dtype)


def _subspace_lowrank(
    base_file: TensorFile,
    key: str,
    unit: Unit,
    factors: _Factors,
    left: torch.Tensor,
    right: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """``|u_i^T W_base v_i|`` for every triplet of a low-rank unit (float64, CPU)."""
    import torch

    up, down, scale = factors
    inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s)).to(up.dtype)
    u = up @ (left.to(up.dtype) * scale.unsqueeze(-1) * inv)
    v = down.mT @ (right.to(up.dtype) * inv)
    w = _base_matrix(base_file, key, unit, up)
    return ((w @ v) * u).sum(dim=0).to("cpu", torch.float64)


def _subspace_dense(base_file: TensorFile, key: str, unit: Unit, d: _Decomp) -> torch.Tensor:
    import torch

    assert d.U is not None and d.Vh is not None
    w = _base_matrix(base_file, key, unit, d.U)
    return ((w @ d.Vh.mT) * d.U).sum(dim=0).to("cpu", torch.float64)


def _elem_size(unit: Unit) -> int:
    from lorasmith.io.header import DTYPE_SIZES

    return DTYPE_SIZES.get(unit.dtype, 2)


def _select_all(job: _Job, policies: list[_Policy], unit: Unit, d: _Decomp, cdtype: torch.dtype) -> None:
    """Scores and per-module selections of one unit; trims what the decomposition keeps."""
    cols = 0
    for i, policy in enumerate(policies):
        scores = None
        if policy.recipe is not None:
            scores = _scores(policy.recipe, unit, d, job.base_norms.get(unit.name), _elem_size(unit))
            d.scores[i] = scores
        if policy.is_global:
            cols = d.available
            continue
        keep = _select_local(policy, unit, d, scores)
        d.selections[i] = keep
        if keep:
            cols = max(cols, keep[-1] + 1)
    # Keep only the columns some output can use, in the compute dtype: memory stays near the outputs' size.
    if d.eig is not None:
        d.left, d.right = d.eig.coefficients(cols)
        d.eig = None
    elif d.left is not None and d.right is not None:
        d.left, d.right = d.left[:, :cols].to(cdtype).clone(), d.right[:, :cols].to(cdtype).clone()
    if d.U is not None and d.Vh is not None:
        d.U, d.Vh = d.U[:, :cols].clone(), d.Vh[:cols].clone()


# --------------------------------------------------------------------------------------------- writing
@dataclass
class _Plan:
    """What one output contains: per unit the kept triplet indices, and the units copied unchanged."""

    keep: dict[str, list[int]]
    unchanged: set[str]


def _is_unchanged(unit: Unit, keep: list[int], policy: _Policy, style: SuffixStyle) -> bool:
    """Every triplet of a plain single LoRA module is kept: copy its tensors instead of re-factoring."""
    single = unit.single
    if single is None or policy.rescale != 1.0:
        return False
    s = single.info.summary
    if s.algo not in ("lora", "locon-tucker") or s.rank is None:
        return False
    if len(keep) != s.rank or keep != list(range(len(keep))):
        return False
    return s.spelling in ("kohya", "peft") and (s.spelling == "peft") == (style == "peft")


def _make_plan(job: _Job, policy: _Policy, keep: dict[str, list[int]]) -> _Plan:
    # only the units in ``keep`` can be unchanged (a unit without kept triplets is not): looking at those
    # alone keeps a per-unit plan O(1) instead of O(units)
    unchanged = set()
    for name, kept in keep.items():
        u = job.by_name.get(name)
        if u is not None and not u.passthrough and _is_unchanged(u, kept, policy, job.style):
            unchanged.add(name)
    return _Plan(keep=keep, unchanged=unchanged)


def _unit_specs(job: _Job, unit: Unit, plan: _Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    if unit.passthrough or unit.name in plan.unchanged:
        c = unit.contributions[0]
        infos = c.file.header.tensors
        return {
            unit.name + sfx: (infos[key].dtype, tuple(infos[key].shape)) for sfx, key in c.info.keys.items()
        }
    keep = plan.keep.get(unit.name, [])
    if not keep:
        return {}
    return lora_tensor_specs(unit, len(keep), job.style, unit.dtype, job.decomps[unit.name].extras)


def _plan_specs(job: _Job, plan: _Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for unit in job.units:
        specs.update(_unit_specs(job, unit, plan))
    first = job.files[0]
    for key in first.extra_keys:
        info = first.header.tensors[key]
        specs.setdefault(key, (info.dtype, tuple(info.shape)))
    return specs


def _rank_alpha(job: _Job, unit: Unit, plan: _Plan) -> tuple[int, float]:
    """Rank and alpha of a written unit (alpha = rank for PEFT files, which carry none)."""
    d = job.decomps[unit.name]
    if unit.name in plan.unchanged:
        rank = int(unit.contributions[0].info.summary.rank or 0)
        alpha = d.alpha_in if d.alpha_in is not None else float(rank)
    else:
        rank = len(plan.keep.get(unit.name, []))
        alpha = d.scale * rank
    return rank, float(rank) if job.style == "peft" else alpha


def _metadata(
    job: _Job, policy: _Policy, plan: _Plan, threshold: float | None, base: _Base | None, to: str | None
) -> dict[str, str]:
    from lorasmith import __version__

    linear: list[tuple[int, float]] = []
    conv: list[tuple[int, float]] = []
    for unit in job.units:
        if unit.passthrough or not (plan.keep.get(unit.name) or unit.name in plan.unchanged):
            continue
        (conv if unit.is_conv else linear).append(_rank_alpha(job, unit, plan))
    record: dict[str, object] = {
        "version": __version__,
        "inputs": [
            {"file": p.name, "weight": w, "sshs_model_hash": f.header.metadata.get("sshs_model_hash")}
            for (p, w), f in zip(job.spec.parts, job.files, strict=True)
        ],
        "policy": policy.name,
    }
    if policy.rank is not None:
        record["rank"] = policy.rank
    if policy.conv_rank is not None:
        record["conv_rank"] = policy.conv_rank
    if policy.dynamic is not None:
        record.update(dynamic=policy.dynamic, param=policy.param, kohya_compat=policy.kohya_compat)
    if policy.recipe is not None:
        record.update(recipe=policy.recipe.text, threshold=threshold)
    if to is not None:
        record["spelling"] = to
    if base is not None:
        record["base"] = base.path.name
    meta = output_metadata(
        job.files[0].metadata, linear=linear, conv=conv, record_key=RECORD_KEY, record=record
    )
    if not any(u.passthrough for u in job.units):  # LoHa / LoKr / full diffs are written as LoRA
        from lorasmith.ops._merge_lora import plain_lora_metadata

        meta = plain_lora_metadata(meta)
    return meta


def _file_bytes(
    job: _Job, policy: _Policy, plan: _Plan, threshold: float | None, base: _Base | None, to: str | None
) -> int:
    specs = _plan_specs(job, plan)
    meta = _metadata(job, policy, plan, threshold, base, to)
    return expected_file_bytes(((n, dt, sh) for n, (dt, sh) in specs.items()), meta)


def _budget_plan(
    job: _Job, index: int, policy: _Policy, base: _Base | None, to: str | None
) -> tuple[_Plan, float, int]:
    """``size=``: the highest-scoring triplets over all modules whose output file fits the budget.

    Every eligible triplet (score above ``-inf``; with a rank cap, a module's ``cap`` best) is ranked by
    score, descending (ties: module order, then position). The output keeps the longest prefix of that
    ranking whose exact file size (tensors, alphas, DoRA/bias extras, header, metadata with the hash
    values the writer adds) is within the budget: a global score cut, the same a ``thr=`` recipe makes,
    set as low as the budget allows. The prefix is found by bisection on the exact size.

    :returns: the plan, the score threshold it amounts to (the lowest kept score), the budget in bytes.
    """
    recipe = policy.recipe
    assert recipe is not None and recipe.size_mib is not None
    budget = math.floor(recipe.size_mib * 1024 * 1024)  # never above the target, not even by a fraction
    decomposed = [u for u in job.units if not u.passthrough]
    order: list[tuple[float, int, int]] = []
    for ui, unit in enumerate(decomposed):
        d = job.decomps[unit.name]
        scores = d.scores[index]
        ranked = sorted(range(d.available), key=lambda i: (-float(scores[i]), i))
        cap = policy.cap(unit)
        for i in ranked if cap is None else ranked[:cap]:
            if float(scores[i]) > -math.inf:
                order.append((-float(scores[i]), ui, i))
    order.sort()

    def plan_of(n: int) -> _Plan:
        keep: dict[str, list[int]] = {u.name: [] for u in decomposed}
        for _neg, ui, i in order[:n]:
            keep[decomposed[ui].name].append(i)
        return _make_plan(job, policy, {k: sorted(v) for k, v in keep.items()})

    def size(n: int) -> int:
        return _file_bytes(job, policy, plan_of(n), -order[n - 1][0] if n else None, base, to)

    lo, hi = 0, len(order)  # invariant: size(lo) <= budget, or lo == 0
    if size(hi) <= budget:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        smallest = size(1) if order else size(0)
        raise LorasmithError(
            f"recipe {recipe.text!r}: {format_number(recipe.size_mib)} MiB is below the smallest possible "
            f"output ({smallest} bytes, {smallest / 1048576:.4f} MiB)",
            hint="raise size=",
        )
    return plan_of(lo), -order[lo - 1][0], budget


def _output_name(label: str, policy: _Policy, threshold: float | None, to: str | None) -> str:
    """``<input>_<policy>[_th<threshold>][_<spelling>].safetensors`` (see ``docs/resize.md``)."""
    name = f"{label}_{policy.slug}" if policy.slug else label
    if policy.recipe is not None and threshold is not None:
        name += f"_th{format_number(round(threshold, 2))}"
    if to is not None:
        name += f"_{to}"
    return name + ".safetensors"


def _write_output(
    job: _Job,
    index: int,
    policy: _Policy,
    path: Path | None,
    folder: Path | None,
    dev: torch.device,
    cdtype: torch.dtype,
    overwrite: bool,
    inputs: list[Path],
    planned: set[Path],
    base: _Base | None,
    to: str | None,
    progress: ProgressCallback,
) -> OutputRecord:
    """Pass 2: write one output, module by module (factors are re-read; nothing else is held)."""
    from lorasmith.io.writer import SafetensorsWriter, check_output_path

    threshold: float | None = None
    target_bytes: int | None = None
    if policy.is_global:
        plan, threshold, target_bytes = _budget_plan(job, index, policy, base, to)
    else:
        chosen = {u.name: job.decomps[u.name].selections[index] for u in job.units if not u.passthrough}
        plan = _make_plan(job, policy, chosen)
        threshold = policy.recipe.threshold if policy.recipe is not None else None
    if path is None:
        assert folder is not None
        path = folder / _output_name(job.spec.label, policy, threshold, to)
        _claim(path, planned)
        check_output_path(path, overwrite=overwrite, inputs=inputs)
    if not any(plan.keep.get(u.name) or u.name in plan.unchanged or u.passthrough for u in job.units):
        raise LorasmithError(
            f"{policy.name}: no module keeps any singular value, so the output would be empty",
            hint="lower thr= (scores are log10 ratios, usually negative)",
        )
    specs = _plan_specs(job, plan)
    meta = _metadata(job, policy, plan, threshold, base, to)
    records: list[ModuleRecord] = []
    rescale = policy.rescale
    written_keys: set[str] = set()

    def work(unit: Unit) -> dict[str, torch.Tensor]:
        return _unit_tensors(job, unit, plan, rescale, dev, cdtype)

    # made in pass 1 (one per-module policy): nothing is left to compute, only to write
    ready = all(u.passthrough or job.decomps[u.name].out_tensors is not None for u in job.units)
    with (
        SafetensorsWriter(path, metadata=meta, overwrite=overwrite, inputs=inputs, plan=specs) as writer,
        compute_threads(dev) as workers,
    ):
        if ready:
            records = _write_in_layout_order(
                job, plan, rescale, specs, writer, f"write {path.name}", progress
            )
        else:
            for n, (unit, tensors) in enumerate(
                zip(job.units, ordered(work, job.units, workers), strict=True)
            ):
                for key, t in tensors.items():
                    writer.write(key, t)
                    written_keys.add(key)
                records.append(_module_record(job, unit, plan, rescale))
                progress(ProgressEvent(f"write {path.name}", n + 1, len(job.units), unit.name))
            first = job.files[0]
            for key in first.extra_keys:
                if key not in written_keys:
                    writer.write(key, first.tensor(key))
        written = writer.close()
    summary = _summary(job, records)
    summary.output_bytes = written.file_bytes
    return OutputRecord(
        input=job.spec.text,
        path=str(written.path),
        policy=policy.name,
        recipe=policy.recipe.text if policy.recipe is not None else None,
        threshold=threshold,
        target_bytes=target_bytes,
        file_bytes=written.file_bytes,
        network_dim=meta.get("ss_network_dim"),
        network_alpha=meta.get("ss_network_alpha"),
        sshs_model_hash=written.sshs_model_hash,
        sshs_legacy_hash=written.sshs_legacy_hash,
        modules=records,
        summary=summary,
    )


def _write_in_layout_order(
    job: _Job,
    plan: _Plan,
    rescale: float,
    specs: dict[str, tuple[str, tuple[int, ...]]],
    writer: SafetensorsWriter,
    stage: str,
    progress: ProgressCallback,
) -> list[ModuleRecord]:
    """Write an output whose tensors were all made in pass 1, in the file's data order; returns the records.

    Why not unit by unit: the data section is ordered by dtype, then name (:func:`lorasmith.io.layout.
    sort_key`), so the units' tensors land all over it, and the writer can hash the data as it is
    written only while the writes are in that order; otherwise it reads the whole file back at the end to
    hash it (measured on the 1052-module benchmark: the write phase 15-20% shorter). Tensors read
    from the input (copied modules, extra tensors) are read as their turn comes; the others are freed
    once written. A unit's progress event comes when its last tensor is written.
    """
    from lorasmith.io.layout import sort_key

    getters: dict[str, Callable[[], torch.Tensor]] = {}
    owner: dict[str, int] = {}
    pending = [0] * len(job.units)
    for i, unit in enumerate(job.units):
        if unit.passthrough:
            c = unit.contributions[0]
            made = {unit.name + sfx: _reader(c.file, key) for sfx, key in c.info.keys.items()}
        else:
            d = job.decomps[unit.name]
            tensors, d.out_tensors = d.out_tensors or {}, None
            made = {key: _holder(t) for key, t in tensors.items()}
        for key, get in made.items():
            getters[key] = get
            owner[key] = i
        pending[i] = len(made)
    first = job.files[0]
    for key in first.extra_keys:
        getters.setdefault(key, _reader(first, key))
    records = [_module_record(job, unit, plan, rescale) for unit in job.units]
    total = len(job.units)
    done = 0
    for i, unit in enumerate(job.units):
        if pending[i] == 0:  # dropped modules: nothing to write
            done += 1
            progress(ProgressEvent(stage, done, total, unit.name))
    for key in sorted(getters, key=lambda k: sort_key(k, specs[k][0])):
        writer.write(key, getters.pop(key)())
        i = owner.get(key, -1)
        if i >= 0:
            pending[i] -= 1
            if pending[i] == 0:
                done += 1
                progress(ProgressEvent(stage, done, total, job.units[i].name))
    return records


def _reader(f: LoraFile, key: str) -> Callable[[], torch.Tensor]:
    return lambda: f.tensor(key)


def _holder(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t


def _unit_tensors(
    job: _Job,
    unit: Unit,
    plan: _Plan,
    rescale: float,
    dev: torch.device,
    cdtype: torch.dtype,
    d: _Decomp | None = None,
    factors: _Factors | None = None,
) -> dict[str, torch.Tensor]:
    """The output tensors of one unit (computed in a worker thread).

    Made in pass 1 already when possible (``d.out_tensors``); ``factors`` are the unit's ``(up_c,
    down_c)`` when still in memory, else they are read again.
    """
    from lorasmith.io.dtypes import torch_dtype

    if d is None and not unit.passthrough:
        d = job.decomps[unit.name]
        if d.out_tensors is not None:
            made, d.out_tensors = d.out_tensors, None  # handed to the writer, then freed
            return made
    if unit.passthrough or unit.name in plan.unchanged:
        c = unit.contributions[0]
        return {unit.name + sfx: c.file.tensor(key) for sfx, key in c.info.keys.items()}
    keep = plan.keep.get(unit.name, [])
    if not keep:
        return {}
    assert d is not None
    up, down = _output_factors(unit, d, keep, rescale, dev, cdtype, factors)
    return encode_unit(unit, up, down, d.scale * len(keep), job.style, torch_dtype(unit.dtype), d.extras)


def _output_factors(
    unit: Unit,
    d: _Decomp,
    keep: list[int],
    rescale: float,
    dev: torch.device,
    cdtype: torch.dtype,
    factors: _Factors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up', down')`` with ``d.scale * up' @ down' = rescale * sum_kept s_i u_i v_i^T`` exactly."""
    import torch

    k = len(keep)
    # keep is ascending and unique, so it is the prefix range(k) exactly when its last index is k - 1:
    # then the kept columns are slices (views), otherwise gathers
    idx = None if keep[-1] == k - 1 else torch.tensor(keep, dtype=torch.long)
    s = d.S[:k] if idx is None else d.S[idx]
    g = d.scale
    sign = -1.0 if g < 0 else 1.0
    if d.left is not None and d.right is not None:
        # u_i = up_c left_i / s_i and v_i = down_c^T right_i / s_i, so
        # up' = up_c @ (left_i * c_i), down' = (right_i * c_i)^T @ down_c, c_i = sqrt(rescale / (|g| s_i))
        coef = torch.where(s > 0, (rescale / (abs(g) * s.clamp_min(1e-300))).sqrt(), torch.zeros_like(s))
        coef = coef.to(device=d.left.device, dtype=cdtype)
        if idx is None:
            left, right = d.left[:, :k], d.right[:, :k]
        else:
            ix = idx.to(d.left.device)
            left, right = d.left[:, ix], d.right[:, ix]
        if factors is None:
            reads = [c.file.read_module(c.module) for c in unit.contributions]
            factors = unit_lowrank_parts(unit, reads, cdtype, dev)
        up, down, scale = factors
        # (up * scale) @ pu == up @ (scale[:, None] * pu): the column scales go into the small matrix
        pu = left.to(cdtype) * scale.unsqueeze(-1) * (coef * sign)
        return up @ pu, (right.to(cdtype) * coef).mT @ down
    assert d.U is not None and d.Vh is not None
    root = (s * rescale / abs(g)).sqrt().to(device=d.U.device, dtype=d.U.dtype)
    if idx is None:
        return d.U[:, :k] * (root * sign), root[:, None] * d.Vh[:k]
    ix = idx.to(d.U.device)
    return d.U[:, ix] * (root * sign), root[:, None] * d.Vh[ix]


def _module_record(job: _Job, unit: Unit, plan: _Plan, rescale: float) -> ModuleRecord:
    import torch

    first = unit.contributions[0].info
    algo = unit.algos[0] if len(unit.contributions) == 1 else f"merge({','.join(unit.algos)})"
    kind: Literal["linear", "conv"] = "conv" if unit.is_conv else "linear"
    if unit.passthrough:
        return ModuleRecord(
            name=unit.name,
            algo=algo,
            kind=kind,
            target=unit.base_key,
            status="copied",
            old_rank=first.summary.rank,
            new_rank=first.summary.rank or 0,
            available_rank=first.summary.rank or 0,
        )
    d = job.decomps[unit.name]
    keep = plan.keep.get(unit.name, [])
    s = d.S
    sq = s * s
    total_sq = float(sq.sum())
    if not keep or keep[-1] == len(keep) - 1:
        # the kept triplets are a prefix (keep is ascending): the discarded ones are the rest
        disc_sq = float(sq[len(keep) :].sum())
    else:
        mask = torch.ones_like(s, dtype=torch.bool)
        mask[torch.tensor(keep, dtype=torch.long)] = False
        disc_sq = float(sq[mask].sum())
    norms = job.base_norms.get(unit.name)
    status: ModuleStatus
    if unit.name in plan.unchanged:
        status = "unchanged"
    elif keep:
        status = "resized"
    else:
        status = "dropped"
    rank, alpha = _rank_alpha(job, unit, plan) if status != "dropped" else (0, 0.0)
    return ModuleRecord(
        name=unit.name,
        algo=algo,
        kind=kind,
        target=unit.base_key,
        status=status,
        old_rank=unit.input_rank,
        new_rank=rank,
        available_rank=d.available,
        old_alpha=d.alpha_in,
        new_alpha=None if status == "dropped" or job.style == "peft" else alpha,
        sv_max=float(s[0]) * rescale,
        rel_error_lora=math.sqrt(disc_sq / total_sq) if total_sq > 0 else 0.0,
        rel_error_base=rescale * math.sqrt(disc_sq) / norms[1]
        if norms is not None and norms[1] > 0
        else None,
    )


def _summary(job: _Job, records: list[ModuleRecord]) -> OutputSummary:
    written = [r for r in records if r.status != "dropped"]
    ranks = [r.new_rank for r in written if r.status != "copied"] or [0]
    disc = 0.0
    total = 0.0
    for r in records:
        if r.status == "copied":
            continue
        d = job.decomps[r.name]
        t = float((d.S * d.S).sum())
        total += t
        disc += t * r.rel_error_lora**2
    base_errors = [r.rel_error_base for r in records if r.rel_error_base is not None]
    return OutputSummary(
        modules=len(written),
        resized=sum(r.status == "resized" for r in records),
        unchanged=sum(r.status == "unchanged" for r in records),
        dropped=sum(r.status == "dropped" for r in records),
        copied=sum(r.status == "copied" for r in records),
        rank_min=min(ranks),
        rank_max=max(ranks),
        rank_mean=round(sum(ranks) / len(ranks), 3),
        rel_error_lora=math.sqrt(disc / total) if total > 0 else 0.0,
        rel_error_base_max=max(base_errors) if base_errors else None,
        input_bytes=sum(f.header.file_size for f in job.files),
        output_bytes=0,
    )
