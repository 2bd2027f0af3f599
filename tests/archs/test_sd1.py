"""The SD1/SD2 family: aliases, blocks and detection against the real key/shape manifests.

Every detection case runs twice: with the real shapes and with every dimension that is a multiple of 64
divided by 64 (what the test fixtures write), because detection must not depend on absolute sizes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from lorasmith.archs._unet import ShapeFit, fit_shapes, normalize_block_label
from lorasmith.archs.base import (
    SPELLINGS,
    Detection,
    SimpleKeyView,
    TensorSpec,
    load_packaged_inventory,
    lora_modules,
)
from lorasmith.archs.sd1 import SD1
from lorasmith.errors import DetectionError, PluginError
from lorasmith.registry import DEFAULT_PLUGINS, Registry
from lorasmith.testing.conformance import ArchitectureConformance

MANIFESTS = Path(__file__).resolve().parent.parent / "data" / "manifests"
OWN_PLUGINS = ["lorasmith.archs.sd1", "lorasmith.archs.sdxl"]
UNET = "model.diffusion_model."

LORA_MANIFESTS = {"lora-sd1-kohya": "sd1", "lora-sd1-conv-kohya": "sd1", "lora-sd2-kohya": "sd2"}
INVENTORIES = {"sd1-ldm": "sd1", "sd2-ldm": "sd2", "sd1-diffusers-unet": "sd1", "sd2-diffusers-unet": "sd2"}


# ------------------------------------------------------------------------------------------------ helpers
def shrink(shape: Sequence[int]) -> tuple[int, ...]:
    """What the fixtures do: every dimension divisible by 64 divided by 64, the others kept."""
    return tuple(d // 64 if d % 64 == 0 else d for d in shape)


@cache
def manifest(stem: str) -> dict[str, Any]:
    with gzip.open(MANIFESTS / f"{stem}.json.gz", "rt", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def view(
    shapes: Mapping[str, Sequence[int]], shrunk: bool, metadata: Mapping[str, str] | None = None
) -> SimpleKeyView:
    return SimpleKeyView(
        {k: TensorSpec(shrink(s) if shrunk else tuple(s), "F16") for k, s in shapes.items()},
        dict(metadata or {}),
    )


def lora_shapes(stem: str, keep: Callable[[str], bool] = lambda k: True) -> dict[str, list[int]]:
    return {k: s for k, (s, _d) in manifest(stem)["tensors"].items() if keep(k)}


def inventory_shapes(stem: str, keep: Callable[[str], bool] = lambda k: True) -> dict[str, tuple[int, ...]]:
    inv = load_packaged_inventory("lorasmith.archs", stem)
    return {k: s.shape for k, s in inv.tensors.items() if keep(k)}


@cache
def own_registry() -> Registry:
    return Registry(builtins=OWN_PLUGINS, autoload=False)


def detect(v: SimpleKeyView) -> Detection:
    return own_registry().detect(v)


@pytest.fixture(scope="module")
def sd1() -> SD1:
    fam = own_registry().get("sd1")
    assert isinstance(fam, SD1)
    return fam


def respell(stem: str, fam: SD1, variant: str, spelling: str) -> dict[str, list[int]]:
    """The manifest's LoRA renamed into ``spelling`` (modules the spelling lacks keep their kohya name)."""
    by_target: dict[tuple[str, Any], str] = {}
    for alias in fam.aliases(variant, spelling):
        by_target.setdefault((alias.target.key, alias.target.slice), alias.name)
    peft = SPELLINGS[spelling].suffixes == "peft"
    out: dict[str, list[int]] = {}
    for name, parts in lora_modules(manifest(stem)["tensors"]).items():
        alias = fam.resolve(name, variant)
        assert alias is not None
        new = by_target.get((alias.target.key, alias.target.slice), name)
        for suffix, key in parts.items():
            shape = manifest(stem)["tensors"][key][0]
            if peft:
                if suffix == ".alpha":
                    continue
                suffix = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}[suffix]
            out[new + suffix] = shape
    return out


