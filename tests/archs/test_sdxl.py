"""The SDXL family: aliases, blocks and detection against the real key/shape manifests.

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

from lorasmith.archs.base import (
    SPELLINGS,
    Detection,
    SimpleKeyView,
    TensorSpec,
    load_packaged_inventory,
    lora_modules,
)
from lorasmith.archs.sdxl import SDXL
from lorasmith.errors import PluginError
from lorasmith.registry import DEFAULT_PLUGINS, Registry
from lorasmith.testing.conformance import ArchitectureConformance

MANIFESTS = Path(__file__).resolve().parent.parent / "data" / "manifests"
OWN_PLUGINS = ["lorasmith.archs.sd1", "lorasmith.archs.sdxl"]
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."

LORA_MANIFESTS = ("lora-sdxl-kohya", "lora-sdxl-conv-kohya")
INVENTORIES = {"sdxl-sgm": "sgm", "sdxl-diffusers-unet": "diffusers-unet"}
COMPONENT_OF_PREFIX = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2"}


# ------------------------------------------------------------------------------------------------ helpers
def shrink(shape: Sequence[int]) -> tuple[int, ...]:
    """What the fixtures do: every dimension divisible by 64 divided by 64, the others kept."""
    return tuple(d // 64 if d % 64 == 0 else d for d in shape)


@cache
def manifest(stem: str) -> dict[str, Any]:
    with gzip.open(MANIFESTS / f"{stem}.json.gz", "rt", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def view(shapes: Mapping[str, Sequence[int]], shrunk: bool) -> SimpleKeyView:
    return SimpleKeyView({k: TensorSpec(shrink(s) if shrunk else tuple(s), "F16") for k, s in shapes.items()})


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
def sdxl() -> SDXL:
    fam = own_registry().get("sdxl")
    assert isinstance(fam, SDXL)
    return fam


def respell(stem: str, fam: SDXL, spelling: str) -> dict[str, list[int]]:
    """The manifest's LoRA renamed into ``spelling`` (modules the spelling lacks keep their kohya name)."""
    by_target: dict[tuple[str, Any], str] = {}
    for alias in fam.aliases(None, spelling):
        by_target.setdefault((alias.target.key, alias.target.slice), alias.name)
    peft = SPELLINGS[spelling].suffixes == "peft"
    out: dict[str, list[int]] = {}
    for name, parts in lora_modules(manifest(stem)["tensors"]).items():
        alias = fam.resolve(name)
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
def test_family_loads_through_the_hook() -> None:
    reg = own_registry()
    assert reg.owner("sdxl") == "lorasmith.archs.sdxl"
    fam = reg.get("sdxl")
    assert fam.variants == ("base",)
    assert fam.spellings == ("kohya", "kohya-diffusers", "peft", "comfy", "lycoris")
    assert fam.modelspec == {"base": "stable-diffusion-xl-v1-base"}
    assert fam.base_model_version == {"base": "sdxl_base_v1-0"}
    assert [inv.id for inv in fam.inventories()] == ["sdxl-sgm", "sdxl-diffusers-unet"]
    assert fam.canonical_inventory().id == "sdxl-sgm"
    assert fam.describe()["block_notations"] == ["sdxl-12", "sdxl-20"]


def test_alias_table_is_cached() -> None:
    fam = SDXL()
    fam.inventories()
    table = fam.alias_table()
    assert fam.alias_table() is table


class TestSDXLConformance(ArchitectureConformance):
    """The conformance suite every family passes (detection checked through the SD1+SDXL registry)."""

    arch_cls = SDXL

    def make_registry(self) -> Registry | None:
        return own_registry()


