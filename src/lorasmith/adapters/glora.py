"""GLoRA (generalised LoRA, LyCORIS): ``dW = g * (W @ a1 @ a2 + b1 @ b2)``, which depends on ``W``.

Factor layout (current LyCORIS; ``.a1.weight`` etc. are the weights of linear/conv sub-layers):
``a1 [in, r(,1,1)]``, ``a2 [r, in(,1,1)]``, ``b1 [out, r(,1,1)]``, ``b2 [r, in(, kh, kw)]``, optionally a
Tucker core ``bm [r, r, kh, kw]`` with a 1x1 ``b2``. For a conv weight ``W [out, in, kh, kw]`` the
``W @ a1 @ a2`` term contracts the input-channel axis: ``(W a1 a2)[o, j, k, l] = sum_ip W[o, i, k, l]
a1[i, p] a2[p, j]``. ``g = alpha / r`` with ``r = a1.shape[1]``.

Early LyCORIS releases named the factors the other way round (``a1 [r, in]``, ``a2 [in, r]``,
``b1 [r, in]``, ``b2 [out, r]``, delta ``W a2 a1 + b2 b1``); the layout is told from the shapes and
normalised on load. Where both layouts fit the shapes, the current one is assumed.

Strength is linear: ``W' = W + ratio * dW(W)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule, fit_shape
from lorasmith.adapters.summary import ModuleSummary
from lorasmith.errors import AdapterError

__all__ = ["GloraModule"]


class GloraModule(AdapterModule):
    """A GLoRA module (``algo`` ``"glora"``)."""

    weight_dependent = True

    def __init__(
        self, summary: ModuleSummary, tensors: Mapping[str, Tensor], alpha: float | None, scale: float
    ) -> None:
        super().__init__(summary, tensors, alpha, scale)
        if summary.glora_layout == "lycoris-old":
            # old names: a1 <-> a2 and b1 <-> b2 swapped; store in the current layout
            t = self.tensors
            t["a1"], t["a2"], t["b1"], t["b2"] = t["a2"], t["a1"], t["b2"], t["b1"]

    def _mat(self, role: str, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        t = self._t(role, dtype, device)
        return t.reshape(t.shape[0], -1)

    def _b_term(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        b1 = self._mat("b1", dtype, device)
        if "bm" in self.tensors:
            b2 = self._mat("b2", dtype, device)
            bm = self._t("bm", dtype, device)
            return torch.einsum("or,rs...,si->oi...", b1, bm, b2)
        return b1 @ self._mat("b2", dtype, device)

    def _apply_plain(self, base: Tensor, ratio: float) -> Tensor:
        if base.ndim < 2 or base.shape[0] != self.out_features or base.shape[1] != self.in_features:
            raise AdapterError(
                f"adapter module {self.name!r}: GLoRA for [{self.out_features}, {self.in_features}, ...] "
                f"does not fit the weight {list(base.shape)}",
                hint="the adapter was made for another model",
            )
        a1 = self._mat("a1", base.dtype, base.device)
        a2 = self._mat("a2", base.dtype, base.device)
        # W a1 a2 on the input-channel axis (axis 1); a conv's kernel axes ride along
        wa = torch.einsum("oi...,ip,pj->oj...", base, a1, a2)
        wb = fit_shape(self._b_term(base.dtype, base.device), base.shape, self.name)
        return base + ratio * self.scale * (wa + wb)
