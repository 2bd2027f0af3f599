"""convert (checkpoint layouts): SD3 / SD3.5 single file <-> diffusers pipeline folder; bit-exact round trips,
the transformer exactly as diffusers' own single-file conversion writes it, configs that build the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasmith.archs._sd3_layout import DIFFUSERS_LAYOUT
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops._diffusers_configs import folder_configs
from lorasmith.ops.convert import convert
from lorasmith.ops.layouts import EXTRAS_NAME, diffusers_inventory, plan_folder
from lorasmith.registry import get, get_registry
from lorasmith.testing import make_checkpoint

VARIANTS = ["sd3-medium", "sd3.5-medium", "sd3.5-large"]
MMDIT = "model.diffusion_model."
TRANSFORMER = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_map_is_a_bijection_onto_the_inventory(variant: str) -> None:
    arch = get("sd3")
    inv = diffusers_inventory(arch, variant)
    assert (inv.id, inv.layout, inv.variant) == (f"{variant}-diffusers", DIFFUSERS_LAYOUT, variant)
    mapping = arch.layout_map(inv.id)
    canonical = arch.canonical_inventory(variant).tensors
    homeless = {k for k in canonical if k not in mapping}
    assert homeless <= {"model.model_sampling.sigmas"} | {
        f"text_encoders.{t}.logit_scale" for t in ("clip_l", "clip_g", "t5xxl")
    }
    parts = [p for e in mapping.values() for p, _ in e.parts]
    assert len(parts) == len(set(parts))
    assert {p for p in parts if "/" not in p} == set(inv.tensors)
    subs = {p.split("/")[0] for p in parts if "/" in p}
    assert subs == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_to_diffusers_and_back_is_bit_exact(tmp_path: Path, variant: str) -> None:
    arch = get("sd3")
    src = tmp_path / "sd3.safetensors"
    make_checkpoint(arch, src, variant=variant, metadata={"modelspec.title": "x"})
    folder = tmp_path / "pipe"
    r = convert(src, folder, to="diffusers")
    assert (r.arch, r.variant, r.to_spelling) == ("sd3", variant, DIFFUSERS_LAYOUT)
    ref = tmp_path / "ref.safetensors"
    make_checkpoint(arch, ref, variant=variant, layout=f"{variant}-diffusers")
    got = {k: v.shape for k, v in read_header(folder / TRANSFORMER).tensors.items()}
    assert got == {k: v.shape for k, v in read_header(ref).tensors.items()}
    assert read_header(folder / TRANSFORMER).metadata["modelspec.title"] == "x"
    with_te = variant == "sd3-medium"  # the packaged SD3.5 files ship without text encoders
    assert (folder / "text_encoder_3" / "model.safetensors").is_file() == with_te
    assert (folder / EXTRAS_NAME).is_file() == with_te  # model_sampling.sigmas, logit_scale
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == (["transformers", "T5EncoderModel"] if with_te else [None, None])
    assert any("tokenizer" in w for w in r.warnings)
    assert any("text_encoder" in w for w in r.warnings) != with_te
    back = tmp_path / "back.safetensors"
    r2 = convert(folder, back, to="single")
    assert (r2.arch, r2.variant, r2.to_spelling) == ("sd3", variant, "single")
    assert _same(load_all(src), load_all(back))
    assert read_header(back).metadata["modelspec.title"] == "x"


def test_values_are_moved_as_diffusers_moves_them(tmp_path: Path) -> None:
    """The transformer file equals diffusers' own single-file conversion of the same tensors (split q/k/v,
    the swapped halves of ``norm_out`` and of the last context block's modulation)."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    arch = get("sd3")
    for variant in ("sd3.5-medium", "sd3.5-large"):
        src = tmp_path / f"{variant}.safetensors"
        tensors = make_checkpoint(arch, src, variant=variant)
        folder = tmp_path / variant
        convert(src, folder, to="diffusers")
        mmdit = {k: v.clone() for k, v in tensors.items() if k.startswith(MMDIT)}
        theirs = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(mmdit)
        ours = load_all(folder / TRANSFORMER)
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        w = tensors[f"{MMDIT}final_layer.adaLN_modulation.1.weight"]
        half = w.shape[0] // 2
        assert torch.equal(ours["norm_out.linear.weight"][:half], w[half:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_configs_build_the_real_models(variant: str) -> None:
    """Configs written from the real shapes build the diffusers/transformers models with the same keys."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    arch = get("sd3")
    inv = diffusers_inventory(arch, variant)
    specs = {k: (s.dtype, s.shape) for k, s in arch.canonical_inventory(variant).tensors.items()}
    from lorasmith.archs._dit import te_tensors

    specs.update({k: (s.dtype, s.shape) for k, s in te_tensors().items()})  # SD3.5 + SD3's text encoders
    plan = plan_folder(arch, arch.layout_map(inv.id), "transformer", specs)
    shapes = {sub: {k: s for k, (_, s) in p.items()} for sub, p in plan.plans.items()}
    cfgs = folder_configs("sd3", variant, shapes, {})
    assert set(cfgs) == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"{s}/config.json" for s in shapes),
    }
    tcfg = cfgs["transformer/config.json"]
    assert tcfg["num_layers"] == {"sd3-medium": 24, "sd3.5-medium": 24, "sd3.5-large": 38}[variant]
    assert tcfg["pos_embed_max_size"] == (384 if variant == "sd3.5-medium" else 192)
    assert tcfg["dual_attention_layers"] == (list(range(13)) if variant == "sd3.5-medium" else [])
    for sub, cls in (("transformer", "SD3Transformer2DModel"), ("vae", "AutoencoderKL")):
        with torch.device("meta"):
            model = getattr(diffusers, cls).from_config(cfgs[f"{sub}/config.json"])
        assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == shapes[sub], sub
    for sub in ("text_encoder", "text_encoder_2"):
        cfg = {
            k: v
            for k, v in cfgs[f"{sub}/config.json"].items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
        with torch.device("meta"):
            te = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg))
        got = {k: tuple(t.shape) for k, t in te.state_dict().items()}
        assert got == {k: s for k, s in shapes[sub].items() if not k.endswith("position_ids")}, sub
    t5 = {
        k: v
        for k, v in cfgs["text_encoder_3/config.json"].items()
        if k not in ("architectures", "torch_dtype")
    }
    with torch.device("meta"):
        enc = transformers.T5EncoderModel(transformers.T5Config(**t5))
    got = {k: tuple(t.shape) for k, t in enc.state_dict().items()}
    got.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; save_pretrained writes it once
    assert got == shapes["text_encoder_3"]


def test_diffusers_transformer_file_is_detected_as_sd3(tmp_path: Path) -> None:
    arch = get("sd3")
    reg = get_registry()
    for variant in VARIANTS:
        path = tmp_path / f"{variant}.safetensors"
        make_checkpoint(arch, path, variant=variant, layout=f"{variant}-diffusers")
        det = reg.detect(read_header(path))
        assert (det.arch, det.variant, det.layout) == ("sd3", variant, DIFFUSERS_LAYOUT)
    # a FLUX diffusers transformer shares SD3's block names but is not SD3
    flux = tmp_path / "flux.safetensors"
    make_checkpoint(get("flux"), flux, layout="flux-dev-diffusers")
    assert arch.detect(read_header(flux)) is None
    assert reg.detect(read_header(flux)).arch == "flux"


def test_clips_without_t5_and_a_lone_transformer_file(tmp_path: Path) -> None:
    arch = get("sd3")
    src = tmp_path / "sd3_medium_incl_clips.safetensors"
    make_checkpoint(arch, src, variant="sd3-medium", components=("mmdit", "vae", "clip_l", "clip_g"))
    folder = tmp_path / "pipe"
    r = convert(src, folder, to="diffusers")
    assert not (folder / "text_encoder_3").exists()
    assert (folder / "text_encoder_2" / "model.safetensors").is_file()
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    assert any("text_encoder_3" in w and "tokenizer_3=None" in w for w in r.warnings)
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    assert _same(load_all(src), load_all(back))
    # the transformer file alone converts to an MMDiT-only single file
    only = tmp_path / "mmdit.safetensors"
    convert(folder / TRANSFORMER, only, to="single")
    a = load_all(src)
    b = load_all(only)
    assert list(b) == [k for k in a if k.startswith(MMDIT)] and all(torch.equal(a[k], b[k]) for k in b)


def test_cli_sd3_to_diffusers_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasmith.cli import app

    src = tmp_path / "sd35.safetensors"
    make_checkpoint(get("sd3"), src, variant="sd3.5-large")
    folder = tmp_path / "pipe"
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(folder), "--to", "diffusers", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert (data["arch"], data["variant"], data["to_spelling"]) == ("sd3", "sd3.5-large", DIFFUSERS_LAYOUT)
    res = CliRunner().invoke(
        app, ["convert", str(folder), "-o", str(tmp_path / "b.safetensors"), "--to", "single"]
    )
    assert res.exit_code == 0, res.output
