"""The common base of every adapter module, the low-rank view and the shared numeric helpers.

An :class:`AdapterModule` wraps the tensors of one module of a LoRA-family file (already parsed and
validated, see :func:`lorasmith.adapters.parse_module`). It materialises the dense weight delta
(:meth:`AdapterModule.delta`), applies itself to a base weight (:meth:`AdapterModule.apply`) and, where
the delta is exactly a low-rank product, exposes the factors (:meth:`AdapterModule.lowrank`).

Numerical conventions shared by all algorithms:

- Factors are cast to the requested compute dtype (float32 by default, float64 in tests) before any
  arithmetic, never multiplied in their storage dtype (fp16/bf16 products lose several digits).
- ``scale`` (``alpha / rank``) is applied once, on the dense result or on one factor, never twice.
- ``ratio`` (the user's strength) is linear for additive algorithms: ``W + ratio * dW``. Multiplicative
  and weight-dependent algorithms (OFT, BOFT, DoRA) document how they interpolate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lorasmith.adapters.summary import Algo, ModuleSummary
from lorasmith.errors import AdapterError

__all__ = ["AdapterModule", "LowRank", "compute_dtype", "fit_shape", "rank_scale", "read_alpha"]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype to compute in: the widest floating dtype among ``dtypes``, at least float32."""
    out = torch.float32
    for dt in dtypes:
        if dt.is_floating_point:
            out = torch.promote_types(out, dt)
    return out


def read_alpha(name: str, tensor: Tensor) -> float:
    """The value of an ``alpha`` tensor: 0-d (kohya) or 1-element 1-d (LyCORIS).

    :raises AdapterError: any other shape, or a value that is not finite.
    """
    if tensor.ndim > 1 or tensor.numel() != 1:
        raise AdapterError(
            f"adapter module {name!r}: alpha must be a 0-d or 1-element tensor, "
            f"got shape {list(tensor.shape)}"
        )
    # .item() of a bf16/fp16 scalar is exact in a Python float (float64)
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise AdapterError(
            f"adapter module {name!r}: alpha is {value}",
            hint="the file is corrupt or was saved from a diverged run",
        )
    return value


def rank_scale(alpha: float | None, rank: int | None) -> float:
    """``alpha / rank``; 1 when alpha is missing or 0, or when there is no rank.

    kohya's and LyCORIS's trainers both treat a stored alpha of 0 as "alpha = rank" (no scaling), so a
    file that says 0 was trained at scale 1; ComfyUI would read it as scale 0 and silently drop the module.
    """
    if alpha is None or alpha == 0 or not rank:
        return 1.0
    return alpha / rank


def _strip_ones(shape: Sequence[int]) -> tuple[int, ...]:
    dims = list(shape)
    while dims and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def fit_shape(tensor: Tensor, target: Sequence[int], name: str) -> Tensor:
    """Reshape a dense delta to the target weight's shape where the two layouts are the same data.

    Allowed: equal shapes; shapes equal after dropping trailing 1s (SD2 "linear as conv 1x1": a 4-D
    ``[out, in, 1, 1]`` delta for a 2-D ``[out, in]`` weight, or the reverse); and a 2-D ``[out, in*k*k]``
    delta for a conv weight ``[out, in, k, k]`` (LoHa / LoKr store conv factors flattened in exactly
    torch's row-major order, so the reshape is the identity on the data).

    :raises AdapterError: any other combination.
    """
    shape = tuple(int(d) for d in target)
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.numel() == math.prod(shape):
        if _strip_ones(tensor.shape) == _strip_ones(shape):
            return tensor.reshape(shape)
        if tensor.ndim == 2 and len(shape) > 2 and tensor.shape[0] == shape[0]:
            return tensor.reshape(shape)
    raise AdapterError(
        f"adapter module {name!r}: its delta has shape {list(tensor.shape)}, which does not fit "
        f"the target weight's shape {list(shape)}",
        hint="the LoRA was made for another model (or another variant of this family)",
    )


