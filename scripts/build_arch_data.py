#!/usr/bin/env python3
"""Regenerate lorasmith's packaged family data and the test manifests from ``shared/manifests``.

The manifests in ``../shared/manifests`` are key/shape records of the real checkpoints and LoRAs of each
family (facts, no weights). A user's clone does not have them, so this script derives the slim files that
the package and its tests need and writes them into the repository:

- ``src/lorasmith/archs/data/<inventory>.json.gz``: one canonical or alternative checkpoint layout per
  file: ``{"id", "family", "variant", "layout", "components", "optional", "tensors": {key: [shape, dtype]}}``.
- ``src/lorasmith/archs/data/keymaps.json.gz``: the ldm/sgm <-> diffusers key tables of SD1/SD2/SDXL.
- ``tests/data/manifests/<lora-manifest>.json.gz``: the LoRA manifests (tensors and the resolved base key
  of every module), used by the detection tests.

Run ``python scripts/build_arch_data.py [--manifests PATH]``; the output is deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PKG_DATA = ROOT / "src" / "lorasmith" / "archs" / "data"
TEST_DATA = ROOT / "tests" / "data" / "manifests"

# manifest stem -> (family id, variant id, layout id, canonical layout of its family?)
INVENTORIES: dict[str, tuple[str, str, str, bool]] = {
    "sd1-ldm": ("sd1", "sd1", "ldm", True),
    "sd1-diffusers-unet": ("sd1", "sd1", "diffusers-unet", False),
    "sd2-ldm": ("sd1", "sd2", "ldm", True),
    "sd2-diffusers-unet": ("sd1", "sd2", "diffusers-unet", False),
    "sdxl-sgm": ("sdxl", "base", "sgm", True),
    "sdxl-diffusers-unet": ("sdxl", "base", "diffusers-unet", False),
    "flux-dev-bfl": ("flux", "dev", "bfl", True),
    "flux-dev-diffusers": ("flux", "dev", "diffusers-transformer", False),
    "flux-schnell-bfl": ("flux", "schnell", "bfl", True),
    "flux-schnell-diffusers": ("flux", "schnell", "diffusers-transformer", False),
    "sd3-medium-comfyui": ("sd3", "sd3-medium", "comfyui", True),
    "sd3.5-medium-comfyui": ("sd3", "sd3.5-medium", "comfyui", True),
    "sd3.5-large-comfyui": ("sd3", "sd3.5-large", "comfyui", True),
    "z-image-comfyui": ("zimage", "z-image", "comfyui", True),
    "z-image-diffusers": ("zimage", "z-image", "diffusers-transformer", False),
}

# safetensors dtype spelling for the torch-style names the manifests use
DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}

COMPONENT_NAMES = {
    "text_encoder_1(clip_l)": "te1",
    "text_encoder_2(openclip bigG)": "te2",
    "text_encoder": "te",
    "mmdit": "mmdit",
    "clip_l": "clip_l",
    "clip_g": "clip_g",
    "t5xxl": "t5xxl",
}


def _load(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    # mtime=0 keeps the gzip bytes identical between runs
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(raw)


def build(manifests: Path) -> None:
    """Write every derived data file from the manifests folder ``manifests``."""
    for stem, (family, variant, layout, canonical) in INVENTORIES.items():
        src = _load(manifests / f"{stem}.json.gz")
        components = {
            COMPONENT_NAMES.get(name, name): prefix
            for name, prefix in (src.get("components") or {}).items()
            if not prefix.startswith("<")
        }
        tensors = {key: [list(shape), DTYPES[dtype]] for key, (shape, dtype) in src["tensors"].items()}
        _dump(
            PKG_DATA / f"{stem}.json.gz",
            {
                "id": stem,
                "family": family,
                "variant": variant,
                "layout": layout,
                "canonical": canonical,
                "description": src.get("variant", ""),
                "components": components,
                "optional": sorted(src.get("optional_keys") or []),
                "tensors": tensors,
            },
        )
    keymaps = _load(manifests / "keymaps-ldm-diffusers.json.gz")
    _dump(PKG_DATA / "keymaps.json.gz", {"maps": keymaps["maps"], "notes": keymaps.get("notes", {})})

    for path in sorted(manifests.glob("lora-*.json.gz")):
        src = _load(path)
        modules = {
            name: {
                "base_manifest": m.get("base_manifest"),
                "base_key": m.get("base_key"),
                "slice": m.get("slice"),
                "block": m.get("block"),
                "kind": m.get("kind"),
                "component": m.get("component"),
            }
            for name, m in src["modules"].items()
        }
        tensors = {key: [list(shape), DTYPES[dtype]] for key, (shape, dtype) in src["tensors"].items()}
        _dump(
            TEST_DATA / path.name,
            {
                "family": src["family"],
                "format": src["format"],
                "rank": src.get("rank"),
                "alpha": src.get("alpha"),
                "tensors": tensors,
                "modules": modules,
            },
        )


def main() -> None:
    """Command-line entry: ``--manifests`` defaults to ``../shared/manifests`` beside the repo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", type=Path, default=ROOT.parent / "shared" / "manifests")
    args = parser.parse_args()
    build(args.manifests)


if __name__ == "__main__":
    main()
