"""Build an :class:`~lorasmith.adapters.base.AdapterModule` from one module's tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lorasmith.adapters.base import AdapterModule, rank_scale, read_alpha
from lorasmith.adapters.full import FullModule
from lorasmith.adapters.glora import GloraModule
from lorasmith.adapters.loha import LohaModule
from lorasmith.adapters.lokr import LokrModule
from lorasmith.adapters.lora import LoraModule
from lorasmith.adapters.norm import NormModule
from lorasmith.adapters.oft import OftModule
from lorasmith.adapters.summary import ROLE_OF_SUFFIX, analyze, normalize_suffix
from lorasmith.archs.base import lora_modules
from lorasmith.errors import AdapterError

__all__ = ["parse_module", "parse_modules"]

_CLASSES: dict[str, type[AdapterModule]] = {
    "lora": LoraModule,
    "locon-tucker": LoraModule,
    "loha": LohaModule,
    "lokr": LokrModule,
    "full": FullModule,
    "norm": NormModule,
    "oft": OftModule,
    "boft": OftModule,
    "glora": GloraModule,
}

# algorithms whose alpha divides a rank; for the others alpha is a constraint (OFT) or unused
_RANK_SCALED = frozenset({"lora", "locon-tucker", "loha", "lokr", "glora"})


def parse_module(name: str, tensors: Mapping[str, Tensor]) -> AdapterModule:
    """Recognise the algorithm of one module from its ``{suffix: tensor}`` and build it.

    Suffixes are those of :data:`lorasmith.archs.base.LORA_SUFFIXES` (``.lora_down.weight``,
    ``.lora_A.weight``, ``.hada_w1_a``, ``.alpha``...), as grouped by
    :func:`lorasmith.archs.base.lora_modules`. The shape rules are those of
    :func:`lorasmith.adapters.summary.analyze`; in addition ``alpha`` must be a finite 0-d or 1-element
    tensor and every factor a floating-point tensor.

    Missing alpha means scale 1; for rank-based algorithms the scale is ``alpha / rank`` (an alpha of 0
    also means scale 1, as in the trainers). For OFT/BOFT alpha is the constraint; full and norm modules
    ignore it.

    :raises AdapterError: naming the module and the problem.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    by_suffix: dict[str, Tensor] = {}
    for suffix, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(
                f"adapter module {name!r}: {suffix!r} is a {type(tensor).__name__}, not a tensor"
            )
        key = normalize_suffix(suffix)
        if key in by_suffix:
            raise AdapterError(f"adapter module {name!r}: suffix {key!r} given twice")
        shapes[key] = tuple(tensor.shape)
        by_suffix[key] = tensor
    summary = analyze(name, shapes)
    by_role = {ROLE_OF_SUFFIX[suffix]: t for suffix, t in by_suffix.items()}
    for role, t in by_role.items():
        if role != "alpha" and not t.is_floating_point():
            raise AdapterError(
                f"adapter module {name!r}: {summary.roles[role]!r} has dtype {t.dtype}, not a float"
            )
    alpha = read_alpha(name, by_role["alpha"]) if "alpha" in by_role else None
    scale = rank_scale(alpha, summary.rank) if summary.algo in _RANK_SCALED else 1.0
    return _CLASSES[summary.algo](summary, by_role, alpha, scale)


def parse_modules(state: Mapping[str, Tensor]) -> dict[str, AdapterModule]:
    """Parse every adapter module of a whole state dict (``{full key: tensor}``).

    Keys without a LoRA-family suffix (e.g. a text-encoder embedding) are skipped.
    """
    out: dict[str, AdapterModule] = {}
    for module, keys in lora_modules(state).items():
        out[module] = parse_module(module, {suffix: state[key] for suffix, key in keys.items()})
    return out
