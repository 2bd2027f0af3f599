"""Detection builds only what it needs, and gives the same answers as scoring every family.

The registry skips a family whose name bound (``lora_prefixes``/``key_prefixes``, no table built) shows it
cannot match a file or cannot reach the best score; ``detect_part`` skips part kinds by their ``heads``.
Laziness is pinned through what was built (``built_alias_tables``, ``loaded_inventories``), never timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasmith.archs._unet import fit_shapes
from lorasmith.archs.base import (
    Alias,
    NameBound,
    SimpleKeyView,
    Target,
    TensorSpec,
    lora_modules,
    name_prefixes,
    split_lora_key,
)
from lorasmith.archs.parts import PART_KINDS, PartCatalog, PartKind, detect_part
from lorasmith.errors import DetectionError, PluginError
from lorasmith.registry import DEFAULT_PLUGINS, TIE_MARGIN, Registry
from lorasmith.testing import checkpoint_view, lora_view
from lorasmith.testing.toy import ToyArch

DITS = ("flux", "sd3", "zimage")


def _fresh() -> Registry:
    return Registry(builtins=DEFAULT_PLUGINS, autoload=False)


def _expected(reg: Registry, view: SimpleKeyView) -> str:
    """What detect() must say, from scoring every family: an arch id, or "error"."""
    found = reg.detect_all(view)
    if not found:
        return "error"
    best = found[0]
    ties = [d for d in found[1:] if abs(d.score - best.score) <= TIE_MARGIN and d.matched == best.matched]
    return "error" if ties else f"{best.arch}/{best.variant}/{best.kind}/{best.layout}/{best.matched}"


def _actual(reg: Registry, view: SimpleKeyView) -> str:
    try:
        d = reg.detect(view)
    except DetectionError:
        return "error"
    return f"{d.arch}/{d.variant}/{d.kind}/{d.layout}/{d.matched}"


# ------------------------------------------------------------------------------------------- laziness
def test_an_sdxl_lora_builds_no_other_family_tables() -> None:
    reg = _fresh()
    sdxl = reg.get("sdxl")
    view = lora_view(sdxl, "base", "kohya")  # UNet and both text encoders: te1 names are FLUX's/SD3's too
    det = reg.detect(view)
    assert (det.arch, det.layout) == ("sdxl", "kohya")
    assert sdxl.built_alias_tables() == ("base",)
    for other in ("sd1", *DITS):
        assert reg.get(other).built_alias_tables() == (), other


def test_a_flux_lora_builds_only_flux_tables() -> None:
    reg = _fresh()
    flux = reg.get("flux")
    det = reg.detect(lora_view(flux, "dev", "kohya"))
    assert det.arch == "flux"
    assert set(flux.built_alias_tables()) == {"dev", "schnell"}
    for other in ("sd1", "sdxl", "sd3", "zimage"):
        assert reg.get(other).built_alias_tables() == (), other


def test_a_fresh_process_loads_only_the_inventories_it_needs() -> None:
    code = """