# ------------------------------------------------------------------------------------------------ aliases
@pytest.mark.parametrize("stem", LORA_MANIFESTS)
def test_every_manifest_module_resolves_to_its_base_key_slice_and_block(sdxl: SDXL, stem: str) -> None:
    modules = manifest(stem)["modules"]
    assert modules
    for name, m in modules.items():
        alias = sdxl.resolve(name)
        assert alias is not None, name
        assert alias.spelling == "kohya"
        assert alias.target.key == m["base_key"], name
        assert alias.target.slice == (tuple(m["slice"]) if m["slice"] else None), name
        assert alias.component == COMPONENT_OF_PREFIX[m["component"]]
        assert sdxl.block_of(m["base_key"]) == m["block"], name


def test_every_alias_lands_inside_the_canonical_inventory(sdxl: SDXL) -> None:
    inv = sdxl.canonical_inventory()
    labels = set(sdxl.block_notations()["sdxl-20"])
    for alias in sdxl.aliases():
        spec = inv.tensors.get(alias.target.key)
        assert spec is not None, alias
        assert spec.shape, alias
        if alias.target.slice is not None:
            dim, start, length = alias.target.slice
            assert 0 <= dim < len(spec.shape)
            assert length > 0, alias
            assert 0 <= start <= start + length <= spec.shape[dim], alias
        assert inv.component_of(alias.target.key) == alias.component, alias
        assert sdxl.block_of(alias.target.key) in labels, alias
        assert alias.spelling in sdxl.spellings


def test_aliases_cover_every_unet_and_text_encoder_weight(sdxl: SDXL) -> None:
    inv = sdxl.canonical_inventory()
    targets = {a.target.key for a in sdxl.aliases()}
    for key, spec in inv.tensors.items():
        comp = inv.component_of(key)
        if key.endswith(".weight") and spec.shape and comp in ("unet", "te1", "te2"):
            assert key in targets, key
        if comp == "vae":
            assert key not in targets, key
    assert sum(1 for t in targets if t.endswith(".attn.in_proj_weight")) == 32
    # the transposed text_projection has no HF alias
    assert TE2 + "text_projection" not in targets


def test_each_spelling_covers_the_unet_and_names_are_unique(sdxl: SDXL) -> None:
    raw = list(sdxl._build_aliases("base"))
    names = [a.name for a in raw]
    assert len(names) == len(set(names)), "two spellings produce one name"
    unet = {a.target for a in raw if a.component == "unet"}
    assert len(unet) == sum(
        1 for k, s in sdxl.modules().items() if k.startswith(UNET) and k.endswith(".weight") and s.shape
    )
    for spelling in sdxl.spellings:
        assert {a.target for a in raw if a.spelling == spelling and a.component == "unet"} == unet
    for comp in ("te1", "te2"):
        te = {a.target for a in raw if a.component == comp}
        for spelling in ("kohya", "peft"):
            assert {a.target for a in raw if a.spelling == spelling and a.component == comp} == te


def test_spelling_examples(sdxl: SDXL) -> None:
    key = UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": "kohya",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": "kohya-diffusers",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "peft",
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k": "comfy",
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": "lycoris",
    }
    for name, spelling in expected.items():
        alias = sdxl.resolve(name)
        assert alias is not None
        assert alias.spelling == spelling
        assert alias.target.key == key
    # ResBlock names stay ldm in the kohya spelling (LoCon), diffusers in kohya-diffusers
    conv = UNET + "output_blocks.6.0.out_layers.3.weight"
    assert sdxl.base_weight("lora_unet_output_blocks_6_0_out_layers_3") == sdxl.base_weight(
        "lora_unet_up_blocks_2_resnets_0_conv2"
    )
    assert sdxl.base_weight("lora_unet_output_blocks_6_0_out_layers_3").key == conv  # type: ignore[union-attr]


