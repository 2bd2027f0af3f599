"""LoRA-family adapters: parse a module's tensors, materialise its delta, expose factors, encode back.

Algorithms: LoRA / LoCon (every trainer's spelling), LoCon Tucker, LoHa, LoKr, DoRA (on any of them),
full diff, norm deltas, OFT, BOFT and GLoRA. Entry points:

- :func:`parse_module` / :func:`parse_modules`: tensors -> :class:`AdapterModule`;
- :meth:`AdapterModule.delta`, :meth:`AdapterModule.apply`, :meth:`AdapterModule.lowrank`;
- :func:`encode_lora`: low-rank factors -> the tensors to write (kohya or PEFT suffixes);
- :func:`module_summary`: the header-level summary, torch-free.

Importing this package does not import torch: the names are loaded on first use, so
``lorasmith.adapters.summary`` stays usable on torch-free paths (``lorasmith inspect``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorasmith.adapters.base import AdapterModule, LowRank
    from lorasmith.adapters.dora import decompose
    from lorasmith.adapters.full import FullModule
    from lorasmith.adapters.glora import GloraModule
    from lorasmith.adapters.loha import LohaModule
    from lorasmith.adapters.lokr import LokrModule
    from lorasmith.adapters.lora import LoraModule, encode_lora
    from lorasmith.adapters.norm import NormModule
    from lorasmith.adapters.oft import OftModule
    from lorasmith.adapters.parse import parse_module, parse_modules
    from lorasmith.adapters.summary import ALGOS, Algo, ModuleSummary, analyze, module_summary

__all__ = [
    "ALGOS",
    "AdapterModule",
    "Algo",
    "FullModule",
    "GloraModule",
    "LohaModule",
    "LokrModule",
    "LoraModule",
    "LowRank",
    "ModuleSummary",
    "NormModule",
    "OftModule",
    "analyze",
    "decompose",
    "encode_lora",
    "module_summary",
    "parse_module",
    "parse_modules",
]

_WHERE: dict[str, str] = {
    "ALGOS": "summary",
    "Algo": "summary",
    "ModuleSummary": "summary",
    "analyze": "summary",
    "module_summary": "summary",
    "AdapterModule": "base",
    "LowRank": "base",
    "decompose": "dora",
    "FullModule": "full",
    "GloraModule": "glora",
    "LohaModule": "loha",
    "LokrModule": "lokr",
    "LoraModule": "lora",
    "encode_lora": "lora",
    "NormModule": "norm",
    "OftModule": "oft",
    "parse_module": "parse",
    "parse_modules": "parse",
}


def __getattr__(name: str) -> Any:
    """Load the public names lazily (PEP 562), so that importing the package does not import torch."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