# ------------------------------------------------------------------------------------------ registration
def test_both_families_load_through_the_hook() -> None:
    reg = own_registry()
    assert set(reg.archs()) == {"sd1", "sdxl"}
    assert reg.owner("sd1") == "lorasmith.archs.sd1"
    fam = reg.get("sd1")
    assert fam.variants == ("sd1", "sd2")
    assert fam.spellings[0] == "kohya"
    assert fam.modelspec == {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v"}
    assert fam.base_model_version == {"sd1": "sd_v1", "sd2": "sd_v2"}
    assert [inv.id for inv in fam.inventories()] == list(SD1.inventory_files)
    assert fam.canonical_inventory("sd2").id == "sd2-ldm"
    assert fam.describe()["block_notations"] == ["sd1-17", "sd1-26"]


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_alias_table_is_cached(variant: str) -> None:
    fam = SD1()
    fam.inventories()
    table = fam.alias_table(variant)
    assert fam.alias_table(variant) is table


class TestSD1Conformance(ArchitectureConformance):
    """The conformance suite every family passes (detection checked through the SD1+SDXL registry)."""

    arch_cls = SD1

    def make_registry(self) -> Registry | None:
        return own_registry()


# ------------------------------------------------------------------------------------------------ aliases
@pytest.mark.parametrize("stem", sorted(LORA_MANIFESTS))
def test_every_manifest_module_resolves_to_its_base_key_slice_and_block(sd1: SD1, stem: str) -> None:
    variant = LORA_MANIFESTS[stem]
    modules = manifest(stem)["modules"]
    assert modules
    for name, m in modules.items():
        alias = sd1.resolve(name, variant)
        assert alias is not None, name
        assert alias.spelling == "kohya"
        assert alias.target.key == m["base_key"], name
        assert alias.target.slice == (tuple(m["slice"]) if m["slice"] else None), name
        assert alias.component == ("te" if name.startswith("lora_te_") else "unet")
        assert sd1.block_of(m["base_key"]) == m["block"], name


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_every_alias_lands_inside_the_canonical_inventory(sd1: SD1, variant: str) -> None:
    inv = sd1.canonical_inventory(variant)
    labels = set(sd1.block_notations()["sd1-26"])
    for alias in sd1.aliases(variant):
        spec = inv.tensors.get(alias.target.key)
        assert spec is not None, alias
        assert spec.shape, alias
        if alias.target.slice is not None:
            dim, start, length = alias.target.slice
            assert 0 <= dim < len(spec.shape)
            assert length > 0, alias
            assert 0 <= start <= start + length <= spec.shape[dim], alias
        assert inv.component_of(alias.target.key) == alias.component, alias
        assert sd1.block_of(alias.target.key) in labels, alias
        assert alias.spelling in sd1.spellings


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_aliases_cover_every_unet_and_text_encoder_weight(sd1: SD1, variant: str) -> None:
    inv = sd1.canonical_inventory(variant)
    targets = {a.target.key for a in sd1.aliases(variant)}
    for key, spec in inv.tensors.items():
        comp = inv.component_of(key)
        if key.endswith(".weight") and spec.shape and comp == "unet":
            assert key in targets, key
        if comp == "vae":
            assert key not in targets, key
    te_weights = {k for k, s in inv.tensors.items() if inv.component_of(k) == "te" and k.endswith(".weight")}
    if variant == "sd1":
        assert te_weights <= targets
    else:  # the HF conversion drops resblocks.23: never a target
        assert not any(".resblocks.23." in t for t in targets)
        assert {k for k in te_weights if ".resblocks.23." not in k} <= targets


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_each_spelling_covers_the_unet_and_names_are_unique(sd1: SD1, variant: str) -> None:
    raw = list(sd1._build_aliases(variant))
    names = [a.name for a in raw]
    assert len(names) == len(set(names)), "two spellings produce one name"
    unet = {a.target for a in raw if a.component == "unet"}
    for spelling in sd1.spellings:
        assert {a.target for a in raw if a.spelling == spelling and a.component == "unet"} == unet
    te = {a.target for a in raw if a.component == "te"}
    for spelling in ("kohya", "peft"):
        assert {a.target for a in raw if a.spelling == spelling and a.component == "te"} == te


def test_spelling_examples(sd1: SD1) -> None:
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    expected = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "kohya",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "kohya-ldm",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "peft",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": "comfy",
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "lycoris",
    }
    for variant in ("sd1", "sd2"):
        for name, spelling in expected.items():
            alias = sd1.resolve(name, variant)
            assert alias is not None
            assert alias.spelling == spelling
            assert alias.target.key == key
    # resnet and norm modules resolve too (LoCon, LyCORIS full/norm modules)
    assert sd1.base_weight("lora_unet_up_blocks_3_resnets_2_norm1", "sd1").key == (  # type: ignore[union-attr]
        UNET + "output_blocks.11.0.in_layers.0.weight"
    )
    te = sd1.resolve("text_encoder.text_model.encoder.layers.3.mlp.fc2", "sd1")
    assert te is not None
    assert te.target.key == "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight"


