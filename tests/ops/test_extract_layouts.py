"""extract with base and tuned in different checkpoint layouts (single file, diffusers folder or file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorasmith.adapters.parse import parse_modules
from lorasmith.io.reader import load_all
from lorasmith.ops.convert import convert
from lorasmith.ops.extract import extract
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_tuned

FACTOR = 32
# planted weights: a UNet attention, a UNet conv, a text-encoder projection; Z-Image's fused q/k/v
PLANTED = {
    "sd1": [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.0.in_layers.2.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
    ],
    "zimage": ["layers.2.attention.qkv.weight", "noise_refiner.0.feed_forward.w1.weight"],
}


def _lora_deltas(path: Path, family: str) -> dict[str, torch.Tensor]:
    arch = get(family)
    out: dict[str, torch.Tensor] = {}
    for name, mod in parse_modules(load_all(path)).items():
        alias = arch.resolve(name)
        assert alias is not None and alias.target.slice is None, name
        out[alias.target.key] = mod.delta(dtype=torch.float64)
    return out


def _check(out: Path, family: str, deltas: dict[str, torch.Tensor], keys: list[str]) -> None:
    got = _lora_deltas(out, family)
    assert set(got) == set(keys)
    for k in keys:
        d = deltas[k]
        err = torch.linalg.vector_norm(got[k].reshape(d.shape) - d) / torch.linalg.vector_norm(d)
        assert float(err) < 1e-6, (k, float(err))


def _pair(tmp_path: Path, family: str) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    arch = get(family)
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(arch, base, factor=FACTOR, dtype=torch.float64)
    tuned = tmp_path / "tuned.safetensors"
    deltas = make_tuned(arch, tensors, tuned, modules=PLANTED[family], rank=2)
    return base, tuned, deltas


@pytest.mark.parametrize("family", ["sd1", "zimage"])
@pytest.mark.parametrize("which", ["tuned", "base"])
def test_one_input_as_a_diffusers_folder(tmp_path: Path, family: str, which: str) -> None:
    base, tuned, deltas = _pair(tmp_path, family)
    folder = tmp_path / f"{which}-diffusers"
    convert(tuned if which == "tuned" else base, folder, to="diffusers")
    args = (base, folder) if which == "tuned" else (folder, tuned)
    out = tmp_path / "lora.safetensors"
    res = extract(
        *args, output=out, rank=2, conv_rank=2, device="cpu", precision="float64", save_dtype="fp32"
    )
    assert res.modules == len(PLANTED[family])
    _check(out, family, deltas, PLANTED[family])


def test_base_as_a_diffusers_unet_file(tmp_path: Path) -> None:
    """A lone diffusers UNet file against a full single file: the UNet is extracted, the rest skipped."""
    base, tuned, deltas = _pair(tmp_path, "sd1")
    folder = tmp_path / "base-diffusers"
    convert(base, folder, to="diffusers")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "lora.safetensors"
    extract(
        unet, tuned, output=out, rank=2, conv_rank=2, device="cpu", precision="float64", save_dtype="fp32"
    )
    unet_keys = [k for k in PLANTED["sd1"] if k.startswith("model.diffusion_model.")]
    _check(out, "sd1", deltas, unet_keys)


def test_both_in_diffusers_layout_as_checkpoint(tmp_path: Path) -> None:
    """--as-checkpoint from a diffusers base writes base + delta in the single-file layout."""
    base, tuned, _deltas = _pair(tmp_path, "zimage")
    bf, tf = tmp_path / "b", tmp_path / "t"
    convert(base, bf, to="diffusers")
    convert(tuned, tf, to="diffusers")
    out = tmp_path / "ckpt.safetensors"
    extract(bf, tf, output=out, rank=2, device="cpu", precision="float64", as_checkpoint=True)
    got, want = load_all(out), load_all(tuned)
    assert set(got) == set(want)
    for k in PLANTED["zimage"]:
        assert torch.allclose(got[k], want[k], atol=1e-9), k
