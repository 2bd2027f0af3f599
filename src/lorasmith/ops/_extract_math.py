"""The numerics of ``extract``: rank policies, the per-module decomposition, clamping, common and union,
and the threads the per-module work runs on (:func:`compute_threads`, :func:`pipelined`).

Internal to :mod:`lorasmith.ops.extract`; the maths is documented in ``docs/extract.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lorasmith.linalg import SVD, RandomizedSVD, exact_svd, lowrank_svd
from lorasmith.ops._parallel import compute_threads, pipelined  # re-exported: shared with resize

__all__ = [
    "Decomposition",
    "RankPolicy",
    "clamp_factors",
    "combine",
    "common_component",
    "compute_threads",
    "decompose",
    "fro_sq_of",
    "lycoris_rank",
    "pipelined",
    "stored_dense",
]

PolicyKind = Literal["fixed", "energy", "ratio", "threshold", "quantile"]


@dataclass(frozen=True)
class RankPolicy:
    """How the rank of one module is chosen.

    :ivar kind: ``fixed`` (``value`` is the rank), ``energy`` (explained variance ``value``, capped at
        ``max_rank``), or the LyCORIS modes ``ratio``, ``threshold``, ``quantile`` (``value`` their
        parameter, capped at ``max_rank`` when given).
    :ivar value: the rank or the mode's parameter.
    :ivar max_rank: a cap (``None``: none besides the matrix size).
    """

    kind: PolicyKind
    value: float
    max_rank: int | None = None


def lycoris_rank(s: torch.Tensor, kind: str, value: float) -> int:
    """LyCORIS' ``extract_linear`` / ``extract_conv`` rank count, at least 1.

    - ``threshold t``: the number of singular values strictly above ``t`` (an absolute value);
    - ``ratio t`` (``0 <= t <= 1``): the number strictly above ``t * S[0]``;
    - ``quantile t`` (``0 <= t <= 1``): the number of prefixes whose running sum of singular values is
      strictly below ``t * sum(S)`` (LyCORIS counts ``cumsum(S) < t * sum(S)``).
    """
    vals = s.detach().to("cpu", torch.float64)
    if kind == "threshold":
        k = int((vals > value).sum())
    elif kind == "ratio":
        k = int((vals > value * float(vals[0])).sum()) if vals.numel() else 0
    elif kind == "quantile":
        k = int((torch.cumsum(vals, 0) < value * float(vals.sum())).sum())
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unknown LyCORIS mode {kind!r}")
    return max(1, k)


@dataclass(frozen=True)
class Decomposition:
    """The decomposition of one module's delta at its chosen rank.

    :ivar svd: the truncated SVD (``rel_error`` the relative Frobenius error of the truncation).
    :ivar rank: the chosen rank.
    :ivar method: ``exact`` or ``randomized``.
    :ivar energy: explained variance kept, ``sum(S[:rank]^2) / ||D||_F^2``.
    """

    svd: SVD
    rank: int
    method: str
    energy: float


def decompose(
    d: torch.Tensor,
    policy: RankPolicy,
    *,
    seed: int,
    method: Literal["auto", "exact", "randomized"] = "auto",
) -> Decomposition:
    """Decompose the 2-D delta ``d`` ``[m, n]`` at the rank ``policy`` chooses.

    ``fixed`` and ``energy`` only need the leading singular triplets, so they use
    :func:`~lorasmith.linalg.lowrank_svd` (seeded randomized when the rank is small against the matrix):
    for ``energy`` the total ``||D||_F^2`` is known without the full spectrum, so the smallest ``k`` with
    ``sum(S[:k]^2) >= energy * ||D||_F^2`` is exact among the ``max_rank`` leading values, and is
    ``max_rank`` when they do not reach it. The LyCORIS modes need the whole spectrum (``quantile`` sums
    all of it): exact SVD. ``||D||_F^2`` is accumulated in float64 (:func:`fro_sq_of`).
    """
    m, n = int(d.shape[0]), int(d.shape[1])
    full = min(m, n)
    if policy.kind in ("fixed", "energy"):
        cap = int(policy.value) if policy.kind == "fixed" else (policy.max_rank or full)
        cap = max(1, min(cap, full))
        svd = lowrank_svd(d, cap, method=method, seed=seed)
        used = "randomized" if isinstance(svd, RandomizedSVD) else "exact"
        # The randomized SVD already made the float64 pass over d for its error estimate (the same
        # reduction as fro_sq_of, so the same number): reuse it rather than read d once more.
        fro_sq = svd.fro_norm**2 if used == "randomized" and svd.fro_norm is not None else fro_sq_of(d)
        if policy.kind == "fixed":
            k = cap
        else:
            # The fraction is of the whole ||D||_F^2, known without the spectrum's tail; the target is
            # lowered by a hair so that a cut landing exactly on a boundary is not missed by rounding.
            target = policy.value * fro_sq * (1.0 - 1e-12)
            k, running = cap, 0.0
            for i, sq in enumerate(svd.S.detach().to("cpu", torch.float64).square().tolist()):
                running += sq
                if running >= target:
                    k = i + 1
                    break
            k = max(1, min(k, cap))
    else:
        svd = exact_svd(d)
        used = "exact"
        fro_sq = fro_sq_of(d)
        k = lycoris_rank(svd.S, policy.kind, policy.value)
        if policy.max_rank is not None:
            k = min(k, policy.max_rank)
        k = min(k, full)
    svd = svd.truncate(k)
    kept = float(svd.S.detach().to(torch.float64).square().sum())
    energy = 1.0 if fro_sq == 0.0 else min(kept / fro_sq, 1.0)
    return Decomposition(svd=svd, rank=svd.rank, method=used, energy=energy)


def fro_sq_of(d: torch.Tensor) -> float:
    """``||d||_F^2`` accumulated in float64 without a float64 copy of ``d``.

    The energy kept is a ratio of two sums of squares; float64 accumulation keeps it exact to the digits
    reported, and ``vector_norm(..., dtype=float64)`` upcasts element by element inside the reduction
    instead of materialising a float64 copy of a possibly large delta.
    """
    return float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2


def stored_dense(rank: int, rows: int, cols: int) -> bool:
    """Whether a rank-``rank`` LoRA of a ``rows x cols`` delta is stored as a dense ``diff`` instead.

    The LoRA holds ``rank * (rows + cols)`` numbers, the dense delta ``rows * cols``: when the LoRA is no
    smaller, the exact dense delta costs nothing more. For a square matrix this is LyCORIS' rule (rank at
    least half the size).
    """
    return rank * (rows + cols) >= rows * cols


def _abs_quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of ``|values|`` by an exact order statistic.

    ``torch.quantile`` refuses inputs above 2^24 elements (a rank-128 factor of a large layer); the
    ``k``-th smallest value (``torch.kthvalue`` on a flattened copy) has no such limit and is exact: it
    is the "higher" interpolation of ``torch.quantile`` at the same ``q``.
    """
    flat = values.detach().reshape(-1).abs()
    n = int(flat.numel())
    k = min(max(math.ceil(q * n), 1), n)
    return float(torch.kthvalue(flat.cpu(), k).values)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ``[-h, h]``, ``h`` the ``q`` quantile of the absolute values of both.

    sd-scripts clamps its factors at the 0.99 quantile to tame outliers before fp16 storage; the factors
    here carry ``sqrt(S)`` each, so one shared bound treats them alike.
    """
    h = _abs_quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), q)
    return up.clamp(-h, h), down.clamp(-h, h)


def combine(d1: torch.Tensor, d2: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weighted union ``2 alpha d1 + 2 (1 - alpha) d2`` (``alpha = 0.5``: the plain sum)."""
    return d1 * (2.0 * alpha) + d2 * (2.0 * (1.0 - alpha))


