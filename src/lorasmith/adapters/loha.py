"""LoHa (low-rank Hadamard product): ``dW = g * (w1a @ w1b) * (w2a @ w2b)``, elementwise.

``g = alpha / r`` with ``r = hada_w1_b.shape[0]``. Plain factors are 2-D: ``w1a [out, r]``,
``w1b [r, in]`` (for a conv, ``[r, in*kh*kw]``, flattened in torch's order). With Tucker cores
(``hada_t1``, ``hada_t2`` of shape ``[r, r, kh, kw]``) the factors are stored mode-wise, both as
``[r, dim]``: ``w1a [r, out]``, ``w1b [r, in]``, and each product is
``P[o, i, k, l] = sum_ab t[a, b, k, l] w_a[a, o] w_b[b, i]`` (the LyCORIS layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule

__all__ = ["LohaModule"]


class LohaModule(AdapterModule):
    """A LoHa module (``algo`` ``"loha"``), with or without Tucker cores."""

    def _product(self, i: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        wa = self._t(f"hada_w{i}_a", dtype, device)
        wb = self._t(f"hada_w{i}_b", dtype, device)
        if f"hada_t{i}" in self.tensors:
            t = self._t(f"hada_t{i}", dtype, device)
            # mode products of the core with the two factor matrices (both stored [r, dim])
            return torch.einsum("ab...,ao,bi->oi...", t, wa, wb)
        return wa @ wb

    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        # the scale is applied once, to the first product, before the Hadamard product
        return (self._product(1, dtype, device) * self.scale) * self._product(2, dtype, device)
