"""The plugin manager: registration, duplicates, alias conflicts, hook validation, env switches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorasmith.archs.base import Alias, Architecture, Inventory, SimpleKeyView, Target, TensorSpec
from lorasmith.errors import DetectionError, PluginError, UnknownArchError
from lorasmith.hookspecs import hookimpl
from lorasmith.registry import DEFAULT_PLUGINS, Registry


def _inventory(family: str, keys: dict[str, tuple[int, ...]]) -> Inventory:
    return Inventory(
        id=f"{family}-test",
        family=family,
        variant="v",
        layout="test",
        canonical=True,
        components={"net": ""},
        optional=frozenset(),
        tensors={k: TensorSpec(s, "F16") for k, s in keys.items()},
    )


def make_family(arch_id: str, keys: dict[str, tuple[int, ...]]) -> type[Architecture]:
    inv = _inventory(arch_id, keys)

    class Fam(Architecture):
        id = arch_id
        name = f"Family {arch_id}"
        variants = ("v",)

        def inventories(self) -> tuple[Inventory, ...]:
            return (inv,)

        def _build_aliases(self, variant: str):  # type: ignore[no-untyped-def]
            for key in inv.tensors:
                path = key.removesuffix(".weight")
                yield Alias("lora_unet_" + path.replace(".", "_"), "kohya", Target(key), "net")

    Fam.__qualname__ = f"Fam_{arch_id}"
    return Fam


def plugin_of(*classes: type[Architecture]) -> object:
    @hookimpl
    def lorasmith_register_architectures() -> list[type[Architecture]]:
        return list(classes)

    return SimpleNamespace(lorasmith_register_architectures=lorasmith_register_architectures)


def test_builtins_register_through_the_hook() -> None:
    reg = Registry(autoload=False)
    assert set(reg.archs()) == {"sd1", "sdxl", "flux", "sd3", "zimage"}
    assert {p.name for p in reg.plugins()} >= set(DEFAULT_PLUGINS)
    for arch_id in reg.archs():
        assert reg.owner(arch_id).startswith("lorasmith.archs.")


def test_duplicate_family_ids_name_both_plugins() -> None:
    a = plugin_of(make_family("fam", {"a.weight": (4, 4)}))
    b = plugin_of(make_family("fam", {"b.weight": (4, 4)}))
    with pytest.raises(PluginError) as err:
        Registry(builtins=[], autoload=False, plugins=[("first", a), ("second", b)])
    assert "first" in err.value.message and "second" in err.value.message
    assert err.value.exit_code == 3


def test_unknown_hook_name_is_an_error() -> None:
    @hookimpl
    def lorasmith_register_architecture() -> list[type[Architecture]]:  # typo: missing "s"
        return []

    bad = SimpleNamespace(lorasmith_register_architecture=lorasmith_register_architecture)
    with pytest.raises(PluginError, match="unknown hook"):
        Registry(builtins=[], autoload=False, plugins=[("typo", bad)])


def test_alias_conflict_names_the_plugin() -> None:
    fam = make_family("fam", {"a.weight": (4, 4), "b.weight": (4, 4)})

    @hookimpl
    def lorasmith_extra_aliases(arch_id: str, variant: str) -> list[Alias]:
        return [Alias("lora_unet_a", "kohya", Target("b.weight"), "net")] if arch_id == "fam" else []

    extra = SimpleNamespace(lorasmith_extra_aliases=lorasmith_extra_aliases)
    reg = Registry(builtins=[], autoload=False, plugins=[("owner", plugin_of(fam)), ("intruder", extra)])
    with pytest.raises(PluginError) as err:
        reg.get("fam").alias_table()
    assert "intruder" in err.value.message


def test_extra_aliases_are_added() -> None:
    fam = make_family("fam", {"a.weight": (4, 4)})

    @hookimpl
    def lorasmith_extra_aliases(arch_id: str) -> list[Alias]:  # fewer arguments than the spec
        return [Alias("mytrainer.a", "kohya", Target("a.weight"), "net")] if arch_id == "fam" else []

    extra = SimpleNamespace(lorasmith_extra_aliases=lorasmith_extra_aliases)
    reg = Registry(builtins=[], autoload=False, plugins=[("owner", plugin_of(fam)), ("extra", extra)])
    assert reg.get("fam").resolve("mytrainer.a") == Alias("mytrainer.a", "kohya", Target("a.weight"), "net")


def test_block_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASMITH_BLOCK_PLUGINS", "lorasmith.archs.flux,zimage")
    reg = Registry(autoload=False)
    assert "flux" not in reg.archs() and "zimage" not in reg.archs()
    assert "sdxl" in reg.archs()


def test_unknown_arch_suggests_nearest() -> None:
    reg = Registry(autoload=False)
    with pytest.raises(UnknownArchError) as err:
        reg.get("fluxx")
    assert "flux" in (err.value.hint or "")


def test_ambiguous_detection_names_candidates() -> None:
    a = plugin_of(make_family("alpha", {"x.weight": (4, 4)}))
    b = plugin_of(make_family("beta", {"x.weight": (4, 4)}))
    reg = Registry(builtins=[], autoload=False, plugins=[("a", a), ("b", b)])
    view = SimpleKeyView.from_shapes({"x.weight": (4, 4)})
    with pytest.raises(DetectionError) as err:
        reg.detect(view)
    assert "alpha" in err.value.message and "beta" in err.value.message
    assert reg.detect(view, arch="beta").arch == "beta"


def test_nothing_matches() -> None:
    reg = Registry(
        builtins=[], autoload=False, plugins=[("a", plugin_of(make_family("alpha", {"x.weight": (4, 4)})))]
    )
    with pytest.raises(DetectionError, match="no known family"):
        reg.detect(SimpleKeyView.from_shapes({"zzz": (1,)}))
