"""``lorasmith plugins`` lists each family's separate parts (table and ``--json``), built-in and plugin."""

from __future__ import annotations

import importlib.util
import json
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from lorasmith import registry as registry_module
from lorasmith.archs.base import Architecture
from lorasmith.archs.parts import PartKind, PartSlot, diffusion_model_slot
from lorasmith.cli import app
from lorasmith.errors import PluginError
from lorasmith.hookspecs import hookimpl
from lorasmith.ops.plugins import FamilyRow, list_plugins
from lorasmith.registry import Registry
from lorasmith.testing import toy


def _families(reg: Registry) -> dict[str, FamilyRow]:
    return {f.id: f for f in list_plugins(reg).families}


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The process-wide registry with the built-in families and the toy family."""
    reg = Registry(autoload=False, plugins=[("toy", toy)])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_builtin_parts_are_listed_per_variant() -> None:
    fams = _families(Registry(autoload=False))
    sd1 = {p.name: p for p in fams["sd1"].parts}
    assert list(sd1) == ["transformer", "vae", "clip_l", "text_encoder"]
    assert sd1["transformer"].kind is None and sd1["transformer"].kind_name == "diffusion model"
    assert sd1["transformer"].variants == ["sd1", "sd2"] and sd1["vae"].variants == ["sd1", "sd2"]
    assert sd1["clip_l"].variants == ["sd1"]
    h = sd1["text_encoder"]
    assert (h.variants, h.kind, h.option, h.form, h.file_form) == (
        ["sd2"],
        "clip_h",
        "--text-encoder",
        "openclip",
        "hf",
    )
    assert (h.prefix, h.file) == ("cond_stage_model.model.", "clip_h.safetensors")

    flux = fams["flux"].parts
    assert [(p.name, p.kind, p.file) for p in flux] == [
        ("transformer", None, None),
        ("vae", "vae16", "ae.safetensors"),
        ("clip_l", "clip_l", "clip_l.safetensors"),
        ("t5xxl", "t5xxl", "t5xxl.safetensors"),
    ]
    assert all(p.variants == ["dev", "schnell"] and p.required for p in flux)
    assert flux[1].kind_name == "16-channel VAE" and flux[1].group == "vae"
    assert [p.required for p in fams["sd3"].parts] == [True, True, False, False, False]
    assert all(f.part_kinds == [] for f in fams.values())


def test_listing_matches_the_families_part_slots() -> None:
    reg = Registry(autoload=False)
    fams = _families(reg)
    for arch_id, arch in reg.archs().items():
        for variant in arch.variants:
            listed = [(p.name, p.prefix, p.kind) for p in fams[arch_id].parts if variant in p.variants]
            assert listed == [(s.name, s.prefix, s.kind) for s in arch.part_slots(variant)]


def test_toy_plugin_parts_and_kind(toy_registry: Registry) -> None:
    fams = _families(toy_registry)
    assert fams["toy"].plugin == "toy"
    assert fams["toy"].part_kinds == ["toy_te"]
    te = fams["toy"].parts[1]
    assert (te.name, te.kind, te.kind_name, te.file) == (
        "text_encoder",
        "toy_te",
        "toy text encoder",
        "toy_te.safetensors",
    )
    assert te.variants == ["small", "large"]


def test_cli_table_and_json(toy_registry: Registry) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    fams = {f["id"]: f for f in json.loads(result.stdout)["families"]}
    assert [p["name"] for p in fams["toy"]["parts"]] == ["transformer", "text_encoder"]
    assert fams["toy"]["parts"][1]["option"] == "--text-encoder"
    assert fams["zimage"]["parts"][2]["kind"] == "qwen3_4b"

    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "parts" in result.stdout
    assert "toy_te.safetensors" in result.stdout
    assert "kind declared by the family" in result.stdout
    assert "variant sd2; openclip form in the single file" in result.stdout


class NoParts(toy.ToyArch):
    """A family without separate parts."""

    id: ClassVar[str] = "noparts"
    part_kinds: ClassVar[tuple[PartKind, ...]] = ()
    component_parts: ClassVar[tuple[PartSlot, ...]] = ()


class UnknownKind(toy.ToyArch):
    """A slot of a kind nobody declares."""

    id: ClassVar[str] = "badkind"
    part_kinds: ClassVar[tuple[PartKind, ...]] = ()
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(toy.UNET_PREFIX),
        PartSlot("text_encoder", "nobody_te", toy.TE_PREFIX),
    )


class RaisingSlots(toy.ToyArch):
    """A family whose ``part_slots`` has a bug."""

    id: ClassVar[str] = "raising"

    def part_slots(self, variant: str | None = None) -> tuple[PartSlot, ...]:
        raise RuntimeError("boom")


def _plugin(cls: type[Architecture]) -> object:
    class Plugin:
        @hookimpl
        def lorasmith_register_architectures(self) -> list[type[Architecture]]:
            return [cls]

    return Plugin()


def test_a_family_without_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(autoload=False, plugins=[("noparts_plugin", _plugin(NoParts))])
    assert _families(reg)["noparts"].parts == []
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "families without separate parts: noparts" in result.stdout


@pytest.mark.parametrize(
    ("cls", "words"), [(UnknownKind, "unknown kind 'nobody_te'"), (RaisingSlots, "RuntimeError: boom")]
)
def test_broken_part_declarations_name_the_plugin(
    monkeypatch: pytest.MonkeyPatch, cls: type[Architecture], words: str
) -> None:
    reg = Registry(autoload=False, plugins=[("brokenparts", _plugin(cls))])
    with pytest.raises(PluginError) as err:
        list_plugins(reg)
    assert "plugin 'brokenparts'" in err.value.message and words in err.value.message
    assert err.value.hint is not None and "LORASMITH_BLOCK_PLUGINS=brokenparts" in err.value.hint

    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 3
    assert "Traceback" not in result.output


@pytest.mark.skipif(
    importlib.util.find_spec("lorasmith_qwenimage") is None, reason="example plugin not installed"
)
def test_example_plugin_is_listed_with_its_transformer_part() -> None:
    reg = Registry(autoload=True)
    fams = _families(reg)
    assert fams["qwenimage"].plugin == "qwenimage"
    assert [p.name for p in fams["qwenimage"].parts] == ["transformer"]
