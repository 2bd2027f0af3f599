"""convert (LoRAs with DoRA): the magnitude survives every spelling that can name the module, and the
effect of each module on a base weight, ``apply(W) - W``, is unchanged by every conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorasmith.adapters.parse import parse_module
from lorasmith.archs.base import Alias, Architecture
from lorasmith.errors import LorasmithError
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops.convert import convert
from lorasmith.ops.loralib import load_lora
from lorasmith.registry import get
from lorasmith.testing import make_lora

FAMILIES = [("sd1", "sd1"), ("sdxl", "base"), ("flux", "dev"), ("sd3", "sd3-medium"), ("zimage", None)]


def _whole_linear_in(arch: Architecture, variant: str | None, spelling: str) -> set[str]:
    """Canonical keys that ``spelling`` names whole (no row slice) and that are 2-D weights."""
    out = set()
    for a in arch.aliases(variant, spelling=spelling):
        spec = _spec(arch, variant, a)
        if a.target.slice is None and spec is not None and len(spec) == 2:
            out.add(a.target.key)
    return out


def _spec(arch: Architecture, variant: str | None, a: Alias) -> tuple[int, ...] | None:
    for inv in (arch.canonical_inventory(variant), *arch.inventories()):
        spec = inv.tensors.get(a.target.key)
        if spec is not None:
            return tuple(spec.shape)
    te = getattr(arch, "text_encoder_modules", None)
    if te is not None and a.target.key in te():
        return tuple(te()[a.target.key].shape)
    return None


def effects(path: Path, arch: str, bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical key -> ``apply(W, 1) - W`` of the module on it (float64), DoRA included."""
    out: dict[str, torch.Tensor] = {}
    with load_lora(path, arch=arch) as lora:
        for name, info in lora.modules.items():
            assert info.alias is not None and info.alias.target.slice is None, name
            key = info.alias.target.key
            module = parse_module(name, {suffix: lora.tensor(k) for suffix, k in info.keys.items()})
            base = bases[key]
            out[key] = module.apply(base, 1.0, dtype=torch.float64).reshape(base.shape) - base
    return out


def _bases(path: Path, arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    with load_lora(path, arch=arch) as lora:
        for name in sorted(lora.modules):
            s = lora.modules[name].summary
            assert s.delta_shape is not None
            out[lora.modules[name].alias.target.key] = torch.randn(  # type: ignore[union-attr]
                s.delta_shape, generator=gen, dtype=torch.float64
            )
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-9) -> bool:
    return set(a) == set(b) and all(
        torch.allclose(a[k], b[k], rtol=0, atol=tol * (float(a[k].abs().max()) or 1.0)) for k in a
    )


@pytest.mark.parametrize(("family", "variant"), FAMILIES)
def test_dora_effect_is_unchanged_in_every_spelling(tmp_path: Path, family: str, variant: str | None) -> None:
    arch = get(family)
    for spelling in arch.spellings:
        keys = _whole_linear_in(arch, variant, "kohya") & _whole_linear_in(arch, variant, spelling)
        fx = make_lora(
            arch,
            tmp_path / f"{spelling}-in.safetensors",
            variant=variant,
            spelling="kohya",
            algo="dora",
            modules=lambda a, keys=keys: a.target.key in keys,  # type: ignore[misc]
            limit=4,
        )
        bases = _bases(fx.path, family)
        want = effects(fx.path, family, bases)
        out = tmp_path / f"{spelling}.safetensors"
        r = convert(fx.path, out, to=spelling, arch=family)
        assert r.counts == {"rename": 4}, spelling
        assert _close(effects(out, family, bases), want), spelling
        got = load_all(out)
        src = load_all(fx.path)
        mags = {k: v for k, v in got.items() if k.endswith((".dora_scale", ".lora_magnitude_vector"))}
        assert len(mags) == 4, spelling
        # the magnitude is only reshaped, never recomputed
        assert sorted(float(v.sum()) for v in mags.values()) == sorted(
            float(v.sum()) for k, v in src.items() if k.endswith(".dora_scale")
        )
        back = tmp_path / f"{spelling}-back.safetensors"
        convert(out, back, to="kohya", arch=family)
        assert _close(effects(back, family, bases), want), spelling
        b = load_all(back)
        assert all(torch.equal(b[k], v) for k, v in src.items() if k.endswith(".dora_scale")), spelling


def test_peft_magnitude_layouts(tmp_path: Path) -> None:
    """Linear -> ``[out]``; Conv2d (SD1's 1x1 ``proj_in``) -> ``[1, out, 1, 1]``, as PEFT stores them."""
    arch = get("sd1")
    fx = make_lora(
        arch,
        tmp_path / "d.safetensors",
        spelling="kohya",
        algo="dora",
        modules=lambda a: a.component == "unet" and a.name.endswith(("_proj_in", "_attn1_to_q")),
        limit=4,
    )
    out = tmp_path / "p.safetensors"
    convert(fx.path, out, to="peft")
    got = load_all(out)
    src = load_all(fx.path)
    seen = set()
    for name in fx.modules:
        mag = src[name + ".dora_scale"]
        peft = got[_peft_name(arch, name) + ".lora_magnitude_vector"]
        kind = "conv" if mag.ndim == 4 else "linear"
        seen.add(kind)
        assert peft.shape == ((1, mag.shape[0], 1, 1) if kind == "conv" else (mag.shape[0],))
        assert torch.equal(peft.reshape(-1), mag.reshape(-1))
    assert seen == {"conv", "linear"}
    back = tmp_path / "k.safetensors"
    convert(out, back, to="kohya")
    b = load_all(back)
    assert all(torch.equal(b[n + ".dora_scale"], src[n + ".dora_scale"]) for n in fx.modules)


