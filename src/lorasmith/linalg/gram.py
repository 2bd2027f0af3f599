"""The Gram route of the factorized SVD: the singular triplets of ``(up * scale) @ down`` from small problems.

:func:`gram_factorized_svd` decomposes a LoRA delta ``dW = up_c @ down`` (``up_c = up * scale``, one scale
per column, so alpha / rank, merge weights and Tucker cores are all already applied; ``R`` columns) without
forming the ``out x in`` product, for a batch of same-shape problems at once. It is the route behind
:func:`lorasmith.linalg.factorized_svd` with ``method="gram"`` (the default), and the one ``resize`` calls
directly, because it hands back the singular vectors as ``R x k`` coefficient matrices on the factors,
from which a truncated LoRA is built with one ``out x R x k`` product per factor.

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

__all__ = ["GramSVD", "gram_factorized_svd", "gram_resolution"]

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


def _non_finite(gu: torch.Tensor, gd: torch.Tensor) -> NonFiniteFactorsError:
    """The error for Gram matrices holding NaN or inf, naming the problems of the batch they belong to."""
    ok = torch.isfinite(gu).flatten(1).all(dim=1) & torch.isfinite(gd).flatten(1).all(dim=1)
    return non_finite_error([i for i, good in enumerate(ok.tolist()) if not good], int(gu.shape[0]))


def gram_core(
    up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rcond: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram route on stacked problems: ``up [B, m, R]``, ``down [B, R, n]``, ``scale [B, R]``.

    The batched kernel behind :func:`gram_factorized_svd` (which validates and stacks; this does
    neither), shared with :func:`lorasmith.linalg.factorized_svd`.

    :returns: ``(S [B, k], left [B, R, k], right [B, R, k])`` in ``dtype`` on the factors' device.
    :raises NonFiniteFactorsError: NaN or inf in the factors (they show up in the Gram matrices), or Gram
        products that overflow ``up``'s dtype.
    """
    m, r, n = int(up.shape[-2]), int(up.shape[-1]), int(down.shape[-1])
    # The only products over the long dimensions. The column scales enter G_u as
    # diag(scale) (up^T up) diag(scale), an R x R operation, instead of a pass over up.
    gu = (up.mT @ up).to(dtype) * (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    gd = (down @ down.mT).to(dtype)
    if not bool(torch.isfinite(gu).all()) or not bool(torch.isfinite(gd).all()):
        raise _non_finite(gu, gd)
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
    lam, vc = torch.linalg.eigh((core + core.mT) / 2)
    k = min(m, n, r)
    lam, vc = lam.flip(-1)[..., :k], vc.flip(-1)[..., :k]
    s = lam.clamp_min(0).sqrt()
    if rcond > 0:
        # A noise eigenvalue far below eps * s_0^2 gives a noise s_i whose 1 / s_i scales the
        # coefficients below without bound; zero the whole triplet instead.
        keep = s > rcond * s[..., :1]
        s = torch.where(keep, s, torch.zeros_like(s))
        vc = vc * keep.unsqueeze(-2).to(vc.dtype)
    left = rd.mT @ vc
    inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    right = (gu @ left) * inv.unsqueeze(-2)
    return s, left, right


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
    work_dtype = _check_batch(ups, downs, scales, dtype, rcond)
    up = ups[0].unsqueeze(0) if len(ups) == 1 else torch.stack(list(ups))
    down = downs[0].unsqueeze(0) if len(downs) == 1 else torch.stack(list(downs))
    scale = _stack_scales(scales, len(ups), int(up.shape[2]), work_dtype, up.device)
    s, left, right = gram_core(up, down, scale, work_dtype, rcond)
    return [GramSVD(S=s[i], left=left[i], right=right[i]) for i in range(int(up.shape[0]))]