@dataclass(frozen=True)
class LowRank:
    """A delta that is exactly ``scale * up @ down`` (optionally through a Tucker core).

    :ivar up: ``[out, r]``.
    :ivar down: ``[r, in * kh * kw]`` without a core; ``[r2, in]`` with one.
    :ivar scale: ``alpha / rank``, not yet applied to either factor.
    :ivar mid: the Tucker core ``[r, r2, kh, kw]`` of LoCon Tucker (``lora_mid``), or ``None``.
    :ivar kernel: the conv kernel (``(3, 3)``), or ``None`` for a linear layer.
    :ivar out_shape: the shape of the dense delta (``[out, in]`` or ``[out, in, kh, kw]``).

    The factors keep their storage dtype; :meth:`fold` and :meth:`dense` compute in float32 or wider.
    """

    up: Tensor
    down: Tensor
    scale: float
    mid: Tensor | None = None
    kernel: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        """The rank of the product (columns of :attr:`up`)."""
        return int(self.up.shape[1])

    def fold(self, dtype: torch.dtype | None = None) -> LowRank:
        """An equivalent pair without a Tucker core.

        ``down_eff[r, in, kh, kw] = sum_j mid[r, j, kh, kw] * down[j, in]``, flattened to ``[r, in*kh*kw]``.

        The rank stays ``r`` (the core's first dimension). Without a core, returns ``self`` unchanged.
        ``dtype`` is the dtype of the folded ``down`` (default: float32 or wider).
        """
        if self.mid is None:
            return self
        dt = dtype or compute_dtype(self.mid.dtype, self.down.dtype)
        mid = self.mid.to(dt)
        down = self.down.to(device=mid.device, dtype=dt).reshape(self.down.shape[0], -1)
        # contract the core's second index with down's rows; kernel axes ride along
        eff = torch.einsum("ij...,jc->ic...", mid, down)
        return LowRank(
            up=self.up,
            down=eff.reshape(eff.shape[0], -1),
            scale=self.scale,
            mid=None,
            kernel=self.kernel,
            out_shape=self.out_shape,
        )

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense delta ``scale * up @ down`` in :attr:`out_shape`."""
        folded = self.fold(dtype)
        up = folded.up.to(dtype).reshape(folded.up.shape[0], -1)
        down = folded.down.to(device=up.device, dtype=dtype)
        return ((up @ down) * self.scale).reshape(self.out_shape)


class AdapterModule:
    """One parsed adapter module. Subclasses implement one algorithm each.

    :ivar name: the module name (tensor keys without their suffixes).
    :ivar algo: ``lora``, ``locon-tucker``, ``loha``, ``lokr``, ``full``, ``norm``, ``oft``, ``boft``
        or ``glora``. DoRA is not an algorithm of its own: any module may carry a magnitude
        (:attr:`dora_scale`).
    :ivar rank: the rank ``alpha`` divides, ``None`` where there is none.
    :ivar alpha: the stored alpha (for OFT/BOFT: the constraint), ``None`` when absent.
    :ivar scale: the factor the delta is multiplied by (``alpha / rank``, or 1).
    :ivar dora_scale: the DoRA magnitude tensor, ``None`` without DoRA.
    :ivar dora_axis: 0 = one magnitude per output row (LyCORIS ``wd_on_out``, PEFT's
        ``lora_magnitude_vector``; shape ``[out, 1, ...]`` or ``[out]``), 1 = one per input column
        (early LyCORIS; shape ``[1, in, ...]``). Detected from the shape. ``None`` without DoRA.
    :ivar out_features: rows of the target weight; ``in_features``, ``kernel``: see
        :class:`~lorasmith.adapters.summary.ModuleSummary`.
    :ivar summary: the header-level analysis this module was built from.
    """

    #: Whether the algorithm itself (not DoRA) needs the base weight.
    weight_dependent: ClassVar[bool] = False

    def __init__(
        self,
        summary: ModuleSummary,
        tensors: Mapping[str, Tensor],
        alpha: float | None,
        scale: float,
    ) -> None:
        self.summary = summary
        self.name: str = summary.name
        self.algo: Algo = summary.algo
        self.rank: int | None = summary.rank
        self.alpha: float | None = alpha
        self.scale: float = scale
        self.out_features: int | None = summary.out_features
        self.in_features: int | None = summary.in_features
        self.kernel: tuple[int, ...] | None = summary.kernel
        #: role -> tensor (``{"down": ..., "up": ..., "alpha": ...}``)
        self.tensors: dict[str, Tensor] = dict(tensors)
        self.dora_scale: Tensor | None = self.tensors.get("dora")
        self.dora_axis: int | None = summary.dora_axis
        self.bias: Tensor | None = self.tensors.get("diff_b")

    def __repr__(self) -> str:
        extra = f", dora_axis={self.dora_axis}" if self.dora_scale is not None else ""
        return (
            f"{type(self).__name__}(name={self.name!r}, algo={self.algo!r}, rank={self.rank}, "
            f"alpha={self.alpha}, scale={self.scale:g}{extra})"
        )

    # ------------------------------------------------------------------------------------- properties
    @property
    def needs_base(self) -> bool:
        """Whether :meth:`delta` needs the base weight (DoRA, OFT, BOFT, GLoRA)."""
        return self.weight_dependent or self.dora_scale is not None

    @property
    def tensor_bytes(self) -> int:
        """Total bytes of the module's tensors as stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def delta_shape(self) -> tuple[int, ...] | None:
        """The shape of the delta as the factors give it (``None`` when it is the base weight's shape)."""
        return self.summary.delta_shape

    # ---------------------------------------------------------------------------------- overridables
    def _natural_delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        """The dense delta in :attr:`delta_shape` (additive algorithms only)."""
        raise NotImplementedError  # pragma: no cover - weight-dependent subclasses override _apply_plain

    def _apply_plain(self, base: Tensor, ratio: float) -> Tensor:
        """The new weight without DoRA; ``base`` is already in the compute dtype and target shape."""
        d = fit_shape(self._natural_delta(base.dtype, base.device), base.shape, self.name)
        return base + ratio * d

    # ---------------------------------------------------------------------------------------- public
    def delta(
        self,
        base: Tensor | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The dense delta ``W' - W`` at full strength, in ``dtype``.

        :param base: the base weight; required when :attr:`needs_base` (DoRA, OFT, BOFT, GLoRA), where
            the result is ``apply(base) - base``. Otherwise it only supplies the target shape.
        :param shape: the target weight's shape; defaults to ``base.shape``, else the factors' own shape.
            A delta that differs only by trailing 1x1 dims (SD2 linear-as-conv1x1) or that is a flattened
            conv (``[out, in*k*k]``) is reshaped to it; anything else is an :class:`AdapterError`.
        :param dtype: the compute and result dtype.
        :param device: where to compute; defaults to ``base``'s device, else the factors'.
        """
        dev = torch.device(device) if device is not None else (base.device if base is not None else None)
        if self.needs_base:
            if base is None:
                raise AdapterError(
                    f"adapter module {self.name!r}: {self._kind_label()} depends on the base weight",
                    hint="pass the base checkpoint's weight for this module",
                )
            b = self._prepare_base(base, shape, dtype, dev)
            return self._apply_full(b, 1.0) - b
        d = self._natural_delta(dtype, dev)
        target = tuple(shape) if shape is not None else (tuple(base.shape) if base is not None else None)
        return fit_shape(d, target, self.name) if target is not None else d

    def apply(
        self,
        base: Tensor,
        ratio: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The new weight for ``base`` at strength ``ratio``.

        Additive algorithms: ``base + ratio * delta``. OFT/BOFT interpolate each rotation towards the
        identity (see :class:`~lorasmith.adapters.oft.OftModule`).

        With DoRA the full-strength decomposed weight ``W1 = m * (W + dW) / ||W + dW||`` is computed first
        (``dW`` the full-strength delta, the norm taken per output row for :attr:`dora_axis` 0 and per
        input column for axis 1), then ``ratio`` interpolates linearly: ``W' = W + ratio * (W1 - W)``.
        This is what ComfyUI and A1111 do: strength 0 leaves the model unchanged, strength 1 is the
        trained weight, and strength is linear as for every other adapter. (LyCORIS's own merge script
        instead computes ``(W + dW) * (1 + ratio * (m / ||W + dW|| - 1))``, which keeps the whole ``dW``
        at strength 0; both agree at ratio 1.)

        :param base: the base weight (any float dtype, any device; the module's tensors follow it).
        :param ratio: the strength.
        :param dtype: the compute and result dtype; defaults to ``base``'s dtype widened to float32.
        """
        dt = dtype or compute_dtype(base.dtype)
        b = self._prepare_base(base, None, dt, base.device)
        return self._apply_full(b, ratio)

    def lowrank(self) -> LowRank | None:
        """The exact low-rank factors of the delta, or ``None`` when the delta is not such a product.

        ``None`` for LoHa, LoKr, full, norm, OFT, BOFT and GLoRA (they are materialised) and for any module
        with DoRA (its delta depends on the base weight).
        """
        return None

    def bias_delta(
        self, dtype: torch.dtype = torch.float32, *, device: torch.device | str | None = None
    ) -> Tensor | None:
        """The bias delta at full strength (``diff_b``, or ``b_norm`` for norm modules), else ``None``.

        Callers add ``ratio * bias_delta()`` to the base bias.
        """
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    # -------------------------------------------------------------------------------------- helpers
    def _kind_label(self) -> str:
        if self.dora_scale is not None and not self.weight_dependent:
            return f"a DoRA {self.algo} module"
        return f"a {self.algo} module"

    def _t(self, role: str, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return self.tensors[role].to(device=device, dtype=dtype)

    def _prepare_base(
        self, base: Tensor, shape: Sequence[int] | None, dtype: torch.dtype, device: torch.device | None
    ) -> Tensor:
        b = base.to(device=device, dtype=dtype)
        if shape is not None and tuple(shape) != tuple(b.shape):
            if math.prod(shape) != b.numel():
                raise AdapterError(
                    f"adapter module {self.name!r}: base weight {list(b.shape)} "
                    f"does not have shape {list(shape)}"
                )
            b = b.reshape(tuple(shape))
        return b

    def _apply_full(self, base: Tensor, ratio: float) -> Tensor:
        if self.dora_scale is None:
            return self._apply_plain(base, ratio)
        from lorasmith.adapters.dora import decompose

        assert self.dora_axis is not None
        full = self._apply_plain(base, 1.0)
        decomposed = decompose(full, self.dora_scale, self.dora_axis, self.name)
        return base + ratio * (decomposed - base)
