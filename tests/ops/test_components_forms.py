"""Part forms: SDXL's CLIP-G and SD2's OpenCLIP-H split in HF form, diffusers-layout VAEs as parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_components import _te_lora, same, write_part

from lorasmith.archs.parts import PART_KINDS, form_inventory
from lorasmith.errors import InvalidFileError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops._components_forms import convert_keys, from_canonical, to_canonical
from lorasmith.ops.components import assemble, bake_parts, split
from lorasmith.ops.inspect import inspect_file
from lorasmith.ops.merge import merge
from lorasmith.registry import detect_part, get
from lorasmith.testing import make_checkpoint, shrink_shape

G = "conditioner.embedders.1.model."


def convert_file(kind: str, src: Path, dst: Path, source: str | None, target: str | None) -> None:
    """Rewrite a part file in another form with the library's converter (values moved only)."""
    tensors = load_all(src)
    out: dict[str, torch.Tensor] = {}
    for c in convert_keys(PART_KINDS[kind], source, target, list(tensors), src.name):
        canon = to_canonical([tensors[k] for k in c.reads], c.entry_in)
        out.update(zip(c.writes, from_canonical(canon, c.entry_out), strict=True))
    save_file(out, dst)


def split_sdxl(tmp: Path) -> tuple[Path, dict[str, Path]]:
    single = tmp / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), single, dtype=None)
    (tmp / "parts").mkdir()
    r = split(single, tmp / "parts")
    return single, {o.slot: Path(o.path) for o in r.outputs}


# ------------------------------------------------------------------------------------------ CLIP-G/H
def test_sdxl_clip_g_is_split_in_hf_form(tmp_path: Path) -> None:
    single, parts = split_sdxl(tmp_path)
    assert parts["clip_g"].name == "clip_g.safetensors"
    g = load_all(parts["clip_g"])
    s = load_all(single)
    assert not any(k.startswith("transformer.") for k in g)
    # the q/k/v projections are the row thirds of OpenCLIP's fused in_proj, in that order
    fused = s[G + "transformer.resblocks.3.attn.in_proj_weight"]
    third = fused.shape[0] // 3
    for i, p in enumerate(("q", "k", "v")):
        assert torch.equal(
            g[f"text_model.encoder.layers.3.self_attn.{p}_proj.weight"], fused[i * third : (i + 1) * third]
        )
    bias = s[G + "transformer.resblocks.0.attn.in_proj_bias"]
    assert torch.equal(g["text_model.encoder.layers.0.self_attn.v_proj.bias"], bias[2 * third :])
    # HF's Linear stores the projection transposed
    assert torch.equal(g["text_projection.weight"], s[G + "text_projection"].t())
    assert torch.equal(g["text_model.embeddings.position_embedding.weight"], s[G + "positional_embedding"])
    assert torch.equal(g["logit_scale"], s[G + "logit_scale"])
    # the same keys as SD3's clip_g.safetensors (what ComfyUI's separate CLIP loaders read)
    assert set(g) == set(form_inventory(PART_KINDS["clip_g"]))
    found = detect_part(read_header(parts["clip_g"]))
    assert found is not None and (found.kind, found.form) == ("clip_g", "hf")


def test_sdxl_assemble_accepts_both_clip_g_forms(tmp_path: Path) -> None:
    single, parts = split_sdxl(tmp_path)
    assemble(parts, tmp_path / "hf.safetensors")
    same(single, tmp_path / "hf.safetensors")
    openclip = tmp_path / "clip_g_openclip.safetensors"
    convert_file("clip_g", parts["clip_g"], openclip, "hf", "openclip")
    assert any(k.startswith("transformer.resblocks.") for k in read_header(openclip).tensors)
    r = inspect_file(openclip)
    assert r.kind == "part" and r.reason == "clip_g text encoder (OpenCLIP form) (used by sdxl, sd3)"
    assemble({**parts, "clip_g": openclip}, tmp_path / "oc.safetensors")
    same(single, tmp_path / "oc.safetensors")