def test_text_encoder_aliases(sdxl: SDXL) -> None:
    te1 = sdxl.resolve("text_encoder.text_model.encoder.layers.11.self_attn.q_proj")
    assert te1 is not None
    assert te1.target.key == TE1 + "text_model.encoder.layers.11.self_attn.q_proj.weight"
    assert te1.component == "te1"
    base = TE2 + "transformer.resblocks.31."
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        for name in (
            f"lora_te2_text_model_encoder_layers_31_self_attn_{proj}",
            f"text_encoder_2.text_model.encoder.layers.31.self_attn.{proj}",
        ):
            alias = sdxl.resolve(name)
            assert alias is not None
            assert alias.component == "te2"
            assert alias.target.key == base + "attn.in_proj_weight"
            assert alias.target.slice == (0, 1280 * i, 1280)
    for hf, oc in {
        "mlp_fc1": "mlp.c_fc.weight",
        "mlp_fc2": "mlp.c_proj.weight",
        "layer_norm2": "ln_2.weight",
    }.items():
        t = sdxl.base_weight(f"lora_te2_text_model_encoder_layers_31_{hf}")
        assert t is not None
        assert (t.key, t.slice) == (base + oc, None)
    assert sdxl.resolve("lora_te2_text_model_encoder_layers_32_mlp_fc1") is None
    assert sdxl.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1") is None  # SD1's prefix


# ------------------------------------------------------------------------------------------------- blocks
def test_block_notations() -> None:
    notations = SDXL().block_notations()
    assert len(notations["sdxl-12"]) == 12
    assert len(notations["sdxl-20"]) == 20
    assert list(notations["sdxl-12"]) == [
        "BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05",
    ]  # fmt: skip
    assert set(notations["sdxl-12"]) <= set(notations["sdxl-20"])
    used = {m["block"] for stem in LORA_MANIFESTS for m in manifest(stem)["modules"].values()}
    assert used == set(notations["sdxl-20"]) - {"IN00"}  # conv_in is no LoCon target
    assert {m["block"] for m in manifest("lora-sdxl-kohya")["modules"].values()} == set(notations["sdxl-12"])


def test_block_of_other_keys(sdxl: SDXL) -> None:
    assert sdxl.block_of(UNET + "time_embed.0.weight") == "BASE"
    assert sdxl.block_of(UNET + "label_emb.0.0.weight") == "BASE"
    assert sdxl.block_of(UNET + "out.2.weight") == "OUT08"
    assert sdxl.block_of(UNET + "input_blocks.0.0.weight") == "IN00"
    assert sdxl.block_of(TE2 + "text_projection") == "BASE"
    assert sdxl.block_of(TE1 + "text_model.final_layer_norm.weight") == "BASE"
    assert sdxl.block_of("first_stage_model.encoder.conv_in.weight") is None
    assert sdxl.block_of("up_blocks.2.resnets.2.conv2.weight") == "OUT08"
    assert sdxl.block_of("down_blocks.2.attentions.1.proj_out.weight") == "IN08"
    assert sdxl.block_of("middle_block.2.out_layers.3.weight") == "M00"


# ---------------------------------------------------------------------------------------------- detection
def _check(det: Detection, kind: str, layout: str) -> None:
    assert (det.arch, det.variant, det.kind, det.layout) == ("sdxl", "base", kind, layout), det
    assert det.score == 1.0, det


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("stem", sorted(INVENTORIES))
def test_detect_full_checkpoints(stem: str, shrunk: bool) -> None:
    det = detect(view(inventory_shapes(stem), shrunk))
    _check(det, "checkpoint", INVENTORIES[stem])
    if stem == "sdxl-sgm":
        assert det.components == ("te1", "te2", "unet", "vae")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("prefix", [UNET, "diffusion_model.", ""], ids=["sgm", "comfy", "bare"])
def test_detect_unet_only_files(prefix: str, shrunk: bool) -> None:
    unet = inventory_shapes("sdxl-sgm", lambda k: k.startswith(UNET))
    _check(detect(view({prefix + k[len(UNET) :]: s for k, s in unet.items()}, shrunk)), "checkpoint", "sgm")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_detect_text_encoders_only(shrunk: bool) -> None:
    shapes = inventory_shapes("sdxl-sgm", lambda k: k.startswith("conditioner."))
    _check(detect(view(shapes, shrunk)), "checkpoint", "sgm")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("part", ["all", "unet", "te"])
