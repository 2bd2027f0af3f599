"""Rank policies: exact minimal counts, sd-scripts compatibility, boundaries, budget selection."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from lorasmith.linalg import (
    BudgetItem,
    LinalgError,
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

# sum 8: cumulative fractions 0.5, 0.75, 0.875, 1.0
S1 = [4.0, 2.0, 1.0, 1.0]
# squares 9, 4, 4, 1, 1, 1 (sum 20): energy fractions 0.45, 0.65, 0.85, 0.9, 0.95, 1.0
S2 = [3.0, 2.0, 2.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------- hand-computed: exact vs kohya


@pytest.mark.parametrize(
    ("t", "exact", "kohya"),
    [
        (1.0, 1, 2),  # nothing is > S0: exact keeps the minimum 1; sd-scripts clamps the count 0 to 1, +1
        (2.0, 1, 2),  # 2 is not > 4/2
        (3.0, 2, 3),  # 4 and 2 are > 4/3
        (4.0, 2, 3),  # the 1s equal 4/4, not greater
        (5.0, 4, 4),  # everything kept; sd-scripts clamps the count to len-1 = 3, +1 = 4
        (math.inf, 4, 4),
    ],
)
def test_sv_ratio_hand_computed(t: float, exact: int, kohya: int) -> None:
    assert rank_sv_ratio(S1, t) == exact
    assert rank_sv_ratio(S1, t, kohya_compat=True) == kohya


@pytest.mark.parametrize(
    ("t", "exact", "kohya"),
    [
        (0.0, 1, 2),
        (0.5, 1, 2),  # boundary: the first value is exactly half
        (0.6, 2, 3),
        (0.75, 2, 3),  # boundary
        (0.8, 3, 4),
        (0.875, 3, 4),  # boundary
        (0.9, 4, 4),
        (1.0, 4, 4),  # boundary at the end: len(S), never one more
    ],
)
def test_sv_cumulative_hand_computed(t: float, exact: int, kohya: int) -> None:
    assert rank_sv_cumulative(S1, t) == exact
    assert rank_sv_cumulative(S1, t, kohya_compat=True) == kohya


@pytest.mark.parametrize(
    ("t", "exact", "kohya"),
    [
        (0.5, 1, 2),  # t^2 = 0.25
        (0.8, 2, 3),  # t^2 = 0.64: 0.65 reached at k = 2
        (0.9, 3, 4),  # t^2 = 0.81: 0.85 reached at k = 3
        (0.96, 5, 6),  # t^2 = 0.9216: 0.95 reached at k = 5
        (1.0, 6, 6),
    ],
)
def test_sv_fro_hand_computed(t: float, exact: int, kohya: int) -> None:
    assert rank_sv_fro(S2, t) == exact
    assert rank_sv_fro(S2, t, kohya_compat=True) == kohya


def test_sv_fro_boundary_with_rounded_square() -> None:
    # sqrt(0.85)**2 is 0.8500000000000001 in floats; the exact answer for t^2 = 0.85 is k = 3
    # (9 + 4 + 4 = 17 = 0.85 * 20), not 4. The tolerance absorbs the last bit.
    t = math.sqrt(0.85)
    assert t * t > 0.85
    assert rank_sv_fro(S2, t) == 3
    assert rank_energy(S2, 0.85) == 3
    assert rank_energy(S2, 0.9) == 4


def test_trailing_zeros_exact_minimum() -> None:
    s = [3.0, 1.0, 0.0, 0.0]
    assert rank_sv_cumulative(s, 1.0) == 2
    assert rank_sv_fro(s, 1.0) == 2
    assert rank_energy(s, 1.0) == 2
    assert rank_sv_ratio(s, math.inf) == 2
    # sd-scripts keeps one more: searchsorted finds index 1, +1, clamp, +1 -> 3.
    assert rank_sv_cumulative(s, 1.0, kohya_compat=True) == 3
    assert rank_sv_fro(s, 1.0, kohya_compat=True) == 3
    assert rank_sv_ratio(s, 1e9, kohya_compat=True) == 3


def test_energy_hand_computed() -> None:
    assert rank_energy(S2, 0.0) == 1
    assert rank_energy(S2, 0.45) == 1
    assert rank_energy(S2, 0.46) == 2
    assert rank_energy(S2, 0.85) == 3
    assert rank_energy(S2, 0.86) == 4
    assert rank_energy(S2, 0.95) == 5
    assert rank_energy(S2, 0.95, max_rank=3) == 3
    assert rank_energy(S2, 1.0) == 6


# ------------------------------------------------------------------------------------ properties


def _random_s(rng: random.Random, length: int) -> list[float]:
    return sorted((rng.lognormvariate(0.0, 2.0) for _ in range(length)), reverse=True)


def _exact_prefix(weights: list[float], fraction: float) -> int:
    """Smallest k with sum(weights[:k]) >= fraction * sum(weights), in exact rational arithmetic."""
    exact = [Fraction(w) for w in weights]
    target = Fraction(fraction) * sum(exact)
    running = Fraction(0)
    for k, w in enumerate(exact, start=1):
        running += w
        if running >= target:
            return k
    return len(weights)


def test_default_mode_is_exact_minimum() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        s = _random_s(rng, rng.randint(1, 40))
        t = rng.random()
        assert rank_sv_cumulative(s, t) == max(1, _exact_prefix(s, t))
        squares = [v * v for v in s]
        assert rank_energy(s, t) == max(1, _exact_prefix(squares, t))
        ratio = 1.0 + rng.random() * 50
        assert rank_sv_ratio(s, ratio) == max(
            1, sum(1 for v in s if Fraction(v) * Fraction(ratio) > Fraction(s[0]))
        )


def test_kohya_compat_is_one_more_clamped() -> None:
    # Away from exact boundaries, sd-scripts' count is min(exact + 1, len(S)) for all three methods.
    rng = random.Random(99)
    for _ in range(200):
        length = rng.randint(2, 40)
        s = torch.tensor(_random_s(rng, length), dtype=torch.float64)
        t = rng.random()
        ratio = 1.0 + rng.random() * 50
        assert rank_sv_cumulative(s, t, kohya_compat=True) == min(rank_sv_cumulative(s, t) + 1, length)
        assert rank_sv_fro(s, t, kohya_compat=True) == min(rank_sv_fro(s, t) + 1, length)
        assert rank_sv_ratio(s, ratio, kohya_compat=True) == min(rank_sv_ratio(s, ratio) + 1, length)


def test_energy_equals_fro_of_sqrt() -> None:
    rng = random.Random(5)
    for _ in range(100):
        s = _random_s(rng, rng.randint(1, 30))
        e = rng.random()
        assert rank_energy(s, e) == rank_sv_fro(s, math.sqrt(e))


# ------------------------------------------------------------------------------ caps and degenerate S


def test_max_rank_caps() -> None:
    assert rank_sv_cumulative(S1, 1.0, max_rank=2) == 2
    assert rank_sv_ratio(S1, 5.0, max_rank=3) == 3
    assert rank_sv_fro(S2, 1.0, max_rank=100) == 6
    assert rank_sv_ratio(S1, 2.0, max_rank=1, kohya_compat=True) == 1
    assert rank_sv_cumulative(S1, 0.8, max_rank=3, kohya_compat=True) == 3


def test_fixed_rank() -> None:
    assert rank_fixed(S1, 2) == 2
    assert rank_fixed(S1, 10) == 4
    assert rank_fixed(torch.tensor([1.0]), 8) == 1
    with pytest.raises(LinalgError, match="at least 1"):
        rank_fixed(S1, 0)


def test_all_zero_s_gives_one() -> None:
    zero = [0.0, 0.0, 0.0]
    assert rank_sv_ratio(zero, 10.0) == 1
    assert rank_sv_cumulative(zero, 0.9) == 1
    assert rank_sv_fro(zero, 0.9) == 1
    assert rank_energy(zero, 0.9) == 1
    assert rank_fixed(zero, 2) == 2
    for compat in (rank_sv_ratio, rank_sv_cumulative, rank_sv_fro):
        assert compat(zero, 1.0, kohya_compat=True) == 1
    assert explained_variance(zero, 1) == 1.0
    assert discarded_rel_error(zero, 1) == 0.0


def test_kohya_min_sv_is_absolute() -> None:
    tiny = [1e-7, 5e-8, 1e-8]
    # sd-scripts treats S0 <= 1e-6 as a zero matrix; the exact mode is scale invariant.
    assert rank_sv_cumulative(tiny, 1.0, kohya_compat=True) == 1
    assert rank_sv_cumulative(tiny, 1.0) == 3
    assert rank_sv_ratio(tiny, 3.0) == 2


def test_single_value_never_crashes() -> None:
    one = [5.0]
    for policy in (rank_sv_ratio, rank_sv_cumulative, rank_sv_fro):
        # sd-scripts computes rank 2 here and crashes on S[1]; lorasmith caps at len(S).
        assert policy(one, 1.0) == 1
        assert policy(one, 1.0, kohya_compat=True) == 1
    assert rank_energy(one, 0.5) == 1


def test_invalid_inputs() -> None:
    for policy in (rank_sv_cumulative, rank_sv_fro):
        with pytest.raises(LinalgError, match="empty"):
            policy([], 0.5)
        with pytest.raises(LinalgError, match="between 0 and 1"):
            policy(S1, 1.5)
        with pytest.raises(LinalgError, match="between 0 and 1"):
            policy(S1, -0.1)
    with pytest.raises(LinalgError, match="empty"):
        rank_sv_ratio([], 2.0, kohya_compat=True)
    with pytest.raises(LinalgError, match="at least 1"):
        rank_sv_ratio(S1, 0.5)
    with pytest.raises(LinalgError, match="at least 1"):
        rank_sv_ratio(S1, math.nan)
    with pytest.raises(LinalgError, match="between 0 and 1"):
        rank_energy(S1, 2.0)
    with pytest.raises(LinalgError, match="max_rank"):
        rank_sv_cumulative(S1, 0.5, max_rank=0)
    with pytest.raises(LinalgError, match="descending"):
        rank_sv_cumulative([1.0, 2.0], 0.5)
    with pytest.raises(LinalgError, match="NaN"):
        rank_sv_cumulative([2.0, math.nan], 0.5)
    with pytest.raises(LinalgError, match="non-negative"):
        rank_sv_cumulative([2.0, -1.0], 0.5)
    with pytest.raises(LinalgError, match="1-D"):
        rank_sv_cumulative(torch.ones(2, 2), 0.5)


def test_tensor_inputs_float32() -> None:
    s = torch.tensor(S1, dtype=torch.float32)
    assert rank_sv_cumulative(s, 0.75) == 2
    assert rank_sv_cumulative(s, 0.75, kohya_compat=True) == 3
    assert rank_sv_ratio(s, 4.0) == 2
    assert rank_sv_ratio(s, 4.0, kohya_compat=True) == 3


# ------------------------------------------------------------------------------------ score threshold


def test_rank_threshold() -> None:
    scores = [-1.0, -2.0, -3.5, -4.0, -math.inf]
    assert rank_threshold(scores, -3.5) == 3  # >= keeps the equal score
    assert rank_threshold(scores, -3.4) == 2
    assert rank_threshold(scores, 0.0) == 1  # nothing passes: the minimum rank 1
    assert rank_threshold(scores, -math.inf) == 5
    assert rank_threshold(scores, -10.0, max_rank=2) == 2
    assert rank_threshold(torch.tensor(scores), -3.5) == 3
    with pytest.raises(LinalgError, match="descending"):
        rank_threshold([-2.0, -1.0], -3.0)
    with pytest.raises(LinalgError, match="empty"):
        rank_threshold([], -3.0)


# ----------------------------------------------------------------------------------------- budget


ITEMS: list[tuple[str, list[float], int, int]] = [
    ("A", [10.0, 5.0, 1.0], 100, 8),
    ("B", [9.0, 6.0, 2.0, 0.5], 30, 4),
    ("C", [3.0], 50, 0),
]
# Rank 1 everywhere: (8 + 100) + (4 + 30) + (0 + 50) = 192. Then, by score: B6 (30), A5 (100), B2 (30),
# A1 (100), B0.5 (30).


@pytest.mark.parametrize(
    ("budget", "ranks", "used"),
    [
        (192, {"A": 1, "B": 1, "C": 1}, 192),
        (221, {"A": 1, "B": 1, "C": 1}, 192),
        (222, {"A": 1, "B": 2, "C": 1}, 222),
        (321, {"A": 1, "B": 2, "C": 1}, 222),  # A5 does not fit: the selection stops (global threshold)
        (322, {"A": 2, "B": 2, "C": 1}, 322),
        (352, {"A": 2, "B": 3, "C": 1}, 352),
        (452, {"A": 3, "B": 3, "C": 1}, 452),
        (482, {"A": 3, "B": 4, "C": 1}, 482),
        (10**12, {"A": 3, "B": 4, "C": 1}, 482),
    ],
)
def test_select_by_budget_exact_accounting(budget: int, ranks: dict[str, int], used: int) -> None:
    got = select_by_budget(ITEMS, budget)
    assert got == ranks
    assert list(got) == ["A", "B", "C"]
    assert budget_bytes_used(ITEMS, got) == used


def test_select_by_budget_below_minimum() -> None:
    with pytest.raises(LinalgError, match="192 bytes"):
        select_by_budget(ITEMS, 191)


def test_select_by_budget_is_global_threshold() -> None:
    rng = random.Random(7)
    items = [
        BudgetItem(f"layer{i}", _random_s(rng, rng.randint(1, 16)), rng.randint(0, 500), rng.randint(0, 64))
        for i in range(30)
    ]
    minimum = budget_bytes_used(items, {item.layer_id: 1 for item in items})
    full = budget_bytes_used(items, {item.layer_id: len(item.scores) for item in items})
    for budget in [minimum, *sorted(rng.randint(minimum, full) for _ in range(20)), full]:
        ranks = select_by_budget(items, budget)
        used = budget_bytes_used(items, ranks)
        assert used <= budget
        kept = [s for item in items for s in item.scores[1 : ranks[item.layer_id]]]
        dropped = [(s, item.bytes_per_rank) for item in items for s in item.scores[ranks[item.layer_id] :]]
        if kept and dropped:
            assert min(kept) >= max(s for s, _ in dropped)
        if dropped:
            # The best dropped candidate did not fit.
            best = max(dropped, key=lambda d: d[0])
            assert used + best[1] > budget


def test_select_by_budget_ties_follow_layer_order() -> None:
    items = [("x", [5.0, 1.0], 10, 0), ("y", [5.0, 1.0], 10, 0)]
    assert select_by_budget(items, 30) == {"x": 2, "y": 1}


def test_select_by_budget_invalid() -> None:
    with pytest.raises(LinalgError, match="twice"):
        select_by_budget([("a", [1.0], 1, 0), ("a", [1.0], 1, 0)], 100)
    with pytest.raises(LinalgError, match="non-negative int"):
        select_by_budget([("a", [1.0], -1, 0)], 100)
    with pytest.raises(LinalgError, match="non-negative int"):
        select_by_budget([("a", [1.0], 1, 0.5)], 100)  # type: ignore[list-item]
    with pytest.raises(LinalgError, match="empty"):
        select_by_budget([("a", [], 1, 0)], 100)
    with pytest.raises(LinalgError, match="no rank"):
        budget_bytes_used(ITEMS, {"A": 1})
    assert select_by_budget([], 0) == {}


# ---------------------------------------------------------------------------------------- measures


def test_explained_variance_and_discarded_error() -> None:
    s = [4.0, 3.0]
    assert explained_variance(s, 0) == 0.0
    assert explained_variance(s, 1) == pytest.approx(16 / 25)
    assert explained_variance(s, 2) == 1.0
    assert explained_variance(s, 9) == 1.0
    assert discarded_rel_error(s, 0) == 1.0
    assert discarded_rel_error(s, 1) == pytest.approx(0.6)
    assert discarded_rel_error(s, 2) == 0.0
    # No cancellation for tiny errors.
    assert discarded_rel_error([1.0, 1e-12], 1) == pytest.approx(1e-12, rel=1e-9)
    with pytest.raises(LinalgError, match="non-negative"):
        explained_variance(s, -1)
    with pytest.raises(LinalgError, match="non-negative"):
        discarded_rel_error(s, -1)
