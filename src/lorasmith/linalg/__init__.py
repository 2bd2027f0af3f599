"""Linear algebra for lorasmith: factorized, exact and randomized SVDs, rank policies, device policy.

A leaf package: it imports only torch and the standard library (a test enforces it), and raises only
:class:`LinalgError`, which the layers above wrap into the user-facing error hierarchy.

- :mod:`lorasmith.linalg.svd`: :func:`factorized_svd` (QR trick, never forms ``up @ down``),
  :func:`factorized_svd_batched`, :func:`exact_svd`, :func:`randomized_svd` (seeded, with its exact
  relative error), :func:`lowrank_svd`, and the :class:`SVD` result with ``truncate`` / ``to_lora``.
- :mod:`lorasmith.linalg.rank`: rank policies (fixed, kohya ``sv_ratio`` / ``sv_cumulative`` / ``sv_fro``
  with an sd-scripts compatibility switch, explained-variance energy, score threshold, byte budget) and
  error measures.
- :mod:`lorasmith.linalg.device`: ``--device`` resolution and the compute dtype.
"""

from __future__ import annotations

from .device import compute_dtype, resolve_device, to_compute
from .errors import LinalgError
from .rank import (
    KOHYA_MIN_SV,
    RTOL,
    BudgetItem,
    SingularValues,
    budget_bytes_used,
    discarded_rel_error,
    explained_variance,
    rank_energy,
    rank_fixed,
    rank_sv_cumulative,
    rank_sv_fro,
    rank_sv_ratio,
    rank_threshold,
    select_by_budget,
)
from .svd import (
    DEFAULT_SEED,
    SVD,
    RandomizedSVD,
    SvdMethod,
    choose_svd_method,
    exact_svd,
    factorized_svd,
    factorized_svd_batched,
    fold_tucker,
    lowrank_svd,
    randomized_svd,
)

__all__ = [
    "DEFAULT_SEED",
    "KOHYA_MIN_SV",
    "RTOL",
    "SVD",
    "BudgetItem",
    "LinalgError",
    "RandomizedSVD",
    "SingularValues",
    "SvdMethod",
    "budget_bytes_used",
    "choose_svd_method",
    "compute_dtype",
    "discarded_rel_error",
    "exact_svd",
    "explained_variance",
    "factorized_svd",
    "factorized_svd_batched",
    "fold_tucker",
    "lowrank_svd",
    "randomized_svd",
    "rank_energy",
    "rank_fixed",
    "rank_sv_cumulative",
    "rank_sv_fro",
    "rank_sv_ratio",
    "rank_threshold",
    "resolve_device",
    "select_by_budget",
    "to_compute",
]