@pytest.mark.parametrize("stem", LORA_MANIFESTS)
def test_detect_manifest_loras(stem: str, part: str, shrunk: bool) -> None:
    keep = {
        "all": lambda k: True,
        "unet": lambda k: k.startswith("lora_unet_"),
        "te": lambda k: k.startswith("lora_te"),
    }[part]
    det = detect(view(lora_shapes(stem, keep), shrunk))
    _check(det, "lora", "kohya")
    assert det.components == {"all": ("te1", "te2", "unet"), "unet": ("unet",), "te": ("te1", "te2")}[part]


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
@pytest.mark.parametrize("spelling", ["kohya", "kohya-diffusers", "peft", "comfy", "lycoris"])
@pytest.mark.parametrize("stem", LORA_MANIFESTS)
def test_detect_every_spelling(sdxl: SDXL, stem: str, spelling: str, shrunk: bool) -> None:
    shapes = respell(stem, sdxl, spelling)
    _check(detect(view(shapes, shrunk)), "lora", spelling)
    unet_only = {k: s for k, s in shapes.items() if not k.startswith(("lora_te", "text_encoder"))}
    _check(detect(view(unet_only, shrunk)), "lora", spelling)


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_sgm_names_shared_with_sd1_are_told_apart_by_shapes(shrunk: bool) -> None:
    """transformer_blocks_0 of input_blocks 4/5/7/8, middle_block_1 and output_blocks 3..5 exist in SD1's
    ldm tree too (kohya-ldm spelling); the cross-attention width and the channel counts tell them apart."""
    sd1 = own_registry().get("sd1")
    for stem in LORA_MANIFESTS:
        shared = {n for n in lora_modules(manifest(stem)["tensors"]) if sd1.resolve(n) is not None}
        assert shared
        shapes = {
            k: s
            for k, s in lora_shapes(stem).items()
            if k.rsplit(".", 2)[0] in shared or k.rsplit(".", 1)[0] in shared
        }
        det = detect(view(shapes, shrunk))
        assert det.arch == "sdxl", det
        other = sd1.detect(view(shapes, shrunk))
        assert other is not None
        assert other.matched < det.matched


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_diffusers_named_sdxl_lora_is_not_sd1(sdxl: SDXL, shrunk: bool) -> None:
    """kohya-diffusers SDXL names overlap SD1's kohya names (down_blocks_1/2, up_blocks_0/1 attentions)."""
    shapes = respell("lora-sdxl-kohya", sdxl, "kohya-diffusers")
    unet = {k: s for k, s in shapes.items() if "_transformer_blocks_0_" in k}
    det = detect(view(unet, shrunk))
    assert (det.arch, det.layout) == ("sdxl", "kohya-diffusers")


@pytest.mark.parametrize("shrunk", [False, True], ids=["real", "shrunk"])
def test_sd_files_are_never_sdxl(shrunk: bool) -> None:
    for stem in ("lora-sd1-kohya", "lora-sd1-conv-kohya", "lora-sd2-kohya"):
        assert detect(view(lora_shapes(stem), shrunk)).arch == "sd1"
    for stem in ("sd1-ldm", "sd2-ldm", "sd1-diffusers-unet", "sd2-diffusers-unet"):
        assert detect(view(inventory_shapes(stem), shrunk)).arch == "sd1"
        unet = inventory_shapes(stem, lambda k: not k.startswith(("first_stage_model.", "cond_stage_model.")))
        assert detect(view(unet, shrunk)).arch == "sd1"


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
    for stem in LORA_MANIFESTS:
        det = reg.detect(view(lora_shapes(stem), shrunk))
        assert (det.arch, det.variant) == ("sdxl", "base")
    for stem in INVENTORIES:
        det = reg.detect(view(inventory_shapes(stem), shrunk))
        assert (det.arch, det.variant) == ("sdxl", "base")
