"""Per-block singular-value summaries of a LoRA (the ``inspect --blocks`` table). Imports torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lorasmith.adapters import parse_module
from lorasmith.errors import UsageError
from lorasmith.io.reader import open_tensors
from lorasmith.linalg import factorized_svd
from lorasmith.ops._device import compute_device
from lorasmith.progress import ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from lorasmith.io.header import Header
    from lorasmith.ops.inspect import BlockRow, ModuleRow


def module_singular_values(module: object, device: torch.device) -> torch.Tensor | None:
    """Singular values of a parsed module's effective delta (scale applied), descending.

    Low-rank modules use the factorized SVD (never forming up @ down); LoHa/LoKr/full are materialised.
    Modules that need the base weight (DoRA, OFT, GLoRA) give ``None``.
    """
    from lorasmith.adapters import AdapterModule

    assert isinstance(module, AdapterModule)
    low = module.lowrank()
    if low is not None:
        flat = low.fold()
        svd = factorized_svd(
            flat.up.to(device, torch.float32), flat.down.to(device, torch.float32), scale=float(flat.scale)
        )
        return svd.S.cpu()
    if module.needs_base:
        return None
    delta = module.delta().to(device, torch.float32)
    values: torch.Tensor = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1)).cpu()
    return values


def block_spectra(
    header: Header,
    modules: Mapping[str, Mapping[str, str]],
    rows: list[ModuleRow],
    *,
    device: str = "cpu",
    progress: ProgressCallback,
) -> list[BlockRow]:
    """Group modules by (block, type) and summarise their spectra."""
    from lorasmith.ops.inspect import BlockRow

    dev = compute_device(device, error=UsageError)
    by_name = {r.name: r for r in rows}
    groups: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    with open_tensors(header.path) as tf:
        for i, (name, suffix_keys) in enumerate(sorted(modules.items())):
            row = by_name[name]
            if row.algo == "invalid":
                continue
            module = parse_module(name, {s: tf.get(k) for s, k in suffix_keys.items()})
            s = module_singular_values(module, dev)
            progress(ProgressEvent("spectra", i + 1, len(modules), name))
            if s is None or s.numel() == 0:
                continue
            rank = row.rank or int(s.numel())
            s = s[:rank]
            energy = float((s**2).sum())
            half = max(1, math.ceil(rank / 2))
            share = float((s[:half] ** 2).sum()) / energy if energy > 0 else 1.0
            from lorasmith.archs.base import classify_module

            mtype = classify_module(row.target or name)
            key = (row.block or "?", mtype)
            groups.setdefault(key, []).append((rank, float(s[0]), float(s[-1]), share))
    out = []
    for (block, mtype), items in sorted(groups.items()):
        smax = max(i[1] for i in items)
        smin = min(i[2] for i in items)
        out.append(
            BlockRow(
                block=block,
                type=mtype,
                count=len(items),
                mean_rank=round(sum(i[0] for i in items) / len(items), 2),
                sv_max=smax,
                sv_min=smin,
                ratio=(smax / smin) if smin > 0 else None,
                energy_half=round(sum(i[3] for i in items) / len(items), 4),
            )
        )
    return out
