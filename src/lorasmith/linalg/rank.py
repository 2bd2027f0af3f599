"""Rank policies: how many singular triplets of a layer to keep.

Every policy takes the singular values ``S`` of one layer (a 1-D tensor or a sequence of floats,
non-negative and descending) and returns an ``int`` in ``[1, len(S)]``:

- The minimum is 1, never 0, also for an all-zero ``S``: a module is never silently dropped by a rank
  policy; it is kept at rank 1 and its error is reported, and dropping is an explicit decision of the
  caller.
- Asking for more than ``len(S)`` never fails: the result is capped at ``len(S)``, and at ``max_rank``
  when given.
- An empty ``S`` (a layer with a zero-size dimension) is a :class:`LinalgError`: no rank in ``[1, 0]``.

Threshold comparisons in the default (exact) mode carry a relative tolerance of :data:`RTOL` (1e-12):
a cut that lands exactly on a boundary (``t = 1.0``, a singular value equal to ``S0 / t``) must give
the mathematically exact answer, not one more or one fewer because of the last bit of a float sum.

``kohya_compat=True`` reproduces the counts of sd-scripts' ``networks/resize_lora.py`` (its
``index_sv_*`` functions and ``rank_resize``); see :func:`rank_sv_ratio` and :data:`KOHYA_MIN_SV`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple, TypeVar

import torch

from .errors import LinalgError

__all__ = [
    "KOHYA_MIN_SV",
    "RTOL",
    "BudgetItem",
    "SingularValues",
    "budget_bytes_used",
    "discarded_rel_error",
    "explained_variance",
    "rank_energy",
    "rank_fixed",
    "rank_sv_cumulative",
    "rank_sv_fro",
    "rank_sv_ratio",
    "rank_threshold",
    "select_by_budget",
]

#: A layer's singular values (or scores): a 1-D tensor, or a sequence of floats.
SingularValues = torch.Tensor | Sequence[float]

#: Relative tolerance of the exact-mode threshold comparisons (see the module docstring).
RTOL = 1e-12

#: sd-scripts' ``MIN_SV``: with ``kohya_compat``, a layer whose largest singular value is at most this
#: (an absolute value) is "a zero matrix" and gets rank 1. sd-scripts decomposes the unscaled
#: ``up @ down`` (``alpha / r`` only enters the new alpha), so pass those singular values to reproduce
#: this check exactly; the counts themselves do not depend on a common scale.
KOHYA_MIN_SV = 1e-6

K = TypeVar("K", bound=Hashable)

_KohyaMethod = Literal["sv_ratio", "sv_cumulative", "sv_fro"]


# --------------------------------------------------------------------------------------------- helpers


def _as_floats(values: SingularValues, name: str) -> list[float]:
    """Convert to a list of float64 numbers, checking 1-D, non-empty, no NaN, and descending order."""
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            raise LinalgError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        floats = [float(v) for v in values.detach().to(device="cpu", dtype=torch.float64).tolist()]
    else:
        floats = [float(v) for v in values]
    if not floats:
        raise LinalgError(f"{name} is empty: a layer with no singular values has no rank to choose")
    if any(math.isnan(v) for v in floats):
        raise LinalgError(f"{name} contains NaN")
    if any(later > earlier for earlier, later in itertools.pairwise(floats)):
        raise LinalgError(f"{name} must be sorted in descending order")
    return floats


def _singular_values(values: SingularValues) -> list[float]:
    floats = _as_floats(values, "S")
    if floats[-1] < 0.0 or math.isinf(floats[0]):
        raise LinalgError("singular values must be finite and non-negative")
    return floats


def _check_max_rank(max_rank: int | None) -> None:
    if max_rank is not None and max_rank < 1:
        raise LinalgError(f"max_rank must be at least 1, got {max_rank}")


def _clamp(k: int, length: int, max_rank: int | None) -> int:
    """Clamp a count to ``[1, min(length, max_rank)]``."""
    upper = length if max_rank is None else min(length, max_rank)
    return max(1, min(k, upper))


def _smallest_prefix(weights: list[float], fraction: float) -> int:
    """Smallest ``k >= 1`` with ``sum(weights[:k]) >= fraction * sum(weights)`` (len(weights) at most).

    An all-zero ``weights`` gives 1.
    """
    total = math.fsum(weights)
    if total == 0.0:
        return 1
    # The target is lowered by RTOL so that fraction = 1.0 (or a fraction hit exactly by a prefix)
    # is reached by the prefix that mathematically reaches it, whatever the rounding of the sums.
    target = fraction * total * (1.0 - RTOL)
    # Neumaier-compensated running sum: with thousands of terms a plain float sum drifts by ~L*eps,
    # which could exceed the tolerance; the compensated sum stays within a few eps of the exact prefix.
    running = 0.0
    compensation = 0.0
    for index, weight in enumerate(weights):
        updated = running + weight
        if abs(running) >= abs(weight):
            compensation += (running - updated) + weight
        else:
            compensation += (weight - updated) + running
        running = updated
        if running + compensation >= target:
            return index + 1
    return len(weights)


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise LinalgError(f"{name} must be between 0 and 1, got {value}")


def _kohya_rank(values: SingularValues, method: _KohyaMethod, target: float, max_rank: int | None) -> int:
    """sd-scripts' ``rank_resize`` count for a dynamic method, clamped to ``[1, len(S)]``.

    Reproduces ``networks/resize_lora.py`` as it stood before sd-scripts PR 2194 ("Fix the 'off by 1'
    problem", opened 2025-09; it later made the cumulative and fro counts exact, then the ratio count):
    the rule of the 2026-02 release that FORMATS.md describes. It computes in the dtype of ``values``
    (float64 for a sequence) with the same torch operations, so float32 inputs round the same way:

    - ``index_sv_cumulative``: ``searchsorted(cumsum(S) / sum(S), t) + 1``;
    - ``index_sv_fro``: ``searchsorted(cumsum(S^2) / sum(S^2), t^2) + 1``;
    - ``index_sv_ratio``: ``count(S > S0 / t)``;
    - each index clamped to ``[1, len(S) - 1]``; then ``new_rank = index + 1``; then rank 1 if
      ``S0 <= 1e-6`` (their ``MIN_SV``), else capped at the requested max rank.

    So sd-scripts keeps one value more than needed and never returns rank 1 for a layer with two or more
    values (unless its max is 1 or its ``S0 <= 1e-6``). Where lorasmith differs: with a single singular
    value sd-scripts computes rank 2 and crashes (``IndexError`` on ``S[1]``); here the result is capped
    at ``len(S)``.
    """
    _singular_values(values)  # validation only; the computation below mirrors sd-scripts on the tensor
    if isinstance(values, torch.Tensor):
        s = values.detach().to("cpu")
    else:
        s = torch.tensor([float(v) for v in values], dtype=torch.float64)
    length = int(s.shape[0])
    if float(s[0]) <= KOHYA_MIN_SV:
        return 1
    if method == "sv_cumulative":
        cumulative = torch.cumsum(s, dim=0) / float(torch.sum(s))
        index = int(torch.searchsorted(cumulative, target)) + 1
    elif method == "sv_fro":
        squared = s.pow(2)
        cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
        index = int(torch.searchsorted(cumulative, target**2)) + 1
    else:
        index = int(torch.sum(s > s[0] / target).item())
    index = max(1, min(index, length - 1))
    rank = index + 1
    if max_rank is not None and rank > max_rank:
        rank = max_rank
    return min(rank, length)


# -------------------------------------------------------------------------------------------- policies


def rank_fixed(S: SingularValues, rank: int) -> int:
    """A fixed rank, capped at ``len(S)``.

    :raises LinalgError: if ``rank < 1`` or ``S`` is empty.
    """
    length = len(_singular_values(S))
    if rank < 1:
        raise LinalgError(f"rank must be at least 1, got {rank}")
    return min(rank, length)


def rank_sv_ratio(
    S: SingularValues, t: float, *, max_rank: int | None = None, kohya_compat: bool = False
) -> int:
    """kohya ``sv_ratio``: keep the singular values greater than ``S0 / t``.

    Exact mode: the number of ``S_i > S0 / t`` (a value equal to ``S0 / t`` up to :data:`RTOL` is not
    greater), at least 1, capped. ``t = 1`` gives 1; ``t = inf`` keeps every non-zero value.

    :param t: the ratio, ``>= 1``.
    :param max_rank: cap (sd-scripts' ``--new_rank``).
    :param kohya_compat: reproduce sd-scripts' count, ``count(S > S0 / t) + 1`` clamped to
        ``[2, len(S)]`` (see :func:`_kohya_rank`).
    :raises LinalgError: if ``t < 1``, ``max_rank < 1`` or ``S`` is empty or invalid.
    """
    if not t >= 1.0:
        raise LinalgError(f"sv_ratio must be at least 1, got {t}")
    _check_max_rank(max_rank)
    if kohya_compat:
        return _kohya_rank(S, "sv_ratio", t, max_rank)
    values = _singular_values(S)
    if values[0] == 0.0:
        return 1
    threshold = (values[0] / t) * (1.0 + RTOL)
    kept = sum(1 for v in values if v > threshold)
    return _clamp(kept, len(values), max_rank)


def rank_sv_cumulative(
    S: SingularValues, t: float, *, max_rank: int | None = None, kohya_compat: bool = False
) -> int:
    """kohya ``sv_cumulative``: the smallest ``k`` with ``sum(S[:k]) / sum(S) >= t``.

    :param t: the fraction of the nuclear norm to keep, in ``[0, 1]``.
    :param kohya_compat: reproduce sd-scripts' count (one more, at least 2; see :func:`_kohya_rank`).
    :raises LinalgError: if ``t`` is outside ``[0, 1]``, ``max_rank < 1`` or ``S`` is empty or invalid.
    """
    _check_fraction(t, "sv_cumulative")
    _check_max_rank(max_rank)
    if kohya_compat:
        return _kohya_rank(S, "sv_cumulative", t, max_rank)
    values = _singular_values(S)
    return _clamp(_smallest_prefix(values, t), len(values), max_rank)


def rank_sv_fro(
    S: SingularValues, t: float, *, max_rank: int | None = None, kohya_compat: bool = False
) -> int:
    """kohya ``sv_fro``: the smallest ``k`` with ``sum(S[:k]^2) / sum(S^2) >= t^2``.

    That is, the rank-``k`` truncation keeps a fraction ``t`` of the Frobenius norm.

    :param t: the fraction of the Frobenius norm to keep, in ``[0, 1]``.
    :param kohya_compat: reproduce sd-scripts' count (one more, at least 2; see :func:`_kohya_rank`).
    :raises LinalgError: if ``t`` is outside ``[0, 1]``, ``max_rank < 1`` or ``S`` is empty or invalid.
    """
    _check_fraction(t, "sv_fro")
    _check_max_rank(max_rank)
    if kohya_compat:
        return _kohya_rank(S, "sv_fro", t, max_rank)
    values = _singular_values(S)
    return _clamp(_smallest_prefix([v * v for v in values], t * t), len(values), max_rank)


def rank_energy(S: SingularValues, energy: float, max_rank: int | None = None) -> int:
    """ckpt_to_lora auto rank: the smallest ``k`` with ``sum(S[:k]^2) / sum(S^2) >= energy``.

    That is, the smallest rank whose explained variance reaches ``energy``. Equal to
    ``rank_sv_fro(S, sqrt(energy))``: ``energy`` is the squared fraction (0.95 by default in
    ckpt_to_lora's ``--rank-thresh``).

    :raises LinalgError: if ``energy`` is outside ``[0, 1]``, ``max_rank < 1`` or ``S`` is empty or invalid.
    """
    _check_fraction(energy, "energy")
    _check_max_rank(max_rank)
    values = _singular_values(S)
    return _clamp(_smallest_prefix([v * v for v in values], energy), len(values), max_rank)


def rank_threshold(scores: SingularValues, thr: float, *, max_rank: int | None = None) -> int:
    """elias-gaeros ``thr=X``: the number of scores ``>= thr``, at least 1, capped.

    ``scores`` are a layer's per-triplet scores in descending order (log-scale, so negative values and
    ``-inf`` are fine). The comparison is exact: scores are compared as given, there is no boundary
    rounding to absorb. (elias-gaeros' script keeps ``score > thr``; the two differ only for a score
    exactly equal to the threshold.)

    :raises LinalgError: on empty, unsorted or NaN scores, or ``max_rank < 1``.
    """
    values = _as_floats(scores, "scores")
    _check_max_rank(max_rank)
    kept = sum(1 for v in values if v >= thr)
    return _clamp(kept, len(values), max_rank)


# ---------------------------------------------------------------------------------------- size budget


class BudgetItem(NamedTuple):
    """One layer competing for a byte budget in :func:`select_by_budget` (a plain 4-tuple works too).

    :ivar layer_id: any hashable name of the layer.
    :ivar scores: its per-triplet scores, descending (higher is more important).
    :ivar bytes_per_rank: bytes that one more rank costs in the output file (e.g. ``2 * (out + in*kh*kw)``
        for fp16 up and down).
    :ivar fixed_bytes: bytes the layer costs whatever its rank (alpha, biases, norms...).
    """

    layer_id: Hashable
    scores: SingularValues
    bytes_per_rank: int
    fixed_bytes: int


def _check_bytes(value: int, what: str, layer_id: Hashable) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LinalgError(f"{what} of layer {layer_id!r} must be a non-negative int, got {value!r}")
    return value


def select_by_budget(items: Sequence[tuple[K, SingularValues, int, int]], budget_bytes: int) -> dict[K, int]:
    """elias-gaeros ``size=``: keep the highest scores across all layers until the byte budget is met.

    Every layer keeps rank 1 (its first score) whatever its score: like every policy here, a module is
    never dropped silently. The remaining triplets of all layers are sorted by score, highest first
    (ties: layer order, then position), and taken greedily while the running total stays within
    ``budget_bytes``; the first one that does not fit ends the selection. The result is therefore a
    global score threshold, the same cut a ``thr=`` recipe would make, chosen as large as the budget
    allows; the total lands below the budget by less than one rank of one layer.

    Bytes are integers and are accounted exactly: the output costs
    ``sum(fixed_bytes + bytes_per_rank * rank)`` (see :func:`budget_bytes_used`), with no rounding.

    :param items: ``(layer_id, scores_desc, bytes_per_rank, fixed_bytes)`` per layer (see
        :class:`BudgetItem`); ``len(scores)`` is the layer's largest possible rank.
    :param budget_bytes: the target size of the tensors, in bytes.
    :returns: ``{layer_id: rank}`` for every layer, in input order.
    :raises LinalgError: on duplicate ids, invalid scores or byte counts, or a budget below the cost of
        rank 1 everywhere (the message gives that minimum).
    """
    layer_scores: list[list[float]] = []
    ids: list[K] = []
    seen: set[K] = set()
    costs: list[int] = []
    used = 0
    for layer_id, scores, bytes_per_rank, fixed_bytes in items:
        if layer_id in seen:
            raise LinalgError(f"layer {layer_id!r} appears twice in the budget selection")
        seen.add(layer_id)
        ids.append(layer_id)
        layer_scores.append(_as_floats(scores, f"scores of layer {layer_id!r}"))
        costs.append(_check_bytes(bytes_per_rank, "bytes_per_rank", layer_id))
        used += _check_bytes(fixed_bytes, "fixed_bytes", layer_id) + bytes_per_rank
    if used > budget_bytes:
        raise LinalgError(
            f"a budget of {budget_bytes} bytes is below the {used} bytes that rank 1 in each of the "
            f"{len(ids)} layers costs"
        )
    # Candidates beyond each layer's forced first triplet. Scores are descending within a layer and
    # ties are broken by position, so a layer's j-th triplet is always taken after its (j-1)-th: the
    # selected triplets of each layer form a prefix, i.e. a rank.
    candidates = sorted(
        (-score, layer, position)
        for layer, values in enumerate(layer_scores)
        for position, score in enumerate(values)
        if position > 0
    )
    ranks = [1] * len(ids)
    for _, layer, _position in candidates:
        cost = costs[layer]
        if used + cost > budget_bytes:
            break
        used += cost
        ranks[layer] += 1
    return dict(zip(ids, ranks, strict=True))


def budget_bytes_used(items: Sequence[tuple[K, SingularValues, int, int]], ranks: dict[K, int]) -> int:
    """Exact byte cost ``sum(fixed_bytes + bytes_per_rank * ranks[layer_id])`` of a rank selection.

    :raises LinalgError: if a layer of ``items`` has no rank in ``ranks``.
    """
    total = 0
    for layer_id, _scores, bytes_per_rank, fixed_bytes in items:
        if layer_id not in ranks:
            raise LinalgError(f"no rank given for layer {layer_id!r}")
        total += fixed_bytes + bytes_per_rank * ranks[layer_id]
    return total


# ------------------------------------------------------------------------------------------- measures


def explained_variance(S: SingularValues, k: int) -> float:
    """``sum(S[:k]^2) / sum(S^2)``: the fraction of the squared Frobenius norm a rank-``k`` truncation keeps.

    ``k`` above ``len(S)`` counts as ``len(S)``. An all-zero ``S`` gives 1.0 (nothing to lose).

    :raises LinalgError: if ``k < 0`` or ``S`` is empty or invalid.
    """
    values = _singular_values(S)
    if k < 0:
        raise LinalgError(f"k must be non-negative, got {k}")
    total = math.fsum(v * v for v in values)
    if total == 0.0:
        return 1.0
    return math.fsum(v * v for v in values[:k]) / total


def discarded_rel_error(S: SingularValues, k: int) -> float:
    """``sqrt(sum(S[k:]^2) / sum(S^2))``: the relative Frobenius error of the rank-``k`` truncation.

    Computed from the discarded tail directly (not as ``sqrt(1 - explained_variance)``, which would
    cancel catastrophically for small errors). An all-zero ``S`` gives 0.0.

    :raises LinalgError: if ``k < 0`` or ``S`` is empty or invalid.
    """
    values = _singular_values(S)
    if k < 0:
        raise LinalgError(f"k must be non-negative, got {k}")
    total = math.fsum(v * v for v in values)
    if total == 0.0:
        return 0.0
    return math.sqrt(math.fsum(v * v for v in values[k:]) / total)
