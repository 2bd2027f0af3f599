"""The Qwen-Image family passes lorasmith's conformance suite, detection holds against the built-ins, and
the SDXL extra aliases land where the built-in SDXL names do."""

from __future__ import annotations

import pytest
from lorasmith.archs.base import SimpleKeyView
from lorasmith.errors import DetectionError
from lorasmith.registry import Registry
from lorasmith.testing import ArchitectureConformance, checkpoint_view, lora_view, shrink_shape

from lorasmith_qwenimage import (
    QwenImage,
    lorasmith_extra_aliases,
    lorasmith_register_architectures,
    sdxl_processor_aliases,
)


def _registry() -> Registry:
    # the built-ins plus this plugin through its real entry point
    return Registry()


class TestQwenImageConformance(ArchitectureConformance):
    """Every check of the suite, detection going through a registry with all built-in families."""

    arch_cls = QwenImage

    def make_registry(self) -> Registry:
        return _registry()


def test_entry_point_loads_the_family() -> None:
    assert lorasmith_register_architectures() == [QwenImage]
    reg = _registry()
    assert reg.owner("qwenimage") == "qwenimage"
    info = next(p for p in reg.plugins() if p.name == "qwenimage")
    assert info.version == "0.1.0"
    assert info.families == ("qwenimage",)


def test_data_file_is_what_the_script_writes() -> None:
    import gzip
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("build_inventory", root / "scripts" / "build_inventory.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    packaged = json.loads(gzip.decompress((script.OUT / "qwen-image.json.gz").read_bytes()))
    assert packaged == json.loads(json.dumps(script.inventory())), "run scripts/build_inventory.py"


def test_inventory_matches_the_config() -> None:
    canon = QwenImage().modules()
    assert canon["transformer_blocks.59.img_mod.1.weight"].shape == (18432, 3072)
    assert canon["transformer_blocks.0.attn.to_q.weight"].shape == (3072, 3072)
    assert canon["transformer_blocks.0.img_mlp.net.0.proj.weight"].shape == (12288, 3072)
    assert canon["txt_in.weight"].shape == (3072, 3584)
    assert canon["proj_out.weight"].shape == (64, 3072)
    assert "transformer_blocks.60.attn.to_q.weight" not in canon
    assert {s.dtype for s in canon.values()} == {"BF16"}


@pytest.mark.parametrize(
    ("name", "spelling"),
    [
        ("transformer.transformer_blocks.3.attn.add_k_proj", "peft"),
        ("diffusion_model.transformer_blocks.3.attn.add_k_proj", "aitk"),
        ("lora_unet_transformer_blocks_3_attn_add_k_proj", "musubi"),
        ("lycoris_transformer_blocks_3_attn_add_k_proj", "lycoris"),
    ],
)
def test_spellings_resolve_to_one_weight(name: str, spelling: str) -> None:
    alias = QwenImage().resolve(name)
    assert alias is not None and alias.spelling == spelling
    assert QwenImage().base_weight(name) == alias.target
    assert alias.target.key == "transformer_blocks.3.attn.add_k_proj.weight"


def test_blocks() -> None:
    arch = QwenImage()
    assert arch.block_of("transformer_blocks.12.txt_mlp.net.2.weight") == "B12"
    assert arch.block_of("model.diffusion_model.img_in.weight") == "IN"
    assert arch.block_of("norm_out.linear.weight") == "OUT"
    assert len(arch.block_notations()["qwen-image-62"]) == 62


def test_prefixed_checkpoint_is_detected() -> None:
    inv = QwenImage().canonical_inventory()
    shapes = {"model.diffusion_model." + k: shrink_shape(s.shape) for k, s in inv.tensors.items()}
    det = _registry().detect(SimpleKeyView.from_shapes(shapes))
    assert (det.arch, det.kind) == ("qwenimage", "checkpoint")


def test_attention_only_lora_beyond_flux_depth_is_qwen() -> None:
    arch = QwenImage()
    names = [a.name for a in arch.aliases(spelling="peft") if ".attn." in a.name]
    det = _registry().detect(lora_view(arch, "qwen-image", "peft", modules=names))
    assert det.arch == "qwenimage"


def test_flux_and_sd3_files_stay_theirs() -> None:
    reg = _registry()
    for arch_id in ("flux", "sd3"):
        arch = reg.get(arch_id)
        for inv in arch.inventories():
            assert reg.detect(checkpoint_view(inv)).arch == arch_id
        for spelling in arch.spellings:
            view = lora_view(arch, arch.default_variant, spelling)
            assert reg.detect(view).arch == arch_id, spelling


def test_misfitting_shapes_do_not_count() -> None:
    # Qwen-Image names with mlp widths that are not 4x the hidden size are not Qwen-Image's
    arch = QwenImage()
    shapes = {k: list(shrink_shape(s.shape)) for k, s in arch.modules().items()}
    for key in list(shapes):
        if "_mlp.net.0.proj.weight" in key:
            shapes[key] = [shapes[key][0] + 64, shapes[key][1]]
    det = arch.detect(SimpleKeyView.from_shapes(shapes))
    assert det is not None
    assert det.matched == det.total - 2 * 60
    assert "do not fit" in det.reason


def test_unknown_file_is_not_claimed() -> None:
    with pytest.raises(DetectionError):
        _registry().detect(SimpleKeyView.from_shapes({"foo.weight": [4, 4]}))


# ---------------------------------------------------------------------------------- the second hook
def test_extra_aliases_only_for_sdxl() -> None:
    assert lorasmith_extra_aliases("flux", "dev") is None
    assert len(lorasmith_extra_aliases("sdxl", "base") or []) == len(list(sdxl_processor_aliases()))


def test_sdxl_processor_names_match_builtin_targets() -> None:
    sdxl = _registry().get("sdxl")
    for alias in sdxl_processor_aliases():
        peft = alias.name.replace(".processor.", ".").replace(".to_out", ".to_out.0")
        builtin = sdxl.resolve(peft)
        assert builtin is not None, peft
        assert builtin.target == alias.target
        assert sdxl.resolve(alias.name) == alias


def test_sdxl_processor_lora_is_detected_as_sdxl() -> None:
    names = [a.name for a in sdxl_processor_aliases()]
    sdxl = _registry().get("sdxl")
    tensors: dict[str, list[int]] = {}
    for alias in sdxl_processor_aliases():
        out, inp = sdxl.modules()[alias.target.key].shape[:2]
        tensors[alias.name + "_lora.down.weight"] = [4, inp // 64 if inp % 64 == 0 else inp]
        tensors[alias.name + "_lora.up.weight"] = [out // 64, 4]
    det = _registry().detect(SimpleKeyView.from_shapes(tensors))
    assert (det.arch, det.kind) == ("sdxl", "lora")
    assert det.matched == det.total == len(names)
