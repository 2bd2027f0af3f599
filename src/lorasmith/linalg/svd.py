"""Singular value decompositions for LoRA resize, merge and extraction.

Four entry points, all returning an :class:`SVD` (thin factors ``U [m, k]``, ``S [k]`` descending,
``Vh [k, n]``) together with the relative Frobenius error of the factorisation against the matrix it
decomposes:

- :func:`factorized_svd`: the SVD of a LoRA delta ``scale * up @ down`` (plain, conv, or LoCon Tucker)
  computed from the factors alone, never forming the ``out x in`` product. Cost ``O((m + n) r^2)``. Two
  routes (``method``): ``"gram"`` (the default; Gram matrices, one Cholesky, one ``r x r`` eigensolver,
  see :mod:`lorasmith.linalg.gram`; several times faster on CPUs, accurate for singular values down to
  about ``s_0 * sqrt(eps)``) and ``"qr"`` (Householder QR of both factors and an SVD of the core;
  accurate far below that). :func:`factorized_svd_batched` runs either on many same-shape problems.
- :func:`exact_svd`: a dense thin SVD of a matrix (conv weights are flattened to ``[out, in*kh*kw]``).
- :func:`randomized_svd`: a seeded randomized range finder with power iterations, for a small target
  rank against a large matrix; it reports the exact error of the approximation it returns.
- :func:`lowrank_svd`: picks exact or randomized for a target rank and truncates.

Everything runs on the tensors' own device, in their own dtype, which must be float32 or float64
(see :func:`lorasmith.linalg.device.to_compute`). Singular vectors get a canonical sign (see
:func:`_canonical_signs`) so that results do not depend on the LAPACK / cuSOLVER backend's arbitrary
sign choices, nor on whether a problem was solved alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .errors import LinalgError
from .gram import gram_core, gram_resolution, non_finite_error

__all__ = [
    "DEFAULT_FACTORIZED_METHOD",
    "DEFAULT_SEED",
    "SVD",
    "FactorizedMethod",
    "RandomizedSVD",
    "SvdMethod",
    "choose_svd_method",
    "exact_svd",
    "factorized_svd",
    "factorized_svd_batched",
    "fold_tucker",
    "lowrank_svd",
    "randomized_svd",
]

#: Seed of the Gaussian sketch when neither ``generator`` nor ``seed`` is given: the randomized SVD is
#: deterministic by default, so that two runs of the same command write the same file.
DEFAULT_SEED = 0

#: The method names accepted by :func:`lowrank_svd`.
SvdMethod = Literal["auto", "exact", "randomized"]

#: The routes of :func:`factorized_svd`: ``"gram"`` (Gram + Cholesky + one eigensolver, fast on CPUs,
#: singular values resolved down to ``s_0 * sqrt(eps)``) or ``"qr"`` (Householder QR, accurate below that).
FactorizedMethod = Literal["gram", "qr"]

#: The route :func:`factorized_svd` takes unless told otherwise: the Gram route, several times faster than
#: Householder QR on CPUs (``docs/performance.md``) and as fast in GEMMs on GPUs.
DEFAULT_FACTORIZED_METHOD: FactorizedMethod = "gram"

_COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class SVD:
    """A thin singular value decomposition ``M ~= U @ diag(S) @ Vh``.

    :ivar U: left singular vectors, ``[m, k]``, orthonormal columns (from the Gram route of
        :func:`factorized_svd`, a triplet below its resolution comes back as ``s = 0`` with zero vectors).
    :ivar S: singular values, ``[k]``, non-negative and descending.
    :ivar Vh: right singular vectors (transposed), ``[k, n]``, orthonormal rows.
    :ivar rel_error: ``||M - U diag(S) Vh||_F / ||M||_F`` for the matrix ``M`` that was decomposed
        (``0.0`` when ``M`` is zero), or ``None`` when unknown. ``0.0`` for a complete decomposition
        (up to float rounding).
    :ivar fro_norm: ``||M||_F`` of the decomposed matrix, used to keep ``rel_error`` exact through
        :meth:`truncate`; ``None`` when unknown.
    :ivar kernel: ``(kh, kw)`` when ``M`` is a flattened conv weight ``[out, in*kh*kw]``, else ``None``;
        :meth:`to_lora` uses it to give the factors their conv shapes.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    rel_error: float | None = None
    fro_norm: float | None = None
    kernel: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        """Number of singular triplets held (``len(S)``)."""
        return int(self.S.shape[0])

    def truncate(self, k: int) -> SVD:
        """Keep the ``k`` leading singular triplets (all of them when ``k >= rank``).

        ``rel_error`` is updated exactly: the dropped components are orthogonal to the kept ones and to
        any residual the decomposition already had, so the squared errors add (Pythagoras).

        :raises LinalgError: if ``k < 1``.
        """
        if k < 1:
            raise LinalgError(f"cannot truncate an SVD to rank {k}; the rank must be at least 1")
        if k >= self.rank:
            return self
        rel_error: float | None = None
        if self.rel_error is not None and self.fro_norm is not None:
            if self.fro_norm == 0.0:
                rel_error = 0.0
            else:
                # Sum of squares in float64: float32 would lose the small tail we are measuring.
                dropped_sq = float(self.S[k:].to(torch.float64).square().sum())
                prior_sq = (self.rel_error * self.fro_norm) ** 2
                rel_error = math.sqrt(prior_sq + dropped_sq) / self.fro_norm
        return replace(
            self,
            U=self.U[:, :k],
            S=self.S[:k],
            Vh=self.Vh[:k, :],
            rel_error=rel_error,
        )

    def reconstruct(self) -> torch.Tensor:
        """Return the dense ``U @ diag(S) @ Vh`` as a 2-D ``[m, n]`` matrix (meant for tests and checks)."""
        return (self.U * self.S) @ self.Vh

    def to_lora(
        self, k: int | None = None, kernel: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the (truncated) decomposition into a LoRA pair ``(up, down)`` with ``up @ down ~= M``.

        The singular values are split evenly, ``up = U sqrt(S)`` and ``down = sqrt(S) Vh``: both factors
        then have comparable magnitudes, which keeps fp16 / bf16 storage away from overflow and
        underflow (putting all of ``S`` into ``up``, as sd-scripts does, gives the same product but a
        lopsided pair). The product carries every scale already folded into ``M``, so the caller stores
        ``alpha = k`` (scale 1), or rescales the pair for any other alpha.

        :param k: number of triplets to keep; ``None`` keeps all of them, larger values are capped.
        :param kernel: ``(kh, kw)`` to reshape for a conv layer; defaults to :attr:`kernel`. For a conv,
            ``up`` is ``[out, k, 1, 1]`` and ``down`` is ``[k, in, kh, kw]``; otherwise ``[out, k]`` and
            ``[k, in]``.
        :raises LinalgError: if ``k < 1`` or the kernel does not divide the column count.
        """
        svd = self if k is None else self.truncate(k)
        kern = kernel if kernel is not None else svd.kernel
        root = svd.S.sqrt()
        up = svd.U * root
        down = root[:, None] * svd.Vh
        if kern is not None:
            kh, kw = kern
            cols = int(down.shape[1])
            if kh < 1 or kw < 1 or cols % (kh * kw) != 0:
                raise LinalgError(
                    f"kernel {kern} does not divide the {cols} columns of the decomposed matrix"
                )
            down = down.reshape(svd.rank, cols // (kh * kw), kh, kw)
            up = up.reshape(int(up.shape[0]), svd.rank, 1, 1)
        return up.contiguous(), down.contiguous()


@dataclass(frozen=True, eq=False)
class RandomizedSVD(SVD):
    """An :class:`SVD` computed by :func:`randomized_svd`.

    ``rel_error`` is always set: the relative Frobenius error of the returned approximation (exact up to
    float rounding, see :func:`randomized_svd`).

    :ivar sketch_size: number of columns of the Gaussian sketch (target rank + oversampling, capped).
    :ivar n_iter: number of power iterations performed.
    """

    # Redeclared to narrow the type: a randomized SVD always knows its error.
    rel_error: float = 0.0
    sketch_size: int = 0
    n_iter: int = 0


# --------------------------------------------------------------------------------------------- helpers


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise LinalgError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _COMPUTE_DTYPES:
        raise LinalgError(
            f"{name} has dtype {t.dtype}; linalg computes in float32 or float64 (convert with to_compute)"
        )


def _as_matrix(m: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Return ``m`` as a 2-D matrix, flattening a conv weight ``[out, in, kh, kw]`` to ``[out, in*kh*kw]``."""
    _check_tensor(m, name)
    if m.ndim == 2:
        mat, kernel = m, None
    elif m.ndim == 4:
        mat, kernel = m.reshape(int(m.shape[0]), -1), (int(m.shape[2]), int(m.shape[3]))
    else:
        raise LinalgError(
            f"{name} must be 2-D [out, in] or 4-D [out, in, kh, kw], got shape {tuple(m.shape)}"
        )
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        raise LinalgError(f"{name} is empty (shape {tuple(m.shape)}); nothing to decompose")
    return mat, kernel


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its ``U`` column is positive.

    An SVD is unique only up to the sign of each pair ``(u_i, v_i)``; backends pick signs arbitrarily, so
    the same matrix gives different factors on CPU and GPU, or alone and in a batch, and a saved file
    (and its hash) would change for nothing. This convention is deterministic and costs ``O(m k)``.
    Works with leading batch dimensions.
    """
    pivot_rows = u.abs().argmax(dim=-2, keepdim=True)
    pivots = u.gather(-2, pivot_rows)
    signs = torch.where(pivots < 0, -1.0, 1.0).to(u.dtype)
    return u * signs, vh * signs.mT


def _fro_of_singular_values(s: torch.Tensor) -> float:
    """``sqrt(sum(s^2))`` in float64: the Frobenius norm of a matrix whose complete SVD has values ``s``."""
    return math.sqrt(float(s.to(torch.float64).square().sum()))


def _make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise LinalgError("give either a generator or a seed for the randomized SVD, not both")
    if generator is not None:
        if generator.device.type != "cpu":
            # The sketch is drawn on the CPU and then moved, so that a seed gives the same sketch (and
            # the same result, up to float rounding) on every device.
            raise LinalgError(
                f"the randomized SVD needs a CPU torch.Generator, got one on {generator.device}"
            )
        return generator
    gen = torch.Generator(device="cpu")
    gen.manual_seed(DEFAULT_SEED if seed is None else seed)
    return gen


# -------------------------------------------------------------------------------------- factorized SVD


def fold_tucker(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a LoCon Tucker triple into an equivalent plain conv LoRA pair ``(up2 [out, r], down2 [r, n])``.

    The Tucker delta is ``W[p, c, k, l] = sum_ij up[p, i] mid[i, j, k, l] down[j, c]`` (LyCORIS'
    ``einsum('i j k l, j r, i p -> p r k l', mid, down, up.T)``), with ``up`` ``[out, r_u]`` or
    ``[out, r_u, 1, 1]``, ``mid`` ``[r_u, r_d, kh, kw]`` and ``down`` ``[r_d, in]`` or ``[r_d, in, 1, 1]``.
    Contracting the mid with the 1x1 down first gives ``down_eff[i, c, k, l] = sum_j mid[i, j, k, l]
    down[j, c]`` and ``W = up @ down_eff`` (flattened): a rank-``r_u`` pair, with no ``out x in`` product.
    ``down2`` is ``down_eff`` flattened to ``[r_u, in*kh*kw]``.

    :raises LinalgError: on shapes that do not fit together.
    """
    up2 = _up_matrix(up)
    _check_tensor(mid, "lora_mid")
    _check_tensor(down, "lora_down")
    if mid.ndim != 4:
        raise LinalgError(f"lora_mid must be 4-D [r, r, kh, kw], got shape {tuple(mid.shape)}")
    if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
        down1 = down.reshape(int(down.shape[0]), int(down.shape[1]))
    elif down.ndim == 2:
        down1 = down
    else:
        raise LinalgError(
            f"with a lora_mid the lora_down must be [r, in] or [r, in, 1, 1], got shape {tuple(down.shape)}"
        )
    if int(mid.shape[0]) != int(up2.shape[1]) or int(mid.shape[1]) != int(down1.shape[0]):
        raise LinalgError(
            f"Tucker ranks do not match: lora_up {tuple(up.shape)}, lora_mid {tuple(mid.shape)}, "
            f"lora_down {tuple(down.shape)}"
        )
    down_eff = torch.einsum("ijkl,jc->ickl", mid, down1)
    return up2, down_eff.reshape(int(mid.shape[0]), -1)


def _up_matrix(up: torch.Tensor) -> torch.Tensor:
    _check_tensor(up, "lora_up")
    if up.ndim == 2:
        return up
    if up.ndim == 4 and tuple(up.shape[2:]) == (1, 1):
        return up.reshape(int(up.shape[0]), int(up.shape[1]))
    raise LinalgError(f"lora_up must be [out, r] or [out, r, 1, 1], got shape {tuple(up.shape)}")


def _prepare_pair(
    up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """Validate a LoRA pair (or Tucker triple) and return ``(up2 [m, r], down2 [r, n], kernel)``."""
    tensors = [up, down] if mid is None else [up, mid, down]
    if mid is None:
        up2 = _up_matrix(up)
        _check_tensor(down, "lora_down")
        if down.ndim == 2:
            down2, kernel = down, None
        elif down.ndim == 4:
            down2 = down.reshape(int(down.shape[0]), -1)
            kernel = (int(down.shape[2]), int(down.shape[3]))
        else:
            raise LinalgError(f"lora_down must be [r, in] or [r, in, kh, kw], got shape {tuple(down.shape)}")
    else:
        up2, down2 = fold_tucker(up, mid, down)
        kernel = (int(mid.shape[2]), int(mid.shape[3]))
    if len({t.dtype for t in tensors}) != 1:
        raise LinalgError(f"LoRA factors have mixed dtypes {[str(t.dtype) for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise LinalgError(f"LoRA factors are on different devices {[str(t.device) for t in tensors]}")
    if int(up2.shape[1]) != int(down2.shape[0]):
        raise LinalgError(
            f"rank mismatch: lora_up {tuple(up.shape)} has rank {int(up2.shape[1])}, "
            f"lora_down {tuple(down.shape)} has rank {int(down2.shape[0])}"
        )
    if up2.shape[0] == 0 or up2.shape[1] == 0 or down2.shape[1] == 0:
        raise LinalgError(f"empty LoRA factors: lora_up {tuple(up.shape)}, lora_down {tuple(down.shape)}")
    return up2, down2, kernel


def _factorized_core(
    up2: torch.Tensor, down2: torch.Tensor, scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QR route on ``[..., m, r] @ [..., r, n]`` (leading batch dims allowed); returns ``(U, S, Vh)``.

    With ``up = Qu Ru`` and ``down^T = Qd Rd``: ``scale * up @ down = Qu (scale Ru Rd^T) Qd^T``. ``Qu`` and
    ``Qd`` have orthonormal columns, so the SVD of the small core ``Ru Rd^T = Uc S Vc^T`` gives the SVD of
    the product, ``U = Qu Uc``, ``V = Qd Vc``, with the same singular values. Householder QR and the core
    SVD are backward stable, so ``S`` matches a dense SVD of the product to float rounding, at
    ``O((m + n) r^2)`` instead of ``O(m n min(m, n))``. Reduced QR handles ``r > m`` or ``r > n``: the
    core is ``min(m, r) x min(n, r)`` and ``k = min(m, n, r)``.
    """
    qu, ru = torch.linalg.qr(up2)
    qd, rd = torch.linalg.qr(down2.mT)
    core = (ru @ rd.mT) * scale
    # NaN or inf in a factor spreads through its R factor into the core: one small check covers both
    # factors (and the SVD below would otherwise fail with a backend error, or return NaN).
    finite = torch.isfinite(core).flatten(-2).all(dim=-1).reshape(-1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise non_finite_error(bad, int(finite.shape[0]))
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    u = qu @ uc
    vh = vch @ qd.mT
    u, vh = _canonical_signs(u, vh)
    return u, s, vh


def _gram_factorized(
    up2: torch.Tensor, down2: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram route on ``[B, m, r] @ [B, r, n]`` with one scalar ``scale [B]`` each; returns ``(U, S, Vh)``.

    :func:`lorasmith.linalg.gram.gram_core` gives ``S`` and the coefficient matrices, with the triplets
    below :func:`~lorasmith.linalg.gram.gram_resolution` zeroed: a noise ``s_i`` would otherwise scale
    its vectors by ``1 / s_i`` without bound (a rank-deficient concatenation of factors reconstructs
    with an error of many times ``||M||`` in float32). Then ``U = up_c left / s`` and
    ``Vh = (down^T right / s)^T``, one ``m x r x k`` and one ``n x r x k`` product.
    """
    r = int(up2.shape[-1])
    # A scalar scale is a column scale with equal entries: G_u only sees its square, and its sign is
    # carried by up_c below.
    col = scale.unsqueeze(-1).expand(-1, r)
    s, left, right = gram_core(up2, down2, col, up2.dtype, gram_resolution(up2.dtype))
    inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    u = ((up2 * col.unsqueeze(-2)) @ left) * inv.unsqueeze(-2)
    vh = ((down2.mT @ right) * inv.unsqueeze(-2)).mT
    u, vh = _canonical_signs(u, vh)
    return u, s, vh


def _check_method(method: str) -> None:
    if method not in ("gram", "qr"):
        raise LinalgError(f"unknown factorized SVD method {method!r}; use 'gram' or 'qr'")


def factorized_svd(
    up: torch.Tensor,
    down: torch.Tensor,
    mid: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    method: FactorizedMethod = DEFAULT_FACTORIZED_METHOD,
) -> SVD:
    """SVD of the LoRA delta ``scale * up @ down`` without forming the product.

    Two routes, the same result type:

    - ``"gram"`` (default): the Gram matrices of the factors, one Cholesky and one ``r x r`` symmetric
      eigensolver (:mod:`lorasmith.linalg.gram`). GEMM-bound, several times faster than QR on CPUs. It
      resolves singular values down to about ``s_0 * sqrt(eps)`` (``3.5e-4 * s_0`` in float32,
      ``1.5e-8 * s_0`` in float64); triplets below that are returned as ``s = 0`` with zero vectors,
      which changes the reconstruction by at most their norm. Above it, values and vectors match a
      dense SVD to that absolute level.
    - ``"qr"``: Householder QR of both factors and an SVD of the ``r x r`` core. Backward stable: accurate
      for singular values far below ``s_0 * sqrt(eps)`` (to about ``s_0 * eps``), and every vector is
      orthonormal, at a fraction of GEMM speed on CPUs. Use it when the small tail of the spectrum
      matters.

    :param up: ``[out, r]`` or ``[out, r, 1, 1]``.
    :param down: ``[r, in]`` or a conv ``[r, in, kh, kw]`` (flattened to ``[r, in*kh*kw]``); with a
        ``mid``, the 1x1 down ``[r_d, in]`` / ``[r_d, in, 1, 1]``.
    :param mid: optional LoCon Tucker core ``[r_u, r_d, kh, kw]``, folded first (see :func:`fold_tucker`).
    :param scale: multiplies the delta, typically ``alpha / r`` (times a merge strength); may be negative.
    :param method: ``"gram"`` or ``"qr"`` (above).
    :returns: an :class:`SVD` with ``k = min(r, out, n)`` triplets, ``rel_error = 0.0``, and ``kernel`` set
        for conv deltas. Computed in the factors' dtype (float32 or float64) on their device, with
        canonical signs (the same on both routes). For a Tucker input, :meth:`SVD.to_lora` gives a plain
        conv pair (``down [k, in, kh, kw]``); re-encoding a Tucker triple is the adapter layer's business.
    :raises NonFiniteFactorsError: NaN or infinite values in the factors (a :class:`LinalgError`).
    :raises LinalgError: on shapes, dtypes or devices that do not fit together, or an unknown method.
    """
    _check_method(method)
    up2, down2, kernel = _prepare_pair(up, down, mid)
    if method == "gram":
        scale_t = torch.full((1,), float(scale), dtype=up2.dtype, device=up2.device)
        u, s, vh = _gram_factorized(up2.unsqueeze(0), down2.unsqueeze(0), scale_t)
        u, s, vh = u[0], s[0], vh[0]
    else:
        u, s, vh = _factorized_core(up2, down2, float(scale))
    return SVD(U=u, S=s, Vh=vh, rel_error=0.0, fro_norm=_fro_of_singular_values(s), kernel=kernel)


def factorized_svd_batched(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    mids: Sequence[torch.Tensor] | None = None,
    scales: Sequence[float] | float = 1.0,
    *,
    method: FactorizedMethod = DEFAULT_FACTORIZED_METHOD,
) -> list[SVD]:
    """:func:`factorized_svd` for many same-shape problems at once (stacked, batched kernels).

    Meant for the GPU, where one batched call replaces hundreds of small kernel launches; the results
    equal those of a loop over :func:`factorized_svd` up to float rounding (signs are canonical in both).

    :param ups: the ``up`` factors, all of one shape.
    :param downs: the ``down`` factors, all of one shape.
    :param mids: optional Tucker cores, one per problem (all present or ``None``).
    :param scales: one scale for all, or one per problem.
    :param method: ``"gram"`` or ``"qr"``, as for :func:`factorized_svd`.
    :raises NonFiniteFactorsError: NaN or infinite values in some problem's factors (``problems`` says which).
    :raises LinalgError: if the lists differ in length, the problems differ in shape, dtype or device, or
        the method is unknown.
    """
    _check_method(method)
    count = len(ups)
    if len(downs) != count:
        raise LinalgError(f"got {count} lora_up tensors but {len(downs)} lora_down tensors")
    if mids is not None and len(mids) != count:
        raise LinalgError(f"got {count} lora_up tensors but {len(mids)} lora_mid tensors")
    scale_list = [float(scales)] * count if isinstance(scales, (int, float)) else [float(x) for x in scales]
    if len(scale_list) != count:
        raise LinalgError(f"got {count} problems but {len(scale_list)} scales")
    if count == 0:
        return []
    prepared = [_prepare_pair(ups[i], downs[i], None if mids is None else mids[i]) for i in range(count)]
    first_up, first_down, kernel = prepared[0]
    for up2, down2, kern in prepared[1:]:
        if (
            up2.shape != first_up.shape
            or down2.shape != first_down.shape
            or kern != kernel
            or up2.dtype != first_up.dtype
            or up2.device != first_up.device
        ):
            raise LinalgError(
                "batched factorized SVD needs problems of one shape, dtype and device: "
                f"{tuple(first_up.shape)} x {tuple(first_down.shape)} "
                f"vs {tuple(up2.shape)} x {tuple(down2.shape)}"
            )
    up_b = torch.stack([p[0] for p in prepared])
    down_b = torch.stack([p[1] for p in prepared])
    scale_b = torch.tensor(scale_list, dtype=up_b.dtype, device=up_b.device)
    if method == "gram":
        u, s, vh = _gram_factorized(up_b, down_b, scale_b)
    else:
        u, s, vh = _factorized_core(up_b, down_b, scale_b[:, None, None])
    # One device-to-host transfer for all the norms instead of one synchronisation per problem.
    fro_norms = s.to(torch.float64).square().sum(dim=-1).sqrt().tolist()
    return [
        SVD(U=u[i], S=s[i], Vh=vh[i], rel_error=0.0, fro_norm=float(fro_norms[i]), kernel=kernel)
        for i in range(count)
    ]


# ------------------------------------------------------------------------------------------- dense SVDs


def exact_svd(m: torch.Tensor) -> SVD:
    """Dense thin SVD of a 2-D matrix, or of a conv weight ``[out, in, kh, kw]`` flattened to 2-D.

    A conv weight is decomposed as ``[out, in*kh*kw]``.

    :returns: an :class:`SVD` with all ``min(m, n)`` triplets, ``rel_error = 0.0``, ``kernel`` set for 4-D
        input.
    :raises LinalgError: on an unsupported dtype or shape.
    """
    mat, kernel = _as_matrix(m, "matrix")
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    u, vh = _canonical_signs(u, vh)
    return SVD(U=u, S=s, Vh=vh, rel_error=0.0, fro_norm=_fro_of_singular_values(s), kernel=kernel)


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    # Re-orthonormalising after every product is what keeps power iterations usable in float32:
    # without it the columns collapse onto the leading singular direction and the small ones are lost.
    q: torch.Tensor = torch.linalg.qr(y).Q
    return q


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> RandomizedSVD:
    """Seeded randomized SVD (range finder with power iterations) truncated to ``rank``.

    Algorithm (Halko, Martinsson, Tropp 2011): draw a Gaussian sketch ``Omega [n, l]`` with
    ``l = min(rank + oversample, m, n)``; ``Q = orth(M Omega)``; ``n_iter`` times ``Q = orth(M orth(M^T
    Q))``; then the small SVD ``Q^T M = Ub S Vh`` and ``U = Q Ub``, truncated to ``rank``.

    The sketch is drawn on the CPU from ``generator`` (or a fresh generator seeded with ``seed``, or
    :data:`DEFAULT_SEED`) and moved to the matrix's device, so a seed gives the same result, up to
    float rounding, on every device. (``torch.svd_lowrank`` takes no generator.)

    ``rel_error`` is ``||M - U S Vh||_F / ||M||_F`` of the returned approximation, computed without
    forming it as ``sqrt(max(||M||_F^2 - sum(S^2), 0)) / ||M||_F``. The identity is exact: ``U S Vh =
    Q B_k`` where ``B_k`` is the best rank-``rank`` approximation of ``B = Q^T M``, and ``M - Q B_k =
    (I - Q Q^T) M + Q (B - B_k)``, two terms in orthogonal subspaces; Pythagoras gives ``||M||^2 - ||B||^2``
    plus ``||B||^2 - sum(S^2)``. Subtracting nearly equal numbers limits its resolution to about
    ``sqrt(eps)`` of ``||M||_F`` (1e-8 in float64, 3e-4 in float32): an error below that reads as ~0.

    :param m: ``[m, n]``, or a conv weight ``[out, in, kh, kw]`` (flattened; ``kernel`` is recorded).
    :param rank: target rank, at least 1; capped at ``min(m, n)``.
    :param oversample: extra sketch columns (more gives a better subspace).
    :param n_iter: power iterations (each costs two passes over ``M``; 2 suits slowly decaying spectra).
    :raises LinalgError: on bad parameters, dtype or shape, or a non-CPU generator.
    """
    mat, kernel = _as_matrix(m, "matrix")
    if rank < 1:
        raise LinalgError(f"randomized SVD rank must be at least 1, got {rank}")
    if oversample < 0:
        raise LinalgError(f"oversample must be >= 0, got {oversample}")
    if n_iter < 0:
        raise LinalgError(f"n_iter must be >= 0, got {n_iter}")
    gen = _make_generator(generator, seed)
    rows, cols = int(mat.shape[0]), int(mat.shape[1])
    k = min(rank, rows, cols)
    sketch_size = min(k + oversample, rows, cols)

    omega = torch.randn(cols, sketch_size, generator=gen, dtype=mat.dtype, device="cpu").to(mat.device)
    q = _orthonormal_basis(mat @ omega)
    for _ in range(n_iter):
        q = _orthonormal_basis(mat.mT @ q)
        q = _orthonormal_basis(mat @ q)
    b = q.mT @ mat
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub[:, :k]
    s = s[:k]
    vh = vh[:k, :]
    u, vh = _canonical_signs(u, vh)

    # float64: the error below is a difference of two nearly equal squares, so a float32 norm (off by
    # ~1e-7 relative, i.e. 2e-7 of ||M||^2) would swamp an error of 1e-2 (1e-4 of ||M||^2) entirely
    fro = float(torch.linalg.vector_norm(mat, dtype=torch.float64))
    if fro == 0.0:
        rel_error = 0.0
    else:
        kept_sq = float(s.to(torch.float64).square().sum())
        # max(., 0): rounding can make the kept energy exceed ||M||^2 by a hair when nothing is lost.
        rel_error = math.sqrt(max(fro * fro - kept_sq, 0.0)) / fro
    return RandomizedSVD(
        U=u,
        S=s,
        Vh=vh,
        rel_error=rel_error,
        fro_norm=fro,
        kernel=kernel,
        sketch_size=sketch_size,
        n_iter=n_iter,
    )


def choose_svd_method(rows: int, cols: int, rank: int) -> Literal["exact", "randomized"]:
    """The method :func:`lowrank_svd` uses with ``method="auto"`` for a ``rows x cols`` matrix.

    Randomized when the target rank is small against the matrix (``4 * rank < min(rows, cols)``) and the
    matrix is not small (``min(rows, cols) >= 256``); below that a dense SVD is cheap and optimal.
    """
    small = min(rows, cols)
    return "randomized" if 4 * rank < small and small >= 256 else "exact"


def lowrank_svd(
    m: torch.Tensor,
    rank: int,
    *,
    method: SvdMethod = "auto",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    oversample: int = 8,
    n_iter: int = 2,
) -> SVD:
    """Rank-``rank`` SVD of ``m`` by the exact or the randomized method, with its relative error.

    :param method: ``"exact"`` (dense SVD, then truncate), ``"randomized"`` (:func:`randomized_svd`) or
        ``"auto"`` (:func:`choose_svd_method`).
    :returns: an :class:`SVD` with ``min(rank, m, n)`` triplets; ``rel_error`` is the relative Frobenius
        error of the truncation (from the discarded singular values for the exact method, from the
        estimate of :func:`randomized_svd` otherwise).
    :raises LinalgError: on an unknown method or bad parameters.
    """
    mat, _ = _as_matrix(m, "matrix")
    if rank < 1:
        raise LinalgError(f"low-rank SVD rank must be at least 1, got {rank}")
    if method not in ("auto", "exact", "randomized"):
        raise LinalgError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'")
    chosen = choose_svd_method(int(mat.shape[0]), int(mat.shape[1]), rank) if method == "auto" else method
    if chosen == "randomized":
        return randomized_svd(m, rank, oversample=oversample, n_iter=n_iter, generator=generator, seed=seed)
    return exact_svd(m).truncate(rank)
