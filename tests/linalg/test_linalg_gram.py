"""The Gram route of the factorized SVD against dense float64 SVDs, and against the QR route."""

from __future__ import annotations

import pytest
import torch

from lorasmith.linalg import (
    DEFAULT_FACTORIZED_METHOD,
    GramSVD,
    LinalgError,
    NonFiniteFactorsError,
    factorized_svd,
    factorized_svd_batched,
    gram_factorized_svd,
    gram_resolution,
)

F32 = torch.float32
F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def vectors(
    g: GramSVD, up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``(U, V)`` from the coefficients, as the docstring defines them (this file's own few lines)."""
    inv = torch.where(g.S > 0, 1.0 / g.S, torch.zeros_like(g.S))
    return ((up * scale) @ g.left) * inv, (down.mT @ g.right) * inv


def assert_gram_is_svd_of(
    g: GramSVD, up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor, atol: float = 1e-10
) -> None:
    """Values equal the dense float64 ones; the vectors are orthonormal and rebuild the delta."""
    dense = ((up * scale) @ down).to(F64)
    ref = torch.linalg.svdvals(dense)
    k = min(dense.shape[0], dense.shape[1], up.shape[1])
    s0 = float(ref[0])
    assert g.rank == k
    assert g.left.shape == g.right.shape == (up.shape[1], k)
    torch.testing.assert_close(g.S.to(F64), ref[:k], rtol=0, atol=atol * s0)
    u, v = vectors(g, up, down, scale)
    live = int((g.S > 1e-6 * s0).sum())  # the triplets of the delta's rank
    eye = torch.eye(live, dtype=F64)
    torch.testing.assert_close((u.mT @ u)[:live, :live].to(F64), eye, rtol=0, atol=100 * atol)
    torch.testing.assert_close((v.mT @ v)[:live, :live].to(F64), eye, rtol=0, atol=100 * atol)
    torch.testing.assert_close(((u * g.S) @ v.mT).to(F64), dense, rtol=0, atol=atol * s0)


# ------------------------------------------------------------------------------------ against dense SVD
@pytest.mark.parametrize(
    ("out", "rank", "cols"),
    [(40, 8, 30), (30, 8, 40), (5, 8, 30), (40, 8, 4), (5, 16, 3), (64, 1, 20)],
    ids=["tall", "wide", "rank_above_out", "rank_above_in", "rank_above_both", "rank1"],
)
def test_linear_pairs_match_dense(out: int, rank: int, cols: int) -> None:
    up, down = randn(out, rank, seed=1), randn(rank, cols, seed=2)
    scale = torch.full((rank,), 0.75, dtype=F64)
    (g,) = gram_factorized_svd([up], [down], [scale], F64)
    assert_gram_is_svd_of(g, up, down, scale)


def test_conv_pair_flattened_matches_dense() -> None:
    """A conv LoRA: ``up [out, r, 1, 1]``, ``down [r, in, kh, kw]``, decomposed as ``[out, in*kh*kw]``."""
    up4, down4 = randn(24, 6, 1, 1, seed=3), randn(6, 5, 3, 3, seed=4)
    up, down = up4.reshape(24, 6), down4.reshape(6, -1)
    scale = torch.full((6,), 1 / 6, dtype=F64)
    (g,) = gram_factorized_svd([up], [down], [scale], F64)
    assert_gram_is_svd_of(g, up, down, scale)
    # the conv delta as a loader builds it, flattened like a conv weight
    delta = torch.einsum("or,rikl->oikl", up4[:, :, 0, 0], down4) / 6
    torch.testing.assert_close(g.S, torch.linalg.svdvals(delta.reshape(24, -1))[:6], rtol=1e-12, atol=0)


def test_rank_deficient_down_factor_takes_the_eigh_fallback() -> None:
    up, down = randn(30, 5, seed=5), randn(5, 12, seed=6)
    down[3] = 2 * down[1]  # G_d = down down^T is singular: Cholesky fails
    _, info = torch.linalg.cholesky_ex(down @ down.mT)
    assert int(info) != 0
    scale = torch.ones(5, dtype=F64)
    (g,) = gram_factorized_svd([up], [down], [scale], F64)
    ref = torch.linalg.svdvals(up @ down)
    # the delta has rank 4: its 5th singular value comes out at the square root of eigenvalue rounding
    assert float(g.S[4]) <= 10 * gram_resolution(F64) * float(ref[0])
    assert_gram_is_svd_of(g, up, down, scale, atol=1e-7)


def test_column_scales() -> None:
    """Per-column scales (merge weights, negative ones too) act as ``up * scale``."""
    up, down = randn(20, 6, seed=7), randn(6, 15, seed=8)
    scale = torch.tensor([0.5, -1.0, 2.0, 0.0, 1e-3, -0.25], dtype=F64)
    (g,) = gram_factorized_svd([up], [down], [scale], F64)
    assert_gram_is_svd_of(g, up, down, scale, atol=1e-9)
    # a float scale is a column scale with equal entries; None is no scale
    (a,) = gram_factorized_svd([up], [down], [-0.5])
    (b,) = gram_factorized_svd([up], [down], [torch.full((6,), -0.5, dtype=F64)])
    (c,) = gram_factorized_svd([up * -0.5], [down])
    torch.testing.assert_close(a.S, b.S, rtol=0, atol=0)
    torch.testing.assert_close(a.S, c.S, rtol=1e-12, atol=0)


def test_batched_same_shape_problems_equal_one_by_one() -> None:
    ups = [randn(30, 5, seed=10 + i) for i in range(4)]
    downs = [randn(5, 12, seed=20 + i) for i in range(4)]
    downs[2][3] = downs[2][1] * 2  # one singular G_d in the batch: the fallback runs for the batch
    scales = [torch.full((5,), 0.5 * (i + 1), dtype=F64) for i in range(4)]
    together = gram_factorized_svd(ups, downs, scales, F64)
    assert len(together) == 4
    for i in range(4):
        (alone,) = gram_factorized_svd([ups[i]], [downs[i]], [scales[i]], F64)
        want = torch.linalg.svdvals((ups[i] * scales[i]) @ downs[i])
        tol = 1e-7 * float(want[0])
        torch.testing.assert_close(together[i].S, want[:5], rtol=1e-9, atol=tol)
        torch.testing.assert_close(alone.S, want[:5], rtol=1e-9, atol=tol)
        assert_gram_is_svd_of(together[i], ups[i], downs[i], scales[i], atol=1e-7)


def test_float32_factors_and_the_dtype_of_the_small_problems() -> None:
    up, down = randn(64, 16, seed=30, dtype=F32), randn(16, 48, seed=31, dtype=F32)
    ref = torch.linalg.svdvals(up.double() @ down.double())
    (g32,) = gram_factorized_svd([up], [down])
    assert g32.S.dtype == g32.left.dtype == F32
    # the float32 limit: values are accurate to about eps * s_0 and far better than s_0 * sqrt(eps)
    torch.testing.assert_close(g32.S.double(), ref[:16], rtol=0, atol=1e-5 * float(ref[0]))
    (g64,) = gram_factorized_svd([up], [down], None, F64)
    assert g64.S.dtype == g64.left.dtype == g64.right.dtype == F64
    torch.testing.assert_close(g64.S, ref[:16], rtol=0, atol=1e-5 * float(ref[0]))


# --------------------------------------------------------------------------- factorized_svd: both routes
def test_default_route_is_gram() -> None:
    assert DEFAULT_FACTORIZED_METHOD == "gram"
    up, down = randn(20, 4, seed=40), randn(4, 9, seed=41)
    (g,) = gram_factorized_svd([up], [down], [0.5])
    torch.testing.assert_close(factorized_svd(up, down, scale=0.5).S, g.S, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("scale", [1.0, -0.3])
@pytest.mark.parametrize(
    ("up_shape", "down_shape", "mid_shape"),
    [((40, 8), (8, 30), None), ((24, 8, 1, 1), (8, 12, 3, 3), None), ((24, 6, 1, 1), (5, 12), (6, 5, 3, 3))],
    ids=["linear", "conv3x3", "tucker"],
)
def test_routes_agree(
    up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
    mid_shape: tuple[int, ...] | None,
    scale: float,
    dtype: torch.dtype,
) -> None:
    up, down = randn(*up_shape, seed=50, dtype=dtype), randn(*down_shape, seed=51, dtype=dtype)
    mid = None if mid_shape is None else randn(*mid_shape, seed=52, dtype=dtype)
    gram = factorized_svd(up, down, mid, scale, method="gram")
    qr = factorized_svd(up, down, mid, scale, method="qr")
    tol = 1e-10 if dtype == F64 else 1e-4
    s0 = float(qr.S[0])
    assert gram.rank == qr.rank and gram.kernel == qr.kernel
    assert gram.S.dtype == gram.U.dtype == dtype
    torch.testing.assert_close(gram.S, qr.S, rtol=0, atol=tol * s0)
    # canonical signs on both routes: the vectors agree, not just up to sign
    torch.testing.assert_close(gram.U, qr.U, rtol=0, atol=tol * 100)
    torch.testing.assert_close(gram.Vh, qr.Vh, rtol=0, atol=tol * 100)
    torch.testing.assert_close(gram.reconstruct(), qr.reconstruct(), rtol=0, atol=tol * s0)
    assert gram.fro_norm == pytest.approx(qr.fro_norm, rel=tol)
    assert gram.rel_error == qr.rel_error == 0.0
    for method in ("gram", "qr"):
        batched = factorized_svd_batched(
            [up, up], [down, down], None if mid is None else [mid, mid], scale, method=method
        )  # type: ignore[arg-type]
        want = gram if method == "gram" else qr
        torch.testing.assert_close(batched[1].S, want.S, rtol=tol, atol=tol * s0)


def test_qr_resolves_singular_values_far_below_the_gram_limit() -> None:
    """The documented trade-off: QR is accurate far below ``s_0 * sqrt(eps)``; Gram is accurate above."""
    # planted spectrum 1 ... 1e-5 with orthonormal factors: s_4 = 1e-5 is below float32's 3.5e-4 limit
    q_u = torch.linalg.qr(randn(50, 5, seed=60)).Q
    q_d = torch.linalg.qr(randn(40, 5, seed=61)).Q
    sv = torch.tensor([1.0, 0.3, 0.1, 1e-2, 1e-5], dtype=F64)
    up, down = (q_u * sv).to(F32), q_d.mT.to(F32)
    ref = torch.linalg.svdvals(up.double() @ down.double())
    qr = factorized_svd(up, down, method="qr")
    assert abs(float(qr.S[4]) - float(ref[4])) <= 0.05 * float(ref[4])
    gram = factorized_svd(up, down, method="gram")
    limit = gram_resolution(F32) * float(ref[0])
    torch.testing.assert_close(gram.S[:4].double(), ref[:4], rtol=0, atol=limit)
    assert float(gram.S[4]) <= 2 * limit


def test_rank_deficient_concatenation_in_float32() -> None:
    """Factors concatenated with themselves (a merge of a LoRA with itself): half the triplets are noise.

    Without ``rcond`` a noise ``s_i`` scales its vectors by ``1 / s_i``: the reconstruction can be off by
    many times ``||dW||``. ``factorized_svd`` zeroes them; ``rcond=gram_resolution`` does the same.
    """
    for seed in range(3):
        up, down = randn(60, 6, seed=70 + seed), 0.01 * randn(6, 40, seed=80 + seed)
        up2, down2 = torch.cat([up, up], 1).to(F32), torch.cat([down, down], 0).to(F32)
        dense = 2 * (up @ down)
        norm = float(dense.norm())
        svd = factorized_svd(up2, down2)
        assert float((svd.reconstruct().double() - dense).norm()) <= 1e-5 * norm
        # what is left of the noise sits at the resolution limit, with vectors too short to matter
        assert float(svd.S[6:].max()) <= 2 * gram_resolution(F32) * float(svd.S[0])
        (g,) = gram_factorized_svd([up2], [down2], rcond=gram_resolution(F32))
        u, v = vectors(g, up2, down2, torch.ones(12, dtype=F32))
        assert float(((u * g.S) @ v.mT).double().sub(dense).norm()) <= 1e-5 * norm
        dropped = g.S == 0
        assert int(dropped.sum()) >= 5
        assert bool((g.left[:, dropped] == 0).all()) and bool((g.right[:, dropped] == 0).all())


def test_zero_delta() -> None:
    up, down = torch.zeros(8, 2, dtype=F64), randn(2, 5, seed=90)
    for method in ("gram", "qr"):
        svd = factorized_svd(up, down, method=method)  # type: ignore[arg-type]
        assert float(svd.S.abs().max()) == 0.0
        assert svd.fro_norm == 0.0
        assert float(svd.reconstruct().abs().max()) == 0.0


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_factors_raise(bad: float) -> None:
    ups = [randn(10, 3, seed=100 + i) for i in range(4)]
    downs = [randn(3, 7, seed=110 + i) for i in range(4)]
    downs[2][1, 4] = bad
    with pytest.raises(NonFiniteFactorsError, match=r"NaN or infinite .*problem 2 of 4") as info:
        gram_factorized_svd(ups, downs)
    assert info.value.problems == (2,)
    assert isinstance(info.value, LinalgError)
    with pytest.raises(NonFiniteFactorsError, match="NaN or infinite") as one:
        gram_factorized_svd([ups[2]], [downs[2]])
    assert one.value.problems == (0,)
    assert "problem" not in str(one.value)
    for method in ("gram", "qr"):
        with pytest.raises(NonFiniteFactorsError):
            factorized_svd(ups[2], downs[2], method=method)  # type: ignore[arg-type]
        with pytest.raises(NonFiniteFactorsError) as batched:
            factorized_svd_batched(ups, downs, method=method)  # type: ignore[arg-type]
        assert batched.value.problems == (2,)


def test_overflowing_gram_products_raise() -> None:
    up = torch.full((4, 2), 1e30, dtype=F32)  # finite, but up^T up overflows float32
    with pytest.raises(NonFiniteFactorsError):
        gram_factorized_svd([up], [torch.ones(2, 3, dtype=F32)])


def test_input_errors() -> None:
    up, down = randn(10, 4, seed=120), randn(4, 6, seed=121)
    assert gram_factorized_svd([], []) == []
    with pytest.raises(LinalgError, match="lora_down"):
        gram_factorized_svd([up, up], [down])
    with pytest.raises(LinalgError, match="column scales"):
        gram_factorized_svd([up], [down], [1.0, 2.0])
    with pytest.raises(LinalgError, match=r"\[4\] tensor"):
        gram_factorized_svd([up], [down], [torch.ones(3, dtype=F64)])
    with pytest.raises(LinalgError, match="rank mismatch"):
        gram_factorized_svd([up], [randn(3, 6, seed=122)])
    with pytest.raises(LinalgError, match="2-D"):
        gram_factorized_svd([up.reshape(10, 4, 1, 1)], [down])
    with pytest.raises(LinalgError, match="float32 or float64"):
        gram_factorized_svd([up.half()], [down.half()])
    with pytest.raises(LinalgError, match="float32 or float64"):
        gram_factorized_svd([up], [down], None, torch.float16)
    with pytest.raises(LinalgError, match="one shape, dtype and device"):
        gram_factorized_svd([up, randn(11, 4, seed=123)], [down, down])
    with pytest.raises(LinalgError, match="one shape, dtype and device"):
        gram_factorized_svd([up, up.float()], [down, down.float()])
    with pytest.raises(LinalgError, match="rcond"):
        gram_factorized_svd([up], [down], rcond=1.5)
    with pytest.raises(LinalgError, match="empty"):
        gram_factorized_svd([torch.zeros(10, 0, dtype=F64)], [torch.zeros(0, 6, dtype=F64)])
    with pytest.raises(LinalgError, match="unknown factorized SVD method"):
        factorized_svd(up, down, method="householder")  # type: ignore[arg-type]
    with pytest.raises(LinalgError, match="unknown factorized SVD method"):
        factorized_svd_batched([up], [down], method="svd")  # type: ignore[arg-type]


def test_resolution() -> None:
    assert gram_resolution(F32) == pytest.approx(3.45e-4, rel=1e-2)
    assert gram_resolution(F64) == pytest.approx(1.49e-8, rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu() -> None:
    ups = [randn(64, 16, seed=130 + i) for i in range(3)]
    downs = [randn(16, 81, seed=140 + i) for i in range(3)]
    cpu = gram_factorized_svd(ups, downs, [0.5] * 3)
    gpu = gram_factorized_svd([u.cuda() for u in ups], [d.cuda() for d in downs], [0.5] * 3)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.S.device.type == "cuda"
        torch.testing.assert_close(b.S.cpu(), a.S, rtol=1e-10, atol=1e-12)