def test_sd2_text_encoder_slices_and_renames(sd1: SD1) -> None:
    base = "cond_stage_model.model.transformer.resblocks.22."
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        for name in (
            f"lora_te_text_model_encoder_layers_22_self_attn_{proj}",
            f"text_encoder.text_model.encoder.layers.22.self_attn.{proj}",
        ):
            t = sd1.base_weight(name, "sd2")
            assert t is not None
            assert t.key == base + "attn.in_proj_weight"
            assert t.slice == (0, 1024 * i, 1024)
    renames = {
        "self_attn_out_proj": "attn.out_proj.weight",
        "mlp_fc1": "mlp.c_fc.weight",
        "mlp_fc2": "mlp.c_proj.weight",
        "layer_norm1": "ln_1.weight",
        "layer_norm2": "ln_2.weight",
    }
    for hf, oc in renames.items():
        t = sd1.base_weight(f"lora_te_text_model_encoder_layers_22_{hf}", "sd2")
        assert t is not None
        assert t.key == base + oc
        assert t.slice is None
    assert sd1.resolve("lora_te_text_model_encoder_layers_23_mlp_fc1", "sd2") is None
    assert sd1.resolve("lora_te_text_model_encoder_layers_12_mlp_fc1", "sd1") is None
    assert sd1.base_weight("lora_te_text_model_final_layer_norm", "sd2").key == (  # type: ignore[union-attr]
        "cond_stage_model.model.ln_final.weight"
    )


def test_linear_proj_in_of_sd2_targets_the_2d_weight(sd1: SD1) -> None:
    t = sd1.base_weight("lora_unet_down_blocks_0_attentions_0_proj_in", "sd2")
    assert t is not None
    assert sd1.modules("sd2")[t.key].shape == (320, 320)
    assert sd1.modules("sd1")[t.key].shape == (320, 320, 1, 1)


# ------------------------------------------------------------------------------------------------- blocks
def test_block_notations() -> None:
    notations = SD1().block_notations()
    assert len(notations["sd1-17"]) == 17
    assert len(notations["sd1-26"]) == 26
    assert list(notations["sd1-17"]) == [
        "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
        *(f"OUT{i:02d}" for i in range(3, 12)),
    ]  # fmt: skip
    assert set(notations["sd1-17"]) <= set(notations["sd1-26"])
    assert len(set(notations["sd1-26"])) == 26
    used = {m["block"] for stem in LORA_MANIFESTS for m in manifest(stem)["modules"].values()}
    assert used <= set(notations["sd1-26"])
    assert {m["block"] for m in manifest("lora-sd1-kohya")["modules"].values()} == set(notations["sd1-17"])


def test_block_of_other_keys(sd1: SD1) -> None:
    assert sd1.block_of(UNET + "time_embed.0.weight") == "BASE"
    assert sd1.block_of(UNET + "out.2.weight") == "OUT11"
    assert sd1.block_of(UNET + "input_blocks.0.0.weight") == "IN00"
    assert sd1.block_of(UNET + "middle_block.1.proj_in.weight") == "M00"
    assert sd1.block_of("cond_stage_model.model.ln_final.weight") == "BASE"
    assert sd1.block_of("first_stage_model.decoder.conv_in.weight") is None
    assert sd1.block_of("alphas_cumprod") is None
    # bare, comfy-prefixed and diffusers keys
    assert sd1.block_of("output_blocks.5.2.conv.weight") == "OUT05"
    assert sd1.block_of("diffusion_model.input_blocks.3.0.op.weight") == "IN03"
    assert sd1.block_of("up_blocks.1.upsamplers.0.conv.weight") == "OUT05"
    assert sd1.block_of("mid_block.attentions.0.proj_in.weight") == "M00"
    assert sd1.block_of("down_blocks.3.resnets.1.conv1") == "IN11"


def test_block_label_synonyms() -> None:
    assert normalize_block_label("MID") == "M00"
    assert normalize_block_label("mid") == "M00"
    assert normalize_block_label("in4") == "IN04"
    assert normalize_block_label("OUT11") == "OUT11"
    assert normalize_block_label("BASE") == "BASE"


