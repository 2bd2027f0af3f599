"""Checkpoint layout conversion through a family's :meth:`~lorasmith.archs.base.Architecture.layout_map`.

``canonical -> layout``: each canonical tensor is read once and written as its layout key(s): renamed,
split along ``dim`` into the entry's parts, and/or with its halves swapped. ``layout -> canonical`` does
the inverse (parts concatenated, halves swapped back). No arithmetic touches a value, so a round trip is
bit-exact. Row counts in a map are the real model's; a file whose tensors are smaller by a common factor
(the shrunk test fixtures) gets them scaled proportionally.

A diffusers output is a folder holding ``transformer/diffusion_pytorch_model.safetensors`` and
``transformer/config.json`` (written from the shapes of the converted weights), loadable with
``FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")``. Built-in maps today: FLUX.1
(``bfl`` <-> ``diffusers-transformer``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lorasmith.archs.base import Architecture, Inventory, LayoutEntry
from lorasmith.errors import InvalidFileError, NotAvailableError, OutputExistsError
from lorasmith.progress import ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    import torch

    from lorasmith.ops.convert import ConvertResult

__all__ = ["LAYOUT_WORDS", "canonical_to_layout", "layout_parts", "layout_to_canonical"]

#: ``--to`` words for checkpoints: the diffusers layout, or back to the single-file (canonical) layout.
LAYOUT_WORDS = {"diffusers": "diffusers", "single": "single", "original": "single", "bfl": "single"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SUBFOLDER = "transformer"


def _diffusers_inventory(arch: Architecture, variant: str | None) -> Inventory:
    for inv in arch.inventories():
        if inv.layout.startswith("diffusers") and (variant is None or inv.variant == variant):
            return inv
    raise NotAvailableError(
        f"family {arch.id!r} has no diffusers layout", hint="only FLUX.1 layouts convert today"
    )


def layout_parts(entry: LayoutEntry, rows_total: int) -> list[tuple[str, int]]:
    """``(layout key, rows)`` of each part for a canonical tensor with ``rows_total`` rows along ``dim``."""
    if len(entry.parts) == 1:
        return [(entry.parts[0][0], rows_total)]
    real = [r for _, r in entry.parts]
    if any(r is None for r in real):
        raise NotAvailableError("a layout entry with several parts must give every part's rows")
    total = sum(r for r in real if r is not None)
    out = []
    for key, r in entry.parts:
        assert r is not None
        local, rem = divmod(r * rows_total, total)
        if rem:
            raise InvalidFileError(f"{key}: {rows_total} rows do not split like the model's {total}")
        out.append((key, local))
    return out


def _swap(t: torch.Tensor, dim: int) -> torch.Tensor:
    import torch

    h = t.shape[dim] // 2
    return torch.cat([t.narrow(dim, h, t.shape[dim] - h), t.narrow(dim, 0, h)], dim=dim).contiguous()


def _config(arch: Architecture, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """``transformer/config.json`` of a FLUX diffusers folder, from the converted weights' shapes."""
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    hidden = shapes["x_embedder.weight"][0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0",
        "patch_size": 1,
        "in_channels": shapes["x_embedder.weight"][1],
        "out_channels": None,
        "num_layers": sum(
            1 for k in shapes if k.startswith("transformer_blocks.") and k.endswith("attn.to_q.weight")
        ),
        "num_single_layers": sum(
            1 for k in shapes if k.startswith("single_transformer_blocks.") and k.endswith("attn.to_q.weight")
        ),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": [16, 56, 56],
    }


