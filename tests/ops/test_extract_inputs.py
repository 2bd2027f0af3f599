"""extract: the output's default dtype, and diffusers folders whose weights are sharded or ``.bin``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasmith.adapters.parse import parse_modules
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops.convert import convert
from lorasmith.ops.extract import extract
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_tuned

FACTOR = 32
SDXL_KEYS = [
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.2.0.in_layers.2.weight",
]
SD1_KEYS = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.middle_block.0.in_layers.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
]


def _factor_dtypes(path: Path) -> set[str]:
    factors = ("_up.weight", "_down.weight")
    return {i.dtype for n, i in read_header(path).tensors.items() if n.endswith(factors)}


def test_fp16_weights_give_an_fp16_lora_whatever_the_first_tensor(tmp_path: Path) -> None:
    """An SDXL file starts with the int64 ``position_ids``: the LoRA still takes the weights' fp16."""
    arch = get("sdxl")
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(arch, base, factor=FACTOR, dtype=torch.float16)
    first = next(iter(read_header(base).tensors.values()))
    assert first.dtype == "I64"  # the case of the bug
    tuned = tmp_path / "tuned.safetensors"
    make_tuned(arch, tensors, tuned, modules=SDXL_KEYS, rank=2)
    out = tmp_path / "lora.safetensors"
    res = extract(base, tuned, output=out, rank=2, conv_rank=2, device="cpu")
    assert res.modules == len(SDXL_KEYS)
    assert _factor_dtypes(out) == {"F16"}


def test_the_most_common_weight_dtype_wins(tmp_path: Path) -> None:
    """bf16 weights after fp32 1-d tensors (which a file lists first) give a bf16 LoRA; --save-dtype rules."""
    arch = get("sd1")
    src = tmp_path / "src.safetensors"
    tensors = make_checkpoint(arch, src, factor=FACTOR, dtype=torch.bfloat16)
    mixed = {k: v.float() if v.ndim == 1 and v.is_floating_point() else v for k, v in tensors.items()}
    base = tmp_path / "base.safetensors"
    save_file(mixed, base)
    # the canonical order puts wider dtypes first: int64 position_ids, then the fp32 1-d tensors
    assert [i.dtype for i in read_header(base).tensors.values()][:2] == ["I64", "F32"]
    tuned = tmp_path / "tuned.safetensors"
    make_tuned(arch, mixed, tuned, modules=SD1_KEYS[:1], rank=2)
    out = tmp_path / "lora.safetensors"
    extract(base, tuned, output=out, rank=2, device="cpu")
    assert _factor_dtypes(out) == {"BF16"}
    out16 = tmp_path / "lora16.safetensors"
    extract(base, tuned, output=out16, rank=2, device="cpu", save_dtype="fp16")
    assert _factor_dtypes(out16) == {"F16"}


def _reshard(model: Path, stem: str, fmt: str, shards: int) -> None:
    """Rewrite ``model``'s one safetensors weights file as ``shards`` files of ``fmt`` (with an index when
    several), as ``save_pretrained`` names them."""
    (single,) = model.glob("*.safetensors")
    tensors = load_all(single)
    single.unlink()
    names = list(tensors)
    if shards == 1:
        path = model / f"{stem}.{fmt}"
        torch.save(tensors, path) if fmt == "bin" else save_file(tensors, path)
        return
    size = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.{fmt}"
        torch.save(part, model / shard) if fmt == "bin" else save_file(part, model / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model / f"{stem}.{fmt}.index.json").write_text(json.dumps(index))


def _check(path: Path, deltas: dict[str, torch.Tensor], keys: list[str]) -> None:
    """The SD1 LoRA at ``path`` applies exactly the planted ``deltas`` on ``keys``, and nothing else."""
    arch = get("sd1")
    got: dict[str, torch.Tensor] = {}
    for name, mod in parse_modules(load_all(path)).items():
        alias = arch.resolve(name)
        assert alias is not None, name
        got[alias.target.key] = mod.delta(dtype=torch.float64)
    assert set(got) == set(keys)
    for k in keys:
        d = deltas[k]
        err = torch.linalg.vector_norm(got[k].reshape(d.shape) - d) / torch.linalg.vector_norm(d)
        assert float(err) < 1e-6, (k, float(err))


@pytest.mark.parametrize("which", ["tuned", "base"])
def test_sharded_and_pickled_diffusers_folders(tmp_path: Path, which: str) -> None:
    """A diffusers folder with a sharded UNet and ``.bin`` text encoder is read as convert reads it."""
    arch = get("sd1")
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(arch, base, factor=FACTOR, dtype=torch.float64)
    tuned = tmp_path / "tuned.safetensors"
    deltas = make_tuned(arch, tensors, tuned, modules=SD1_KEYS, rank=2)
    folder = tmp_path / "pipe"
    convert(tuned if which == "tuned" else base, folder, to="diffusers")
    _reshard(folder / "unet", "diffusion_pytorch_model", "safetensors", 3)
    _reshard(folder / "text_encoder", "pytorch_model", "bin", 2)
    _reshard(folder / "vae", "diffusion_pytorch_model", "bin", 1)
    assert not list((folder / "unet").glob("diffusion_pytorch_model.safetensors"))
    args = (base, folder) if which == "tuned" else (folder, tuned)
    out = tmp_path / "lora.safetensors"
    res = extract(
        *args, output=out, rank=2, conv_rank=2, device="cpu", precision="float64", save_dtype="fp32"
    )
    assert res.modules == len(SD1_KEYS)
    _check(out, deltas, SD1_KEYS)


def test_a_shard_index_as_the_base(tmp_path: Path) -> None:
    """A diffusers UNet's shard index given as --base: the UNet is extracted, the rest skipped."""
    arch = get("sd1")
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(arch, base, factor=FACTOR, dtype=torch.float64)
    tuned = tmp_path / "tuned.safetensors"
    deltas = make_tuned(arch, tensors, tuned, modules=SD1_KEYS, rank=2)
    folder = tmp_path / "pipe"
    convert(base, folder, to="diffusers")
    _reshard(folder / "unet", "diffusion_pytorch_model", "safetensors", 2)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    out = tmp_path / "lora.safetensors"
    res = extract(
        index, tuned, output=out, rank=2, conv_rank=2, device="cpu", precision="float64", save_dtype="fp32"
    )
    unet = [k for k in SD1_KEYS if k.startswith("model.diffusion_model.")]
    assert res.modules == len(unet)
    _check(out, deltas, unet)