def _subspaces(d: torch.Tensor, policy: RankPolicy, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    dec = decompose(d, policy, seed=seed)
    return dec.svd.U, dec.svd.Vh


def common_component(d1: torch.Tensor, d2: torch.Tensor, policy: RankPolicy, seed: int) -> torch.Tensor:
    """The part of two deltas that lies in both of their principal subspaces.

    With ``U_i, V_i`` the left and right singular vectors each delta keeps under ``policy``, and
    ``P(X) = X X^T`` the orthogonal projector onto their span::

        C = 1/2 [ P(U_2) d1 P(V_2) + P(U_1) d2 P(V_1) ]

    Each term is the component of one delta inside the other's row and column spaces; averaging the two
    makes ``C`` symmetric in the inputs. When ``d1 = A + B1`` and ``d2 = A + B2`` with ``B1``, ``B2`` and
    ``A`` in mutually orthogonal row and column spaces, ``C = A`` exactly: the shared change survives,
    what only one fine-tune did is removed.
    """
    u1, v1h = _subspaces(d1, policy, seed)
    u2, v2h = _subspaces(d2, policy, seed)
    a = u2 @ ((u2.mT @ d1 @ v2h.mT) @ v2h)
    b = u1 @ ((u1.mT @ d2 @ v1h.mT) @ v1h)
    return (a + b) * 0.5
