"""Factorized, exact, randomized and low-rank SVDs against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from lorasmith.linalg import (
    SVD,
    FactorizedMethod,
    LinalgError,
    RandomizedSVD,
    choose_svd_method,
    discarded_rel_error,
    exact_svd,
    factorized_svd,
    factorized_svd_batched,
    fold_tucker,
    lowrank_svd,
    randomized_svd,
)

F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def dense_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Reference delta, as a 2-D [out, in*kh*kw] matrix, computed the straightforward way."""
    out = up.shape[0]
    up2 = up.reshape(out, -1)
    if mid is None:
        return scale * (up2 @ down.reshape(down.shape[0], -1))
    down2 = down.reshape(down.shape[0], -1)
    # LyCORIS' Tucker formula, with up transposed to [r, out] as LyCORIS stores its factor.
    w = torch.einsum("ijkl,jr,ip->prkl", mid, down2, up2.T)
    return scale * w.reshape(out, -1)


def assert_is_svd_of(svd: SVD, dense: torch.Tensor, k: int) -> None:
    ref = torch.linalg.svdvals(dense)
    s0 = float(ref[0])
    assert svd.rank == k
    assert svd.U.shape == (dense.shape[0], k)
    assert svd.Vh.shape == (k, dense.shape[1])
    # Singular values equal the dense ones (relative to the largest: rank-deficient tails are ~0).
    torch.testing.assert_close(svd.S, ref[:k], rtol=0, atol=1e-10 * s0)
    assert bool((svd.S[:-1] >= svd.S[1:]).all())
    torch.testing.assert_close(svd.reconstruct(), dense, rtol=0, atol=1e-10 * s0)
    eye = torch.eye(k, dtype=dense.dtype)
    torch.testing.assert_close(svd.U.T @ svd.U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, eye, rtol=0, atol=1e-10)


def assert_canonical_signs(svd: SVD) -> None:
    pivots = svd.U.gather(0, svd.U.abs().argmax(dim=0, keepdim=True))
    assert bool((pivots >= 0).all())


# (up shape, down shape, mid shape or None)
CASES = {
    "linear": ((40, 8), (8, 30), None),
    "conv1x1": ((40, 8, 1, 1), (8, 30, 1, 1), None),
    "conv3x3": ((24, 8, 1, 1), (8, 12, 3, 3), None),
    "tucker3x3": ((24, 6, 1, 1), (5, 12, 1, 1), (6, 5, 3, 3)),
    "tucker_2d_factors": ((24, 6), (5, 12), (6, 5, 3, 3)),
    "rank_above_out": ((5, 8), (8, 30), None),
    "rank_above_in": ((40, 8), (8, 4), None),
    "rank_above_both": ((5, 16), (16, 3), None),
    "conv_rank_above_out": ((4, 8, 1, 1), (8, 3, 3, 3), None),
}


