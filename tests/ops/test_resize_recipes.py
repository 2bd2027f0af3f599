"""Base-aware recipes (thr=, size=), base norms and errors, against references computed here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorasmith.ops.resize as resize_mod
from lorasmith.archs.base import Alias
from lorasmith.errors import ArchMismatchError, InvalidFileError, LorasmithError
from lorasmith.ops.resize import parse_recipes, resize
from lorasmith.registry import get_registry
from lorasmith.testing import LoraFixture, make_checkpoint, make_lora, target_spec

F64 = torch.float64


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(F64)


def out_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"]
    r = down.shape[0]
    g = float(tensors[name + ".alpha"]) / r
    return g * (flat(up).reshape(up.shape[0], r) @ flat(down))


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraFixture, Path, dict[str, torch.Tensor]]:
    d = tmp_path_factory.mktemp("pair")
    sdxl = get_registry().get("sdxl")
    base = make_checkpoint(sdxl, d / "base.safetensors", dtype=F64)
    fx = make_lora(sdxl, d / "lora.safetensors", rank=8, limit=10, dtype=F64)
    return fx, d / "base.safetensors", base


def reference(fx: LoraFixture, base: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor | float]]:
    """Per module: U, S, Vh of the exact delta, and the base slice's norms and subspace values."""
    out: dict[str, dict[str, torch.Tensor | float]] = {}
    for name, em in fx.modules.items():
        delta = flat(em.delta)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(fx.rank or 0, *delta.shape)  # the true rank: the rest are rounding-level zeros
        u, s, vh = u[:, :k], s[:k], vh[:k]
        w = base[em.target.key].to(F64)
        if em.target.slice is not None:
            w = w.narrow(*em.target.slice)
        w = flat(w)
        out[name] = {
            "U": u,
            "S": s,
            "Vh": vh,
            "spn": float(torch.linalg.matrix_norm(w, ord=2)),
            "fro": float(w.norm()),
            "sub": ((w @ vh.mT) * u).sum(0).abs(),
            "params": float((delta.shape[0] + delta.shape[1]) * 8),  # float64 output: 8 bytes per value
        }
    return out


def ref_scores(recipe: str, ref: dict[str, torch.Tensor | float]) -> torch.Tensor:
    (r,) = parse_recipes(recipe)
    s = ref["S"]
    assert isinstance(s, torch.Tensor)
    score = torch.log10(s) + math.log10(r.rescale)
    for method, w in r.weights.items():
        if method == "subspace":
            sub = ref["sub"]
            assert isinstance(sub, torch.Tensor)
            score = score - w * torch.log10(sub)
            continue
        value = {
            "spn_ckpt": ref["spn"],
            "fro_ckpt": ref["fro"],
            "spn_lora": float(s[0]),
            "fro_lora": float(s.norm()),
            "params": ref["params"],
        }[method]
        assert isinstance(value, float)
        score = score - w * math.log10(value)
    return score


RECIPES = [
    "fro_ckpt=1",
    "spn_ckpt=1",
    "spn_lora",
    "fro_lora=1",
    "params=1,spn_lora=1",
    "subspace=0.5,spn_ckpt=0.5",
    "spn_lora=2,fro_ckpt=2,rescale=0.5",
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_thr_recipe_keeps_exactly_the_triplets_scoring_above_the_threshold(
    tmp_path: Path, sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]], recipe: str
) -> None:
    fx, base_path, base = sdxl_pair
    refs = reference(fx, base)
    scores = {n: ref_scores(recipe + ",thr=0", r) for n, r in refs.items()}
    # a threshold halfway between two scores near the middle: some triplets kept, some not, no tie
    flat_scores = torch.sort(torch.cat(list(scores.values())), descending=True).values
    mid = len(flat_scores) // 2
    thr = float(flat_scores[mid] + flat_scores[mid + 1]) / 2
    result = resize(
        [fx.path],
        output_dir=tmp_path,
        base=base_path,
        recipe=f"{recipe},thr={thr!r}",
        precision="float64",
        device="cpu",
        cache_dir=tmp_path / "cache",
    )
    (out,) = result.outputs
    tensors = load_file(out.path)
    rescale = parse_recipes(recipe + ",thr=0")[0].rescale
    recs = {m.name: m for m in out.modules}
    for name, ref in refs.items():
        keep = (scores[name] >= thr).nonzero().flatten()
        u, s, vh = ref["U"], ref["S"], ref["Vh"]
        assert isinstance(u, torch.Tensor) and isinstance(s, torch.Tensor) and isinstance(vh, torch.Tensor)
        rec = recs[name]
        assert rec.new_rank == len(keep), name
        discarded = math.sqrt(float((s**2).sum() - (s[keep] ** 2).sum()))
        assert rec.rel_error_lora == pytest.approx(discarded / float(s.norm()), rel=1e-6, abs=1e-9)
        assert rec.rel_error_base == pytest.approx(
            rescale * discarded / float(ref["fro"]), rel=1e-6, abs=1e-9
        )
        if len(keep) == 0:
            assert rec.status == "dropped"
            assert not any(k.startswith(name + ".") for k in tensors)
            continue
        want = rescale * ((u[:, keep] * s[keep]) @ vh[keep])
        got = out_delta(tensors, name)
        assert float((got - want).norm()) <= 1e-9 * float(s.norm()), name
    slug = parse_recipes(recipe + ",thr=0")[0].slug
    assert Path(out.path).name == f"lora_{slug}_th{round(thr, 2):g}.safetensors"


