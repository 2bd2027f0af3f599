#!/usr/bin/env python3
"""Regenerate the small example files in ``examples/`` (real key structure, shrunk shapes).

They come from the same fixture factory the tests use (:mod:`lorasmith.testing`), with fixed seeds, so the
output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint, make_lora

OUT = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    """Write every example file."""
    OUT.mkdir(exist_ok=True)
    reg = get_registry()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_output_name": "sdxl-tiny-lora",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.title": "sdxl tiny example",
    }
    make_lora(
        reg.get("sdxl"),
        OUT / "sdxl-tiny-lora.safetensors",
        rank=8,
        alpha=4.0,
        limit=48,
        dtype=torch.float16,
        metadata=meta,
    )
    make_lora(
        reg.get("zimage"),
        OUT / "zimage-musubi-tiny-lora.safetensors",
        spelling="musubi",
        rank=4,
        limit=12,
        dtype=torch.bfloat16,
    )
    make_checkpoint(reg.get("sd1"), OUT / "sd15-tiny-checkpoint.safetensors", dtype=torch.float16)


if __name__ == "__main__":
    main()
