"""Norm-layer deltas (LyCORIS ``w_norm`` / ``b_norm``): ``weight += w_norm``, ``bias += b_norm``.

These target LayerNorm / GroupNorm affine parameters (1-d). No alpha scaling applies.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule
from lorasmith.adapters.summary import ModuleSummary

__all__ = ["NormModule"]


class NormModule(AdapterModule):
    """A norm-layer delta (``algo`` ``"norm"``); :meth:`bias_delta` returns ``b_norm``."""

    def __init__(
        self, summary: ModuleSummary, tensors: Mapping[str, Tensor], alpha: float | None, scale: float
    ) -> None:
        super().__init__(summary, tensors, alpha, scale)
        b_norm = self.tensors.get("b_norm")
        if b_norm is not None:
            self.bias = b_norm.reshape(-1)

    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return self._t("w_norm", dtype, device) * self.scale
