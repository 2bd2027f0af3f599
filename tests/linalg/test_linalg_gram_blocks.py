"""The Gram route's fast paths: split Gram products, the one-reduction finiteness check, coefficients
on demand (:class:`~lorasmith.linalg.gram.GramEig`)."""

from __future__ import annotations

import pytest
import torch

from lorasmith.linalg import NonFiniteFactorsError, gram_factorized_svd
from lorasmith.linalg import gram as gram_mod

F32 = torch.float32
F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


@pytest.fixture
def split_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split Gram products of small problems too, so that tests exercise that path cheaply."""
    monkeypatch.setattr(gram_mod, "_SPLIT_MIN_RANK", 2)
    monkeypatch.setattr(gram_mod, "_SPLIT_MIN_LENGTH", 2)


@pytest.mark.parametrize("shape", [(40, 8), (33, 7), (2, 40, 8), (1, 33, 9), (3, 2, 20, 6)])
@pytest.mark.usefixtures("split_small")
def test_split_gram_equals_the_full_product(shape: tuple[int, ...]) -> None:
    x = randn(*shape, seed=1)
    cols = gram_mod._gram(x, of_columns=True)
    rows = gram_mod._gram(x.mT, of_columns=False)
    ref = x.mT @ x
    assert cols.shape == rows.shape == ref.shape
    torch.testing.assert_close(cols, ref, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(rows, ref, rtol=1e-13, atol=1e-12)
    # the off-diagonal blocks mirror each other exactly (the lower one is a copy of the upper one)
    h = ref.shape[-1] // 2
    assert torch.equal(cols[..., h:, :h], cols[..., :h, h:].mT)


def test_gram_is_one_product_below_the_thresholds() -> None:
    """Small problems (the defaults) take the single GEMM, and give the same answer."""
    x = randn(50, 8, seed=2)
    torch.testing.assert_close(gram_mod._gram(x, of_columns=True), x.mT @ x, rtol=0, atol=0)
    y = randn(8, 50, seed=3)
    torch.testing.assert_close(gram_mod._gram(y, of_columns=False), y @ y.mT, rtol=0, atol=0)


def test_split_gram_at_the_default_thresholds() -> None:
    """A real-sized rank (64, split in halves) against the full product, float32."""
    x = randn(1100, 64, seed=4, dtype=F32)
    torch.testing.assert_close(gram_mod._gram(x, of_columns=True), x.mT @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gram_mod._gram(x.mT, of_columns=False), x.mT @ x, rtol=1e-5, atol=1e-3)


@pytest.mark.usefixtures("split_small")
def test_svd_through_split_grams_matches_dense() -> None:
    up, down = randn(30, 9, seed=5), randn(9, 25, seed=6)
    scale = torch.linspace(0.5, 1.5, 9, dtype=F64)
    (g,) = gram_factorized_svd([up], [down], [scale], F64)
    dense = (up * scale) @ down
    ref = torch.linalg.svdvals(dense)
    torch.testing.assert_close(g.S, ref[:9], rtol=0, atol=1e-10 * float(ref[0]))
    inv = 1.0 / g.S
    u, v = ((up * scale) @ g.left) * inv, (down.mT @ g.right) * inv
    torch.testing.assert_close((u * g.S) @ v.mT, dense, rtol=0, atol=1e-10 * float(ref[0]))


def test_gram_sum_overflow_is_not_mistaken_for_a_non_finite_factor() -> None:
    """Every Gram entry is finite but their float32 sum overflows: the exact check clears it.

    ``up`` has orthogonal +-2e18 columns, so ``G_u = 2.56e38 I`` (finite; the float32 maximum is 3.4e38)
    whose sum is 1e39; ``down`` is tiny, so the delta itself is of order one.
    """
    sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h = sign
    for _ in range(5):
        h = torch.kron(h, sign)  # 64 x 64 Hadamard matrix
    up = (2e18 * h[:, :4]).to(F32)
    down = (1e-18 * randn(4, 10, seed=7)).to(F32)
    (g,) = gram_factorized_svd([up], [down], None, F32)
    ref = torch.linalg.svdvals(up.to(F64) @ down.to(F64))
    torch.testing.assert_close(g.S.to(F64), ref[:4], rtol=1e-4, atol=0)


def test_non_finite_factor_still_raises() -> None:
    up, down = randn(20, 4, seed=8, dtype=F32), randn(4, 12, seed=9, dtype=F32)
    up[3, 1] = float("inf")
    with pytest.raises(NonFiniteFactorsError):
        gram_factorized_svd([up], [down], None, F32)
    up[3, 1] = float("nan")
    with pytest.raises(NonFiniteFactorsError):
        gram_factorized_svd([up], [down], None, F32)


# ------------------------------------------------------------------------- coefficients on demand
def test_eig_coefficients_are_the_leading_columns_of_the_svd() -> None:
    from lorasmith.linalg.gram import gram_factorized_eig

    ups = [randn(30, 9, seed=10), randn(30, 9, seed=11)]
    downs = [randn(9, 25, seed=12), randn(9, 25, seed=13)]
    scales = [torch.full((9,), 0.5, dtype=F64), torch.linspace(-1.0, 2.0, 9, dtype=F64)]
    full = gram_factorized_svd(ups, downs, scales, F64)
    eigs = gram_factorized_eig(ups, downs, scales, F64)
    assert len(eigs) == 2
    for e, g in zip(eigs, full, strict=True):
        torch.testing.assert_close(e.S, g.S, rtol=0, atol=0)
        for cols in (0, 1, 4, 9):
            left, right = e.coefficients(cols)
            assert left.shape == right.shape == (9, cols)
            torch.testing.assert_close(left, g.left[:, :cols], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(right, g.right[:, :cols], rtol=1e-12, atol=1e-12)
        left, right = e.coefficients(50)  # more than there are: all of them
        assert left.shape == (9, 9)
        left, right = e.coefficients()
        torch.testing.assert_close(right, g.right, rtol=1e-12, atol=1e-12)


def test_eig_of_an_empty_batch_and_its_validation() -> None:
    from lorasmith.linalg import LinalgError
    from lorasmith.linalg.gram import gram_factorized_eig

    assert gram_factorized_eig([], []) == []
    with pytest.raises(LinalgError, match="lora_down"):
        gram_factorized_eig([randn(4, 2, seed=1)], [])
    with pytest.raises(LinalgError, match="rank mismatch"):
        gram_factorized_eig([randn(4, 2, seed=1)], [randn(3, 5, seed=2)])