@pytest.mark.parametrize("method", ["gram", "qr"])
@pytest.mark.parametrize("scale", [1.0, 0.37, -1.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_factorized_svd_matches_dense(case: str, scale: float, method: FactorizedMethod) -> None:
    up_shape, down_shape, mid_shape = CASES[case]
    up = randn(*up_shape, seed=1)
    down = randn(*down_shape, seed=2)
    mid = None if mid_shape is None else randn(*mid_shape, seed=3)
    dense = dense_delta(up, down, mid, scale)
    svd = factorized_svd(up, down, mid, scale=scale, method=method)
    r = up_shape[1]
    assert_is_svd_of(svd, dense, min(r, dense.shape[0], dense.shape[1]))
    assert_canonical_signs(svd)
    assert svd.rel_error == 0.0
    assert svd.fro_norm == pytest.approx(float(dense.norm()), rel=1e-12)
    if mid_shape is not None:
        assert svd.kernel == mid_shape[2:]
    elif len(down_shape) == 4:
        assert svd.kernel == down_shape[2:]
    else:
        assert svd.kernel is None


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_factorized_svd_float32_and_dtype_kept(method: FactorizedMethod) -> None:
    up = randn(64, 16, seed=4, dtype=torch.float32)
    down = randn(16, 48, seed=5, dtype=torch.float32)
    svd = factorized_svd(up, down, scale=0.5, method=method)
    assert svd.U.dtype == svd.S.dtype == svd.Vh.dtype == torch.float32
    ref = torch.linalg.svdvals(0.5 * up.double() @ down.double())
    torch.testing.assert_close(svd.S.double(), ref[:16], rtol=0, atol=1e-5 * float(ref[0]))


def test_fold_tucker_is_equivalent_pair() -> None:
    up = randn(10, 4, 1, 1, seed=6)
    mid = randn(4, 3, 3, 3, seed=7)
    down = randn(3, 5, 1, 1, seed=8)
    up2, down2 = fold_tucker(up, mid, down)
    assert up2.shape == (10, 4)
    assert down2.shape == (4, 5 * 9)
    torch.testing.assert_close(up2 @ down2, dense_delta(up, down, mid, 1.0), rtol=0, atol=1e-12)


def test_to_lora_shapes_and_sqrt_split() -> None:
    up = randn(24, 8, 1, 1, seed=9)
    down = randn(8, 6, 3, 3, seed=10)
    svd = factorized_svd(up, down, scale=0.25)
    new_up, new_down = svd.to_lora(5)
    assert new_up.shape == (24, 5, 1, 1)
    assert new_down.shape == (5, 6, 3, 3)
    # sqrt split: the column norms of up equal the row norms of down, each sqrt(S_i).
    root = svd.S[:5].sqrt()
    torch.testing.assert_close(new_up.reshape(24, 5).norm(dim=0), root)
    torch.testing.assert_close(new_down.reshape(5, -1).norm(dim=1), root)
    product = new_up.reshape(24, 5) @ new_down.reshape(5, -1)
    truncated = svd.truncate(5)
    torch.testing.assert_close(product, truncated.reconstruct(), rtol=0, atol=1e-12)
    # The truncation's error is exactly the discarded tail.
    dense = dense_delta(up, down, None, 0.25)
    true_error = float((dense - product).norm() / dense.norm())
    assert truncated.rel_error == pytest.approx(true_error, rel=1e-9)
    assert truncated.rel_error == pytest.approx(discarded_rel_error(svd.S, 5), rel=1e-12)


def test_to_lora_linear_and_explicit_kernel() -> None:
    m = randn(12, 20, seed=11)
    svd = exact_svd(m)
    up, down = svd.to_lora()
    assert up.shape == (12, 12)
    assert down.shape == (12, 20)
    torch.testing.assert_close(up @ down, m, rtol=0, atol=1e-12)
    up4, down4 = svd.to_lora(3, kernel=(2, 2))
    assert up4.shape == (12, 3, 1, 1)
    assert down4.shape == (3, 5, 2, 2)
    with pytest.raises(LinalgError, match="does not divide"):
        svd.to_lora(3, kernel=(3, 3))
    with pytest.raises(LinalgError):
        svd.truncate(0)
    assert svd.truncate(100) is svd


def test_truncate_composes_errors() -> None:
    m = randn(30, 20, seed=12)
    svd = exact_svd(m)
    once = svd.truncate(10).truncate(4)
    direct = svd.truncate(4)
    assert once.rel_error == pytest.approx(direct.rel_error, rel=1e-12)
    approx = once.reconstruct()
    assert once.rel_error == pytest.approx(float((m - approx).norm() / m.norm()), rel=1e-9)


def test_factorized_svd_input_errors() -> None:
    up = randn(10, 4, seed=13)
    down = randn(4, 6, seed=14)
    with pytest.raises(LinalgError, match="rank mismatch"):
        factorized_svd(up, randn(3, 6, seed=15))
    with pytest.raises(LinalgError, match="float32 or float64"):
        factorized_svd(up.half(), down.half())
    with pytest.raises(LinalgError, match="mixed dtypes"):
        factorized_svd(up, down.float())
    with pytest.raises(LinalgError, match="lora_up"):
        factorized_svd(randn(10, 4, 3, 3, seed=16), down)
    with pytest.raises(LinalgError, match="Tucker ranks"):
        factorized_svd(up, randn(3, 6, seed=17), randn(4, 4, 3, 3, seed=18))
    with pytest.raises(LinalgError, match="lora_mid"):
        factorized_svd(up, randn(3, 6, seed=17), randn(4, 3, 3, seed=18))
    with pytest.raises(LinalgError, match="1, 1"):
        factorized_svd(up, randn(3, 6, 3, 3, seed=17), randn(4, 3, 3, 3, seed=18))


def test_exact_svd_conv_and_errors() -> None:
    w = randn(8, 4, 3, 3, seed=19)
    svd = exact_svd(w)
    assert svd.kernel == (3, 3)
    assert_is_svd_of(svd, w.reshape(8, -1), 8)
    with pytest.raises(LinalgError, match="2-D"):
        exact_svd(randn(3, 3, 3, seed=20))
    with pytest.raises(LinalgError, match="empty"):
        exact_svd(torch.zeros(0, 4, dtype=F64))
    with pytest.raises(LinalgError, match="float32 or float64"):
        exact_svd(torch.zeros(3, 4, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------ randomized


def planted(
    rows: int, cols: int, rank: int, noise: float, seed: int, dtype: torch.dtype = F64
) -> torch.Tensor:
    """A rank-``rank`` matrix with singular values 10 .. 1 plus Gaussian noise of relative size ``noise``."""
    u, _ = torch.linalg.qr(randn(rows, rank, seed=seed))
    v, _ = torch.linalg.qr(randn(cols, rank, seed=seed + 1))
    s = torch.logspace(1, 0, rank, dtype=F64)
    m = (u * s) @ v.T + noise * randn(rows, cols, seed=seed + 2) / (rows * cols) ** 0.5 * float(s.norm())
    out: torch.Tensor = m.to(dtype)
    return out


def test_randomized_svd_reproducible_with_seed() -> None:
    m = planted(300, 200, 10, 1e-2, seed=21)
    a = randomized_svd(m, 12, seed=7)
    b = randomized_svd(m, 12, seed=7)
    assert torch.equal(a.U, b.U)
    assert torch.equal(a.S, b.S)
    assert torch.equal(a.Vh, b.Vh)
    assert a.rel_error == b.rel_error
    c = randomized_svd(m, 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.S, c.S)
    d = randomized_svd(m, 12, seed=8)
    assert not torch.equal(a.U, d.U)
    # Different sketches agree on the dominant (well separated) singular values.
    torch.testing.assert_close(a.S[:10], d.S[:10], rtol=1e-6, atol=0)
    # No seed and no generator: the default seed, still deterministic.
    assert torch.equal(randomized_svd(m, 12).S, randomized_svd(m, 12).S)


def test_randomized_svd_error_estimate_matches_true_error() -> None:
    m = planted(300, 200, 10, 5e-2, seed=22)
    for rank in (5, 10, 14):
        svd = randomized_svd(m, rank, seed=1)
        assert isinstance(svd, RandomizedSVD)
        assert svd.rank == rank
        assert svd.sketch_size == rank + 8
        true_error = float((m - svd.reconstruct()).norm() / m.norm())
        assert svd.rel_error == pytest.approx(true_error, rel=1e-6)
        # Close to the optimal (Eckart-Young) error of a rank-`rank` approximation.
        optimal = discarded_rel_error(torch.linalg.svdvals(m), rank)
        assert optimal * (1 - 1e-9) <= true_error <= 1.01 * optimal


def test_randomized_svd_near_exact_for_planted_rank() -> None:
    m = planted(300, 200, 10, 0.0, seed=23)
    svd = randomized_svd(m, 10, seed=3)
    assert float((m - svd.reconstruct()).norm() / m.norm()) < 1e-12
    # The cheap estimate resolves errors down to about sqrt(eps) only.
    assert svd.rel_error < 1e-6
    torch.testing.assert_close(svd.S, torch.logspace(1, 0, 10, dtype=F64), rtol=1e-10, atol=0)
    assert_canonical_signs(svd)


def test_randomized_svd_float32_estimate() -> None:
    m = planted(256, 192, 8, 5e-2, seed=24, dtype=torch.float32)
    svd = randomized_svd(m, 8, seed=0)
    assert svd.S.dtype == torch.float32
    true_error = float((m.double() - svd.reconstruct().double()).norm() / m.double().norm())
    assert svd.rel_error == pytest.approx(true_error, abs=2e-3)


def test_randomized_svd_float32_small_error_is_not_lost() -> None:
    """A 1% error is a 1e-4 difference of squares: a float32 norm of the matrix used to report 0."""
    m = planted(1280, 1280, 64, 1e-2, seed=3, dtype=torch.float32)
    svd = randomized_svd(m, 64, seed=0)
    true_error = float((m.double() - svd.reconstruct().double()).norm() / m.double().norm())
    assert true_error > 5e-3
    assert svd.rel_error == pytest.approx(true_error, rel=0.05)


def test_randomized_svd_caps_and_conv() -> None:
    w = randn(6, 2, 3, 3, seed=25)
    svd = randomized_svd(w, 50, seed=0)
    assert svd.rank == 6
    assert svd.kernel == (3, 3)
    # The sketch spans the whole column space: exact.
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(w.reshape(6, -1)), rtol=1e-10, atol=0)
    assert svd.rel_error < 1e-6
    zero = randomized_svd(torch.zeros(20, 10, dtype=F64), 3)
    assert zero.rel_error == 0.0
    assert bool((zero.S == 0).all())


def test_randomized_svd_parameter_errors() -> None:
    m = randn(20, 10, seed=26)
    with pytest.raises(LinalgError, match="not both"):
        randomized_svd(m, 3, seed=1, generator=torch.Generator())
    with pytest.raises(LinalgError, match="at least 1"):
        randomized_svd(m, 0)
    with pytest.raises(LinalgError, match="oversample"):
        randomized_svd(m, 3, oversample=-1)
    with pytest.raises(LinalgError, match="n_iter"):
        randomized_svd(m, 3, n_iter=-1)


# ------------------------------------------------------------------------------------------- low rank


def test_choose_svd_method() -> None:
    assert choose_svd_method(512, 300, 16) == "randomized"
    assert choose_svd_method(300, 512, 74) == "randomized"
    assert choose_svd_method(300, 512, 75) == "exact"  # 4 * 75 == 300 is not small against 300
    assert choose_svd_method(255, 4096, 8) == "exact"  # small matrix: dense SVD is cheap
    assert choose_svd_method(256, 4096, 8) == "randomized"


def test_lowrank_svd_auto_choice_and_errors() -> None:
    m = planted(512, 300, 12, 1e-2, seed=27)
    auto = lowrank_svd(m, 16, seed=2)
    assert isinstance(auto, RandomizedSVD)
    assert auto.rank == 16
    exact = lowrank_svd(m, 16, method="exact")
    assert not isinstance(exact, RandomizedSVD)
    ref = torch.linalg.svdvals(m)
    assert exact.rel_error == pytest.approx(discarded_rel_error(ref, 16), rel=1e-10)
    true_error = float((m - exact.reconstruct()).norm() / m.norm())
    assert exact.rel_error == pytest.approx(true_error, rel=1e-8)
    assert auto.rel_error == pytest.approx(exact.rel_error, rel=1e-2)
    big_rank = lowrank_svd(m, 200)
    assert not isinstance(big_rank, RandomizedSVD)
    assert big_rank.rank == 200
    forced = lowrank_svd(m, 100, method="randomized", seed=0, n_iter=1)
    assert isinstance(forced, RandomizedSVD)
    assert forced.n_iter == 1
    assert lowrank_svd(m[:40, :30], 1000).rank == 30
    with pytest.raises(LinalgError, match="unknown SVD method"):
        lowrank_svd(m, 4, method="dense")  # type: ignore[arg-type]
    with pytest.raises(LinalgError, match="at least 1"):
        lowrank_svd(m, 0)


# -------------------------------------------------------------------------------------------- batched


@pytest.mark.parametrize("method", ["gram", "qr"])
@pytest.mark.parametrize("case", ["linear", "conv3x3", "tucker3x3", "rank_above_out"])
def test_batched_equals_loop(case: str, method: FactorizedMethod) -> None:
    up_shape, down_shape, mid_shape = CASES[case]
    count = 5
    ups = [randn(*up_shape, seed=100 + i) for i in range(count)]
    downs = [randn(*down_shape, seed=200 + i) for i in range(count)]
    mids = None if mid_shape is None else [randn(*mid_shape, seed=300 + i) for i in range(count)]
    scales = [0.5, -1.0, 2.0, 1.0, 0.125]
    batched = factorized_svd_batched(ups, downs, mids, scales, method=method)
    assert len(batched) == count
    for i, got in enumerate(batched):
        mid = None if mids is None else mids[i]
        want = factorized_svd(ups[i], downs[i], mid, scale=scales[i], method=method)
        torch.testing.assert_close(got.S, want.S, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.U, want.U, rtol=0, atol=1e-10)
        torch.testing.assert_close(got.Vh, want.Vh, rtol=0, atol=1e-10)
        assert got.kernel == want.kernel
        assert got.fro_norm == pytest.approx(want.fro_norm, rel=1e-12)
        assert got.rel_error == 0.0


def test_batched_single_scale_and_errors() -> None:
    ups = [randn(10, 4, seed=i) for i in range(3)]
    downs = [randn(4, 7, seed=10 + i) for i in range(3)]
    batched = factorized_svd_batched(ups, downs, scales=0.5)
    for up, down, got in zip(ups, downs, batched, strict=True):
        torch.testing.assert_close(got.reconstruct(), 0.5 * up @ down, rtol=0, atol=1e-12)
    assert factorized_svd_batched([], []) == []
    with pytest.raises(LinalgError, match="one shape"):
        factorized_svd_batched([*ups, randn(11, 4, seed=99)], [*downs, randn(4, 7, seed=98)])
    with pytest.raises(LinalgError, match="lora_down"):
        factorized_svd_batched(ups, downs[:2])
    with pytest.raises(LinalgError, match="scales"):
        factorized_svd_batched(ups, downs, scales=[1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    up = randn(64, 16, seed=30)
    down = randn(16, 9, 3, 3, seed=31)
    cpu = factorized_svd(up, down, scale=0.5)
    gpu = factorized_svd(up.cuda(), down.cuda(), scale=0.5)
    assert gpu.S.device.type == "cuda"
    torch.testing.assert_close(gpu.S.cpu(), cpu.S, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.U.cpu(), cpu.U, rtol=0, atol=1e-9)
    batched = factorized_svd_batched([up.cuda()] * 3, [down.cuda()] * 3, scales=0.5)
    torch.testing.assert_close(batched[2].U.cpu(), cpu.U, rtol=0, atol=1e-9)
    m = planted(300, 256, 8, 1e-2, seed=32)
    rcpu = randomized_svd(m, 8, seed=5)
    rgpu = randomized_svd(m.cuda(), 8, seed=5)
    torch.testing.assert_close(rgpu.S.cpu(), rcpu.S, rtol=1e-9, atol=0)
    assert rgpu.rel_error == pytest.approx(rcpu.rel_error, rel=1e-6)
