"""The Gram route of the factorized SVD: the singular triplets of ``(up * scale) @ down`` from small problems.

:func:`gram_factorized_svd` decomposes a LoRA delta ``dW = up_c @ down`` (``up_c = up * scale``, one scale
per column, so alpha / rank, merge weights and Tucker cores are all already applied; ``R`` columns) without
forming the ``out x in`` product, for a batch of same-shape problems at once. It is the route behind
:func:`lorasmith.linalg.factorized_svd` with ``method="gram"`` (the default), and the one ``resize`` calls
directly, because it hands back the singular vectors as ``R x k`` coefficient matrices on the factors,
from which a truncated LoRA is built with one ``out x R x k`` product per factor. Its first half,
:func:`gram_factorized_eig`, stops at the singular values, so that a caller that chooses the rank from them
computes the coefficients of the kept triplets only (:meth:`GramEig.coefficients`).

The maths. With the Gram matrices ``G_u = up_c^T up_c`` and ``G_d = down down^T`` and any ``R x R``
factors with ``R_u^T R_u = G_u`` and ``R_d^T R_d = G_d``, there are orthonormal ``Q_u``, ``Q_d`` with
``up_c = Q_u R_u`` and ``down^T = Q_d R_d``, so the small core ``C = R_u R_d^T = U_c S V_c^T`` has the
singular values ``S`` of ``dW``, and the singular vectors follow without ``Q``: ``u_i = up_c (R_d^T V_c)_i
/ s_i`` and ``v_i = down^T (R_u^T U_c)_i / s_i`` (because ``down Q_d = R_d^T`` and ``up_c^T Q_u =
R_u^T``). ``R_d`` is a Cholesky factor of ``G_d``; ``C`` itself is never formed: its right singular vectors
and squared singular values are the eigenpairs of ``C^T C = R_d G_u R_d^T``, and ``R_u^T U_c = G_u R_d^T
V_c / s``, so ``R_u`` is never needed either. Per problem that is two Gram products over the long
dimensions, ``O((out + in) R^2)``, one ``R x R`` Cholesky and one ``R x R`` symmetric eigensolver: a
third of the cost of two eigendecompositions and an SVD, and on CPUs several times faster than Householder
QR of the factors (the ``"qr"`` route of :func:`~lorasmith.linalg.factorized_svd`), which costs the same
order of flops but runs at a fraction of GEMM speed (``docs/performance.md``: 10-20x on the reference
machine).

Accuracy. A Gram matrix squares the factors' condition number, and the eigensolver resolves the squared
singular values ``s_i^2`` only to about ``eps * s_0^2``. So singular values down to about
``s_0 * sqrt(eps)`` (:func:`gram_resolution`: ``3.5e-4 * s_0`` in float32, ``1.5e-8 * s_0`` in float64)
are accurate to that absolute level, and below it they are rounding noise: relative errors grow as the
values shrink. The leading triplets, the kept part of a truncation and the total ``sum(s_i^2)`` (the
trace of ``C^T C``) stay accurate. The QR route resolves singular values far below ``s_0 * sqrt(eps)``
(to about ``s_0 * eps``); use it when those tails matter. Triplets whose ``s_i`` is pure noise can carry
wildly scaled vectors (a ``1 / s_i`` of a noise value); ``rcond`` zeroes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import LinalgError, NonFiniteFactorsError

__all__ = ["GramEig", "GramSVD", "gram_factorized_eig", "gram_factorized_svd", "gram_resolution"]

_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class GramSVD:
    """The singular triplets of one ``dW = (up * scale) @ down``, with the vectors held as coefficients.

    ``dW = sum_i s_i u_i v_i^T`` with ``u_i = (up * scale) @ left[:, i] / s_i`` and
    ``v_i = down^T @ right[:, i] / s_i`` (for ``s_i > 0``; a zero triplet has zero coefficients or
    contributes nothing). So ``(up * scale) @ left[:, K] @ diag(c) @ diag(c) @ right[:, K]^T @ down`` with
    ``c = 1 / sqrt(s_K)`` is the truncation of ``dW`` to the triplets ``K``, computed without any
    ``out x in`` product.

    :ivar S: singular values, ``[k]`` with ``k = min(out, in, R)``, non-negative and descending.
    :ivar left: ``R_d^T V_c``, ``[R, k]``.
    :ivar right: ``R_u^T U_c``, ``[R, k]``.
    """

    S: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        """Number of singular triplets held (``len(S)``)."""
        return int(self.S.shape[0])


def gram_resolution(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the Gram route resolves singular values down to about this times ``s_0``.

    ``3.5e-4`` for float32, ``1.5e-8`` for float64 (see the module docstring). Passed as ``rcond`` to
    :func:`gram_factorized_svd` it drops the triplets that are rounding noise.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def _check_batch(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | float] | None,
    dtype: torch.dtype | None,
    rcond: float,
) -> torch.dtype:
    """Validate a non-empty batch (shapes, dtypes, devices, counts) so that stacking cannot fail in torch.

    :returns: the dtype of the small problems (``dtype``, else the factors').
    """
    if not (math.isfinite(rcond) and 0.0 <= rcond < 1.0):
        raise LinalgError(f"rcond must be in [0, 1), got {rcond}")
    if scales is not None and len(scales) != len(ups):
        raise LinalgError(f"got {len(ups)} problems but {len(scales)} column scales")
    up0, down0 = ups[0], downs[0]
    for name, t in (("lora_up", up0), ("lora_down", down0)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LinalgError(f"{name} must be a 2-D tensor (flatten conv factors first), got {shape}")
        if t.dtype not in _DTYPES:
            raise LinalgError(f"{name} has dtype {t.dtype}; linalg computes in float32 or float64")
    rank = int(up0.shape[1])
    if int(down0.shape[0]) != rank:
        raise LinalgError(
            f"rank mismatch: lora_up {tuple(up0.shape)} has rank {rank}, lora_down {tuple(down0.shape)} "
            f"has rank {int(down0.shape[0])}"
        )
    if rank == 0 or up0.shape[0] == 0 or down0.shape[1] == 0:
        raise LinalgError(f"empty LoRA factors: lora_up {tuple(up0.shape)}, lora_down {tuple(down0.shape)}")
    for i in range(len(ups)):
        up, down = ups[i], downs[i]
        if (
            not isinstance(up, torch.Tensor)
            or not isinstance(down, torch.Tensor)
            or up.shape != up0.shape
            or down.shape != down0.shape
            or up.dtype != up0.dtype
            or down.dtype != up0.dtype
            or up.device != up0.device
            or down.device != up0.device
        ):
            raise LinalgError(
                "a batched Gram-route SVD needs problems of one shape, dtype and device: problem 0 is "
                f"{tuple(up0.shape)} x {tuple(down0.shape)}, problem {i} is not"
            )
        if scales is not None:
            sc = scales[i]
            if isinstance(sc, torch.Tensor) and (tuple(sc.shape) != (rank,) or sc.device != up0.device):
                raise LinalgError(
                    f"the column scale of problem {i} must be a [{rank}] tensor on {up0.device}, "
                    f"got {tuple(sc.shape)} on {sc.device}"
                )
    work = up0.dtype if dtype is None else dtype
    if work not in _DTYPES:
        raise LinalgError(f"Gram-route SVD dtype is {work}; linalg computes in float32 or float64")
    return work


def _stack_scales(
    scales: Sequence[torch.Tensor | float] | None,
    count: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if scales is None:
        return torch.ones(count, rank, dtype=dtype, device=device)
    rows = [
        sc if isinstance(sc, torch.Tensor) else torch.full((rank,), float(sc), dtype=dtype, device=device)
        for sc in scales
    ]
    return torch.stack(rows).to(dtype)


def non_finite_error(bad: Sequence[int], total: int) -> NonFiniteFactorsError:
    """The :class:`NonFiniteFactorsError` for the problems ``bad`` (indices) of a batch of ``total``."""
    where = ""
    if total > 1:
        listed = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        where = f" (problem{'s' if len(bad) > 1 else ''} {listed} of {total})"
    return NonFiniteFactorsError(
        f"NaN or infinite values in the LoRA factors or in products of them{where}", problems=bad
    )


def _non_finite(gu: torch.Tensor, gd: torch.Tensor) -> NonFiniteFactorsError | None:
    """The error for Gram matrices holding NaN or inf, naming the problems of the batch they belong to.

    ``None`` when every entry is finite (the cheap check in :func:`gram_eig` can raise a false alarm).
    """
    ok = torch.isfinite(gu).flatten(1).all(dim=1) & torch.isfinite(gd).flatten(1).all(dim=1)
    bad = [i for i, good in enumerate(ok.tolist()) if not good]
    return non_finite_error(bad, int(gu.shape[0])) if bad else None


#: Below this rank, or this length of the vectors, a Gram product is one GEMM: splitting it saves too
#: little to pay for the extra calls (measured: no gain at ``L = 640, 768``, 8-15% at ``L = 1280``).
_SPLIT_MIN_RANK = 64
_SPLIT_MIN_LENGTH = 1024


def _gram(x: torch.Tensor, *, of_columns: bool) -> torch.Tensor:
    """The Gram matrix of the columns (``x^T x`` for ``x [..., L, R]``) or of the rows (``x x^T`` for
    ``x [..., R, L]``) of ``x``: ``[..., R, R]``.

    On a CPU, for ``R >= 64``, the ``R`` vectors are split into halves ``x1``, ``x2`` and two products are
    made: the top block row ``x1 [x1 x2]^T`` and the corner ``x2 x2^T``; the bottom-left block is the
    transpose of the top-right one. That is three quarters of the flops of the full GEMM, and measured on
    the reference CPU (AMD Zen3, one thread, ``R = 128``, ``L`` from 1280 to 10240) 8-20% faster; four
    blocks (10 of 16 products) or three separate half-by-half products were no faster, smaller products
    running at a lower rate. The halves are strided views, read in place by the BLAS (no copies). On a GPU
    the single GEMM is the faster.
    """
    r, length = (int(x.shape[-1]), int(x.shape[-2])) if of_columns else (int(x.shape[-2]), int(x.shape[-1]))
    if x.device.type != "cpu" or r < _SPLIT_MIN_RANK or length < _SPLIT_MIN_LENGTH:
        return x.mT @ x if of_columns else x @ x.mT
    if x.ndim > 2:
        # one 2-D problem at a time: torch's batched path costs 5-10% more on these small products
        flat = x.reshape(-1, *x.shape[-2:])
        if flat.shape[0] == 1:
            return _gram(flat[0], of_columns=of_columns).reshape(*x.shape[:-2], r, r)
        out = torch.empty((flat.shape[0], r, r), dtype=x.dtype, device=x.device)
        for i in range(int(flat.shape[0])):
            out[i] = _gram(flat[i], of_columns=of_columns)
        return out.reshape(*x.shape[:-2], r, r)
    h = r // 2
    xt = x.mT if of_columns else x  # [..., R, L]: the vectors are its rows
    top = xt[..., :h, :] @ xt.mT  # [..., h, R]
    corner = xt[..., h:, :] @ xt[..., h:, :].mT  # [..., R - h, R - h]
    g = torch.empty((*x.shape[:-2], r, r), dtype=x.dtype, device=x.device)
    g[..., :h, :] = top
    g[..., h:, :h] = top[..., h:].mT
    g[..., h:, h:] = corner
    return g


@dataclass(frozen=True, eq=False)
class GramEig:
    """The Gram route of ``dW = (up * scale) @ down`` up to its eigensolver, for one problem or a stack.

    It holds the singular values and what the coefficient matrices of :class:`GramSVD` are made from, so a
    caller can choose the rank from ``S`` first and then compute the coefficients of only the triplets it
    keeps (:meth:`coefficients`): two ``R x R x cols`` products instead of ``R x R x k`` (``resize`` at rank
    32 of 128 skips three quarters of that work).

    :ivar S: singular values ``[..., k]``, descending; the triplets below ``rcond`` are zero.
    :ivar vectors: ``V_c``, the eigenvectors of ``C^T C`` in the same order, ``[..., R, k]`` (zero columns for
        the zeroed triplets).
    :ivar rd: ``R_d``, the square root of ``G_d`` used, ``[..., R, R]``.
    :ivar gu: ``G_u`` with the column scales applied, ``[..., R, R]``.
    """

    S: torch.Tensor
    vectors: torch.Tensor
    rd: torch.Tensor
    gu: torch.Tensor

    def coefficients(self, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of the first ``cols`` triplets (all by default), ``[..., R, cols]`` each.

        ``left = R_d^T V_c`` and ``right = R_u^T U_c = G_u left / s`` (see the module docstring); a zero
        singular value gets zero coefficients.
        """
        k = int(self.S.shape[-1])
        c = k if cols is None else max(0, min(int(cols), k))
        s, vectors = (self.S, self.vectors) if c == k else (self.S[..., :c], self.vectors[..., :c])
        left = self.rd.mT @ vectors
        # 1 / s, and 0 for a zero s (clamped first: 1 / a subnormal s would overflow to inf)
        inv = torch.where(s > 0, s.clamp_min(torch.finfo(s.dtype).tiny).reciprocal(), 0.0)
        right = (self.gu @ left).mul_(inv.unsqueeze(-2))
        return left, right

    def __getitem__(self, index: int) -> GramEig:
        """Problem ``index`` of a stack."""
        return GramEig(S=self.S[index], vectors=self.vectors[index], rd=self.rd[index], gu=self.gu[index])


def gram_eig(
    up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rcond: float = 0.0
) -> GramEig:
    """The Gram route up to the eigensolver, on one problem (``up [m, R]``, ``down [R, n]``, ``scale [R]``)
    or on stacked ones (a leading batch dimension ``B`` on all three). No validation:
    :func:`gram_factorized_eig` validates and stacks.

    :returns: the :class:`GramEig` (stacked like the inputs), in ``dtype`` on the factors' device.
    :raises NonFiniteFactorsError: NaN or inf in the factors (they show up in the Gram matrices), or Gram
        products that overflow ``up``'s dtype.
    """
    m, r, n = int(up.shape[-2]), int(up.shape[-1]), int(down.shape[-1])
    # The only products over the long dimensions. The column scales enter G_u as
    # diag(scale) (up^T up) diag(scale), an R x R operation, instead of a pass over up. (In place, and
    # few calls throughout: on a CPU these small problems run on several Python threads, and each torch
    # call is a GIL hand-over.)
    gu = _gram(up, of_columns=True)
    if gu.dtype != dtype:
        gu = gu.to(dtype)
    gu.mul_(scale.unsqueeze(-1)).mul_(scale.unsqueeze(-2))
    gd = _gram(down, of_columns=False)
    if gd.dtype != dtype:
        gd = gd.to(dtype)
    # A NaN or inf anywhere makes the sum NaN or inf (inf - inf is NaN): one reduction instead of a mask
    # per matrix (4x cheaper). Finite entries whose sum overflows are a false alarm the exact check clears.
    if not math.isfinite(float(gu.sum() + gd.sum())):
        error = _non_finite(gu.reshape(-1, r, r), gd.reshape(-1, r, r))
        if error is not None:
            raise error
    # The small problems run in `dtype`: the Gram matrices already carry that dtype's rounding
    # (eps * ||G||), so a wider dtype here would not make s more accurate.
    chol, info = torch.linalg.cholesky_ex(gd)
    if bool((info == 0).all()):
        rd = chol.mT
    else:
        # A singular G_d (a rank-deficient down factor): any square root works, and an eigendecomposition
        # gives one; tiny negative eigenvalues are rounding noise.
        ld, wd = torch.linalg.eigh(gd)
        rd = ld.clamp_min(0).sqrt().unsqueeze(-1) * wd.mT
    core = rd @ gu @ rd.mT
    # Symmetrised because rounding makes R_d G_u R_d^T slightly asymmetric, and eigh reads one triangle.
    # Negated, so that eigh's ascending order is the descending order of s: no flipped copies.
    neg = core + core.mT
    neg.mul_(-0.5)
    lam, vc = torch.linalg.eigh(neg)
    s = lam.neg_().clamp_min_(0).sqrt_()
    k = min(m, n, r)
    if k < r:
        s, vc = s[..., :k], vc[..., :k]
    if rcond > 0:
        # A noise eigenvalue far below eps * s_0^2 gives a noise s_i whose 1 / s_i scales the
        # coefficients without bound; zero the whole triplet instead.
        keep = s > rcond * s[..., :1]
        s = s * keep
        vc = vc * keep.unsqueeze(-2)
    return GramEig(S=s, vectors=vc, rd=rd, gu=gu)


def gram_core(
    up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rcond: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram route on stacked problems: ``up [B, m, R]``, ``down [B, R, n]``, ``scale [B, R]``.

    The batched kernel behind :func:`gram_factorized_svd` (which validates and stacks; this does
    neither), shared with :func:`lorasmith.linalg.factorized_svd`: :func:`gram_eig`, then every
    triplet's coefficients.

    :returns: ``(S [B, k], left [B, R, k], right [B, R, k])`` in ``dtype`` on the factors' device.
    :raises NonFiniteFactorsError: NaN or inf in the factors (they show up in the Gram matrices), or Gram
        products that overflow ``up``'s dtype.
    """
    eig = gram_eig(up, down, scale, dtype, rcond)
    left, right = eig.coefficients()
    return eig.S, left, right


def _stacked(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | float] | None,
    dtype: torch.dtype | None,
    rcond: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Validate a non-empty batch and stack it: ``(up [B, m, R], down [B, R, n], scale [B, R], dtype)``."""
    work_dtype = _check_batch(ups, downs, scales, dtype, rcond)
    up = ups[0].unsqueeze(0) if len(ups) == 1 else torch.stack(list(ups))
    down = downs[0].unsqueeze(0) if len(downs) == 1 else torch.stack(list(downs))
    scale = _stack_scales(scales, len(ups), int(up.shape[2]), work_dtype, up.device)
    return up, down, scale, work_dtype


def gram_factorized_eig(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | float] | None = None,
    dtype: torch.dtype | None = None,
    *,
    rcond: float = 0.0,
) -> list[GramEig]:
    """:func:`gram_factorized_svd` without the coefficients: one :class:`GramEig` per problem.

    For callers that choose how many triplets to keep from ``S`` and then ask for the coefficients of
    those only (:meth:`GramEig.coefficients`). Parameters, validation and errors are those of
    :func:`gram_factorized_svd`.
    """
    if len(downs) != len(ups):
        raise LinalgError(f"got {len(ups)} lora_up tensors but {len(downs)} lora_down tensors")
    if not ups:
        return []
    if len(ups) == 1:
        # one problem (a CPU caller): the same kernel on 2-D tensors, without stacking and unstacking
        work_dtype = _check_batch(ups, downs, scales, dtype, rcond)
        up0 = ups[0]
        scale0 = _stack_scales(scales, 1, int(up0.shape[1]), work_dtype, up0.device)[0]
        return [gram_eig(up0, downs[0], scale0, work_dtype, rcond)]
    up, down, scale, work_dtype = _stacked(ups, downs, scales, dtype, rcond)
    eig = gram_eig(up, down, scale, work_dtype, rcond)
    return [eig[i] for i in range(int(up.shape[0]))]


def gram_factorized_svd(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | float] | None = None,
    dtype: torch.dtype | None = None,
    *,
    rcond: float = 0.0,
) -> list[GramSVD]:
    """Gram-route SVDs of same-shape LoRA deltas ``(up * scale) @ down``, stacked into one batched call.

    The maths and its accuracy are in the module docstring. One problem per list entry; on a GPU a
    batch of same-shape modules replaces many small kernel launches, and the results equal those of
    one-problem calls up to float rounding. Singular vectors come back as coefficients
    (:class:`GramSVD`); :func:`lorasmith.linalg.factorized_svd` (``method="gram"``) turns them into an
    :class:`~lorasmith.linalg.SVD` with explicit ``U`` and ``Vh``.

    :param ups: ``[out, R]`` factors, all of one shape, dtype (float32 or float64) and device.
    :param downs: ``[R, n]`` factors (a conv down factor flattened to ``[R, in*kh*kw]``), likewise.
    :param scales: per problem, a column scale: a ``[R]`` tensor or one float for every column (alpha /
        rank, merge weights; may be negative); ``None`` for no scaling.
    :param dtype: the dtype of the Gram matrices and the ``R x R`` problems (default: the factors');
        the Gram products themselves run in the factors' dtype.
    :param rcond: return the triplets with ``s_i <= rcond * s_0`` as zeros (``S``, ``left`` and
        ``right``); ``0`` keeps every triplet as computed. :func:`gram_resolution` is the natural value:
        below it the triplets are rounding noise.
    :returns: one :class:`GramSVD` per problem, ``k = min(out, n, R)`` triplets each, in ``dtype`` on the
        factors' device.
    :raises NonFiniteFactorsError: NaN or inf in the factors, or Gram products that overflow (its ``problems``
        names the offending entries).
    :raises LinalgError: lists of different lengths, or problems of different shapes, dtypes or devices.
    """
    if len(downs) != len(ups):
        raise LinalgError(f"got {len(ups)} lora_up tensors but {len(downs)} lora_down tensors")
    if not ups:
        return []
    up, down, scale, work_dtype = _stacked(ups, downs, scales, dtype, rcond)
    s, left, right = gram_core(up, down, scale, work_dtype, rcond)
    return [GramSVD(S=s[i], left=left[i], right=right[i]) for i in range(int(up.shape[0]))]