def test_recipes_share_one_decomposition(
    tmp_path: Path,
    sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fx, base_path, _ = sdxl_pair
    calls: list[int] = []
    real = resize_mod._gram_batch

    def counting(ups, *rest):  # type: ignore[no-untyped-def]
        calls.append(len(ups))
        return real(ups, *rest)

    monkeypatch.setattr(resize_mod, "_gram_batch", counting)
    recipes = "spn_ckpt=1,thr=-1.5:fro_lora=1,thr=-1:subspace=1,thr=-0.5:spn_lora=1,size=0.02"
    result = resize(
        [fx.path],
        output_dir=tmp_path,
        base=base_path,
        recipe=recipes,
        precision="float64",
        device="cpu",
        cache_dir=tmp_path / "cache",
    )
    assert len(result.outputs) == 4
    assert sum(calls) == len(fx.modules) == result.decompositions
    assert len({o.path for o in result.outputs}) == 4


def _real_shaped_lora(path: Path) -> LoraFixture:
    """A few SDXL attention / projection modules at their real sizes (320..1280), rank 32, fp16."""
    sdxl = get_registry().get("sdxl")

    def pick(alias: Alias) -> bool:
        spec = target_spec(sdxl, "base", alias.target)
        return (
            spec is not None
            and len(spec.shape) == 2
            and alias.component == "unet"
            and 320 <= min(spec.shape)
            and max(spec.shape) <= 1280
        )

    return make_lora(sdxl, path, modules=pick, limit=14, rank=32, factor=1, dtype=torch.float16, seed=3)


@pytest.mark.parametrize("fraction", [0.3, 0.55, 0.8])
def test_size_recipe_lands_within_one_percent_of_the_target(tmp_path: Path, fraction: float) -> None:
    fx = _real_shaped_lora(tmp_path / "big.safetensors")
    size = fx.path.stat().st_size
    target_mib = round(size * fraction / 2**20, 3)
    target = math.floor(target_mib * 2**20)  # the budget never exceeds the target, not even by a fraction
    result = resize([fx.path], output_dir=tmp_path, recipe=f"spn_lora=1,size={target_mib}", device="cpu")
    (out,) = result.outputs
    actual = Path(out.path).stat().st_size
    assert out.file_bytes == actual
    assert target * 0.99 <= actual <= target, (actual, target)
    assert out.target_bytes == target
    # the selection is a global score cut: per module, the triplets with log10(s_i / s_0) >= threshold
    assert out.threshold is not None
    recs = {m.name: m for m in out.modules}
    for name, em in fx.modules.items():
        # singular values from the factors (QR of each, SVD of the 32 x 32 core): no dense 1280 x 1280 SVD
        up, down = flat(em.factors[".lora_up.weight"]), flat(em.factors[".lora_down.weight"])
        core = torch.linalg.qr(up).R @ torch.linalg.qr(down.T).R.T
        s = torch.linalg.svdvals(core * em.scale)
        kept = int((torch.log10(s / s[0]) >= out.threshold - 1e-5).sum())
        assert abs(recs[name].new_rank - kept) <= 1, name
    assert Path(out.path).name.startswith(f"big_spnlora1_size{target_mib:g}_th")


def test_size_below_the_minimum_is_refused(tmp_path: Path) -> None:
    fx = _real_shaped_lora(tmp_path / "big.safetensors")
    with pytest.raises(LorasmithError, match="below the smallest possible output"):
        resize([fx.path], output_dir=tmp_path, recipe="spn_lora=1,size=0.0001", device="cpu")
    assert list(tmp_path.glob("big_*")) == []


def test_rank_cap_applies_to_recipes(
    tmp_path: Path, sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]]
) -> None:
    fx, _, _ = sdxl_pair
    result = resize([fx.path], output_dir=tmp_path, recipe="spn_lora=1,thr=-9", rank=2, device="cpu")
    assert {m.new_rank for m in result.outputs[0].modules} == {2}


