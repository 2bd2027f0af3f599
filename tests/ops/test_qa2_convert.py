"""Acceptance pass over ``convert``: regressions for what a user's round of conversions found."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, LorasmithError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops.convert import convert
from lorasmith.registry import get
from lorasmith.testing import make_lora


def _mixed_sdxl(tmp_path: Path) -> Path:
    """What diffusers' convert_state_dict_to_kohya writes for SDXL: UNet names over the diffusers tree
    (kohya-diffusers, the majority here) and text-encoder modules in kohya names."""
    arch = get("sdxl")
    unet = make_lora(arch, tmp_path / "u.safetensors", spelling="kohya-diffusers", limit=6)
    te = make_lora(
        arch, tmp_path / "t.safetensors", spelling="kohya", modules=lambda a: a.component != "unet", limit=2
    )
    tensors = {**load_all(unet.path), **load_all(te.path)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path


def test_dtype_only_keeps_every_module_name_of_a_mixed_file(tmp_path: Path) -> None:
    src = _mixed_sdxl(tmp_path)
    out = tmp_path / "o.safetensors"
    r = convert(src, out, dtype="fp16")  # no --to: "keep"
    assert set(read_header(out).tensors) == set(read_header(src).tensors)
    assert r.counts == {"rename": 8}
    a, b = load_all(src), load_all(out)
    for k, t in a.items():
        want = t if k.endswith(".alpha") else t.to(torch.float16)
        assert torch.equal(b[k], want), k
    # --to keep says the same
    out2 = tmp_path / "o2.safetensors"
    convert(src, out2, to="keep", dtype="bf16")
    assert set(read_header(out2).tensors) == set(read_header(src).tensors)


def test_peft_output_metadata_says_the_baked_alpha(tmp_path: Path) -> None:
    fx = make_lora(get("flux"), tmp_path / "a.safetensors", limit=4, rank=4, alpha=2.0)
    out = tmp_path / "p.safetensors"
    convert(fx.path, out, to="peft")
    meta = read_header(out).metadata
    # alpha / rank is baked into PEFT factors: their alpha is the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    back = tmp_path / "k.safetensors"
    convert(out, back, to="kohya")
    assert read_header(back).metadata["ss_network_alpha"] == "4"


def test_padding_one_part_into_a_fused_module_says_fused(tmp_path: Path) -> None:
    arch = get("zimage")
    fx = make_lora(
        arch, tmp_path / "m.safetensors", modules=["lora_unet_layers_0_attention_to_q"], algo="loha"
    )
    with pytest.raises(LorasmithError, match="cannot be fused exactly") as info:
        convert(fx.path, tmp_path / "o.safetensors", to="kohya")
    assert info.value.message.startswith(f"{fx.path}: module ")  # the file is named, as in every error


# ------------------------------------------------------------------------------------------------ pickles
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"hello world", "not a readable PyTorch pickle"),  # the unpickler raised a KeyError
        (b"\x80\x02}q\x00(X", "not a readable PyTorch pickle"),
    ],
)
def test_damaged_pickles_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    src = tmp_path / "bad.ckpt"
    src.write_bytes(content)
    out = tmp_path / "o.safetensors"
    with pytest.raises(InvalidFileError, match=message):
        convert(src, out)
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "-q"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and message in res.stderr
    assert not out.exists()


def _lightning_ckpt(path: Path, **save_kw: object) -> None:
    """A checkpoint as PyTorch Lightning saved the original SD 1.x ones: callbacks keyed by the
    ModelCheckpoint class, numpy scalars and arrays (made here without Lightning installed)."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        obj = {
            "epoch": 5,
            "global_step": np.int64(470000),
            "state_dict": {"model.diffusion_model.out.2.weight": torch.ones(2, 2)},
            "callbacks": {cls: {"best_model_score": np.array([1.5]), "monitor": None}},
        }
        torch.save(obj, path, **save_kw)  # type: ignore[arg-type]
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5")
@pytest.mark.parametrize("save_kw", [{}, {"pickle_protocol": 2}, {"_use_new_zipfile_serialization": False}])
def test_lightning_checkpoint_converts(tmp_path: Path, save_kw: dict[str, object]) -> None:
    src = tmp_path / "sd.ckpt"
    _lightning_ckpt(src, **save_kw)
    out = tmp_path / "o.safetensors"
    r = convert(src, out)
    assert r.tensors == 1
    assert torch.equal(load_all(out)["model.diffusion_model.out.2.weight"], torch.ones(2, 2))
    assert any("non-tensor" in w for w in r.warnings)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_pickle_is_still_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Evil(marker)}, src)
    out = tmp_path / "o.safetensors"
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "-q", "--json"])
    assert res.exit_code == 1 and "refused" in res.stderr and "Traceback" not in res.output
    assert not marker.exists() and not out.exists()
    assert res.stdout == ""  # --json: nothing on stdout for an error


