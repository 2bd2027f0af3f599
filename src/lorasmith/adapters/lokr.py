"""LoKr (low-rank Kronecker product): ``dW = g * kron(w1, w2)``.

``w1 [a, c]`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2`` (``[b, d]`` or, for a
conv, ``[b, d, kh, kw]``), ``lokr_w2_a @ lokr_w2_b`` (``[b, d]`` or ``[b, d*kh*kw]`` flattened), or a
Tucker product ``sum_pq t2[p, q, k, l] w2_a[p, o] w2_b[q, i]`` (``w2_a [r, b]``, ``w2_b [r, d]``, the
LyCORIS layout). The result is ``[a*b, c*d(, kh, kw)]``.

The scale is ``alpha / r`` with ``r`` the rank of the factored part (``w2_b.shape[0]`` when w2 is
factored, else ``w1_b.shape[0]``); when both Kronecker factors are stored full the scale is 1 whatever
alpha says (LyCORIS writes ``alpha = dim`` there and ignores it on load).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule

__all__ = ["LokrModule"]


class LokrModule(AdapterModule):
    """A LoKr module (``algo`` ``"lokr"``)."""

    def _w1(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        if "lokr_w1" in self.tensors:
            return self._t("lokr_w1", dtype, device)
        return self._t("lokr_w1_a", dtype, device) @ self._t("lokr_w1_b", dtype, device)

    def _w2(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        if "lokr_w2" in self.tensors:
            return self._t("lokr_w2", dtype, device)
        wa = self._t("lokr_w2_a", dtype, device)
        wb = self._t("lokr_w2_b", dtype, device)
        if "lokr_t2" in self.tensors:
            t = self._t("lokr_t2", dtype, device)
            return torch.einsum("pq...,po,qi->oi...", t, wa, wb)
        return wa @ wb

    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        w1 = self._w1(dtype, device)
        w2 = self._w2(dtype, device)
        if w2.ndim > 2:
            # kron over (out, in) only: give w1 singleton kernel axes so the kernel comes from w2 alone
            w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - 2)))
        # torch.kron views its inputs; einsum results can be non-contiguous
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale
