"""The one place that turns a ``--device`` value into a torch device for the ops (imports torch)."""

from __future__ import annotations

import torch

from lorasmith.errors import LorasmithError
from lorasmith.linalg import resolve_device
from lorasmith.linalg.errors import LinalgError


def compute_device(spec: str, *, error: type[LorasmithError] = LorasmithError) -> torch.device:
    """``resolve_device(spec)``, with a bad or unavailable device reported as ``error`` (one line + hint)."""
    try:
        return resolve_device(spec)
    except LinalgError as exc:
        raise error(str(exc), hint="pass --device cpu, cuda or cuda:N") from None
