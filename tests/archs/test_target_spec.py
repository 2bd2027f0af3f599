"""``Architecture.target_spec``: the one lookup of the real shape of the weight a LoRA target names.

The variant's canonical inventory first, then the family's other inventories, then its parts; DiT families
also search their text-encoder tables. The commands' lookups (LoRA merging, baking into part files) and
the testing views go through it.
"""

from __future__ import annotations

import pytest

from lorasmith.archs.base import TensorSpec
from lorasmith.ops._components_bake import _real_rows
from lorasmith.ops._merge_ckpt import fit_slice
from lorasmith.ops.loralib import _real_full_rows
from lorasmith.registry import DEFAULT_PLUGINS, Registry
from lorasmith.testing import DEFAULT_FACTOR, checkpoint_view, shrink_target, target_spec
from lorasmith.testing.toy import ToyArch


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry(builtins=DEFAULT_PLUGINS, autoload=False)


CLIP_L_Q = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
T5_Q = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"


def test_canonical_inventory_first(reg: Registry) -> None:
    sdxl = reg.get("sdxl")
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert sdxl.target_spec(key) == TensorSpec((3 * 1280, 1280), "F16")
    sd1 = reg.get("sd1")
    # the variant's own file first: SD2's attn2.to_k reads 1024-wide text states, SD1's 768
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd1.target_spec(key, "sd1").shape == (320, 768)
    assert sd1.target_spec(key, "sd2").shape == (320, 1024)


def test_other_inventories_then_none(reg: Registry) -> None:
    sd3 = reg.get("sd3")
    # SD3.5 Large's file has no text encoders; SD3 Medium's does
    assert CLIP_L_Q not in sd3.canonical_inventory("sd3.5-large").tensors
    assert sd3.target_spec(CLIP_L_Q, "sd3.5-large") == TensorSpec((768, 768), "F16")
    assert sd3.target_spec("no.such.weight", "sd3.5-large") is None


def test_a_dit_text_encoder_key_resolves(reg: Registry) -> None:
    flux = reg.get("flux")
    assert all(CLIP_L_Q not in inv.tensors for inv in flux.inventories())
    assert flux.target_spec(CLIP_L_Q, "dev") == TensorSpec((768, 768), "F16")
    spec = flux.target_spec(T5_Q, "schnell")
    assert spec is not None and spec.shape == (4096, 4096)
    # every text-encoder alias of every spelling resolves
    for variant in flux.variants:
        for alias in flux.aliases(variant):
            assert flux.target_spec(alias.target.key, variant) is not None, alias.name


def test_a_key_below_a_part_slot_resolves(reg: Registry) -> None:
    zimage = reg.get("zimage")
    key = "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight"
    assert all(key not in inv.tensors for inv in zimage.inventories())
    assert zimage.target_spec(key) == TensorSpec((4096, 2560), "BF16")
    # outside the slot's prefix, or a name the part kind does not have: unknown
    assert zimage.target_spec("text_encoders.qwen3_4b.transformer.model.layers.99.nothing.weight") is None
    assert zimage.target_spec("text_encoders.qwen3_4b.logit_scale") is None


def test_the_toy_family_uses_the_base_behaviour() -> None:
    toy = ToyArch()
    key = next(iter(toy.canonical_inventory().tensors))
    assert toy.target_spec(key) == toy.canonical_inventory().tensors[key]
    assert toy.target_spec("missing") is None


@pytest.mark.parametrize(("arch_id", "variant"), [("flux", "dev"), ("sd3", "sd3-medium"), ("zimage", None)])
def test_a_shrunk_checkpoints_fused_slice_maps_to_the_right_rows(
    reg: Registry, arch_id: str, variant: str | None
) -> None:
    arch = reg.get(arch_id)
    view = checkpoint_view(arch.canonical_inventory(variant))
    sliced = [a for a in arch.aliases(variant) if a.target.slice is not None]
    assert sliced
    for alias in sliced:
        sl = alias.target.slice
        assert sl is not None
        real = _real_rows(arch, variant, alias.target.key, sl[0])
        spec = arch.target_spec(alias.target.key, variant)
        assert spec is not None and real == spec.shape[sl[0]]
        shrunk_rows = view.tensors[alias.target.key].shape[sl[0]]
        expected = shrink_target(alias.target, spec.shape, DEFAULT_FACTOR).slice
        assert fit_slice(sl, real, shrunk_rows, alias.name) == expected, alias.name


def test_the_commands_lookups_agree(reg: Registry) -> None:
    flux = reg.get("flux")
    # merging/re-spelling a FLUX.1 LoRA needs the rows of its text-encoder targets too
    assert _real_full_rows(flux, "dev", CLIP_L_Q) == 768
    assert _real_rows(flux, "dev", T5_Q, 1) == 4096
    assert _real_full_rows(flux, "dev", "no.such.weight") is None
    for alias in flux.aliases("dev", "peft")[:50]:
        assert target_spec(flux, "dev", alias.target) == flux.target_spec(alias.target.key, "dev")
