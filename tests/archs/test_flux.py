"""The FLUX.1 family: aliases, blocks and detection against the real key manifests (real and shrunk)."""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from lorasmith.archs.base import SPELLINGS, SimpleKeyView, TensorSpec
from lorasmith.archs.flux import Flux, diffusers_modules
from lorasmith.registry import Registry

MANIFESTS = Path(__file__).resolve().parent.parent / "data" / "manifests"
DIT_FAMILIES = ["lorasmith.archs.flux", "lorasmith.archs.sd3", "lorasmith.archs.zimage"]
FLUX_TE_MANIFEST = "@clip_l(HF transformers layout, separate file)"


def shrink(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d // 64 if d % 64 == 0 else d for d in shape)


def load_manifest(name: str) -> dict[str, Any]:
    with gzip.open(MANIFESTS / f"{name}.json.gz", "rt", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def manifest_view(data: Mapping[str, Any], shrunk: bool) -> SimpleKeyView:
    return SimpleKeyView(
        {k: TensorSpec(shrink(s) if shrunk else tuple(s), d) for k, (s, d) in data["tensors"].items()}
    )


def synth_lora(arch: Flux, variant: str, spelling: str, shrunk: bool, rank: int = 4) -> SimpleKeyView:
    """Every 2-D/4-D alias of one spelling as a plain LoRA (kohya or PEFT suffixes)."""
    peft = SPELLINGS[spelling].suffixes == "peft"
    tensors: dict[str, TensorSpec] = {}
    for name, alias in arch.spelling_table(variant, spelling).items():
        spec = arch.target_spec(alias.target.key, variant)
        assert spec is not None
        if len(spec.shape) not in (2, 4):
            continue
        out = alias.target.slice[2] if alias.target.slice else spec.shape[0]
        down = (rank, *spec.shape[1:])
        up = (out, rank, *([1] * (len(spec.shape) - 2)))
        if shrunk:
            down, up = shrink(down), shrink(up)
        if peft:
            tensors[name + ".lora_A.weight"] = TensorSpec(down, "BF16")
            tensors[name + ".lora_B.weight"] = TensorSpec(up, "BF16")
        else:
            tensors[name + ".lora_down.weight"] = TensorSpec(down, "BF16")
            tensors[name + ".lora_up.weight"] = TensorSpec(up, "BF16")
            tensors[name + ".alpha"] = TensorSpec((), "BF16")
    return SimpleKeyView(tensors)


@pytest.fixture(scope="module")
def flux() -> Flux:
    return Flux()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(builtins=DIT_FAMILIES, autoload=False)


# ------------------------------------------------------------------------------------------------ aliases
def test_alias_tables_build_and_are_cached() -> None:
    fresh = Flux()
    for variant in Flux.variants:
        table = fresh.alias_table(variant)
        assert table
        assert fresh.alias_table(variant) is table


@pytest.mark.parametrize("variant", Flux.variants)
def test_every_alias_target_exists_with_its_slice_inside(flux: Flux, variant: str) -> None:
    for alias in flux.alias_table(variant).values():
        spec = flux.target_spec(alias.target.key, variant)
        assert spec is not None, alias
        if alias.target.slice is not None:
            dim, start, length = alias.target.slice
            assert dim == 0, alias
            assert 0 < length <= spec.shape[0] - start, alias


@pytest.mark.parametrize("variant", Flux.variants)
def test_every_transformer_weight_has_kohya_and_comfy_names(flux: Flux, variant: str) -> None:
    kohya = flux.spelling_table(variant, "kohya")
    comfy = flux.spelling_table(variant, "comfy")
    for key, spec in flux.modules(variant).items():
        if key.endswith(".weight") and spec.shape:
            path = key[: -len(".weight")]
            assert kohya[f"lora_unet_{path.replace('.', '_')}"].target.key == key
            assert comfy[f"diffusion_model.{path}"].target.key == key


@pytest.mark.parametrize("variant", Flux.variants)
def test_diffusers_names_exist_with_the_slice_shape(flux: Flux, variant: str) -> None:
    diffusers = next(inv for inv in flux.inventories() if inv.variant == variant and inv.layout != "bfl")
    peft = flux.spelling_table(variant, "peft")
    covered: set[str] = set()
    by_key: dict[str, list[tuple[int, int, int]]] = {}
    for name, alias in peft.items():
        if alias.component != "transformer":
            continue
        dkey = name.removeprefix("transformer.") + ".weight"
        base = flux.modules(variant)[alias.target.key].shape
        expected = base if alias.target.slice is None else (alias.target.slice[2], *base[1:])
        assert diffusers.tensors[dkey].shape == expected, name
        covered.add(dkey)
        if alias.target.slice is not None:
            by_key.setdefault(alias.target.key, []).append(alias.target.slice)
    # the fused weights are tiled exactly by their slices
    for key, slices in by_key.items():
        slices.sort(key=lambda s: s[1])
        assert slices[0][1] == 0
        assert all(a[1] + a[2] == b[1] for a, b in itertools.pairwise(slices))
        assert slices[-1][1] + slices[-1][2] == flux.modules(variant)[key].shape[0]
    missed = {k for k, s in diffusers.tensors.items() if k.endswith(".weight") and s.shape} - covered
    # documented skips: swapped halves (norm_out) and q/k norms whose BFL tensors are ".scale"
    assert all(k == "norm_out.linear.weight" or ".norm_" in k for k in missed), sorted(missed)[:5]
    assert "norm_out.linear.weight" in missed


def test_single_block_linear1_split(flux: Flux) -> None:
    parts = diffusers_modules("single_blocks.0.linear1", (21504, 3072))
    assert parts == [
        ("single_transformer_blocks.0.attn.to_q", (0, 0, 3072)),
        ("single_transformer_blocks.0.attn.to_k", (0, 3072, 3072)),
        ("single_transformer_blocks.0.attn.to_v", (0, 6144, 3072)),
        ("single_transformer_blocks.0.proj_mlp", (0, 9216, 12288)),
    ]
    assert diffusers_modules("final_layer.adaLN_modulation.1", (6144, 3072)) == []
    alias = flux.resolve("lora_transformer_single_transformer_blocks_3_proj_mlp")
    assert alias is not None
    assert alias.spelling == "onetrainer"
    assert alias.target.key == "single_blocks.3.linear1.weight"
    assert alias.target.slice == (0, 9216, 12288)
    assert flux.resolve("lycoris_transformer_blocks_0_attn_add_k_proj").target.slice == (0, 3072, 3072)  # type: ignore[union-attr]


def test_text_encoder_aliases(flux: Flux) -> None:
    te1 = flux.resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    assert te1 is not None
    assert te1.component == "te1"
    assert (
        te1.target.key
        == "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    te3 = flux.resolve("lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    assert te3 is not None
    assert te3.component == "te3"
    assert te3.target.key == "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert flux.resolve("lora_te2_encoder_block_0_layer_0_SelfAttention_q").target == te3.target  # type: ignore[union-attr]
    assert flux.resolve("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q").target == te3.target  # type: ignore[union-attr]
    assert flux.resolve("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").target == te1.target  # type: ignore[union-attr]
    assert flux.resolve(te1.target.key.removesuffix(".weight")).target == te1.target  # type: ignore[union-attr]
    assert set(flux.text_encoder_modules()) >= {te1.target.key, te3.target.key}


def test_schnell_has_no_guidance_aliases(flux: Flux) -> None:
    assert "lora_unet_guidance_in_in_layer" in flux.alias_table("dev")
    assert "lora_unet_guidance_in_in_layer" not in flux.alias_table("schnell")


# ------------------------------------------------------------------------------------ the LoRA manifest
def test_manifest_modules_resolve_with_blocks(flux: Flux) -> None:
    data = load_manifest("lora-flux-kohya")
    for name, mod in data["modules"].items():
        alias = flux.resolve(name, "dev")
        assert alias is not None, name
        assert alias.spelling == "kohya"
        if mod["base_manifest"] == "flux-dev-bfl":
            assert alias.target.key == mod["base_key"]
        else:  # CLIP-L in the HF layout of a separate file: ComfyUI's clip_l key space here
            assert mod["base_manifest"] == FLUX_TE_MANIFEST
            assert alias.target.key == "text_encoders.clip_l.transformer." + mod["base_key"]
        assert alias.target.slice == (tuple(mod["slice"]) if mod["slice"] else None)
        assert flux.block_of(alias.target.key) == mod["block"]
        assert flux.block_of(mod["base_key"]) == mod["block"]


@pytest.mark.parametrize("shrunk", [False, True])
def test_manifest_lora_detection(registry: Registry, shrunk: bool) -> None:
    det = registry.detect(manifest_view(load_manifest("lora-flux-kohya"), shrunk))
    assert (det.arch, det.variant, det.kind, det.layout) == ("flux", "dev", "lora", "kohya")
    assert det.score == 1.0
    assert det.components == ("te1", "transformer")


@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("spelling", Flux.spellings)
@pytest.mark.parametrize("variant", Flux.variants)
def test_every_spelling_is_detected(
    flux: Flux, registry: Registry, variant: str, spelling: str, shrunk: bool
) -> None:
    det = registry.detect(synth_lora(flux, variant, spelling, shrunk))
    assert (det.arch, det.kind, det.layout) == ("flux", "lora", spelling)
    assert det.variant == "dev"  # LoRAs are reported as dev
    assert det.score == 1.0


def test_lora_with_guidance_modules_is_dev(registry: Registry) -> None:
    view = SimpleKeyView.from_shapes(
        {
            "lora_unet_guidance_in_in_layer.lora_down.weight": (4, 256),
            "lora_unet_guidance_in_in_layer.lora_up.weight": (48, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 48),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (144, 4),
        }
    )
    det = registry.detect(view)
    assert (det.arch, det.variant, det.layout) == ("flux", "dev", "kohya")


# -------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "transformer."])
@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("inventory", Flux.inventory_files)
def test_checkpoint_detection(
    flux: Flux, registry: Registry, inventory: str, shrunk: bool, prefix: str
) -> None:
    inv = next(i for i in flux.inventories() if i.id == inventory)
    view = SimpleKeyView(
        {
            prefix + k: TensorSpec(shrink(v.shape) if shrunk else v.shape, v.dtype)
            for k, v in inv.tensors.items()
        }
    )
    found = registry.detect_all(view)
    det = found[0]
    assert (det.arch, det.variant, det.kind, det.layout) == ("flux", inv.variant, "checkpoint", inv.layout)
    assert det.score == 1.0
    # the other families score far lower
    assert all(d.score < 0.2 for d in found[1:]), found[1:]


def test_partial_schnell_checkpoint(registry: Registry, flux: Flux) -> None:
    keys = {k: shrink(v.shape) for k, v in flux.modules("schnell").items() if k.startswith("double_blocks.")}
    det = registry.detect(SimpleKeyView.from_shapes(keys))
    assert (det.arch, det.variant) == ("flux", "schnell")


# ------------------------------------------------------------------------------------------------- blocks
def test_flux_61_notation(flux: Flux) -> None:
    labels = flux.block_notations()["flux-61"]
    assert len(labels) == 61
    assert len(set(labels)) == 61
    assert labels[:3] == ["CLIP", "T5", "IN"]
    assert labels[-1] == "OUT"
    assert labels[3] == "D00"
    assert labels[21] == "D18"
    assert labels[22] == "S00"
    assert labels[59] == "S37"


@pytest.mark.parametrize("variant", Flux.variants)
def test_every_key_and_target_has_a_notation_label(flux: Flux, variant: str) -> None:
    labels = set(flux.block_notations()["flux-61"])
    for inv in flux.inventories():
        for key in inv.tensors:
            assert flux.block_of(key) in labels, key
            assert flux.block_of("model.diffusion_model." + key) == flux.block_of(key)
    for alias in flux.alias_table(variant).values():
        assert flux.block_of(alias.target.key) in labels, alias
    assert flux.block_of("img_in.weight") == "IN"
    assert flux.block_of("guidance_in.out_layer.weight") == "IN"
    assert flux.block_of("final_layer.adaLN_modulation.1.weight") == "OUT"
    assert flux.block_of("single_blocks.37.linear2.weight") == "S37"
    assert flux.block_of("text_encoders.t5xxl.transformer.shared.weight") == "T5"
    assert flux.block_of("first_stage_model.decoder.conv_in.weight") is None


def test_metadata_values(flux: Flux) -> None:
    assert flux.modelspec == {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}
    assert set(flux.base_model_version) == set(flux.variants)


def test_detection_among_all_builtins() -> None:
    everyone = Registry(autoload=False)
    for manifest in ("lora-flux-kohya",):
        for shrunk in (False, True):
            det = everyone.detect(manifest_view(load_manifest(manifest), shrunk))
            assert (det.arch, det.kind) == ("flux", "lora"), manifest