def _peft_name(arch: Architecture, kohya: str) -> str:
    target = arch.resolve(kohya)
    assert target is not None
    return next(
        a.name
        for a in arch.aliases(None, spelling="peft")
        if a.target == target.target and "processor" not in a.name
    )


def _with_dora(src: Path, dst: Path, shape: str) -> None:
    """Copy a LoRA adding (or reshaping) a positive DoRA magnitude per output row or per input column."""
    t = load_all(src)
    gen = torch.Generator().manual_seed(3)
    names = {k.rsplit(".", 2)[0] for k in t if k.endswith((".hada_w1_a", ".lora_up.weight"))}
    for name in names:
        t.pop(name + ".dora_scale", None)
        up = t.get(name + ".hada_w1_a", t.get(name + ".lora_up.weight"))
        down = t.get(name + ".hada_w1_b", t.get(name + ".lora_down.weight"))
        assert up is not None and down is not None
        size = (up.shape[0], 1) if shape == "rows" else (1, down.reshape(down.shape[0], -1).shape[1])
        t[name + ".dora_scale"] = torch.rand(size, generator=gen, dtype=up.dtype) + 0.5
    save_file(t, dst)


def test_loha_dora_into_peft_needs_lossy_and_keeps_the_magnitude(tmp_path: Path) -> None:
    arch = get("sd1")
    fx = make_lora(
        arch,
        tmp_path / "h.safetensors",
        spelling="kohya",
        algo="loha",
        rank=2,
        modules=lambda a: a.name.endswith("_attn2_to_k"),
        limit=3,
    )
    src = tmp_path / "hd.safetensors"
    _with_dora(fx.path, src, "rows")
    out = tmp_path / "p.safetensors"
    with pytest.raises(LorasmithError, match="no exact PEFT form") as info:
        convert(src, out, to="peft")
    assert info.value.hint is not None and "--lossy" in info.value.hint
    r = convert(src, out, to="peft", lossy=True, lossy_tol=1e-12)
    assert r.counts == {"lossy": 3} and r.max_rel_error is not None and r.max_rel_error < 1e-9
    bases = _bases(src, "sd1")
    assert _close(effects(out, "sd1", bases), effects(src, "sd1", bases), tol=1e-7)
    got, s = load_all(out), load_all(src)
    assert sum(k.endswith(".lora_magnitude_vector") for k in got) == 3
    assert sorted(float(v.sum()) for k, v in got.items() if k.endswith(".lora_magnitude_vector")) == sorted(
        float(v.sum()) for k, v in s.items() if k.endswith(".dora_scale")
    )


def test_per_column_dora_has_no_peft_form(tmp_path: Path) -> None:
    arch = get("sdxl")
    fx = make_lora(
        arch,
        tmp_path / "d.safetensors",
        spelling="kohya",
        algo="dora",
        modules=lambda a: a.component == "unet" and a.name.endswith("_attn1_to_q"),
        limit=2,
    )
    src = tmp_path / "col.safetensors"
    _with_dora(fx.path, src, "columns")
    for lossy in (False, True):
        with pytest.raises(LorasmithError, match="per input column") as info:
            convert(src, tmp_path / "p.safetensors", to="peft", lossy=lossy)
        assert info.value.hint is not None and "kohya" in info.value.hint
    assert not (tmp_path / "p.safetensors").exists()
    out = tmp_path / "l.safetensors"
    convert(src, out, to="lycoris")  # kohya-style suffixes carry it bit for bit
    a = load_all(src)
    b = load_all(out)
    assert sorted(v.shape for k, v in b.items() if k.endswith(".dora_scale")) == sorted(
        v.shape for k, v in a.items() if k.endswith(".dora_scale")
    )
    bases = _bases(src, "sdxl")
    assert _close(effects(out, "sdxl", bases), effects(src, "sdxl", bases), tol=0)


def test_dora_never_fuses_or_splits(tmp_path: Path) -> None:
    arch = get("zimage")
    fx = make_lora(
        arch,
        tmp_path / "q.safetensors",
        spelling="kohya",
        algo="dora",
        modules=lambda a: a.name.endswith("_attention_qkv"),
        limit=1,
    )
    for lossy in (False, True):
        with pytest.raises(LorasmithError, match=r"DoRA modules? cannot be .*(fused|split)"):
            convert(fx.path, tmp_path / "m.safetensors", to="musubi", lossy=lossy)
