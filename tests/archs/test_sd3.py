"""The SD3 / SD3.5 family: aliases, blocks and detection against the real key manifests (real and shrunk)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from lorasmith.archs.base import SPELLINGS, SimpleKeyView, TensorSpec
from lorasmith.archs.sd3 import SD3, diffusers_modules
from lorasmith.registry import Registry

MANIFESTS = Path(__file__).resolve().parent.parent / "data" / "manifests"
DIT_FAMILIES = ["lorasmith.archs.flux", "lorasmith.archs.sd3", "lorasmith.archs.zimage"]
MMDIT = "model.diffusion_model."
LORA_MANIFESTS = {"lora-sd3-medium-kohya": "sd3-medium", "lora-sd3.5-large-kohya": "sd3.5-large"}


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


def synth_lora(
    arch: SD3, variant: str, spelling: str, shrunk: bool, keep: Any = None, rank: int = 4
) -> SimpleKeyView:
    """The 2-D/4-D aliases of one spelling (those ``keep(name)`` accepts) as a plain LoRA."""
    peft = SPELLINGS[spelling].suffixes == "peft"
    tensors: dict[str, TensorSpec] = {}
    for name, alias in arch.spelling_table(variant, spelling).items():
        if keep is not None and not keep(name):
            continue
        spec = arch.target_spec(alias.target.key, variant)
        assert spec is not None
        if len(spec.shape) not in (2, 4):
            continue
        out = alias.target.slice[2] if alias.target.slice else spec.shape[0]
        down = (rank, *spec.shape[1:])
        up = (out, rank, *([1] * (len(spec.shape) - 2)))
        if shrunk:
            down, up = shrink(down), shrink(up)
        a, b = (".lora_A.weight", ".lora_B.weight") if peft else (".lora_down.weight", ".lora_up.weight")
        tensors[name + a] = TensorSpec(down, "BF16")
        tensors[name + b] = TensorSpec(up, "BF16")
    return SimpleKeyView(tensors)


@pytest.fixture(scope="module")
def sd3() -> SD3:
    return SD3()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(builtins=DIT_FAMILIES, autoload=False)


# ------------------------------------------------------------------------------------------------ aliases
def test_alias_tables_build_and_are_cached() -> None:
    fresh = SD3()
    for variant in SD3.variants:
        table = fresh.alias_table(variant)
        assert table
        assert fresh.alias_table(variant) is table


@pytest.mark.parametrize("variant", SD3.variants)
def test_every_alias_target_exists_with_its_slice_inside(sd3: SD3, variant: str) -> None:
    by_key: dict[str, set[tuple[int, int, int]]] = {}
    for alias in sd3.alias_table(variant).values():
        spec = sd3.target_spec(alias.target.key, variant)
        assert spec is not None, alias
        assert alias.target.key.startswith((MMDIT, "text_encoders.")), alias
        if alias.target.slice is not None:
            dim, start, length = alias.target.slice
            assert dim == 0, alias
            assert 0 < length <= spec.shape[0] - start, alias
            by_key.setdefault(alias.target.key, set()).add(alias.target.slice)
    for key, slices in by_key.items():  # q/k/v thirds tile the fused weight
        rows = sd3.modules(variant)[key].shape[0]
        assert sorted(slices) == [(0, 0, rows // 3), (0, rows // 3, rows // 3), (0, 2 * rows // 3, rows // 3)]


@pytest.mark.parametrize("variant", SD3.variants)
def test_every_mmdit_weight_has_kohya_and_comfy_names(sd3: SD3, variant: str) -> None:
    kohya = sd3.spelling_table(variant, "kohya")
    comfy = sd3.spelling_table(variant, "comfy")
    for key, spec in sd3.modules(variant).items():
        if key.startswith(MMDIT) and key.endswith(".weight") and spec.shape:
            path = key[len(MMDIT) : -len(".weight")]
            assert kohya[f"lora_unet_{path.replace('.', '_')}"].target.key == key
            assert comfy[f"diffusion_model.{path}"].target.key == key


def test_diffusers_names(sd3: SD3) -> None:
    peft = sd3.spelling_table("sd3.5-medium", "peft")
    x = MMDIT + "joint_blocks.3.x_block."
    c = MMDIT + "joint_blocks.3.context_block."
    expected = {
        "transformer.transformer_blocks.3.attn.to_k": (x + "attn.qkv.weight", (0, 1536, 1536)),
        "transformer.transformer_blocks.3.attn.add_v_proj": (c + "attn.qkv.weight", (0, 3072, 1536)),
        "transformer.transformer_blocks.3.attn2.to_q": (x + "attn2.qkv.weight", (0, 0, 1536)),
        "transformer.transformer_blocks.3.attn2.to_out.0": (x + "attn2.proj.weight", None),
        "transformer.transformer_blocks.3.attn.to_out.0": (x + "attn.proj.weight", None),
        "transformer.transformer_blocks.3.attn.to_add_out": (c + "attn.proj.weight", None),
        "transformer.transformer_blocks.3.ff.net.0.proj": (x + "mlp.fc1.weight", None),
        "transformer.transformer_blocks.3.ff_context.net.2": (c + "mlp.fc2.weight", None),
        "transformer.transformer_blocks.3.norm1.linear": (x + "adaLN_modulation.1.weight", None),
        "transformer.transformer_blocks.3.norm1_context.linear": (c + "adaLN_modulation.1.weight", None),
        "transformer.transformer_blocks.3.attn.norm_added_q": (c + "attn.ln_q.weight", None),
        "transformer.pos_embed.proj": (MMDIT + "x_embedder.proj.weight", None),
        "transformer.time_text_embed.text_embedder.linear_2": (MMDIT + "y_embedder.mlp.2.weight", None),
        "transformer.proj_out": (MMDIT + "final_layer.linear.weight", None),
    }
    for name, (key, sl) in expected.items():
        assert (peft[name].target.key, peft[name].target.slice) == (key, sl), name
    # the pre-only last context block and norm_out have swapped halves in diffusers: not aliased
    assert "transformer.transformer_blocks.23.norm1_context.linear" not in peft
    assert "transformer.transformer_blocks.22.norm1_context.linear" in peft
    assert "transformer.norm_out.linear" not in peft
    assert diffusers_modules("final_layer.adaLN_modulation.1", (3072, 1536)) == []
    assert diffusers_modules("joint_blocks.23.context_block.adaLN_modulation.1", (3072, 1536), True) == []
    ot = sd3.resolve("lora_transformer_transformer_blocks_0_attn_add_k_proj", "sd3-medium")
    assert ot is not None
    assert ot.spelling == "onetrainer"
    assert ot.target.slice == (0, 1536, 1536)
    ly = sd3.resolve("lycoris_transformer_blocks_37_attn_to_v", "sd3.5-large")
    assert ly is not None
    assert ly.target.slice == (0, 4864, 2432)


def test_text_encoder_aliases(sd3: SD3) -> None:
    for variant in SD3.variants:
        te2 = sd3.resolve("lora_te2_text_model_encoder_layers_31_self_attn_v_proj", variant)
        assert te2 is not None
        assert te2.component == "te2"
        assert te2.target.slice is None
        assert te2.target.key == (
            "text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.v_proj.weight"
        )
        peft = sd3.resolve("text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj", variant)
        assert peft is not None
        assert peft.target == te2.target
        assert peft.spelling == "peft"
        te3 = sd3.resolve("lora_te3_encoder_block_23_layer_1_DenseReluDense_wo", variant)
        assert te3 is not None
        assert te3.component == "te3"
        assert sd3.resolve("text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wo", variant) is not None


# ----------------------------------------------------------------------------------- the LoRA manifests
@pytest.mark.parametrize(("manifest", "variant"), LORA_MANIFESTS.items())
def test_manifest_modules_resolve_with_blocks(sd3: SD3, manifest: str, variant: str) -> None:
    data = load_manifest(manifest)
    for name, mod in data["modules"].items():
        alias = sd3.resolve(name, variant)
        assert alias is not None, name
        assert alias.spelling == "kohya"
        assert mod["base_manifest"] in (sd3.canonical_inventory(variant).id, "sd3-medium-comfyui")
        assert alias.target.key == mod["base_key"]
        assert alias.target.slice == (tuple(mod["slice"]) if mod["slice"] else None)
        assert sd3.block_of(mod["base_key"]) == mod["block"]


@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize(("manifest", "variant"), LORA_MANIFESTS.items())
def test_manifest_lora_detection(registry: Registry, manifest: str, variant: str, shrunk: bool) -> None:
    det = registry.detect(manifest_view(load_manifest(manifest), shrunk))
    assert (det.arch, det.variant, det.kind, det.layout) == ("sd3", variant, "lora", "kohya")
    assert det.score == 1.0
    assert det.components == ("te1", "te2", "transformer")


@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("spelling", SD3.spellings)
@pytest.mark.parametrize("variant", SD3.variants)
def test_every_spelling_is_detected(
    sd3: SD3, registry: Registry, variant: str, spelling: str, shrunk: bool
) -> None:
    det = registry.detect(synth_lora(sd3, variant, spelling, shrunk))
    assert (det.arch, det.variant, det.kind, det.layout) == ("sd3", variant, "lora", spelling)
    assert det.score == 1.0


@pytest.mark.parametrize("shrunk", [False, True])
def test_lora_variant_signs(sd3: SD3, registry: Registry, shrunk: bool) -> None:
    def detect(variant: str, keep: Any) -> str | None:
        det = registry.detect(synth_lora(sd3, variant, "kohya", shrunk, keep))
        assert det.arch == "sd3"
        return det.variant

    # no attn2 modules: the 9 x hidden x-block adaLN still says 3.5 Medium
    assert detect("sd3.5-medium", lambda n: "x_block_adaLN" in n or "_attn_qkv" in n) == "sd3.5-medium"
    # only the pre-only last context block's adaLN (2 x hidden outputs) tells the depth
    last = "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1"
    assert detect("sd3.5-large", lambda n: n == last or "joint_blocks_0_" in n) == "sd3.5-large"
    last = "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"
    assert detect("sd3-medium", lambda n: n == last or "joint_blocks_1_" in n) == "sd3-medium"
    # attn2 names alone
    assert detect("sd3.5-medium", lambda n: "attn2" in n) == "sd3.5-medium"
    # a block index past 23
    assert detect("sd3.5-large", lambda n: "joint_blocks_30_x_block_mlp" in n) == "sd3.5-large"
    # nothing tells: the smallest variant that knows every module
    assert detect("sd3.5-large", lambda n: "joint_blocks_2_x_block_attn_qkv" in n) == "sd3-medium"


# -------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_view(tensors: Mapping[str, TensorSpec], shrunk: bool, bare: bool) -> SimpleKeyView:
    out: dict[str, TensorSpec] = {}
    for key, spec in tensors.items():
        name = key[len(MMDIT) :] if bare and key.startswith(MMDIT) else key
        out[name] = TensorSpec(shrink(spec.shape) if shrunk else spec.shape, spec.dtype)
    return SimpleKeyView(out)


@pytest.mark.parametrize("bare", [False, True])
@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("inventory", SD3.inventory_files)
def test_checkpoint_detection(sd3: SD3, registry: Registry, inventory: str, shrunk: bool, bare: bool) -> None:
    inv = next(i for i in sd3.inventories() if i.id == inventory)
    view = _checkpoint_view(inv.tensors, shrunk, bare)
    found = registry.detect_all(view)
    det = found[0]
    assert (det.arch, det.variant, det.kind, det.layout) == ("sd3", inv.variant, "checkpoint", "comfyui")
    assert det.score == 1.0
    assert "mmdit" in det.components
    assert "vae" in det.components
    # the other families score far lower
    assert all(d.score < 0.2 for d in found[1:]), found[1:]


@pytest.mark.parametrize("inventory", SD3.inventory_files)
def test_mmdit_only_checkpoint(sd3: SD3, registry: Registry, inventory: str) -> None:
    inv = next(i for i in sd3.inventories() if i.id == inventory)
    only = {k: v for k, v in inv.tensors.items() if k.startswith(MMDIT)}
    det = registry.detect(_checkpoint_view(only, shrunk=True, bare=True))
    assert (det.arch, det.variant, det.kind) == ("sd3", inv.variant, "checkpoint")
    assert det.components == ("mmdit",)


# ------------------------------------------------------------------------------------------------- blocks
def test_notations(sd3: SD3) -> None:
    notations = sd3.block_notations()
    assert set(notations) == {"sd3-24", "sd3-38"}
    assert len(notations["sd3-24"]) == 29
    assert len(notations["sd3-38"]) == 43
    assert notations["sd3-38"][:4] == ["TE1", "TE2", "TE3", "IN"]
    assert notations["sd3-38"][4] == "JB00"
    assert notations["sd3-38"][-2:] == ["JB37", "OUT"]


@pytest.mark.parametrize("variant", SD3.variants)
def test_every_key_and_target_has_a_notation_label(sd3: SD3, variant: str) -> None:
    depth = 38 if variant == "sd3.5-large" else 24
    labels = set(sd3.block_notations()[f"sd3-{depth}"])
    for key in sd3.modules(variant):
        label = sd3.block_of(key)
        if key.startswith(("first_stage_model.", "model.model_sampling.")):
            assert label is None, key
        else:
            assert label in labels, key
            assert sd3.block_of(key.removeprefix(MMDIT)) == label
    for alias in sd3.alias_table(variant).values():
        assert sd3.block_of(alias.target.key) in labels, alias
    assert sd3.block_of(MMDIT + "pos_embed") == "IN"
    assert sd3.block_of(MMDIT + "final_layer.linear.weight") == "OUT"
    assert sd3.block_of("text_encoders.t5xxl.transformer.shared.weight") == "TE3"


def test_metadata_values(sd3: SD3) -> None:
    assert sd3.modelspec["sd3.5-large"] == "stable-diffusion-3.5-large"
    assert set(sd3.modelspec) == set(sd3.variants) == set(sd3.base_model_version)


def test_detection_among_all_builtins() -> None:
    everyone = Registry(autoload=False)
    for manifest in tuple(LORA_MANIFESTS):
        for shrunk in (False, True):
            det = everyone.detect(manifest_view(load_manifest(manifest), shrunk))
            assert (det.arch, det.kind) == ("sd3", "lora"), manifest