import json
from lorasmith.archs.base import loaded_inventories
from lorasmith.registry import get_registry
from lorasmith.testing import checkpoint_view
reg = get_registry()
view = checkpoint_view(reg.get("sdxl").canonical_inventory())
before = set(loaded_inventories())
det = reg.detect(view)
print(json.dumps({"arch": det.arch, "loaded": sorted(s for _p, s in set(loaded_inventories()) - before)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["arch"] == "sdxl"
    assert not [s for s in result["loaded"] if s.startswith(("flux", "sd3", "z-image", "qwen"))], result


def test_detect_part_skips_kinds_by_their_heads() -> None:
    def boom() -> Mapping[str, TensorSpec]:
        raise AssertionError("the kind's tables were built")

    kinds = dict(PART_KINDS)
    kinds["probe"] = PartKind("probe", "probe encoder", boom, heads=("probe.",))
    catalog = PartCatalog(kinds, {})
    view = SimpleKeyView.from_shapes({"encoder.down.0.weight": [4, 4], "decoder.up.0.weight": [4, 4]})
    assert detect_part(view, catalog) is None or detect_part(view, catalog).kind != "probe"
    hit = SimpleKeyView.from_shapes({"probe.a": [4, 4]})
    with pytest.raises(AssertionError, match="tables were built"):
        detect_part(hit, catalog)


# ---------------------------------------------------------------------------------------- same answers
def _views(reg: Registry) -> list[tuple[str, SimpleKeyView]]:
    out: list[tuple[str, SimpleKeyView]] = []
    for arch_id, arch in reg.archs().items():
        for inv in arch.inventories():
            out.append((f"{arch_id} checkpoint {inv.id}", checkpoint_view(inv)))
        for variant in arch.variants:
            out.append((f"{arch_id} lora {variant}", lora_view(arch, variant)))
    sdxl, flux = reg.get("sdxl"), reg.get("flux")
    te1 = [a.name for a in sdxl.aliases("base", "kohya") if a.component == "te1"]
    out.append(("clip-l only (shared by sdxl, flux, sd3)", lora_view(sdxl, "base", "kohya", modules=te1)))
    unet = [a.name for a in sdxl.aliases("base", "kohya") if a.component == "unet"][:40]
    half = lora_view(sdxl, "base", "kohya", modules=unet + te1)
    out.append(("sdxl unet + clip-l", half))
    mixed = dict(checkpoint_view(flux.canonical_inventory()).tensors)
    mixed.update(lora_view(sdxl, "base", "kohya", modules=unet).tensors)
    out.append(("flux checkpoint with sdxl lora keys", SimpleKeyView(mixed)))
    out.append(("nothing known", SimpleKeyView.from_shapes({"foo.weight": [4, 4]})))
    return out


def test_bounded_detection_agrees_with_scoring_every_family() -> None:
    reg = _fresh()
    for what, view in _views(reg):
        assert _actual(reg, view) == _expected(reg, view), what


def test_name_bounds_cover_what_detection_matches() -> None:
    reg = _fresh()
    for what, view in _views(reg):
        modules = list(lora_modules(view.tensors))
        keys = [k for k in view.tensors if split_lora_key(k) is None]
        for det in reg.detect_all(view):
            bound = reg.get(det.arch).name_bound(modules, keys)
            assert det.matched <= bound.matched, (what, det.arch)
            assert det.score <= bound.score + TIE_MARGIN, (what, det.arch)


# --------------------------------------------------------------------------------------------- bounds
def test_name_bound_arithmetic() -> None:
    b = NameBound(lora=3, lora_total=4, checkpoint=1, checkpoint_total=10)
    assert b.matched == 4
    assert b.score == 0.75
    assert NameBound(0, 0, 0, 0).score == 0.0


def test_name_prefixes_kohya_rule() -> None:
    assert name_prefixes(("lora_unet_",), ("double_blocks.", "img_in"), kohya=True) == (
        "lora_unet_double_blocks_",
        "lora_unet_img_in",
    )
    assert name_prefixes(("a.", "b."), ("x.",)) == ("a.x.", "b.x.")


def test_key_bound_follows_the_wrapper_prefixes() -> None:
    flux = _fresh().get("flux")
    assert flux.could_know_key("double_blocks.0.img_attn.qkv.weight")
    assert flux.could_know_key("model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
    assert not flux.could_know_key("model.diffusion_model.input_blocks.0.0.weight")
    assert flux.could_know_module("lora_unet_double_blocks_0_img_attn_qkv")
    assert not flux.could_know_module("lora_unet_input_blocks_4_1_proj_in")


def test_a_family_without_prefixes_is_always_scored() -> None:
    toy = ToyArch()
    assert toy.lora_prefixes is None and toy.key_prefixes is None
    assert toy.name_bound(["anything"], ["any.key"]) == NameBound(1, 1, 1, 1)


def test_extra_aliases_widen_the_bound() -> None:
    sdxl = _fresh().get("sdxl")
    name = "my_trainer_unet_attn"
    assert not sdxl.could_know_module(name)
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    sdxl.add_aliases([Alias(name, "kohya", Target(key), "unet")], source="myplugin")
    assert sdxl.could_know_module(name)


class _WrongLoraPrefixes(ToyArch):
    id = "wronglora"
    lora_prefixes = ("nothing_",)


class _WrongKeyPrefixes(ToyArch):
    id = "wrongkeys"
    key_prefixes = ("nothing.",)


def test_conformance_reports_prefixes_that_miss_names() -> None:
    from lorasmith.testing.conformance import check_name_bounds, conformance_report

    failures = check_name_bounds(_WrongLoraPrefixes())
    assert failures and all("starts with none of lora_prefixes" in f for f in failures[:-1])
    failures = check_name_bounds(_WrongKeyPrefixes())
    assert failures and all("starts with none of key_prefixes" in f for f in failures[:-1])
    notes = conformance_report(ToyArch(), checks=["name-bounds"]).notes
    assert any("scores this family in full" in n for n in notes)


# --------------------------------------------------------------------------------- lazy alias conflicts
def test_an_alias_conflict_is_reported_on_first_use_and_by_plugins() -> None:
    from types import SimpleNamespace

    from lorasmith.hookspecs import hookimpl
    from lorasmith.ops.plugins import list_plugins

    @hookimpl
    def lorasmith_extra_aliases(arch_id: str) -> list[Alias] | None:
        if arch_id != "sdxl":
            return None
        name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
        return [Alias(name, "peft", Target(key), "unet")]

    plugin = SimpleNamespace(lorasmith_extra_aliases=lorasmith_extra_aliases)
    reg = Registry(autoload=False, plugins=[("clash", plugin)])  # building the registry does not fail
    with pytest.raises(PluginError, match="alias conflict") as first_use:
        reg.get("sdxl").alias_table()
    assert first_use.value.hint == "block it with LORASMITH_BLOCK_PLUGINS=clash"
    with pytest.raises(PluginError, match="extra aliases from plugin 'clash'") as listing:
        list_plugins(reg)
    assert listing.value.hint == "block it with LORASMITH_BLOCK_PLUGINS=clash"


# ------------------------------------------------------------------------------------------ shape fits
def _fit_reference(items: list[list[tuple[int, int]] | None]) -> tuple[int, int, int, Fraction | None]:
    """fit_shapes with Fraction objects, as it was written first."""
    from collections import Counter

    groups, resolved, ndim = [], 0, 0
    for pairs in items:
        resolved += 1
        if pairs is None:
            ndim += 1
            continue
        groups.append([Fraction(f, c) for f, c in pairs if c > 0 and f > 0 and c % 64 == 0])
    votes = Counter(r for g in groups for r in g)
    if not votes:
        return resolved, 0, ndim, None

    def vote(kv: tuple[Fraction, int]) -> tuple[int, bool, Fraction]:
        s = kv[0]
        pow2 = s.numerator & (s.numerator - 1) == 0 and s.denominator & (s.denominator - 1) == 0
        return (kv[1], pow2, -abs(s - 1))

    scale = max(votes.items(), key=vote)[0]
    return resolved, sum(1 for g in groups if any(r != scale for r in g)), ndim, scale


dims = st.sampled_from([0, 3, 4, 9, 20, 40, 64, 77, 128, 320, 640, 768, 1280, 2048, 30, 60])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.tuples(dims, dims), max_size=3)), max_size=12))
def test_fit_shapes_matches_the_fraction_reference(items: list[list[tuple[int, int]] | None]) -> None:
    fit = fit_shapes(items)
    assert (fit.resolved, fit.off_scale, fit.ndim_mismatch, fit.scale) == _fit_reference(items)
