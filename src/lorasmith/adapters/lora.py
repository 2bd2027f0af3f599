"""LoRA and LoCon (incl. Tucker): ``dW = (alpha / r) * up @ down``, and writing LoRA factors back.

Accepted spellings (all parsed to the same module): kohya ``.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``; PEFT ``.lora_A.weight`` / ``.lora_B.weight`` (also ``.lora_A.default.weight``); old diffusers
``_lora.down.weight``, ``.lora.down.weight`` and ``.lora_linear_layer.down.weight`` (and their ``up``).

Shapes: linear ``up [out, r]``, ``down [r, in]``; conv ``up [out, r, 1, 1]``, ``down [r, in, kh, kw]``,
whose product is taken on ``down`` flattened to ``[r, in*kh*kw]`` and reshaped back. LoCon Tucker adds
``lora_mid [r, r, kh, kw]`` with a 1x1 ``down``: ``dW[o, i, k, l] = g * sum_ab up[o, a] mid[a, b, k, l]
down[b, i]``. The rank that alpha divides is ``down.shape[0]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule, LowRank, compute_dtype
from lorasmith.adapters.summary import ModuleSummary
from lorasmith.errors import AdapterError

__all__ = ["LoraModule", "encode_lora"]


class LoraModule(AdapterModule):
    """A LoRA / LoCon module (``algo`` ``"lora"``), or LoCon Tucker (``algo`` ``"locon-tucker"``)."""

    def __init__(
        self, summary: ModuleSummary, tensors: Mapping[str, Tensor], alpha: float | None, scale: float
    ) -> None:
        super().__init__(summary, tensors, alpha, scale)
        self.up: Tensor = self.tensors["up"]
        self.down: Tensor = self.tensors["down"]
        self.mid: Tensor | None = self.tensors.get("mid")

    def _factors(self) -> LowRank:
        out_shape = self.summary.delta_shape
        assert out_shape is not None
        up = self.up.reshape(self.up.shape[0], self.up.shape[1])
        if self.mid is not None:
            down = self.down.reshape(self.down.shape[0], self.down.shape[1])
        else:
            # explicit column count, not -1: reshape cannot infer -1 for a 0-element tensor (parse_module
            # refuses rank 0, but a module built by hand should fail where its shape is checked, not here)
            down = self.down.reshape(self.down.shape[0], math.prod(self.down.shape[1:]))
        return LowRank(
            up=up, down=down, scale=self.scale, mid=self.mid, kernel=self.kernel, out_shape=out_shape
        )

    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        f = self._factors()
        up = f.up.to(device=device, dtype=dtype)
        down = f.down.to(device=device, dtype=dtype)
        if f.mid is not None:
            mid = f.mid.to(device=device, dtype=dtype)
            # Tucker: contract the core with both factors; the kernel axes of mid pass through
            d = torch.einsum("oa,ab...,bi->oi...", up, mid, down)
        else:
            d = up @ down
        return (d * self.scale).reshape(f.out_shape)

    def lowrank(self) -> LowRank | None:
        """The factors (``mid`` set for LoCon Tucker; see :meth:`LowRank.fold`), ``None`` with DoRA."""
        if self.dora_scale is not None:
            return None
        return self._factors()


def encode_lora(
    up: Tensor,
    down: Tensor,
    alpha: float | None,
    *,
    suffixes: Literal["kohya", "peft"] = "kohya",
    conv: bool = False,
    kernel: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The ``{suffix: tensor}`` of one LoRA module, ready to be written under its module name.

    :param up: ``[out, r]`` (or ``[out, r, 1, 1]``).
    :param down: ``[r, in]``, ``[r, in*kh*kw]`` or ``[r, in, kh, kw]``.
    :param alpha: the module's alpha (the delta is ``alpha / r * up @ down``); ``None`` means scale 1.
    :param suffixes: ``"kohya"`` writes ``.lora_down.weight``, ``.lora_up.weight`` and a 0-d float32
        ``.alpha`` (``alpha = r`` when ``alpha`` is ``None``, so loaders that insist on an alpha read
        scale 1). ``"peft"`` writes ``.lora_A.weight`` / ``.lora_B.weight`` and no alpha: the scale
        ``g = alpha / r`` is baked into the factors, ``sqrt(|g|)`` into each (the sign goes to ``up``).
        Splitting it keeps both factors' magnitudes where training left them: putting all of a small
        ``g`` (say 1/128) into ``up`` alone pushes typical fp16 ``up`` values into the subnormal range.
    :param conv: write conv-shaped factors (``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``).
    :param kernel: the conv kernel when ``down`` is given flattened; defaults to ``down``'s own kernel,
        else ``(1, 1)``.
    :param dtype: the dtype to write the factors in (default: ``up``'s dtype). The arithmetic of the PEFT
        baking is done in float32 or wider first.
    :raises AdapterError: rank mismatch, wrong number of dimensions, a kernel that does not divide
        ``down``, a non-finite alpha, or a non-1x1 kernel with ``conv=False``.
    """
    what = "encode_lora"
    if up.ndim < 2 or any(d != 1 for d in up.shape[2:]):
        raise AdapterError(f"{what}: up must be [out, r] or [out, r, 1, 1], got {list(up.shape)}")
    if down.ndim < 2:
        raise AdapterError(f"{what}: down must be [r, in] or [r, in, kh, kw], got {list(down.shape)}")
    r = int(up.shape[1])
    if down.shape[0] != r:
        raise AdapterError(
            f"{what}: rank mismatch: up {list(up.shape)} has rank {r}, down {list(down.shape)}"
        )
    if alpha is not None and not math.isfinite(alpha):
        raise AdapterError(f"{what}: alpha is {alpha}")
    if suffixes not in ("kohya", "peft"):
        raise AdapterError(f"{what}: unknown suffix style {suffixes!r}", hint="use 'kohya' or 'peft'")
    out_dtype = dtype or up.dtype
    up2 = up.reshape(up.shape[0], r)
    if conv:
        k = tuple(kernel) if kernel is not None else (tuple(down.shape[2:]) if down.ndim > 2 else (1, 1))
        flat = down.reshape(r, -1)
        kk = math.prod(k)
        if not k or kk == 0 or flat.shape[1] % kk:
            raise AdapterError(f"{what}: kernel {list(k)} does not divide down {list(down.shape)}")
        down_w = flat.reshape(r, flat.shape[1] // kk, *k)
        up_w = up2.reshape(up2.shape[0], r, *([1] * len(k)))
    else:
        if kernel is not None and any(d != 1 for d in kernel):
            raise AdapterError(f"{what}: kernel {list(kernel)} given with conv=False")
        if down.ndim > 2 and any(d != 1 for d in down.shape[2:]):
            raise AdapterError(f"{what}: down {list(down.shape)} has a kernel; pass conv=True")
        down_w = down.reshape(r, down.shape[1])
        up_w = up2
    if suffixes == "kohya":
        a = float(r) if alpha is None else float(alpha)
        return {
            ".lora_down.weight": down_w.to(out_dtype).contiguous(),
            ".lora_up.weight": up_w.to(out_dtype).contiguous(),
            # float32, not the factor dtype: fp16/bf16 cannot hold most non-integer alphas exactly
            ".alpha": torch.tensor(a, dtype=torch.float32),
        }
    g = 1.0 if alpha is None else float(alpha) / r
    root = math.sqrt(abs(g))
    wide = compute_dtype(up.dtype, down.dtype)
    return {
        ".lora_A.weight": (down_w.to(wide) * root).to(out_dtype).contiguous(),
        ".lora_B.weight": (up_w.to(wide) * math.copysign(root, g)).to(out_dtype).contiguous(),
    }
