"""DoRA (weight-decomposed low-rank adaptation): the magnitude re-normalisation step.

A DoRA module is any low-rank (or LoHa, LoKr, full, OFT) module plus a magnitude tensor ``m``
(``dora_scale`` in LyCORIS/kohya files, ``lora_magnitude_vector`` in PEFT files). The trained weight is

    W1 = m * (W + dW) / ||W + dW||

where the norm is taken per output row (axis 0: over every dimension except 0; LyCORIS ``wd_on_out``,
PEFT: magnitude shape ``[out, 1, ...]`` or ``[out]``) or per input column (axis 1: over every dimension
except 1; early LyCORIS releases, magnitude shape ``[1, in, ...]``). The axis is told from the
magnitude's shape (:func:`lorasmith.adapters.summary.analyze`). How the strength enters is documented on
:meth:`lorasmith.adapters.base.AdapterModule.apply`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorasmith.errors import AdapterError

__all__ = ["decompose", "weight_norm"]


def weight_norm(weight: Tensor, axis: int) -> Tensor:
    """The L2 norm of ``weight`` over every dimension except ``axis``, kept broadcastable.

    axis 0 gives ``[out, 1, ...]`` (one norm per output row), axis 1 gives ``[1, in, 1, ...]``.
    """
    dims = tuple(d for d in range(weight.ndim) if d != axis)
    norm: Tensor = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    return norm


def decompose(weight: Tensor, magnitude: Tensor, axis: int, name: str = "?") -> Tensor:
    """``magnitude * weight / ||weight||`` along ``axis`` (``weight`` is the full-strength ``W + dW``).

    :raises AdapterError: the magnitude does not have one entry per row (axis 0) or column (axis 1).
    """
    if weight.ndim < 2:
        raise AdapterError(
            f"adapter module {name!r}: DoRA needs a 2-d or wider weight, got {list(weight.shape)}"
        )
    n = weight.shape[axis]
    if magnitude.numel() != n:
        raise AdapterError(
            f"adapter module {name!r}: DoRA magnitude has {magnitude.numel()} entries but the weight "
            f"{list(weight.shape)} has {n} {'rows' if axis == 0 else 'columns'}",
            hint="the LoRA was made for another model",
        )
    view = [1] * weight.ndim
    view[axis] = n
    m = magnitude.to(device=weight.device, dtype=weight.dtype).reshape(view)
    # A zero row/column would divide 0 by 0; clamping at the smallest normal number leaves every
    # non-degenerate norm bit-exact and maps an all-zero row to zero (m * 0 / tiny = 0).
    norm = weight_norm(weight, axis).clamp_min(torch.finfo(weight.dtype).tiny)
    return weight * (m / norm)
