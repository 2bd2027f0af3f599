"""OFT and BOFT: multiplicative orthogonal fine-tuning, ``W' = R W`` with ``R`` orthogonal.

Both store ``oft_blocks`` (``B``), optionally ``rescale`` (one factor per output row) and ``alpha``, which
here is a *constraint*, not a scale. The conventions below are those of the trainers that write these
files (kohya-ss ``networks/oft.py`` and LyCORIS ``diag-oft`` / ``boft``):

- ``Q = B - B^T`` per block (skew-symmetric; no factor 1/2).
- With ``alpha > 0`` the Frobenius norm of ``Q`` over *all* blocks is clipped to ``alpha * out``
  (``out`` = rows of the weight): both trainers multiply the stored constraint by the output dimension.
  ComfyUI clips at ``alpha`` itself, which disagrees with training whenever ``||Q||`` lies between the
  two; lorasmith follows the trainers.
- ``R = (I + Q)(I - Q)^-1`` per block (Cayley transform, orthogonal for skew ``Q``).

OFT (``oft_blocks [n, b, b]``, ``out = n * b``) rotates each group of ``b`` consecutive output rows:
``W'[block k] = R_k^T W[block k]`` (the trainers contract ``R``'s *first* index with the rows, i.e.
``einsum("k n m, k n ... -> k m ...")``). BOFT (``oft_blocks [m, n, b, b]``) applies ``m`` butterfly stages
in order; stage ``i`` permutes the rows so that rows ``2^i * b/2`` apart share a block, multiplies each
block by ``R_{i,k}`` (``einsum("b i j, b j ... -> b i ...")``, i.e. ``R``, not ``R^T``), and undoes the
permutation. ``rescale`` then multiplies each output row.

Strength: every rotation is interpolated towards the identity, ``R(ratio) = I + ratio * (R - I)`` (as
both trainers do), and so is the rescale, ``1 + ratio * (rescale - 1)``: strength 0 leaves the weight
unchanged. (LyCORIS applies ``rescale`` at full strength whatever the multiplier; both agree at 1.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule
from lorasmith.adapters.summary import ModuleSummary
from lorasmith.errors import AdapterError

__all__ = ["OftModule", "butterfly_permutation", "cayley"]


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """The orthogonal blocks ``(I + Q)(I - Q)^-1`` of ``Q = blocks - blocks^T`` (last two axes).

    ``constraint > 0`` clips the Frobenius norm of ``Q`` over the whole tensor to ``constraint``.
    """
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = float(torch.linalg.vector_norm(q))
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    # (I + Q) and (I - Q) are polynomials in Q, so they commute: (I + Q)(I - Q)^-1 = (I - Q)^-1 (I + Q),
    # which a linear solve gives without forming an explicit inverse (better conditioned).
    r: Tensor = torch.linalg.solve(eye - q, eye + q)
    return r


def butterfly_permutation(rows: int, stage: int, block: int, device: torch.device | None = None) -> Tensor:
    """Row order of BOFT stage ``stage``: position ``p`` of the permuted weight holds row ``perm[p]``.

    Rows are split into groups of ``2k`` (``k = 2^stage * block/2``); inside a group, row ``g*k + j``
    (``g`` in {0, 1}) moves to position ``2j + g``, so each run of ``block`` consecutive positions pairs
    rows that are ``k`` apart.
    """
    k = 2**stage * (block // 2)
    return torch.arange(rows, device=device).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


class OftModule(AdapterModule):
    """An OFT (``algo`` ``"oft"``, 3-d blocks) or BOFT (``algo`` ``"boft"``, 4-d blocks) module.

    :ivar constraint: the clip applied to ``||Q||`` (``alpha * out``; 0 = none).
    :ivar stages: butterfly stages (1 for OFT); ``block_num`` and ``block_size``: blocks per stage, and
        their size.
    """

    weight_dependent = True

    def __init__(
        self, summary: ModuleSummary, tensors: Mapping[str, Tensor], alpha: float | None, scale: float
    ) -> None:
        super().__init__(summary, tensors, alpha, scale)
        assert summary.oft_geometry is not None
        assert summary.out_features is not None
        self.stages, self.block_num, self.block_size = summary.oft_geometry
        self.constraint: float = alpha * summary.out_features if alpha is not None and alpha > 0 else 0.0

    def rotations(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """The orthogonal blocks at full strength: ``[n, b, b]`` (OFT) or ``[m, n, b, b]`` (BOFT)."""
        return cayley(self._t("oft_blocks", dtype, device), self.constraint)

    def _apply_plain(self, base: Tensor, ratio: float) -> Tensor:
        rows = base.shape[0]
        if rows != self.block_num * self.block_size:
            raise AdapterError(
                f"adapter module {self.name!r}: {self.algo} blocks cover {self.block_num * self.block_size} "
                f"rows but the weight {list(base.shape)} has {rows}",
                hint="the adapter was made for another model",
            )
        r = self.rotations(base.dtype, base.device)
        eye = torch.eye(self.block_size, dtype=base.dtype, device=base.device)
        r = eye + ratio * (r - eye)
        rest = base.shape[1:]
        if self.algo == "oft":
            blocks = base.reshape(self.block_num, self.block_size, *rest)
            out = torch.einsum("knm,kn...->km...", r, blocks).reshape(base.shape)
        else:
            out = base
            for i in range(self.stages):
                perm = butterfly_permutation(rows, i, self.block_size, base.device)
                blocks = out[perm].reshape(self.block_num, self.block_size, *rest)
                rotated = torch.einsum("kij,kj...->ki...", r[i], blocks).reshape(base.shape)
                out = torch.empty_like(rotated)
                out[perm] = rotated  # undo the permutation
        if "rescale" in self.tensors:
            rs = self._t("rescale", base.dtype, base.device).reshape(rows, *([1] * (base.ndim - 1)))
            out = out * (1 + ratio * (rs - 1))
        return out