# ---------------------------------------------------------------------------------------------- detection
def _check_ckpt(det: Detection, variant: str, layout: str) -> None:
    assert (det.arch, det.variant, det.kind, det.layout) == ("sd1", variant, "checkpoint", layout), det
    assert det.score == 1.0, det


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("stem", sorted(INVENTORIES))
def test_detect_full_checkpoints(stem: str, shrunk: bool) -> None:
    variant = INVENTORIES[stem]
    det = detect(view(inventory_shapes(stem), shrunk))
    layout = "diffusers-unet" if "diffusers" in stem else "ldm"
    _check_ckpt(det, variant, layout)
    if layout == "ldm":
        assert det.components == ("te", "unet", "vae")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("prefix", [UNET, "diffusion_model.", ""], ids=["ldm", "comfy", "bare"])
@pytest.mark.parametrize("stem", ["sd1-ldm", "sd2-ldm"])
def test_detect_unet_only_files(stem: str, prefix: str, shrunk: bool) -> None:
    shapes = {
        prefix + k[len(UNET) :]: s for k, s in inventory_shapes(stem, lambda k: k.startswith(UNET)).items()
    }
    _check_ckpt(detect(view(shapes, shrunk)), INVENTORIES[stem], "ldm")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("stem", ["sd1-ldm", "sd2-ldm"])
def test_detect_text_encoder_only_files(stem: str, shrunk: bool) -> None:
    shapes = inventory_shapes(stem, lambda k: k.startswith("cond_stage_model."))
    _check_ckpt(detect(view(shapes, shrunk)), INVENTORIES[stem], "ldm")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("drop", ["proj_", "attn2.to_k", "attn2."], ids=["no-proj", "no-attn2-k", "no-attn2"])
@pytest.mark.parametrize("stem", sorted(INVENTORIES))
def test_each_unet_signal_alone_tells_the_variant(stem: str, drop: str, shrunk: bool) -> None:
    """proj_in/proj_out rank and the attn2 context width each suffice (the other one removed)."""
    shapes = inventory_shapes(stem, lambda k: (k.startswith(UNET) or "diffusers" in stem) and drop not in k)
    det = detect(view(shapes, shrunk))
    assert (det.arch, det.variant, det.kind) == ("sd1", INVENTORIES[stem], "checkpoint"), det


def test_unet_without_any_variant_signal_defaults_to_sd1_or_metadata(sd1: SD1) -> None:
    # one resnet: identical in SD1, SD2 (and SDXL, so the family is forced)
    shapes = inventory_shapes("sd2-ldm", lambda k: k.startswith(UNET + "input_blocks.1.0."))
    det = sd1.detect(view(shapes, True))
    assert det is not None
    assert det.variant == "sd1"
    det = sd1.detect(view(shapes, True, {"modelspec.architecture": "stable-diffusion-v2-768-v"}))
    assert det is not None
    assert det.variant == "sd2"


def _check_lora(det: Detection, variant: str, spelling: str) -> None:
    assert (det.arch, det.variant, det.kind, det.layout) == ("sd1", variant, "lora", spelling), det
    assert det.score == 1.0, det


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("part", ["all", "unet", "te"])
@pytest.mark.parametrize("stem", sorted(LORA_MANIFESTS))
def test_detect_manifest_loras(stem: str, part: str, shrunk: bool) -> None:
    keep = {
        "all": lambda k: True,
        "unet": lambda k: k.startswith("lora_unet_"),
        "te": lambda k: k.startswith("lora_te_"),
    }[part]
    det = detect(view(lora_shapes(stem, keep), shrunk))
    _check_lora(det, LORA_MANIFESTS[stem], "kohya")
    assert det.components == {"all": ("te", "unet"), "unet": ("unet",), "te": ("te",)}[part]


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("spelling", ["kohya", "kohya-ldm", "peft", "comfy", "lycoris"])
@pytest.mark.parametrize("stem", sorted(LORA_MANIFESTS))
def test_detect_every_spelling(sd1: SD1, stem: str, spelling: str, shrunk: bool) -> None:
    variant = LORA_MANIFESTS[stem]
    shapes = respell(stem, sd1, variant, spelling)
    _check_lora(detect(view(shapes, shrunk)), variant, spelling)
    unet_only = {
        k: s for k, s in shapes.items() if "te_" not in k.split(".")[0] and not k.startswith("text_")
    }
    _check_lora(detect(view(unet_only, shrunk)), variant, spelling)


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_lora_variant_from_cross_attention_ratio(shrunk: bool) -> None:
    """A UNet LoRA of a single transformer block: attn2_to_k in-dim / attn1_to_k in-dim is 2.4 or 3.2."""
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn"
    for stem, variant in (("lora-sd1-kohya", "sd1"), ("lora-sd2-kohya", "sd2")):
        shapes = lora_shapes(stem, lambda k: k.startswith((block + "1_to_k", block + "2_to_k")))
        assert len(shapes) == 6
        assert detect(view(shapes, shrunk)).variant == variant


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_lora_text_encoder_layer_count_and_width(shrunk: bool) -> None:
    # layers 12..22 exist only in SD2's text encoder
    shapes = lora_shapes("lora-sd2-kohya", lambda k: "_layers_20_" in k)
    assert detect(view(shapes, shrunk)).variant == "sd2"
    # the first layers alone: the width fits SD1's or SD2's text encoder by a power-of-two factor
    for stem, variant in (("lora-sd1-kohya", "sd1"), ("lora-sd2-kohya", "sd2")):
        shapes = lora_shapes(stem, lambda k: "_layers_0_" in k)
        assert detect(view(shapes, shrunk)).variant == variant


