"""The Z-Image family: aliases, blocks and detection against the real key manifests (real and shrunk)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from lorasmith.archs.base import SPELLINGS, Alias, SimpleKeyView, TensorSpec
from lorasmith.archs.zimage import ZImage, diffusers_modules
from lorasmith.registry import Registry

MANIFESTS = Path(__file__).resolve().parent.parent / "data" / "manifests"
DIT_FAMILIES = ["lorasmith.archs.flux", "lorasmith.archs.sd3", "lorasmith.archs.zimage"]
#: LoRA manifest -> the spelling its trainer writes
LORA_MANIFESTS = {
    "lora-zimage-musubi": "musubi",
    "lora-zimage-aitoolkit": "aitk",
    "lora-zimage-diffusers": "peft",
}


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


def synth_lora(arch: ZImage, spelling: str, shrunk: bool, rank: int = 4) -> SimpleKeyView:
    """Every 2-D alias of one spelling as a plain LoRA (kohya or PEFT suffixes)."""
    peft = SPELLINGS[spelling].suffixes == "peft"
    tensors: dict[str, TensorSpec] = {}
    for name, alias in arch.spelling_table(None, spelling).items():
        spec = arch.target_spec(alias.target.key)
        assert spec is not None
        if len(spec.shape) != 2:
            continue
        out = alias.target.slice[2] if alias.target.slice else spec.shape[0]
        down: tuple[int, ...] = (rank, spec.shape[1])
        up: tuple[int, ...] = (out, rank)
        if shrunk:
            down, up = shrink(down), shrink(up)
        a, b = (".lora_A.weight", ".lora_B.weight") if peft else (".lora_down.weight", ".lora_up.weight")
        tensors[name + a] = TensorSpec(down, "BF16")
        tensors[name + b] = TensorSpec(up, "BF16")
    return SimpleKeyView(tensors)


@pytest.fixture(scope="module")
def zimage() -> ZImage:
    return ZImage()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(builtins=DIT_FAMILIES, autoload=False)


# ------------------------------------------------------------------------------------------------ aliases
def test_alias_table_builds_and_is_cached() -> None:
    fresh = ZImage()
    table = fresh.alias_table()
    assert table
    assert fresh.alias_table() is table


def test_every_alias_target_exists_with_its_slice_inside(zimage: ZImage) -> None:
    for alias in zimage.alias_table().values():
        spec = zimage.modules().get(alias.target.key)
        assert spec is not None, alias
        if alias.target.slice is not None:
            dim, start, length = alias.target.slice
            assert dim == 0, alias
            assert 0 < length <= spec.shape[0] - start, alias


def test_diffusers_layout_is_covered_exactly(zimage: ZImage) -> None:
    comfy = zimage.canonical_inventory()
    diffusers = next(i for i in zimage.inventories() if not i.canonical)
    covered: dict[str, tuple[str, tuple[int, int, int] | None]] = {}
    for key, spec in comfy.tensors.items():
        if not key.endswith(".weight"):
            continue
        for path, sl in diffusers_modules(key.removesuffix(".weight"), spec.shape):
            dkey = path + ".weight"
            expected = spec.shape if sl is None else (sl[2], *spec.shape[1:])
            assert diffusers.tensors[dkey].shape == expected, dkey
            covered[dkey] = (key, sl)
    assert covered.keys() == {k for k in diffusers.tensors if k.endswith(".weight")}
    assert covered["layers.7.attention.to_v.weight"] == ("layers.7.attention.qkv.weight", (0, 7680, 3840))
    assert covered["noise_refiner.1.attention.norm_k.weight"] == (
        "noise_refiner.1.attention.k_norm.weight",
        None,
    )
    assert covered["all_final_layer.2-1.adaLN_modulation.1.weight"] == (
        "final_layer.adaLN_modulation.1.weight",
        None,
    )
    assert covered["all_x_embedder.2-1.weight"] == ("x_embedder.weight", None)


def test_spellings_of_one_module(zimage: ZImage) -> None:
    qkv = "layers.3.attention.qkv.weight"
    k_slice = (0, 3840, 3840)
    names = {
        "lora_unet_layers_3_attention_qkv": ("kohya", None),
        "diffusion_model.layers.3.attention.qkv": ("comfy", None),
        "lora_unet_layers_3_attention_to_k": ("musubi", k_slice),
        "diffusion_model.layers.3.attention.to_k": ("aitk", k_slice),
        "transformer.layers.3.attention.to_k": ("peft", k_slice),
        "lora_transformer_layers_3_attention_to_k": ("onetrainer", k_slice),
        "lycoris_layers_3_attention_to_k": ("lycoris", k_slice),
    }
    for name, (spelling, sl) in names.items():
        alias = zimage.resolve(name)
        assert alias is not None, name
        assert (alias.spelling, alias.target.key, alias.target.slice) == (spelling, qkv, sl)
    out = zimage.resolve("lora_unet_context_refiner_1_attention_to_out_0")
    assert out is not None
    assert out.target.key == "context_refiner.1.attention.out.weight"
    # a name two spellings share belongs to both tables, with one target
    shared = "lora_unet_layers_3_feed_forward_w1"
    kohya = zimage.spelling_table(None, "kohya")[shared]
    musubi = zimage.spelling_table(None, "musubi")[shared]
    assert (kohya.spelling, musubi.spelling) == ("kohya", "musubi")
    assert kohya.target == musubi.target == zimage.resolve(shared).target  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- the LoRA manifests
@pytest.mark.parametrize("manifest", LORA_MANIFESTS)
def test_manifest_modules_resolve_with_blocks(zimage: ZImage, manifest: str) -> None:
    data = load_manifest(manifest)
    for name, mod in data["modules"].items():
        alias = zimage.resolve(name)
        assert alias is not None, name
        assert name in zimage.spelling_table(None, LORA_MANIFESTS[manifest])
        assert mod["base_manifest"] == "z-image-comfyui"
        assert alias.target.key == mod["base_key"]
        assert alias.target.slice == (tuple(mod["slice"]) if mod["slice"] else None)
        assert zimage.block_of(mod["base_key"]) == mod["block"]


@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize(("manifest", "spelling"), LORA_MANIFESTS.items())
def test_manifest_lora_detection(registry: Registry, manifest: str, spelling: str, shrunk: bool) -> None:
    det = registry.detect(manifest_view(load_manifest(manifest), shrunk))
    assert (det.arch, det.variant, det.kind, det.layout) == ("zimage", "z-image", "lora", spelling)
    assert det.score == 1.0
    assert det.components == ("transformer",)


@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("spelling", ZImage.spellings)
def test_every_spelling_is_detected(zimage: ZImage, registry: Registry, spelling: str, shrunk: bool) -> None:
    found = registry.detect_all(synth_lora(zimage, spelling, shrunk))
    det = found[0]
    assert (det.arch, det.variant, det.kind, det.layout) == ("zimage", "z-image", "lora", spelling)
    assert det.score == 1.0
    assert all(d.score < 0.2 for d in found[1:]), found[1:]


# -------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "transformer."])
@pytest.mark.parametrize("shrunk", [False, True])
@pytest.mark.parametrize("inventory", ZImage.inventory_files)
def test_checkpoint_detection(
    zimage: ZImage, registry: Registry, inventory: str, shrunk: bool, prefix: str
) -> None:
    inv = next(i for i in zimage.inventories() if i.id == inventory)
    view = SimpleKeyView(
        {
            prefix + k: TensorSpec(shrink(v.shape) if shrunk else v.shape, v.dtype)
            for k, v in inv.tensors.items()
        }
    )
    found = registry.detect_all(view)
    det = found[0]
    assert (det.arch, det.variant, det.kind, det.layout) == ("zimage", "z-image", "checkpoint", inv.layout)
    assert det.score == 1.0
    assert all(d.score < 0.2 for d in found[1:]), found[1:]


# ------------------------------------------------------------------------------------------------- blocks
def test_notation(zimage: ZImage) -> None:
    labels = zimage.block_notations()["zimage-37"]
    assert len(labels) == 37
    assert len(set(labels)) == 37
    assert labels[:6] == ["TE", "IN", "NR0", "NR1", "CR0", "CR1"]
    assert labels[6] == "L00"
    assert labels[-2:] == ["L29", "OUT"]


def test_every_key_has_a_notation_label(zimage: ZImage) -> None:
    labels = set(zimage.block_notations()["zimage-37"])
    for inv in zimage.inventories():
        for key in inv.tensors:
            assert zimage.block_of(key) in labels, key
            assert zimage.block_of("model.diffusion_model." + key) == zimage.block_of(key)
    assert zimage.block_of("x_pad_token") == "IN"
    assert zimage.block_of("cap_embedder.1.weight") == "IN"
    assert zimage.block_of("all_final_layer.2-1.linear.weight") == "OUT"
    assert zimage.block_of("noise_refiner.1.feed_forward.w2.weight") == "NR1"
    assert zimage.block_of("layers.29.adaLN_modulation.0.weight") == "L29"
    assert zimage.block_of("text_encoders.qwen3_4b.model.embed_tokens.weight") is None


def test_metadata_values(zimage: ZImage) -> None:
    assert zimage.modelspec == {"z-image": "Z-Image"}
    assert zimage.base_model_version == {"z-image": "zimage"}


def test_detection_among_all_builtins() -> None:
    everyone = Registry(autoload=False)
    for manifest in tuple(LORA_MANIFESTS):
        for shrunk in (False, True):
            det = everyone.detect(manifest_view(load_manifest(manifest), shrunk))
            assert (det.arch, det.kind) == ("zimage", "lora"), manifest


def test_extra_aliases_take_part_in_the_spelling() -> None:
    arch = ZImage()
    target = arch.resolve("lora_unet_layers_0_attention_qkv")
    assert target is not None
    extra = [Alias("newtrainer.layers.0.qkv", "newtrainer", target.target, "transformer")]
    arch.add_aliases(extra, source="test-plugin")
    view = SimpleKeyView.from_shapes(
        {
            "newtrainer.layers.0.qkv.lora_down.weight": (4, 60),
            "newtrainer.layers.0.qkv.lora_up.weight": (180, 4),
        }
    )
    det = arch.detect(view)
    assert det is not None
    assert (det.arch, det.kind, det.layout) == ("zimage", "lora", "newtrainer")
