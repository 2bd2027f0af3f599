"""The numerics of ``extract``: rank policies, the per-module decomposition, clamping, common and union,
and the threads the per-module work runs on (:func:`compute_threads`, :func:`pipelined`).

Internal to :mod:`lorasmith.ops.extract`; the maths is documented in ``docs/extract.md``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from lorasmith.linalg import SVD, RandomizedSVD, exact_svd, lowrank_svd

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


# ------------------------------------------------------------------------------------------------ threads
T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

#: In-flight budget of :func:`pipelined`, in bytes of the items' ``cost`` (extract: each module's delta in
#: the compute dtype). A module's working set is a few times its delta (base, tuned, delta, factors), so
#: this keeps the extra memory of the modules in flight to some hundreds of MiB whatever the core count;
#: an item larger than the budget still runs, alone.
INFLIGHT_BYTES = 192 * 2**20


@contextmanager
def compute_threads(dev: torch.device) -> Iterator[int]:
    """How many modules to decompose at once, with torch's intra-op threads set for that.

    On a CPU, modules are decomposed in parallel by as many Python threads as torch would use (torch
    releases the GIL in its kernels), each running single-threaded torch: the QRs of ``m x (k + p)``
    blocks and the small SVDs of the randomized SVD are too small for OpenMP, whose barriers cost more
    than the work and stall badly when another process takes a core (measured on 2 cores: 14 s with one
    thread against 47 - 94 s with two on the same 102 modules). torch's setting is restored afterwards.
    On a GPU, one thread feeds the device: the modules go one after the other.
    """
    if dev.type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, threads)
    finally:
        torch.set_num_threads(threads)


def _one_thread() -> None:
    # MKL's and OpenMP's thread counts are per thread: set them in each worker too, not only globally
    torch.set_num_threads(1)


def pipelined(
    fetch: Callable[[T], P],
    solve: Callable[[P], R],
    items: Sequence[T],
    workers: int,
    cost: Callable[[T], int],
    budget: int = INFLIGHT_BYTES,
) -> Generator[R, None, None]:
    """``solve(fetch(item))`` for every item, in order, with ``solve`` on ``workers`` threads.

    ``fetch`` (the reads) runs on the calling thread, one item after the other, so the inputs are read
    sequentially by the one thread that owns them; ``solve`` (the maths, which must read nothing) runs in
    the pool. Results come back in the items' order whatever the scheduling, so what the caller writes
    and reports is the same as a sequential run. At most ``2 * workers`` items are in flight, and no more
    than ``budget`` of their summed ``cost`` (one item always is), so the memory held stays bounded.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield solve(fetch(item))
        return
    window = 2 * workers
    pool = ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="lorasmith-extract", initializer=_one_thread
    )
    try:
        pending: deque[tuple[Future[R], int]] = deque()
        held, nxt = 0, 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                c = cost(items[nxt])
                if pending and held + c > budget:
                    break
                pending.append((pool.submit(solve, fetch(items[nxt])), c))
                held += c
                nxt += 1
            future, c = pending.popleft()
            result = future.result()
            held -= c
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