# --------------------------------------------------------------------------------------------- base norms
def test_base_errors_are_recorded_for_fixed_ranks(
    tmp_path: Path, sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]]
) -> None:
    fx, base_path, base = sdxl_pair
    cache = tmp_path / "cache"
    out = tmp_path / "out.safetensors"
    result = resize(
        [fx.path], output=out, rank=3, base=base_path, precision="float64", device="cpu", cache_dir=cache
    )
    refs = reference(fx, base)
    for rec in result.outputs[0].modules:
        s = refs[rec.name]["S"]
        assert isinstance(s, torch.Tensor)
        discarded = math.sqrt(float((s[3:] ** 2).sum()))
        assert rec.rel_error_base == pytest.approx(discarded / float(refs[rec.name]["fro"]), rel=1e-9)
    info = result.base[0]
    assert info.computed == len(fx.modules) and info.cache_hits == 0
    again = resize(
        [fx.path], output=out, rank=3, base=base_path, overwrite=True, device="cpu", cache_dir=cache
    )
    assert again.base[0].cache_hits == len(fx.modules) and again.base[0].computed == 0


def test_base_of_another_family_is_refused(tmp_path: Path) -> None:
    fx = make_lora(get_registry().get("sdxl"), tmp_path / "lora.safetensors", rank=4, limit=3)
    make_checkpoint(get_registry().get("sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(ArchMismatchError, match="is a Stable Diffusion"):
        resize(
            [fx.path],
            output=tmp_path / "o.safetensors",
            recipe="fro_ckpt=1,thr=-2",
            base=tmp_path / "sd1.safetensors",
            cache_dir=tmp_path / "c",
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_base_key_is_refused(
    tmp_path: Path, sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]]
) -> None:
    fx, base_path, _ = sdxl_pair
    tensors = load_file(str(base_path))
    victim = next(iter(fx.modules.values())).target.key
    del tensors[victim]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LorasmithError, match="has no weight"):
        resize(
            [fx.path],
            output=tmp_path / "o.safetensors",
            recipe="spn_ckpt=1,thr=-2",
            base=tmp_path / "partial.safetensors",
            cache_dir=tmp_path / "c",
        )


def test_recipe_needing_the_base_without_it_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LorasmithError, match="needs the base checkpoint"):
        resize(["x.safetensors"], output=tmp_path / "o.safetensors", recipe="subspace=1,thr=0")


def test_a_lora_given_as_base_is_refused(
    tmp_path: Path, sdxl_pair: tuple[LoraFixture, Path, dict[str, torch.Tensor]]
) -> None:
    fx, _, _ = sdxl_pair
    with pytest.raises(InvalidFileError, match="a LoRA, not a base checkpoint"):
        resize([fx.path], output=tmp_path / "o.safetensors", recipe="fro_ckpt=1,thr=-2", base=fx.path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fro_ckpt=1,thr=-2,bogus=1", "unknown key 'bogus'"),
        ("fro_ckpt=1", "exactly one of thr="),
        ("fro_ckpt=1,thr=-2,size=3", "exactly one of thr="),
        ("thr=-1", "at least one scoring method"),
        ("spn_lora=1,size=-1", "size must be positive"),
        ("spn_lora=x,thr=1", "is not a number"),
        ("spn_lora=1,thr=1,rescale=0", "rescale must be positive"),
        ("spn_lora=1,thr=1:", "empty recipe"),
    ],
)
def test_bad_recipes(text: str, message: str) -> None:
    with pytest.raises(LorasmithError, match=message):
        parse_recipes(text)


def test_recipe_weights_are_normalised() -> None:
    (r,) = parse_recipes("spn_ckpt=3,subspace=1,size=32,rescale=2")
    assert r.weights == {"spn_ckpt": 0.75, "subspace": 0.25}
    assert r.size_mib == 32 and r.threshold is None and r.rescale == 2
    assert r.slug == "spnckpt0.75_subspace0.25_scale2_size32"
    assert r.needs_base == ["spn_ckpt", "subspace"]