def _prep_folder(output: Path, overwrite: bool) -> Path:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output}: output already exists", hint="pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise InvalidFileError(f"{output}: a diffusers output is a folder, and this is a file")
    (output / SUBFOLDER).mkdir(parents=True, exist_ok=True)
    return output / SUBFOLDER


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    # atomic like the tensor writer: a temporary file replaced into place
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def canonical_to_layout(
    src: Path,
    output: Path,
    *,
    arch: Architecture,
    variant: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write the canonical single file ``src`` as a diffusers folder ``output`` (see the module docstring)."""
    from lorasmith.io.header import read_header
    from lorasmith.io.reader import open_tensors
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops.convert import RECORD_KEY, ConvertResult

    inv = _diffusers_inventory(arch, variant)
    mapping = arch.layout_map(inv.id)
    header = read_header(src)
    missing = [k for k in header.tensors if k not in mapping]
    if missing:
        raise InvalidFileError(
            f"{src}: {len(missing)} tensor(s) are not {arch.name} single-file keys, e.g. {missing[0]!r}",
            hint="give the family's original single-file checkpoint (no prefix)",
        )
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in header.tensors.items():
        entry = mapping[key]
        shape = tuple(info.shape)
        for part, rows in layout_parts(entry, shape[entry.dim]):
            plan[part] = (info.dtype, (*shape[: entry.dim], rows, *shape[entry.dim + 1 :]))
    folder = _prep_folder(output, overwrite)
    meta = dict(header.metadata)
    meta[RECORD_KEY] = json.dumps({"layout": inv.layout}, separators=(",", ":"))
    target = folder / WEIGHTS_NAME
    with open_tensors(src) as tf, SafetensorsWriter(target, metadata=meta, overwrite=True, plan=plan) as w:
        for i, key in enumerate(header.tensors):
            entry = mapping[key]
            t = tf.get(key)
            if entry.transform == "swap_halves":
                t = _swap(t, entry.dim)
            start = 0
            for part, rows in layout_parts(entry, t.shape[entry.dim]):
                w.write(part, t.narrow(entry.dim, start, rows).contiguous())
                start += rows
            progress(ProgressEvent("writing", i + 1, len(header.tensors), key))
        written = w.close()
    _write_json(folder / "config.json", _config(arch, {k: s for k, (_, s) in plan.items()}))
    return ConvertResult(
        kind="checkpoint",
        input=str(src),
        output=str(output),
        arch=arch.id,
        variant=variant,
        to_spelling=inv.layout,
        tensors=len(plan),
        file_bytes=written.file_bytes,
        sshs_model_hash=written.sshs_model_hash,
    )


def layout_to_canonical(
    src: Path,
    output: Path,
    *,
    arch: Architecture,
    variant: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Write a diffusers folder (or its weights file) ``src`` as the canonical single file ``output``."""
    from lorasmith.io.header import read_header
    from lorasmith.io.reader import open_tensors
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops.convert import RECORD_KEY, ConvertResult

    weights = src / SUBFOLDER / WEIGHTS_NAME if src.is_dir() else src
    if not weights.is_file():
        raise InvalidFileError(
            f"{src}: no {SUBFOLDER}/{WEIGHTS_NAME} in this folder", hint="give a diffusers folder"
        )
    inv = _diffusers_inventory(arch, variant)
    mapping = arch.layout_map(inv.id)
    header = read_header(weights)
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    present = set(header.tensors)
    used: set[str] = set()
    for key, entry in mapping.items():
        names = [p for p, _ in entry.parts]
        if not all(n in present for n in names):
            if any(n in present for n in names):
                raise InvalidFileError(f"{weights}: only some parts of {key!r} are present")
            continue
        first = header.tensors[names[0]]
        rows = sum(int(header.tensors[n].shape[entry.dim]) for n in names)
        shape = tuple(first.shape)
        plan[key] = (first.dtype, (*shape[: entry.dim], rows, *shape[entry.dim + 1 :]))
        used.update(names)
    extra = present - used
    if extra:
        raise InvalidFileError(
            f"{weights}: {len(extra)} tensor(s) are not {arch.name} diffusers keys, "
            f"e.g. {sorted(extra)[0]!r}",
            hint="give a diffusers transformer of this family",
        )
    meta = {k: v for k, v in header.metadata.items() if k != RECORD_KEY}
    meta[RECORD_KEY] = json.dumps({"layout": "single"}, separators=(",", ":"))
    import torch

    with (
        open_tensors(weights) as tf,
        SafetensorsWriter(output, metadata=meta, overwrite=overwrite, inputs=[weights], plan=plan) as w,
    ):
        for i, key in enumerate(plan):
            entry = mapping[key]
            parts = [tf.get(n) for n, _ in entry.parts]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=entry.dim)
            if entry.transform == "swap_halves":
                t = _swap(t, entry.dim)
            w.write(key, t.contiguous())
            progress(ProgressEvent("writing", i + 1, len(plan), key))
        written = w.close()
    return ConvertResult(
        kind="checkpoint",
        input=str(src),
        output=str(output),
        arch=arch.id,
        variant=variant,
        to_spelling="single",
        tensors=len(plan),
        file_bytes=written.file_bytes,
        sshs_model_hash=written.sshs_model_hash,
    )