# -------------------------------------------------------------------------------------------------- split
def test_split_is_all_or_nothing(tmp_path: Path) -> None:
    """A NaN in a later part (the text encoder) used to leave the parts written before it."""
    from lorasmith.ops.components import split
    from lorasmith.testing import make_checkpoint

    src = tmp_path / "sd1.safetensors"
    tensors = make_checkpoint(get("sd1"), src)
    key = next(k for k in tensors if k.startswith("cond_stage_model.") and tensors[k].is_floating_point())
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key].view(-1)[0] = float("nan")
    nan_src = tmp_path / "nan.safetensors"
    save_file(bad, str(nan_src))
    out = tmp_path / "parts"
    out.mkdir()
    with pytest.raises(LorasmithError, match="NaN"):
        split(nan_src, out)
    assert list(out.iterdir()) == []  # no part, no staging folder
    res = CliRunner().invoke(app, ["convert", "--split", str(nan_src), "--output-dir", str(out), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert list(out.iterdir()) == []
    # with --allow-nonfinite the warning names the file in the output folder, not a staging copy
    res = CliRunner().invoke(
        app, ["convert", "--split", str(nan_src), "--output-dir", str(out), "-q", "--allow-nonfinite"]
    )
    assert res.exit_code == 0, res.output
    assert f"{out / 'clip_l.safetensors'}: tensor" in res.stderr and ".tmp" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "clip_l.safetensors",
        "nan.safetensors",
        "vae.safetensors",
    ]
    # an existing set is replaced only with --overwrite, and only once the new set is complete
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LorasmithError, match="NaN"):
        split(nan_src, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    clean = tmp_path / "parts2"
    clean.mkdir()
    split(src, clean)
    assert sorted(p.name for p in clean.iterdir()) == [
        "clip_l.safetensors",
        "sd1.safetensors",
        "vae.safetensors",
    ]


def test_split_of_a_bare_diffusion_model_says_so(tmp_path: Path) -> None:
    from lorasmith.ops.components import split
    from lorasmith.testing import make_checkpoint

    src = tmp_path / "flux1-dev.safetensors"
    make_checkpoint(get("flux"), src)
    with pytest.raises(InvalidFileError, match="already a separate flux diffusion model"):
        split(src, tmp_path)


def test_no_counterpart_names_the_spellings_that_have_one(tmp_path: Path) -> None:
    fx = make_lora(get("sdxl"), tmp_path / "a.safetensors", modules=lambda a: a.component == "te2", limit=2)
    with pytest.raises(LorasmithError, match="no counterpart in the output spelling 'lycoris'") as info:
        convert(fx.path, tmp_path / "o.safetensors", to="lycoris", arch="sdxl")
    assert info.value.hint is not None and "kohya, peft" in info.value.hint
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    ("fam", "src", "dst", "names"),
    [
        # musubi names feed_forward like kohya does; converting into musubi once failed on them
        (
            "zimage",
            "kohya",
            "musubi",
            ["lora_unet_layers_0_feed_forward_w1", "lora_unet_layers_0_attention_qkv"],
        ),
        # ComfyUI's own names for the embedders are also ai-toolkit's
        ("zimage", "kohya", "comfy-keys", ["lora_unet_cap_embedder_1", "lora_unet_layers_3_feed_forward_w2"]),
        # OneTrainer's text-encoder names are kohya's
        (
            "sd3",
            "kohya",
            "onetrainer",
            ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_joint_blocks_0_x_block_attn_proj"],
        ),
    ],
)
def test_names_shared_by_two_spellings_convert(
    tmp_path: Path, fam: str, src: str, dst: str, names: list[str]
) -> None:
    arch = get(fam)
    fx = make_lora(arch, tmp_path / "a.safetensors", modules=names, rank=4)
    out = tmp_path / "b.safetensors"
    convert(fx.path, out, to=dst, arch=fam)  # shrunk shapes: some names alone fit two families
    back = tmp_path / "c.safetensors"
    convert(out, back, to=src, arch=fam)
    a, c = load_all(fx.path), load_all(back)
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------- scaled FP8 files
def _scaled_fp8(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ComfyUI scaled FP8 FLUX.1 file: double-block linears as FP8 with a scalar or per-row scale."""
    from lorasmith.testing import make_checkpoint

    plain = make_checkpoint(get("flux"), tmp_path / "plain.safetensors", dtype=torch.bfloat16)
    out: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(plain.items()):
        if k.startswith("double_blocks.0.") and k.endswith(".weight") and v.ndim == 2:
            out[k] = v.to(torch.float8_e4m3fn)
            scale = torch.tensor(0.5) if i % 2 else torch.full((v.shape[0],), 0.25)
            out[k.removesuffix("weight") + "scale_weight"] = scale
            out[k.removesuffix("weight") + "scale_input"] = torch.tensor(1.0)
        else:
            out[k] = v
    out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "flux-fp8-scaled.safetensors"
    save_file(out, str(path))
    return path, plain, out


def test_scaled_fp8_checkpoint_is_dequantized_by_a_cast(tmp_path: Path) -> None:
    src, plain, stored = _scaled_fp8(tmp_path)
    out = tmp_path / "bf16.safetensors"
    r = convert(src, out, dtype="bf16")
    got = load_all(out)
    assert set(got) == set(plain)  # the scales and the marker are gone
    for k, v in got.items():
        scale_key = k.removesuffix("weight") + "scale_weight"
        if scale_key in stored:
            scale = stored[scale_key].float()
            want = stored[k].float() * (scale if scale.ndim == 0 else scale.reshape(-1, 1))
            assert torch.equal(v, want.to(torch.bfloat16)), k
        else:
            assert torch.equal(v, plain[k]), k
    assert any("dequantized" in w for w in r.warnings)
    # without a wider dtype there is nothing to dequantize into: an error, nothing written
    with pytest.raises(LorasmithError, match="scaled FP8"):
        convert(src, tmp_path / "fp8.safetensors", dtype="fp8")
    assert not (tmp_path / "fp8.safetensors").exists()
    with pytest.raises(InvalidFileError, match="scaled FP8"):
        convert(src, tmp_path / "folder", to="diffusers")


def test_inspect_says_a_checkpoint_is_scaled_fp8(tmp_path: Path) -> None:
    from lorasmith.ops.inspect import inspect_file

    src, _plain, _stored = _scaled_fp8(tmp_path)
    r = inspect_file(src)
    assert r.arch == "flux" and r.unknown_keys == 0 and r.confidence == 1.0
    assert any("scaled FP8" in w for w in r.warnings)


def test_sd2_linear_proj_in_written_as_sd_scripts_1x1_conv_becomes_linear_in_peft(tmp_path: Path) -> None:
    """sd-scripts writes SD2's proj_in/proj_out (Linear layers) as 1x1 conv factors; diffusers' PEFT layer
    is a Linear, whose lora_A/lora_B are 2-D (4-D factors do not load into it)."""
    from lorasmith.io.header import read_header

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", variant="sd2", modules=[name])
    tensors = {k: (v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v) for k, v in load_all(fx.path).items()}
    src = tmp_path / "conv.safetensors"
    save_file(tensors, str(src), metadata={"ss_v2": "True", "ss_base_model_version": "sd_v2"})
    out = tmp_path / "p.safetensors"
    r = convert(src, out, to="peft", arch="sd1")
    assert r.variant == "sd2"
    shapes = {k: v.shape for k, v in read_header(out).tensors.items()}
    assert all(len(s) == 2 for s in shapes.values()), shapes
    back = tmp_path / "k.safetensors"
    convert(out, back, to="kohya", arch="sd1")
    got = load_all(back)
    delta = got[name + ".lora_up.weight"].double() @ got[name + ".lora_down.weight"].double()
    delta *= float(got[name + ".alpha"]) / got[name + ".lora_down.weight"].shape[0]
    want = fx.modules[name].delta
    assert torch.allclose(delta, want, atol=1e-6 * float(want.abs().max()))
    # SD1's proj_in is a 1x1 Conv2d in diffusers: its PEFT factors stay 4-D
    fx1 = make_lora(get("sd1"), tmp_path / "b.safetensors", variant="sd1", modules=[name])
    out1 = tmp_path / "p1.safetensors"
    convert(fx1.path, out1, to="peft", arch="sd1")
    assert all(len(i.shape) == 4 for i in read_header(out1).tensors.values())
