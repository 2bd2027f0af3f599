"""convert (checkpoint layouts): FLUX BFL single file <-> diffusers folder, bit-exact both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasmith.archs.base import LayoutEntry
from lorasmith.errors import NotAvailableError, UsageError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops.convert import convert
from lorasmith.ops.layouts import layout_parts
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora


def test_flux_layout_map_is_a_bijection() -> None:
    arch = get("flux")
    for inv_id in ("flux-dev-diffusers", "flux-schnell-diffusers"):
        inv = next(i for i in arch.inventories() if i.id == inv_id)
        mapping = arch.layout_map(inv_id)
        assert set(mapping) == set(arch.canonical_inventory(inv.variant).tensors)
        parts = [p for e in mapping.values() for p, _ in e.parts]
        assert len(parts) == len(set(parts)) and set(parts) == set(inv.tensors)


def test_layout_map_default_is_not_available() -> None:
    with pytest.raises(NotAvailableError):
        get("sd3").layout_map("sd3-medium-comfyui")


def test_layout_parts_scale_with_shrunk_files() -> None:
    entry = LayoutEntry((("q", 3072), ("k", 3072), ("v", 3072), ("mlp", 12288)))
    assert layout_parts(entry, 336) == [("q", 48), ("k", 48), ("v", 48), ("mlp", 192)]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_single_to_diffusers_and_back_is_bit_exact(tmp_path: Path, variant: str) -> None:
    arch = get("flux")
    src = tmp_path / "flux.safetensors"
    make_checkpoint(arch, src, variant=variant, metadata={"modelspec.title": "x"})
    folder = tmp_path / "flux-diffusers"
    r = convert(src, folder, to="diffusers")
    assert r.arch == "flux" and r.variant == variant
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    h = read_header(weights)
    ref = tmp_path / "ref.safetensors"
    make_checkpoint(arch, ref, variant=variant, layout=f"flux-{variant}-diffusers")
    ref_h = read_header(ref)
    assert {k: v.shape for k, v in h.tensors.items()} == {k: v.shape for k, v in ref_h.tensors.items()}
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["guidance_embeds"] == (variant == "dev")
    assert cfg["num_layers"] == 19 and cfg["num_single_layers"] == 38
    # the swapped halves of norm_out
    a = load_all(src)
    d = load_all(weights)
    w = a["final_layer.adaLN_modulation.1.weight"]
    half = w.shape[0] // 2
    assert torch.equal(d["norm_out.linear.weight"][:half], w[half:])
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    b = load_all(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_header(back).metadata["modelspec.title"] == "x"


def test_layout_errors(tmp_path: Path) -> None:
    arch = get("flux")
    src = tmp_path / "flux.safetensors"
    make_checkpoint(arch, src)
    with pytest.raises(UsageError, match="already a single-file"):
        convert(src, tmp_path / "x.safetensors", to="single")
    fx = make_lora(arch, tmp_path / "l.safetensors", limit=2)
    with pytest.raises(Exception, match="spelling"):
        convert(fx.path, tmp_path / "y", to="diffusers-transformer")


def test_an_incomplete_checkpoint_is_an_error_before_anything_is_written(tmp_path: Path) -> None:
    """The configs need every model's structure: a missing tensor is a one-line error, not a traceback."""
    from lorasmith.errors import InvalidFileError
    from lorasmith.io.writer import save_file

    src = tmp_path / "sd1.safetensors"
    make_checkpoint(get("sd1"), src)
    tensors = load_all(src)
    missing = next(k for k in tensors if k.endswith("input_blocks.1.0.in_layers.2.weight"))
    del tensors[missing]
    save_file(tensors, src, overwrite=True)
    with pytest.raises(InvalidFileError, match="incomplete"):
        convert(src, tmp_path / "out", to="diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1.safetensors"]
