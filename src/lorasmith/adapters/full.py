"""Full-rank difference (LyCORIS "full" / ``diff``): ``dW = diff``, bias ``+= diff_b``.

No alpha scaling applies: a stored alpha is kept in :attr:`~lorasmith.adapters.base.AdapterModule.alpha`
for reporting but the scale is 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule

__all__ = ["FullModule"]


class FullModule(AdapterModule):
    """A full weight difference (``algo`` ``"full"``)."""

    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return self._t("diff", dtype, device) * self.scale
