"""The conformance suite: the toy family and an inline family pass it; broken families are reported."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import pytest

from lorasmith.archs.base import (
    Alias,
    Architecture,
    Detection,
    Inventory,
    KeyView,
    Kind,
    SimpleKeyView,
    Target,
    TensorSpec,
)
from lorasmith.hookspecs import hookimpl
from lorasmith.registry import Registry
from lorasmith.testing import (
    CHECKS,
    ArchitectureConformance,
    ToyArch,
    check_aliases,
    check_architecture,
    check_blocks,
    check_checkpoint_detection,
    check_describe,
    check_identity,
    check_inventories,
    check_lora_detection,
    checkpoint_view,
    conformance_report,
    lora_view,
)
from lorasmith.testing import toy as toy_module
from lorasmith.testing.toy import UNET_PREFIX


def _registry(*classes: type[Architecture]) -> Registry:
    class Plugin:
        @hookimpl
        def lorasmith_register_architectures(self) -> list[type[Architecture]]:
            return list(classes)

    return Registry(builtins=(), autoload=False, plugins=[("test-families", Plugin())])


# ------------------------------------------------------------------------------------------ passing
class TestToyConformance(ArchitectureConformance):
    """How a plugin author runs the suite: set arch_cls (and optionally a registry)."""

    arch_cls = ToyArch

    def make_registry(self) -> Registry:
        return Registry(builtins=(), autoload=False, plugins=[("toy", toy_module)])


class Mini(Architecture):
    """The smallest family that passes: inventories and aliases declared inline."""

    id = "mini"
    name = "Mini"
    variants = ("one",)
    spellings = ("kohya",)

    @cached_property
    def _inv(self) -> tuple[Inventory, ...]:
        tensors = {
            "mini.attn.weight": TensorSpec((256, 128), "F16"),
            "mini.attn.bias": TensorSpec((256,), "F16"),
            "mini.ff.weight": TensorSpec((128, 256), "F16"),
        }
        return (Inventory("mini-one", "mini", "one", "plain", True, {"main": "mini."}, frozenset(), tensors),)

    def inventories(self) -> tuple[Inventory, ...]:
        return self._inv

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        for path in ("attn", "ff"):
            yield Alias(f"lora_mini_{path}", "kohya", Target(f"mini.{path}.weight"), "main")


class TestMiniConformance(ArchitectureConformance):
    arch_cls = Mini


def test_toy_passes_with_and_without_registry() -> None:
    assert check_architecture(ToyArch()) == []
    report = conformance_report(ToyArch(), registry=_registry(ToyArch, Mini))
    assert report.ok
    assert report.failures == ()


def test_toy_notes_indistinguishable_variants() -> None:
    report = conformance_report(ToyArch(), checks=["lora-detection"])
    # the text encoder is the same in both variants: a te-only LoRA of "large" reads as "small"
    assert any("large/kohya" in n and "te only" in n for n in report.notes)


def test_check_functions_and_unknown_check() -> None:
    arch = ToyArch()
    for fn in (check_identity, check_inventories, check_aliases, check_blocks, check_describe):
        assert fn(arch) == []
    assert check_checkpoint_detection(arch) == []
    assert check_lora_detection(arch) == []
    with pytest.raises(ValueError, match="unknown checks"):
        conformance_report(arch, checks=["nope"])
    assert next(iter(CHECKS)) == "identity"


def test_base_class_without_arch_cls_says_so() -> None:
    class TestNothing(ArchitectureConformance):
        pass

    with pytest.raises(TypeError, match="arch_cls"):
        TestNothing().test_identity()


def test_views_match_fixture_shapes() -> None:
    arch = ToyArch()
    view = checkpoint_view(arch.canonical_inventory(), components=["unet"], key_prefix_strip=UNET_PREFIX)
    assert view.tensors["blocks.0.attn.qkv.weight"].shape == (12, 4)
    assert not any(k.startswith("text_encoder.") for k in view.tensors)
    lv = lora_view(arch, spelling="peft", rank=2)
    assert lv.tensors["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"].shape == (4, 2)
    assert not any(k.endswith(".alpha") for k in lv.tensors)
    assert lora_view(arch).tensors["lora_unet_blocks_0_conv.lora_up.weight"].shape == (2, 4, 1, 1)


# ------------------------------------------------------------------------------------------- broken
class UnknownSpelling(ToyArch):
    spellings = ("kohya", "peft", "nope")


class BadId(ToyArch):
    id = "Toy Family"


class MissingTarget(ToyArch):
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        yield Alias("lora_unet_ghost", "kohya", Target(UNET_PREFIX + "ghost.weight"), "unet")


class WrongVariantTarget(ToyArch):
    """A small-variant alias onto a key only the large inventory has."""

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        if variant == "small":
            yield Alias(
                "lora_unet_blocks_2_conv", "kohya", Target(UNET_PREFIX + "blocks.2.conv.weight"), "unet"
            )


class ExternalEncoder(ToyArch):
    """Aliases onto a text encoder that no inventory of the family ships: noted, not failed."""

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        yield Alias("lora_te9_layer_0", "kohya", Target("t5.layers.0.weight"), "te9")


def test_aliases_onto_an_unshipped_component_are_noted() -> None:
    report = conformance_report(ExternalEncoder(), checks=["aliases", "lora-detection"])
    assert report.ok, report.failures
    assert any("1 te9 aliases not checked" in n for n in report.notes)


class SliceOutside(ToyArch):
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        qkv = UNET_PREFIX + "blocks.0.attn.qkv.weight"
        yield Alias("transformer.transformer_blocks.0.attn.to_w", "peft", Target(qkv, (0, 640, 256)), "unet")


class SliceOverlap(ToyArch):
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        qkv = UNET_PREFIX + "blocks.0.attn.qkv.weight"
        yield Alias("transformer.transformer_blocks.0.attn.to_qk", "peft", Target(qkv, (0, 128, 256)), "unet")


class TwoNamesOneTarget(ToyArch):
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        yield Alias("lora_unet_conv_in_again", "kohya", Target(UNET_PREFIX + "conv_in.weight"), "unet")


class Conflict(ToyArch):
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield from super()._build_aliases(variant)
        yield Alias("lora_unet_conv_in", "kohya", Target(UNET_PREFIX + "out.weight"), "unet")


class UnusedSpelling(ToyArch):
    spellings = ("kohya", "peft", "musubi")


class BadBlocks(ToyArch):
    def block_of(self, key: str) -> str | None:
        return "ZZ" if key.endswith("conv_in.weight") else super().block_of(key)


class BlindDetection(ToyArch):
    def detect(self, view: KeyView) -> Detection | None:
        return None


class StuckVariant(ToyArch):
    def _refine_variant(self, view: KeyView, variant: str, kind: Kind) -> str | None:
        return "small"


class LoraAsCheckpoint(ToyArch):
    def detect_lora(self, view: KeyView) -> Detection | None:
        det = super().detect_lora(view)
        if det is None:
            return None
        return Detection(self.id, det.score, "checkpoint", det.variant, "canon", det.components, det.reason)


class NotJson(ToyArch):
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "oops": {1, 2}}


class NoCanonical(ToyArch):
    def inventories(self) -> tuple[Inventory, ...]:
        return tuple(i for i in super().inventories() if i.variant != "large")


class ForeignInventory(ToyArch):
    def inventories(self) -> tuple[Inventory, ...]:
        first, *rest = super().inventories()
        bad = Inventory(
            "other",
            "otherfamily",
            "small",
            "x",
            False,
            {},
            frozenset({"missing"}),
            {"a": TensorSpec((2,), "Q9")},
        )
        return (first, *rest, bad)


class ExplodingInventories(ToyArch):
    def inventories(self) -> tuple[Inventory, ...]:
        raise RuntimeError("data file missing")


class UnknownLabels(ToyArch):
    def block_notations(self) -> Mapping[str, Sequence[str]]:
        return {"empty": [], "dup": ["A", "A"]}


BROKEN: list[tuple[type[ToyArch], str, str]] = [
    (UnknownSpelling, "identity", "spelling 'nope' is not in"),
    (BadId, "identity", "lowercase id"),
    (MissingTarget, "aliases", "'lora_unet_ghost' targets 'model.diffusion_model.ghost.weight', which the"),
    (WrongVariantTarget, "aliases", "small: alias 'lora_unet_blocks_2_conv' targets"),
    (SliceOutside, "aliases", "is outside"),
    (SliceOverlap, "aliases", "overlap"),
    (TwoNamesOneTarget, "aliases", "two kohya names for one target"),
    (Conflict, "aliases", "alias conflict"),
    (UnusedSpelling, "aliases", "spelling 'musubi' is listed but no variant has an alias"),
    (BadBlocks, "blocks", "= 'ZZ', a label of no notation"),
    (UnknownLabels, "blocks", "notation 'empty' is empty"),
    (BlindDetection, "checkpoint-detection", "toy-small-canon (shrunk /64): not detected"),
    (BlindDetection, "lora-detection", "not detected"),
    (StuckVariant, "checkpoint-detection", "variant 'small', expected 'large'"),
    (StuckVariant, "lora-detection", "variant 'small', expected 'large'"),
    (LoraAsCheckpoint, "lora-detection", "kind 'checkpoint', expected 'lora'"),
    (NotJson, "describe", "not JSON-serialisable"),
    (NoCanonical, "inventories", "variant 'large' has no canonical inventory"),
    (ForeignInventory, "inventories", "belongs to family 'otherfamily'"),
    (ForeignInventory, "inventories", "unknown dtypes Q9"),
    (ForeignInventory, "inventories", "optional keys it does not have"),
    (ExplodingInventories, "inventories", "the check raised RuntimeError: data file missing"),
]


@pytest.mark.parametrize(("cls", "check", "needle"), BROKEN, ids=[f"{c.__name__}-{k}" for c, k, _ in BROKEN])
def test_broken_families_are_reported(cls: type[ToyArch], check: str, needle: str) -> None:
    failures = check_architecture(cls())
    mine = [f for f in failures if f.startswith(f"[{check}] ")]
    assert any(needle in f for f in mine), "\n".join(failures) or "no failure"


def test_the_pytest_helper_fails_a_broken_family() -> None:
    class TestBroken(ArchitectureConformance):
        arch_cls = SliceOutside

    with pytest.raises(AssertionError, match="is outside"):
        TestBroken().test_aliases()
    TestBroken().test_identity()  # the other checks still pass


def test_registry_ambiguity_is_reported() -> None:
    class Clone(ToyArch):
        id = "toyclone"

    failures = check_architecture(ToyArch(), registry=_registry(ToyArch, Clone))
    assert any("ambiguous family" in f and "toyclone" in f for f in failures)


def test_registry_picking_another_family_is_reported() -> None:
    class Greedy(ToyArch):
        id = "greedy"

        def detect(self, view: KeyView) -> Detection | None:
            return Detection(self.id, 1.0, "checkpoint", None, None, (), "claims everything", 10**6, 10**6)

    report = conformance_report(
        ToyArch(), registry=_registry(ToyArch, Greedy), checks=["checkpoint-detection"]
    )
    assert any("the registry detects 'greedy'" in f for f in report.failures)


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """A plugin module registering Mini (the registry accepts a module as plugin)."""
    return [Mini]


def test_registry_with_a_plugin_module() -> None:
    import sys

    registry = Registry(builtins=(), autoload=False, plugins=[("mini", sys.modules[__name__])])
    assert check_architecture(registry.get("mini"), registry=registry) == []
    view = SimpleKeyView.from_shapes({"lora_mini_attn.lora_down.weight": (4, 2)})
    assert registry.detect(view).arch == "mini"