def test_lora_metadata_breaks_ties() -> None:
    # attn1 modules alone have the same shapes in SD1 and SD2
    shapes = lora_shapes("lora-sd2-kohya", lambda k: "_attn1_" in k)
    assert detect(view(shapes, True)).variant == "sd1"
    for meta in (
        {"ss_base_model_version": "sd_v2"},
        {"ss_v2": "True"},
        {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"},
    ):
        assert detect(view(shapes, True, meta)).variant == "sd2"
    # shapes win over metadata
    assert detect(view(lora_shapes("lora-sd1-kohya"), True, {"ss_v2": "True"})).variant == "sd1"


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_sdxl_files_are_never_sd1(shrunk: bool) -> None:
    for stem in ("lora-sdxl-kohya", "lora-sdxl-conv-kohya"):
        assert detect(view(lora_shapes(stem), shrunk)).arch == "sdxl"
        # only the modules whose names also exist in SD1's ldm tree: shapes decide
        tb0 = lora_shapes(stem, lambda k: "_transformer_blocks_0_" in k)
        assert detect(view(tb0, shrunk)).arch == "sdxl"
    for stem in ("sdxl-sgm", "sdxl-diffusers-unet"):
        assert detect(view(inventory_shapes(stem), shrunk)).arch == "sdxl"


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("stem", sorted(LORA_MANIFESTS))
def test_sd_loras_whose_names_sdxl_also_knows_stay_sd1(sd1: SD1, stem: str, shrunk: bool) -> None:
    sdxl = own_registry().get("sdxl")
    common = {n for n in lora_modules(manifest(stem)["tensors"]) if sdxl.resolve(n) is not None}
    assert common  # down_blocks_1/2 and up_blocks_1 attentions exist in both diffusers trees
    shapes = lora_shapes(stem, lambda k: k.rsplit(".", 2)[0] in common or k.rsplit(".", 1)[0] in common)
    det = detect(view(shapes, shrunk))
    assert (det.arch, det.variant) == ("sd1", LORA_MANIFESTS[stem])


def test_vae_only_file_is_ambiguous() -> None:
    shapes = inventory_shapes("sd1-ldm", lambda k: k.startswith("first_stage_model."))
    with pytest.raises(DetectionError):
        detect(view(shapes, True))


def test_shape_fit_is_scale_invariant() -> None:
    assert fit_shapes([[(320, 320), (768, 768)], [(1280, 1280)]]) == ShapeFit(2, 0, 0, 1)
    shrunk = fit_shapes([[(5, 320), (12, 768)], [(20, 1280)], [(77, 77)]])
    assert shrunk.inconsistent == 0
    assert shrunk.power_of_two
    assert shrunk.resolved == 3
    wrong = fit_shapes([[(5, 320), (16, 768)], [(20, 1280)], None])
    assert (wrong.off_scale, wrong.ndim_mismatch, wrong.inconsistent) == (1, 1, 2)


@cache
def all_builtins() -> Registry | str:
    available = [m for m in DEFAULT_PLUGINS if importlib.util.find_spec(m) is not None]
    try:
        return Registry(builtins=available, autoload=False)
    except PluginError as exc:  # a sibling family is mid-rewrite; our own registry is tested above
        return str(exc)


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_detection_among_all_available_builtins(shrunk: bool) -> None:
    reg = all_builtins()
    if isinstance(reg, str):
        pytest.skip(f"built-ins do not load: {reg}")
    for stem, variant in LORA_MANIFESTS.items():
        det = reg.detect(view(lora_shapes(stem), shrunk))
        assert (det.arch, det.variant) == ("sd1", variant)
    for stem, variant in INVENTORIES.items():
        det = reg.detect(view(inventory_shapes(stem), shrunk))
        assert (det.arch, det.variant) == ("sd1", variant)
