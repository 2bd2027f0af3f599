"""Each built-in family declares its own part table, the way a plugin family does."""

from __future__ import annotations

import pytest

from lorasmith.archs.base import Architecture
from lorasmith.archs.flux import Flux
from lorasmith.archs.parts import PART_KINDS, part_catalog
from lorasmith.archs.sd1 import SD1
from lorasmith.archs.sd3 import SD3
from lorasmith.archs.sdxl import SDXL
from lorasmith.archs.zimage import ZImage

BUILTINS: tuple[type[Architecture], ...] = (SD1, SDXL, Flux, SD3, ZImage)

#: (family, variant) -> (slot name, kind, single-file prefix, split file name) of every slot
EXPECTED = {
    ("sd1", "sd1"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae4", "first_stage_model.", "vae.safetensors"),
        ("clip_l", "clip_l", "cond_stage_model.transformer.", "clip_l.safetensors"),
    ],
    ("sd1", "sd2"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae4", "first_stage_model.", "vae.safetensors"),
        ("text_encoder", "clip_h", "cond_stage_model.model.", "clip_h.safetensors"),
    ],
    ("sdxl", "base"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae4", "first_stage_model.", "vae.safetensors"),
        ("clip_l", "clip_l", "conditioner.embedders.0.transformer.", "clip_l.safetensors"),
        ("clip_g", "clip_g", "conditioner.embedders.1.model.", "clip_g.safetensors"),
    ],
    ("flux", "dev"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae16", "vae.", "ae.safetensors"),
        ("clip_l", "clip_l", "text_encoders.clip_l.transformer.", "clip_l.safetensors"),
        ("t5xxl", "t5xxl", "text_encoders.t5xxl.transformer.", "t5xxl.safetensors"),
    ],
    ("sd3", "sd3-medium"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae16", "first_stage_model.", "vae.safetensors"),
        ("clip_l", "clip_l", "text_encoders.clip_l.transformer.", "clip_l.safetensors"),
        ("clip_g", "clip_g", "text_encoders.clip_g.transformer.", "clip_g.safetensors"),
        ("t5xxl", "t5xxl", "text_encoders.t5xxl.transformer.", "t5xxl.safetensors"),
    ],
    ("zimage", "z-image"): [
        ("transformer", None, "model.diffusion_model.", None),
        ("vae", "vae16", "vae.", "ae.safetensors"),
        ("text_encoder", "qwen3_4b", "text_encoders.qwen3_4b.transformer.", "qwen_3_4b.safetensors"),
    ],
}


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda c: c.id)
def test_every_builtin_declares_component_parts_on_its_class(cls: type[Architecture]) -> None:
    # declared on the family's own class, not inherited from the base or found by id elsewhere
    assert "component_parts" in vars(cls)
    assert cls.component_parts
    assert cls.component_parts[0].name == "transformer"
    assert cls.component_parts == cls().part_slots(cls.variants[0])


@pytest.mark.parametrize(("family", "variant"), sorted(EXPECTED))
def test_builtin_tables(family: str, variant: str) -> None:
    cls = next(c for c in BUILTINS if c.id == family)
    slots = cls().part_slots(variant)
    assert [(s.name, s.kind, s.prefix, s.filename) for s in slots] == EXPECTED[(family, variant)]


def test_every_variant_of_a_family_but_sd2_shares_the_table() -> None:
    for cls in BUILTINS:
        arch = cls()
        for variant in (None, *cls.variants):
            want = "sd2" if variant == "sd2" else cls.variants[0]
            assert arch.part_slots(variant) == arch.part_slots(want)


def test_slot_details_that_are_not_in_the_table() -> None:
    sd2 = {s.name: s for s in SD1().part_slots("sd2")}
    assert sd2["text_encoder"].form == "openclip"
    sdxl = {s.name: s for s in SDXL().part_slots()}
    assert (sdxl["clip_g"].form, sdxl["clip_l"].form) == ("openclip", None)
    assert all(not s.required for s in SD3().part_slots()[2:])
    assert all(s.required for c in (SD1, SDXL, Flux, ZImage) for s in c().part_slots())
    zimage = {s.name: s for s in ZImage().part_slots()}
    assert zimage["text_encoder"].outer == "text_encoders.qwen3_4b."
    flux = {s.name: s for s in Flux().part_slots()}
    assert flux["clip_l"].outer == "text_encoders.clip_l."
    assert {s.group for s in flux.values()} == {"unet", "vae", "te"}


def test_a_family_that_declares_nothing_has_no_parts() -> None:
    from lorasmith.testing import ToyArch

    class Bare(ToyArch):
        id = "sdxl-lookalike"
        component_parts = ()

    assert Bare().part_slots(None) == ()


def test_builtin_kinds_are_used_by_the_families_that_declare_slots_of_them() -> None:
    cat = part_catalog(c() for c in BUILTINS)
    assert set(cat.kinds) == set(PART_KINDS)
    assert cat.users == {
        "vae4": ("sd1", "sdxl"),
        "clip_l": ("sd1", "sdxl", "flux", "sd3"),
        "clip_h": ("sd1",),
        "clip_g": ("sdxl", "sd3"),
        "vae16": ("flux", "sd3", "zimage"),
        "t5xxl": ("flux", "sd3"),
        "qwen3_4b": ("zimage",),
    }