def test_clip_g_moves_between_sdxl_and_sd3(tmp_path: Path) -> None:
    _single, parts = split_sdxl(tmp_path)
    sd3 = tmp_path / "sd3.safetensors"
    make_checkpoint(get("sd3"), sd3, dtype=None, seed=3)
    (tmp_path / "sd3parts").mkdir()
    sd3_parts = {o.slot: Path(o.path) for o in split(sd3, tmp_path / "sd3parts").outputs}
    # SDXL's CLIP-G (HF form) into an SD3 single file, and SD3's into an SDXL single file
    assemble({**sd3_parts, "clip_g": parts["clip_g"]}, tmp_path / "a.safetensors")
    (tmp_path / "back").mkdir()
    got = {o.slot: Path(o.path) for o in split(tmp_path / "a.safetensors", tmp_path / "back").outputs}
    same(parts["clip_g"], got["clip_g"])
    assemble({**parts, "clip_g": sd3_parts["clip_g"]}, tmp_path / "b.safetensors")
    (tmp_path / "back2").mkdir()
    got = {o.slot: Path(o.path) for o in split(tmp_path / "b.safetensors", tmp_path / "back2").outputs}
    same(sd3_parts["clip_g"], got["clip_g"])


def test_sd2_open_clip_h_round_trip_in_hf_form(tmp_path: Path) -> None:
    single = tmp_path / "sd21.safetensors"
    make_checkpoint(get("sd1"), single, variant="sd2", dtype=None)
    (tmp_path / "p").mkdir()
    r = split(single, tmp_path / "p")
    assert r.variant == "sd2"
    got = {o.slot: Path(o.path) for o in r.outputs}
    assert got["text_encoder"].name == "clip_h.safetensors"
    h = read_header(got["text_encoder"]).tensors
    # every resblock kept (ComfyUI tells CLIP-H by layers.22), the projection transposed
    assert "text_model.encoder.layers.23.self_attn.k_proj.weight" in h and "text_projection.weight" in h
    assert inspect_file(got["text_encoder"]).arch == "sd1"
    assemble(got, tmp_path / "back.safetensors")
    same(single, tmp_path / "back.safetensors")


def test_incomplete_fused_tensor_is_a_clear_error(tmp_path: Path) -> None:
    _single, parts = split_sdxl(tmp_path)
    g = load_all(parts["clip_g"])
    del g["text_model.encoder.layers.5.self_attn.k_proj.weight"]
    save_file(g, tmp_path / "broken.safetensors")
    with pytest.raises(InvalidFileError, match=r"--clip-g broken.safetensors: has .* but not .*k_proj") as e:
        assemble({**parts, "clip_g": tmp_path / "broken.safetensors"}, tmp_path / "o.safetensors")
    assert "\n" not in e.value.message
    assert not (tmp_path / "o.safetensors").exists()


def test_bake_into_sdxl_hf_clip_g_equals_bake_and_split(tmp_path: Path) -> None:
    single, parts = split_sdxl(tmp_path)
    _te_lora("sdxl", tmp_path / "lora.safetensors")
    merge([f"{tmp_path / 'lora.safetensors'}:0.6"], base=single, output=tmp_path / "baked.safetensors")
    (tmp_path / "ref").mkdir()
    ref = {o.slot: Path(o.path) for o in split(tmp_path / "baked.safetensors", tmp_path / "ref").outputs}
    main = tmp_path / "unet_vae_clip_l.safetensors"
    # the same tensors as the single file (fixtures are seeded per key), less CLIP-G
    make_checkpoint(get("sdxl"), main, dtype=None, components=("unet", "vae", "te1"))
    # the diffusion model file here holds UNet, VAE and CLIP-L; CLIP-G comes separately in HF form
    res = bake_parts(
        main,
        [f"{tmp_path / 'lora.safetensors'}:0.6"],
        tmp_path / "t.safetensors",
        parts={"clip_g": (parts["clip_g"], tmp_path / "g.safetensors")},
    )
    assert not res.unmatched and not res.skipped
    assert {o.slot: o.changed > 0 for o in res.outputs} == {"transformer": True, "clip_g": True}
    same(ref["clip_g"], tmp_path / "g.safetensors")
    (tmp_path / "t2").mkdir()
    again = {o.slot: Path(o.path) for o in split(tmp_path / "t.safetensors", tmp_path / "t2").outputs}
    for slot in ("transformer", "vae", "clip_l"):
        same(ref[slot], again[slot])


