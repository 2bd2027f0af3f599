"""Linear algebra for lorasmith: factorized, exact and randomized SVDs, rank policies, device policy.

A leaf package: it imports only torch and the standard library (a test enforces it), and raises only
:class:`LinalgError` (and its subclass :class:`NonFiniteFactorsError`), which the layers above wrap into the
user-facing error hierarchy.

- :mod:`lorasmith.linalg.svd`: :func:`factorized_svd` (the one entry point for the SVD of a LoRA delta
  from its factors, never forming ``up @ down``; ``method="gram"``, the default, or ``"qr"``),
  :func:`factorized_svd_batched`, :func:`exact_svd`, :func:`randomized_svd` (seeded, with its exact
  relative error), :func:`lowrank_svd`, and the :class:`SVD` result with ``truncate`` / ``to_lora``.
- :mod:`lorasmith.linalg.gram`: the Gram route itself (Gram matrices, one Cholesky, one ``r x r``
  eigensolver; why, and its ``s_0 * sqrt(eps)`` accuracy limit), batched over same-shape problems:
  :func:`gram_factorized_svd` returns the singular vectors as coefficients on the factors
  (:class:`GramSVD`), for callers that build truncated factors without ever forming ``U`` or ``V``
  (``resize``).
- :mod:`lorasmith.linalg.rank`: rank policies (fixed, kohya ``sv_ratio`` / ``sv_cumulative`` / ``sv_fro``
  with an sd-scripts compatibility switch, explained-variance energy, score threshold, byte budget) and
  error measures.
- :mod:`lorasmith.linalg.device`: ``--device`` resolution and the compute dtype.
"""

from __future__ import annotations

from .device import compute_dtype, resolve_device, to_compute
from .errors import LinalgError, NonFiniteFactorsError
from .gram import GramEig, GramSVD, gram_factorized_eig, gram_factorized_svd, gram_resolution
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
    DEFAULT_FACTORIZED_METHOD,
    DEFAULT_SEED,
    SVD,
    FactorizedMethod,
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
    "DEFAULT_FACTORIZED_METHOD",
    "DEFAULT_SEED",
    "KOHYA_MIN_SV",
    "RTOL",
    "SVD",
    "BudgetItem",
    "FactorizedMethod",
    "GramEig",
    "GramSVD",
    "LinalgError",
    "NonFiniteFactorsError",
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
    "gram_factorized_eig",
    "gram_factorized_svd",
    "gram_resolution",
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
