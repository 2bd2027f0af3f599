"""convert (checkpoint layouts): SD1/SD2/SDXL single file <-> diffusers pipeline folder, Z-Image ComfyUI <->
diffusers; bit-exact round trips, inventory-exact diffusers keys, configs that build the real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasmith.errors import InvalidFileError, OutputExistsError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops._diffusers_configs import folder_configs
from lorasmith.ops.convert import convert
from lorasmith.ops.layouts import EXTRAS_NAME, default_subfolder, diffusers_inventory, plan_folder
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

# (family, variant, diffusers inventory, canonical keys without a diffusers home)
CASES = [
    ("sd1", "sd1", "sd1-diffusers-unet", 12),
    ("sd1", "sd2", "sd2-diffusers-unet", 26),
    ("sdxl", "base", "sdxl-diffusers-unet", 1),
    ("zimage", "z-image", "z-image-diffusers", 0),
]
_SCHEDULE = "alphas_cumprod"


@pytest.mark.parametrize(("family", "variant", "inv_id", "homeless"), CASES)
def test_layout_map_is_a_bijection_onto_the_inventory(
    family: str, variant: str, inv_id: str, homeless: int
) -> None:
    arch = get(family)
    inv = next(i for i in arch.inventories() if i.id == inv_id)
    mapping = arch.layout_map(inv_id)
    canonical = arch.canonical_inventory(variant).tensors
    assert set(mapping) <= set(canonical)
    assert len(set(canonical) - set(mapping)) == homeless
    parts = [p for e in mapping.values() for p, _ in e.parts]
    assert len(parts) == len(set(parts))
    # keys without a subfolder are exactly the packaged diffusers inventory
    assert {p for p in parts if "/" not in p} == set(inv.tensors)


def test_sd2_drops_the_last_text_layer_and_projection() -> None:
    mapping = get("sd1").layout_map("sd2-diffusers-unet")
    assert not any(".resblocks.23." in k for k in mapping)
    assert "cond_stage_model.model.text_projection" not in mapping
    assert "cond_stage_model.model.transformer.resblocks.22.ln_1.weight" in mapping
    sdxl = get("sdxl").layout_map("sdxl-diffusers-unet")
    assert sdxl["conditioner.embedders.1.model.text_projection"].transform == "transpose"


@pytest.mark.parametrize(("family", "variant", "inv_id", "homeless"), CASES)
def test_single_to_diffusers_and_back_is_bit_exact(
    tmp_path: Path, family: str, variant: str, inv_id: str, homeless: int
) -> None:
    arch = get(family)
    src = tmp_path / "single.safetensors"
    make_checkpoint(arch, src, variant=variant, metadata={"modelspec.title": "x"})
    folder = tmp_path / "pipe"
    r = convert(src, folder, to="diffusers")
    assert r.arch == family and r.variant == variant
    inv = next(i for i in arch.inventories() if i.id == inv_id)
    sub = default_subfolder(inv)
    main = folder / sub / "diffusion_pytorch_model.safetensors"
    ref = tmp_path / "ref.safetensors"
    make_checkpoint(arch, ref, variant=variant, layout=inv_id)
    got = {k: v.shape for k, v in read_header(main).tensors.items()}
    assert got == {k: v.shape for k, v in read_header(ref).tensors.items()}
    assert read_header(main).metadata["modelspec.title"] == "x"
    assert (folder / sub / "config.json").is_file()
    assert (folder / EXTRAS_NAME).is_file() == (homeless > 0)
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    a, b = load_all(src), load_all(back)
    assert list(a) == list(b)  # same keys in the same order
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_sd_pipeline_folder_contents(tmp_path: Path) -> None:
    arch = get("sdxl")
    src = tmp_path / "sdxl.safetensors"
    make_checkpoint(arch, src)
    folder = tmp_path / "pipe"
    r = convert(src, folder, to="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == [None, None]  # no tokenizer in a single file
    for rel in (
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (folder / rel).is_file(), rel
    assert any("tokenizer" in w for w in r.warnings) and any(EXTRAS_NAME in w for w in r.warnings)
    a = load_all(src)
    vae = load_all(folder / "vae" / "diffusion_pytorch_model.safetensors")
    q = a["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.dim() == 4 and torch.equal(vae["decoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
    te2 = load_all(folder / "text_encoder_2" / "model.safetensors")
    proj = a["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(te2["text_projection.weight"], proj.t())
    fused = a["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"]
    w = fused.shape[0] // 3
    k = te2["text_model.encoder.layers.3.self_attn.k_proj.weight"]
    assert torch.equal(k, fused[w : 2 * w])
    te1 = load_all(folder / "text_encoder" / "model.safetensors")
    assert "text_model.final_layer_norm.weight" in te1


def test_unet_only_folder_and_diffusers_keyed_file(tmp_path: Path) -> None:
    arch = get("sd1")
    src = tmp_path / "sd1.safetensors"
    make_checkpoint(arch, src)
    unet_file = tmp_path / "unet.safetensors"
    make_checkpoint(arch, unet_file, layout="sd1-diffusers-unet")
    back = tmp_path / "back.safetensors"
    r = convert(unet_file, back, to="single")
    keys = list(load_all(back))
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)
    assert r.warnings and "not in the input" in r.warnings[0]


def test_folder_output_rules(tmp_path: Path) -> None:
    arch = get("zimage")
    src = tmp_path / "z.safetensors"
    make_checkpoint(arch, src)
    folder = tmp_path / "out"
    convert(src, folder, to="diffusers")
    with pytest.raises(OutputExistsError):
        convert(src, folder, to="diffusers")
    stale = folder / "stale.txt"
    stale.write_text("x")
    convert(src, folder, to="diffusers", overwrite=True)
    assert not stale.exists()  # the folder is replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    inside = folder / "in.safetensors"
    inside.write_bytes(src.read_bytes())
    with pytest.raises(OutputExistsError, match="holds the input"):
        convert(inside, folder, to="diffusers", overwrite=True)
    # a foreign tensor in a diffusers weights file is refused on the way back
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    from lorasmith.io.writer import save_file

    t = load_all(weights)
    t["not.a.key"] = torch.zeros(1)
    save_file(t, weights, overwrite=True)
    with pytest.raises(InvalidFileError, match="not Z-Image diffusers keys"):
        convert(folder, tmp_path / "b.safetensors", to="single")


@pytest.mark.parametrize(
    ("family", "variant"), [("sd1", "sd1"), ("sd1", "sd2"), ("sdxl", "base"), ("zimage", "z-image")]
)
def test_configs_build_the_real_models(family: str, variant: str) -> None:
    """Configs written from the real shapes build diffusers/transformers models with the same state dict."""
    diffusers = pytest.importorskip("diffusers")
    arch = get(family)
    inv = diffusers_inventory(arch, variant)
    specs = {k: (s.dtype, s.shape) for k, s in arch.canonical_inventory(variant).tensors.items()}
    plan = plan_folder(arch, arch.layout_map(inv.id), default_subfolder(inv), specs)
    shapes = {sub: {k: s for k, (_, s) in p.items()} for sub, p in plan.plans.items()}
    cfgs = folder_configs(family, variant, shapes, {})
    models = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "transformer": "ZImageTransformer2DModel",
    }
    for sub, cls in models.items():
        if f"{sub}/config.json" not in cfgs:
            continue
        with torch.device("meta"):
            model = getattr(diffusers, cls).from_config(cfgs[f"{sub}/config.json"])
        assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == shapes[sub], sub
    transformers = pytest.importorskip("transformers")
    for sub in ("text_encoder", "text_encoder_2"):
        if f"{sub}/config.json" not in cfgs:
            continue
        cfg = {
            k: v
            for k, v in cfgs[f"{sub}/config.json"].items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
        with torch.device("meta"):
            te = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg))
        got = {k: tuple(t.shape) for k, t in te.state_dict().items()}
        ours = {k: s for k, s in shapes[sub].items() if not k.endswith("position_ids")}
        if "text_projection.weight" not in ours:
            got.pop("text_projection.weight")
        assert got == ours, sub


def test_cli_layout_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasmith.cli import app

    src = tmp_path / "sd1.safetensors"
    make_checkpoint(get("sd1"), src)
    folder = tmp_path / "pipe"
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(folder), "--to", "diffusers", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["to_spelling"] == "diffusers-unet"
    assert sum(data["dtypes"].values()) == data["tensors"] == 1143


def test_a_family_without_a_layout_map_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin family with a diffusers inventory but no layout_map: "no key map", nothing written."""
    from lorasmith import registry as registry_module
    from lorasmith.errors import NotAvailableError
    from lorasmith.ops.convert import convert
    from lorasmith.registry import Registry
    from lorasmith.testing import ToyArch
    from lorasmith.testing import toy as toy_module

    monkeypatch.setattr(registry_module, "_REGISTRY", Registry(autoload=False, plugins=[("toy", toy_module)]))
    toy = ToyArch()
    src = tmp_path / "toy.safetensors"
    make_checkpoint(toy, src)
    with pytest.raises(NotAvailableError, match="no key map"):
        convert(src, tmp_path / "out", to="diffusers", arch=toy.id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.safetensors"]
