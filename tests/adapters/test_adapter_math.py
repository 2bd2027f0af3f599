"""Every algorithm's delta/apply against an independent dense float64 reference.

The references are written straight from the formulas (explicit loops over kernel positions, torch.kron,
dense block-diagonal and permutation matrices), never by calling the package's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lorasmith.adapters import parse_module

F64 = torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rnd(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def block_diag(blocks: Tensor) -> Tensor:
    """Dense block-diagonal matrix of ``blocks [n, b, b]``, built by hand."""
    n, b, _ = blocks.shape
    out = torch.zeros(n * b, n * b, dtype=blocks.dtype)
    for i in range(n):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = blocks[i]
    return out


def close(a: Tensor, b: Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("alpha_kind", ["0d", "1d", "none", "zero"])
def test_lora_linear(gen: torch.Generator, alpha_kind: str) -> None:
    out, inp, r = 7, 5, 3
    up, down = rnd(gen, out, r), rnd(gen, r, inp)
    t = {".lora_up.weight": up, ".lora_down.weight": down}
    g = 1.0
    if alpha_kind == "0d":
        t[".alpha"] = torch.tensor(2.0)
        g = 2.0 / r
    elif alpha_kind == "1d":
        t[".alpha"] = torch.tensor([6.0])
        g = 6.0 / r
    elif alpha_kind == "zero":
        t[".alpha"] = torch.tensor(0.0)  # trainers read alpha 0 as alpha = rank
    m = parse_module("m", t)
    assert m.algo == "lora"
    assert m.rank == r
    assert m.scale == pytest.approx(g)
    assert m.alpha == (None if alpha_kind == "none" else float(t[".alpha"].reshape(())))
    assert not m.needs_base
    assert (m.out_features, m.in_features, m.kernel) == (out, inp, None)
    ref = g * (up @ down)
    close(m.delta(dtype=F64), ref)
    base = rnd(gen, out, inp)
    close(m.apply(base, 0.7), base + 0.7 * ref)
    assert m.apply(base).dtype == F64
    assert m.apply(base.float()).dtype == torch.float32


def conv_ref(up: Tensor, down: Tensor, g: float) -> Tensor:
    out, r = up.shape[0], up.shape[1]
    _, inp, kh, kw = down.shape
    ref = torch.zeros(out, inp, kh, kw, dtype=F64)
    for ky in range(kh):
        for kx in range(kw):
            ref[:, :, ky, kx] = g * (up.reshape(out, r) @ down[:, :, ky, kx])
    return ref


@pytest.mark.parametrize("k", [1, 3])
def test_locon_conv(gen: torch.Generator, k: int) -> None:
    out, inp, r = 6, 4, 2
    up, down = rnd(gen, out, r, 1, 1), rnd(gen, r, inp, k, k)
    m = parse_module("conv", {".lora_up.weight": up, ".lora_down.weight": down, ".alpha": torch.tensor(1.0)})
    assert m.kernel == (k, k)
    ref = conv_ref(up, down, 1.0 / r)
    close(m.delta(dtype=F64), ref)
    low = m.lowrank()
    assert low is not None
    close(low.fold(F64).dense(F64), ref)
    base = rnd(gen, out, inp, k, k)
    close(m.apply(base, -0.5), base - 0.5 * ref)


def test_locon_tucker(gen: torch.Generator) -> None:
    out, inp, r = 6, 5, 3
    up, mid, down = rnd(gen, out, r, 1, 1), rnd(gen, r, r, 3, 3), rnd(gen, r, inp, 1, 1)
    m = parse_module(
        "t",
        {
            ".lora_up.weight": up,
            ".lora_mid.weight": mid,
            ".lora_down.weight": down,
            ".alpha": torch.tensor(4.0),
        },
    )
    assert m.algo == "locon-tucker"
    assert m.kernel == (3, 3)
    g = 4.0 / r
    ref = torch.zeros(out, inp, 3, 3, dtype=F64)
    for ky in range(3):
        for kx in range(3):
            ref[:, :, ky, kx] = g * up.reshape(out, r) @ mid[:, :, ky, kx] @ down.reshape(r, inp)
    close(m.delta(dtype=F64), ref)
    low = m.lowrank()
    assert low is not None
    assert low.mid is not None
    folded = low.fold(F64)
    assert folded.mid is None
    assert tuple(folded.down.shape) == (r, inp * 9)
    assert folded.rank == r
    close((folded.scale * folded.up.double() @ folded.down).reshape(ref.shape), ref)
    close(folded.dense(F64), ref)


def test_linear_as_conv1x1(gen: torch.Generator) -> None:
    """SD2 style: the LoRA is 4-D 1x1 while the base weight is 2-D (and the reverse)."""
    out, inp, r = 5, 4, 2
    up, down = rnd(gen, out, r, 1, 1), rnd(gen, r, inp, 1, 1)
    m = parse_module("x", {".lora_up.weight": up, ".lora_down.weight": down})
    ref = up.reshape(out, r) @ down.reshape(r, inp)
    assert tuple(m.delta(dtype=F64).shape) == (out, inp, 1, 1)
    close(m.delta(shape=(out, inp), dtype=F64), ref)
    base = rnd(gen, out, inp)
    close(m.apply(base), base + ref)
    m2 = parse_module("y", {".lora_up.weight": up.reshape(out, r), ".lora_down.weight": down.reshape(r, inp)})
    close(m2.delta(shape=(out, inp, 1, 1), dtype=F64), ref.reshape(out, inp, 1, 1))


# ------------------------------------------------------------------------------------------------ LoHa
def test_loha_linear(gen: torch.Generator) -> None:
    out, inp, r = 6, 5, 3
    w1a, w1b, w2a, w2b = rnd(gen, out, r), rnd(gen, r, inp), rnd(gen, out, r), rnd(gen, r, inp)
    m = parse_module(
        "h",
        {
            ".hada_w1_a": w1a,
            ".hada_w1_b": w1b,
            ".hada_w2_a": w2a,
            ".hada_w2_b": w2b,
            ".alpha": torch.tensor([1.5]),
        },
    )
    assert m.algo == "loha"
    assert m.rank == r
    ref = (1.5 / r) * (w1a @ w1b) * (w2a @ w2b)
    close(m.delta(dtype=F64), ref)
    assert m.lowrank() is None
    base = rnd(gen, out, inp)
    close(m.apply(base, 0.3), base + 0.3 * ref)


def test_loha_conv_flattened(gen: torch.Generator) -> None:
    out, inp, r = 4, 3, 2
    w1a, w1b, w2a, w2b = rnd(gen, out, r), rnd(gen, r, inp * 9), rnd(gen, out, r), rnd(gen, r, inp * 9)
    m = parse_module("h", {".hada_w1_a": w1a, ".hada_w1_b": w1b, ".hada_w2_a": w2a, ".hada_w2_b": w2b})
    flat = (w1a @ w1b) * (w2a @ w2b)
    ref = torch.zeros(out, inp, 3, 3, dtype=F64)
    for c in range(inp):
        for ky in range(3):
            for kx in range(3):
                ref[:, c, ky, kx] = flat[:, c * 9 + ky * 3 + kx]
    base = rnd(gen, out, inp, 3, 3)
    close(m.delta(base, dtype=F64), ref)
    close(m.apply(base), base + ref)


def test_loha_tucker(gen: torch.Generator) -> None:
    out, inp, r = 5, 4, 3
    t1, t2 = rnd(gen, r, r, 3, 3), rnd(gen, r, r, 3, 3)
    w1a, w1b, w2a, w2b = rnd(gen, r, out), rnd(gen, r, inp), rnd(gen, r, out), rnd(gen, r, inp)
    m = parse_module(
        "h",
        {
            ".hada_w1_a": w1a,
            ".hada_w1_b": w1b,
            ".hada_w2_a": w2a,
            ".hada_w2_b": w2b,
            ".hada_t1": t1,
            ".hada_t2": t2,
            ".alpha": torch.tensor(2.0),
        },
    )
    assert m.kernel == (3, 3)
    ref = torch.zeros(out, inp, 3, 3, dtype=F64)
    for ky in range(3):
        for kx in range(3):
            p1 = w1a.T @ t1[:, :, ky, kx] @ w1b
            p2 = w2a.T @ t2[:, :, ky, kx] @ w2b
            ref[:, :, ky, kx] = (2.0 / r) * p1 * p2
    close(m.delta(dtype=F64), ref)


# ------------------------------------------------------------------------------------------------ LoKr
def test_lokr_full_factors(gen: torch.Generator) -> None:
    w1, w2 = rnd(gen, 2, 3), rnd(gen, 4, 5)
    m = parse_module("k", {".lokr_w1": w1, ".lokr_w2": w2, ".alpha": torch.tensor(8.0)})
    assert m.algo == "lokr"
    assert m.rank is None
    assert m.scale == 1.0  # both factors full: alpha is ignored
    assert (m.out_features, m.in_features) == (8, 15)
    close(m.delta(dtype=F64), torch.kron(w1, w2))


def test_lokr_factored(gen: torch.Generator) -> None:
    r = 2
    w1a, w1b = rnd(gen, 2, r), rnd(gen, r, 3)
    w2a, w2b = rnd(gen, 4, r), rnd(gen, r, 5)
    m = parse_module(
        "k",
        {
            ".lokr_w1_a": w1a,
            ".lokr_w1_b": w1b,
            ".lokr_w2_a": w2a,
            ".lokr_w2_b": w2b,
            ".alpha": torch.tensor(1.0),
        },
    )
    assert m.rank == r
    close(m.delta(dtype=F64), 0.5 * torch.kron(w1a @ w1b, w2a @ w2b))
    # only w1 factored: the rank is w1's
    m1 = parse_module(
        "k", {".lokr_w1_a": w1a, ".lokr_w1_b": w1b, ".lokr_w2": w2a @ w2b, ".alpha": torch.tensor(1.0)}
    )
    assert m1.rank == r
    close(m1.delta(dtype=F64), 0.5 * torch.kron(w1a @ w1b, w2a @ w2b))


def lokr_conv_ref(w1: Tensor, w2: Tensor) -> Tensor:
    a, c = w1.shape
    b, d, kh, kw = w2.shape
    ref = torch.zeros(a * b, c * d, kh, kw, dtype=F64)
    for i in range(a):
        for j in range(c):
            ref[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return ref


def test_lokr_conv(gen: torch.Generator) -> None:
    w1, w2 = rnd(gen, 2, 3), rnd(gen, 4, 2, 3, 3)
    m = parse_module("k", {".lokr_w1": w1, ".lokr_w2": w2})
    assert m.kernel == (3, 3)
    close(m.delta(dtype=F64), lokr_conv_ref(w1, w2))
    # factored conv w2 stored flattened [r, d*k*k]: needs the target shape
    r = 2
    w2a, w2b = rnd(gen, 4, r), rnd(gen, r, 2 * 9)
    mf = parse_module(
        "k", {".lokr_w1": w1, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": torch.tensor(3.0)}
    )
    ref = 1.5 * lokr_conv_ref(w1, (w2a @ w2b).reshape(4, 2, 3, 3))
    close(mf.delta(shape=(8, 6, 3, 3), dtype=F64), ref)


def test_lokr_tucker(gen: torch.Generator) -> None:
    r = 2
    w1 = rnd(gen, 2, 3)
    t2, w2a, w2b = rnd(gen, r, r, 3, 3), rnd(gen, r, 4), rnd(gen, r, 5)
    m = parse_module(
        "k",
        {".lokr_w1": w1, ".lokr_t2": t2, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": torch.tensor(1.0)},
    )
    w2 = torch.zeros(4, 5, 3, 3, dtype=F64)
    for ky in range(3):
        for kx in range(3):
            w2[:, :, ky, kx] = w2a.T @ t2[:, :, ky, kx] @ w2b
    close(m.delta(dtype=F64), 0.5 * lokr_conv_ref(w1, w2))


# ------------------------------------------------------------------------------------------ full, norm
def test_full_and_norm(gen: torch.Generator) -> None:
    diff, db = rnd(gen, 4, 3, 3, 3), rnd(gen, 4)
    m = parse_module("f", {".diff": diff, ".diff_b": db})
    assert m.algo == "full"
    close(m.delta(dtype=F64), diff)
    bd = m.bias_delta(F64)
    assert bd is not None
    close(bd, db)
    base = rnd(gen, 4, 3, 3, 3)
    close(m.apply(base, 2.0), base + 2 * diff)
    wn, bn = rnd(gen, 6), rnd(gen, 6)
    n = parse_module("n", {".w_norm": wn, ".b_norm": bn})
    assert n.algo == "norm"
    close(n.delta(dtype=F64), wn)
    nb = n.bias_delta(F64)
    assert nb is not None
    close(nb, bn)


# ------------------------------------------------------------------------------------------------ DoRA
def dora_ref(base: Tensor, dw: Tensor, m: Tensor, axis: int, ratio: float) -> Tensor:
    full = base + dw
    if axis == 0:
        norms = full.reshape(full.shape[0], -1).norm(dim=1)
        shape = [full.shape[0]] + [1] * (full.ndim - 1)
    else:
        norms = full.transpose(0, 1).reshape(full.shape[1], -1).norm(dim=1)
        shape = [1, full.shape[1]] + [1] * (full.ndim - 2)
    decomposed: Tensor = full * (m.reshape(shape) / norms.reshape(shape))
    return base + ratio * (decomposed - base)


@pytest.mark.parametrize(("mag_shape", "axis"), [((7, 1), 0), ((1, 5), 1), ((7,), 0)])
def test_dora_linear(gen: torch.Generator, mag_shape: tuple[int, ...], axis: int) -> None:
    out, inp, r = 7, 5, 2
    up, down = rnd(gen, out, r), rnd(gen, r, inp)
    mag = rnd(gen, *mag_shape).abs() + 0.5
    m = parse_module(
        "d",
        {".lora_up.weight": up, ".lora_down.weight": down, ".alpha": torch.tensor(1.0), ".dora_scale": mag},
    )
    assert m.dora_axis == axis
    assert m.needs_base
    assert m.lowrank() is None
    base = rnd(gen, out, inp)
    dw = 0.5 * up @ down
    for ratio in (1.0, 0.4, 0.0):
        close(m.apply(base, ratio), dora_ref(base, dw, mag, axis, ratio))
    close(m.delta(base, dtype=F64), dora_ref(base, dw, mag, axis, 1.0) - base)


def test_dora_peft_magnitude_and_conv(gen: torch.Generator) -> None:
    out, inp, r = 6, 4, 2
    a, b = rnd(gen, r, inp), rnd(gen, out, r)
    mag = rnd(gen, out).abs() + 0.1
    m = parse_module("p", {".lora_A.weight": a, ".lora_B.weight": b, ".lora_magnitude_vector": mag})
    assert m.dora_axis == 0
    base = rnd(gen, out, inp)
    close(m.apply(base), dora_ref(base, b @ a, mag, 0, 1.0))
    # conv 3x3, per-output-row magnitude [out, 1, 1, 1] and per-input-column [1, in, 1, 1]
    up, down = rnd(gen, out, r, 1, 1), rnd(gen, r, inp, 3, 3)
    cbase = rnd(gen, out, inp, 3, 3)
    dw = conv_ref(up, down, 1.0)
    for shape, axis in (((out, 1, 1, 1), 0), ((1, inp, 1, 1), 1)):
        mag4 = rnd(gen, *shape).abs() + 0.1
        mc = parse_module("c", {".lora_up.weight": up, ".lora_down.weight": down, ".dora_scale": mag4})
        assert mc.dora_axis == axis
        close(mc.apply(cbase, 0.6), dora_ref(cbase, dw, mag4, axis, 0.6))


def test_dora_on_loha(gen: torch.Generator) -> None:
    out, inp, r = 5, 4, 2
    w = {
        k: rnd(gen, *s)
        for k, s in (
            (".hada_w1_a", (out, r)),
            (".hada_w1_b", (r, inp)),
            (".hada_w2_a", (out, r)),
            (".hada_w2_b", (r, inp)),
        )
    }
    mag = rnd(gen, out, 1).abs()
    m = parse_module("h", {**w, ".dora_scale": mag})
    base = rnd(gen, out, inp)
    dw = (w[".hada_w1_a"] @ w[".hada_w1_b"]) * (w[".hada_w2_a"] @ w[".hada_w2_b"])
    close(m.apply(base), dora_ref(base, dw, mag, 0, 1.0))


# ------------------------------------------------------------------------------------------------- OFT
def cayley_ref(blocks: Tensor, constraint: float) -> Tensor:
    q = blocks - blocks.transpose(-1, -2)
    n = math.sqrt(float((q**2).sum()))
    if constraint > 0 and n > constraint:
        q = q * constraint / n
    eye = torch.eye(q.shape[-1], dtype=F64)
    stacked: Tensor = torch.stack(
        [(eye + qi) @ torch.linalg.inv(eye - qi) for qi in q.reshape(-1, *q.shape[-2:])]
    ).reshape(q.shape)
    return stacked


@pytest.mark.parametrize("alpha", [None, 1e-3, 10.0])
@pytest.mark.parametrize("conv", [False, True])
def test_oft(gen: torch.Generator, alpha: float | None, conv: bool) -> None:
    n, b, inp = 3, 4, 5
    out = n * b
    blocks = 0.3 * rnd(gen, n, b, b)
    t = {".oft_blocks": blocks}
    if alpha is not None:
        t[".alpha"] = torch.tensor(alpha, dtype=F64)
    m = parse_module("o", t)
    assert m.algo == "oft"
    assert m.needs_base
    assert m.out_features == out
    base = rnd(gen, out, inp, 3, 3) if conv else rnd(gen, out, inp)
    c = alpha * out if alpha else 0.0
    r = cayley_ref(blocks, c)
    w2 = base.reshape(out, -1)
    for ratio in (1.0, 0.5):
        rr = torch.eye(b, dtype=F64) + ratio * (r - torch.eye(b, dtype=F64))
        big = block_diag(rr)
        ref = (big.T @ w2).reshape(base.shape)  # trainers apply R^T to each block of rows
        close(m.apply(base, ratio), ref)
    close(m.delta(base, dtype=F64), (block_diag(r).T @ w2).reshape(base.shape) - base)
    with pytest.raises(Exception, match="depends on the base weight"):
        m.delta()


def test_oft_rescale_and_orthogonality(gen: torch.Generator) -> None:
    n, b, inp = 2, 3, 4
    out = n * b
    blocks, rescale = rnd(gen, n, b, b), rnd(gen, out, 1)
    m = parse_module("o", {".oft_blocks": blocks, ".rescale": rescale})
    base = rnd(gen, out, inp)
    r = cayley_ref(blocks, 0.0)
    rot = block_diag(r).T @ base
    close(m.apply(base), rot * rescale)
    close(m.apply(base, 0.0), base)
    half = block_diag(torch.eye(b, dtype=F64) + 0.5 * (r - torch.eye(b, dtype=F64))).T @ base
    close(m.apply(base, 0.5), half * (1 + 0.5 * (rescale - 1)))
    # without rescale, a full-strength OFT preserves every column's norm
    plain = parse_module("o", {".oft_blocks": blocks})
    close(plain.apply(base).norm(dim=0), base.norm(dim=0))


def boft_ref(blocks: Tensor, base: Tensor, constraint: float, ratio: float) -> Tensor:
    m, n, b, _ = blocks.shape
    out = n * b
    r = cayley_ref(blocks, constraint)
    eye_b = torch.eye(b, dtype=F64)
    total = torch.eye(out, dtype=F64)
    for i in range(m):
        k = 2**i * (b // 2)
        # P @ W puts original row (a*2k + g*k + j) at position (a*2k + 2*j + g)
        perm = torch.zeros(out, out, dtype=F64)
        for a in range(out // (2 * k)):
            for g in range(2):
                for j in range(k):
                    perm[a * 2 * k + 2 * j + g, a * 2 * k + g * k + j] = 1.0
        stage = block_diag(eye_b + ratio * (r[i] - eye_b))
        total = perm.T @ stage @ perm @ total
    return (total @ base.reshape(out, -1)).reshape(base.shape)


@pytest.mark.parametrize(("stages", "n", "b"), [(1, 4, 2), (2, 4, 2), (2, 2, 4), (3, 4, 2)])
def test_boft(gen: torch.Generator, stages: int, n: int, b: int) -> None:
    blocks = 0.4 * rnd(gen, stages, n, b, b)
    out = n * b
    m = parse_module("b", {".oft_blocks": blocks, ".alpha": torch.tensor(1e-2, dtype=F64)})
    assert m.algo == "boft"
    base = rnd(gen, out, 3)
    for ratio in (1.0, 0.3):
        close(m.apply(base, ratio), boft_ref(blocks, base, 1e-2 * out, ratio))
    cbase = rnd(gen, out, 2, 3, 3)
    close(m.apply(cbase), boft_ref(blocks, cbase, 1e-2 * out, 1.0))


# ----------------------------------------------------------------------------------------------- GLoRA
def test_glora_linear(gen: torch.Generator) -> None:
    out, inp, r = 6, 5, 2
    a1, a2, b1, b2 = rnd(gen, inp, r), rnd(gen, r, inp), rnd(gen, out, r), rnd(gen, r, inp)
    t = {".a1.weight": a1, ".a2.weight": a2, ".b1.weight": b1, ".b2.weight": b2, ".alpha": torch.tensor(1.0)}
    m = parse_module("g", t)
    assert m.algo == "glora"
    assert m.needs_base
    assert m.rank == r
    base = rnd(gen, out, inp)
    dw = 0.5 * (base @ a1 @ a2 + b1 @ b2)
    close(m.delta(base, dtype=F64), dw)
    close(m.apply(base, 0.25), base + 0.25 * dw)
    # the early-LyCORIS naming (a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]) gives the same delta
    old = {
        ".a1.weight": a2,
        ".a2.weight": a1,
        ".b1.weight": b2,
        ".b2.weight": b1,
        ".alpha": torch.tensor(1.0),
    }
    mo = parse_module("g", old)
    assert mo.summary.glora_layout == "lycoris-old"
    close(mo.delta(base, dtype=F64), dw)


def test_glora_conv(gen: torch.Generator) -> None:
    out, inp, r = 4, 3, 2
    a1, a2 = rnd(gen, inp, r, 1, 1), rnd(gen, r, inp, 1, 1)
    b1, b2 = rnd(gen, out, r, 1, 1), rnd(gen, r, inp, 3, 3)
    m = parse_module("g", {".a1.weight": a1, ".a2.weight": a2, ".b1.weight": b1, ".b2.weight": b2})
    base = rnd(gen, out, inp, 3, 3)
    ref = torch.zeros_like(base)
    for ky in range(3):
        for kx in range(3):
            ref[:, :, ky, kx] = (
                base[:, :, ky, kx] @ a1.reshape(inp, r) @ a2.reshape(r, inp)
                + b1.reshape(out, r) @ b2[:, :, ky, kx]
            )
    close(m.delta(base, dtype=F64), ref)
    # Tucker core bm with a 1x1 b2
    b2t, bm = rnd(gen, r, inp, 1, 1), rnd(gen, r, r, 3, 3)
    mt = parse_module(
        "g", {".a1.weight": a1, ".a2.weight": a2, ".b1.weight": b1, ".b2.weight": b2t, ".bm.weight": bm}
    )
    ref_t = torch.zeros_like(base)
    for ky in range(3):
        for kx in range(3):
            ref_t[:, :, ky, kx] = base[:, :, ky, kx] @ a1.reshape(inp, r) @ a2.reshape(r, inp) + b1.reshape(
                out, r
            ) @ bm[:, :, ky, kx] @ b2t.reshape(r, inp)
    close(mt.delta(base, dtype=F64), ref_t)


# ---------------------------------------------------------------------------------------------- devices
def _all_kinds(gen: torch.Generator) -> dict[str, dict[str, Tensor]]:
    out, inp, r = 8, 6, 2
    return {
        "lora": {".lora_up.weight": rnd(gen, out, r), ".lora_down.weight": rnd(gen, r, inp)},
        "dora": {
            ".lora_up.weight": rnd(gen, out, r),
            ".lora_down.weight": rnd(gen, r, inp),
            ".dora_scale": rnd(gen, out, 1).abs(),
        },
        "loha": {
            ".hada_w1_a": rnd(gen, out, r),
            ".hada_w1_b": rnd(gen, r, inp),
            ".hada_w2_a": rnd(gen, out, r),
            ".hada_w2_b": rnd(gen, r, inp),
        },
        "lokr": {".lokr_w1": rnd(gen, 2, 2), ".lokr_w2_a": rnd(gen, 4, r), ".lokr_w2_b": rnd(gen, r, 3)},
        "full": {".diff": rnd(gen, out, inp)},
        "glora": {
            ".a1.weight": rnd(gen, inp, r),
            ".a2.weight": rnd(gen, r, inp),
            ".b1.weight": rnd(gen, out, r),
            ".b2.weight": rnd(gen, r, inp),
        },
        "oft": {".oft_blocks": rnd(gen, 2, 4, 4)},
        "boft": {".oft_blocks": rnd(gen, 2, 4, 2, 2)},
    }


def test_factors_follow_the_base_device(gen: torch.Generator) -> None:
    """On the meta device every op must stay on the base's device (a CPU factor would raise)."""
    for kind, tensors in _all_kinds(gen).items():
        if kind in ("oft", "boft"):
            continue  # linalg.solve has no meta kernel
        m = parse_module(kind, tensors)
        base = torch.empty(8, 6, device="meta")
        assert m.apply(base).device.type == "meta", kind
        assert m.delta(base).device.type == "meta", kind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gen: torch.Generator) -> None:
    for kind, tensors in _all_kinds(gen).items():
        m = parse_module(kind, tensors)
        base = rnd(gen, 8, 6)
        got = m.apply(base.cuda(), 0.7)
        assert got.is_cuda
        close(got.cpu(), m.apply(base, 0.7))