# ------------------------------------------------------------------------------------------ VAEs
def test_diffusers_vae_is_recognised(tmp_path: Path) -> None:
    write_part("vae4", tmp_path / "diffusion_pytorch_model.safetensors", form="diffusers")
    h = read_header(tmp_path / "diffusion_pytorch_model.safetensors").tensors
    assert "decoder.up_blocks.0.resnets.0.conv1.weight" in h and "quant_conv.weight" in h
    r = inspect_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert r.kind == "part" and r.components == ["vae4"]
    assert r.reason == "4-channel VAE (diffusers layout) (used by sd1, sdxl)"
    write_part("vae16", tmp_path / "flux_vae.safetensors", form="diffusers")
    r = inspect_file(tmp_path / "flux_vae.safetensors")
    assert r.reason == "16-channel VAE (diffusers layout) (used by flux, sd3, zimage)"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_assemble_converts_a_diffusers_vae(family: str, tmp_path: Path) -> None:
    single = tmp_path / "single.safetensors"
    make_checkpoint(get(family), single, dtype=torch.float16)
    if family == "flux":
        (tmp_path / "flux").mkdir()
        write_part("vae16", tmp_path / "ae.safetensors", seed=4)
        write_part("clip_l", tmp_path / "clip_l.safetensors", seed=5)
        write_part("t5xxl", tmp_path / "t5xxl.safetensors", seed=6)
        parts = {
            "transformer": single,
            "vae": tmp_path / "ae.safetensors",
            "clip_l": tmp_path / "clip_l.safetensors",
            "t5xxl": tmp_path / "t5xxl.safetensors",
        }
        kind = "vae16"
    else:
        (tmp_path / "p").mkdir()
        parts = {o.slot: Path(o.path) for o in split(single, tmp_path / "p").outputs}
        kind = "vae4"
    assemble(parts, tmp_path / "ref.safetensors")
    vae = tmp_path / "diffusion_pytorch_model.safetensors"
    convert_file(kind, parts["vae"], vae, "ldm", "diffusers")
    ldm = load_all(parts["vae"])
    diff = load_all(vae)
    # the facts of the layout, checked apart from the converter: renamed resnets, the mid-block attention's
    # 1x1 convs stored as Linear weights
    assert torch.equal(
        diff["encoder.down_blocks.1.resnets.0.conv1.weight"], ldm["encoder.down.1.block.0.conv1.weight"]
    )
    q = ldm["decoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1)
    assert torch.equal(diff["decoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
    res = assemble({**parts, "vae": vae}, tmp_path / "out.safetensors")
    same(tmp_path / "ref.safetensors", tmp_path / "out.safetensors")
    assert res.inputs[1].kind == kind


def test_diffusers_vae_of_the_wrong_family(tmp_path: Path) -> None:
    single = tmp_path / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), single)
    (tmp_path / "p").mkdir()
    parts = {o.slot: Path(o.path) for o in split(single, tmp_path / "p").outputs}
    write_part("vae16", tmp_path / "vae.safetensors", form="diffusers")
    with pytest.raises(
        InvalidFileError, match=r"--vae vae.safetensors: is the 16-channel VAE \(diffusers layout\)"
    ):
        assemble({**parts, "vae": tmp_path / "vae.safetensors"}, tmp_path / "o.safetensors")


def test_form_inventories_scale_like_the_fixtures() -> None:
    # the row split of a fused tensor follows a shrunk file (the real rows are the model's)
    inv = form_inventory(PART_KINDS["clip_g"])
    q = inv["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (1280, 1280) and shrink_shape(q.shape) == (20, 20)
