"""Dense float64 references shared by the merge, resize and user-pass tests (imported by module name:
pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from lorasmith.ops._merge_lora import load_lora


def full_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Canonical key -> the file's summed delta over the whole (shrunk) weight, whatever its layout
    (fused or split modules), in float64."""
    lora = load_lora(path, 1.0)
    out: dict[str, torch.Tensor] = {}
    for name, mod in lora.modules.items():
        d = mod.delta(dtype=torch.float64)
        d = d.reshape(d.shape[0], -1)
        alias = lora.alias(name)
        assert alias is not None
        spec = lora.arch.target_spec(alias.target.key, lora.file.variant)
        assert spec is not None
        start, rows = 0, d.shape[0]
        if alias.target.slice is not None:
            ratio = Fraction(alias.target.slice[2], d.shape[0])
            start, rows = int(alias.target.slice[1] / ratio), int(spec.shape[0] / ratio)
        full = out.setdefault(alias.target.key, torch.zeros(rows, d.shape[1], dtype=torch.float64))
        full[start : start + d.shape[0]] += d
    return out


def expected_sum(*pairs: tuple[Any, float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i dW_i`` per canonical key of fixtures' exact ``dense_deltas()`` (2-D)."""
    out: dict[str, torch.Tensor] = {}
    for fx, w in pairs:
        for k, v in fx.dense_deltas().items():
            v = w * v.reshape(v.shape[0], -1)
            out[k] = out[k] + v if k in out else v
    return out
