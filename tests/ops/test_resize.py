"""resize against a dense float64 reference: every family, spelling and algorithm of the fixture factory.

The reference is computed here from the fixture's exact delta (``ExpectedModule.delta``) with
``torch.linalg.svd`` / ``svdvals``; output deltas are rebuilt from the written tensors by this file's own
few lines (not by lorasmith's adapters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasmith.archs.base import Alias
from lorasmith.io.hashes import sshs_hashes_of_file
from lorasmith.ops.resize import ResizeResult, resize
from lorasmith.registry import get_registry
from lorasmith.testing import LoraFixture, make_lora, shrink_slice, target_spec

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers
def arch(name: str):  # type: ignore[no-untyped-def]
    return get_registry().get(name)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(F64)


def out_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The delta a loader computes for module ``name`` of a written file (2-D, float64)."""
    if name + ".lora_down.weight" in tensors:
        down, up = tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"]
        r = down.shape[0]
        alpha = tensors.get(name + ".alpha")
        g = 1.0 if alpha is None else float(alpha) / r
    else:
        down, up = tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"]
        r, g = down.shape[0], 1.0
    return g * (flat(up).reshape(up.shape[0], r) @ flat(down))


def truncated(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank-k truncation, all singular values) of a 2-D float64 matrix."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def run(paths: list[Path] | list[str], out: Path, **kw: object) -> ResizeResult:
    kw.setdefault("precision", "float64")
    kw.setdefault("device", "cpu")
    return resize(paths, output=out, **kw)  # type: ignore[arg-type]


def records(result: ResizeResult) -> dict[str, object]:
    return {m.name: m for m in result.outputs[0].modules}


def check_truncation(
    fx: LoraFixture, out: Path, result: ResizeResult, rank_of: Callable[[torch.Tensor], int]
) -> None:
    """Every module: output delta == rank-k truncation of the exact delta; error == discarded norm."""
    tensors = load_file(str(out))
    recs = records(result)
    assert set(recs) == set(fx.modules)
    for name, em in fx.modules.items():
        ref = flat(em.delta)
        s_all = torch.linalg.svdvals(ref)
        k = rank_of(s_all)
        trunc, s = truncated(ref, k)
        got = out_delta(tensors, name)
        scale = float(ref.norm())
        assert float((got - trunc).norm()) <= 1e-9 * scale, name
        discarded = math.sqrt(float((s[k:] ** 2).sum()))
        assert float((got - ref).norm()) == pytest.approx(discarded, rel=1e-6, abs=1e-12 * scale), name
        rec = recs[name]
        assert rec.new_rank == k, name
        assert rec.rel_error_lora == pytest.approx(discarded / scale, rel=1e-6, abs=1e-12), name


# ----------------------------------------------------------------------------------------- fixed rank
FAMILY_CASES = [
    ("sd1", "kohya"),
    ("sd1", "peft"),
    ("sdxl", "kohya"),
    ("sdxl", "peft"),
    ("sdxl", "comfy"),
    ("flux", "kohya"),
    ("flux", "peft"),
    ("sd3", "kohya"),
    ("zimage", "kohya"),
    ("zimage", "aitk"),
    ("zimage", "musubi"),
]


@pytest.mark.parametrize(("family", "spelling"), FAMILY_CASES)
def test_fixed_rank_is_the_truncated_svd_in_every_family(tmp_path: Path, family: str, spelling: str) -> None:
    fx = make_lora(arch(family), tmp_path / "in.safetensors", spelling=spelling, rank=6, limit=6, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=3)
    check_truncation(fx, out, result, lambda s: min(3, len(s)))
    tensors = load_file(str(out))
    style_peft = spelling in ("peft", "aitk")
    for name, em in fx.modules.items():
        if style_peft:
            assert name + ".lora_A.weight" in tensors and name + ".alpha" not in tensors
        else:
            # strength kept: alpha' / k == alpha / r
            k = tensors[name + ".lora_down.weight"].shape[0]
            assert float(tensors[name + ".alpha"]) / k == pytest.approx(em.scale, rel=1e-7)


@pytest.mark.parametrize("algo", ["locon-tucker", "loha", "lokr", "full"])
def test_lycoris_algorithms_are_decomposed_exactly(tmp_path: Path, algo: str) -> None:
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", algo=algo, rank=4, limit=6, dtype=F64)  # type: ignore[arg-type]
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=3, conv_rank=2)
    conv = {n for n, em in fx.modules.items() if em.delta.ndim == 4 and math.prod(em.delta.shape[2:]) > 1}
    tensors = load_file(str(out))
    recs = records(result)
    for name, em in fx.modules.items():
        ref = flat(em.delta)
        k = min(2 if name in conv else 3, *ref.shape)
        trunc, s = truncated(ref, k)
        assert float((out_delta(tensors, name) - trunc).norm()) <= 1e-9 * float(ref.norm()), name
        assert recs[name].rel_error_lora == pytest.approx(
            math.sqrt(float((s[k:] ** 2).sum())) / float(ref.norm()), rel=1e-6, abs=1e-12
        )
        # written back as a plain LoRA (conv-shaped for convolutions)
        assert name + ".lora_down.weight" in tensors
        suffixes = [key[len(name) :] for key in tensors if key.startswith(name + ".")]
        assert sorted(suffixes) == [".alpha", ".lora_down.weight", ".lora_up.weight"], name
        if em.delta.ndim == 4:
            assert tensors[name + ".lora_down.weight"].shape[1:] == em.delta.shape[1:]
    if algo == "locon-tucker":
        assert conv, "the Tucker fixture should hold 3x3 convolutions"


def test_conv_3x3_locon_and_conv_rank(tmp_path: Path) -> None:
    sdxl = arch("sdxl")

    def is_conv3(alias: Alias) -> bool:
        spec = target_spec(sdxl, "base", alias.target)
        return spec is not None and len(spec.shape) == 4 and spec.shape[2:] == (3, 3)

    def is_linear(alias: Alias) -> bool:
        spec = target_spec(sdxl, "base", alias.target)
        return spec is not None and len(spec.shape) == 2

    a = make_lora(sdxl, tmp_path / "conv.safetensors", modules=is_conv3, rank=6, limit=4, dtype=F64)
    b = make_lora(sdxl, tmp_path / "lin.safetensors", modules=is_linear, rank=6, limit=4, dtype=F64)
    merged_names = set(a.modules) | set(b.modules)
    both = load_file(str(a.path)) | load_file(str(b.path))
    from safetensors.torch import save_file

    save_file(both, str(tmp_path / "both.safetensors"))
    out = tmp_path / "out.safetensors"
    result = run([tmp_path / "both.safetensors"], out, rank=4, conv_rank=2)
    recs = records(result)
    tensors = load_file(str(out))
    for name in merged_names:
        em = (a.modules | b.modules)[name]
        is_conv = name in a.modules
        assert recs[name].kind == ("conv" if is_conv else "linear")
        k = min(2 if is_conv else 4, *flat(em.delta).shape)
        assert recs[name].new_rank == k
        trunc, _ = truncated(flat(em.delta), k)
        assert float((out_delta(tensors, name) - trunc).norm()) <= 1e-9 * float(em.delta.norm())
        if is_conv:
            assert tensors[name + ".lora_down.weight"].shape == (k, *em.delta.shape[1:])
            assert tensors[name + ".lora_up.weight"].shape == (em.delta.shape[0], k, 1, 1)
    from lorasmith.io.header import read_header

    meta = read_header(out).metadata
    assert meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"


def test_dora_keeps_magnitude_and_resizes_the_low_rank_part(tmp_path: Path) -> None:
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", algo="dora", rank=6, limit=5, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=2)
    src = load_file(str(fx.path))
    tensors = load_file(str(out))
    for name, em in fx.modules.items():
        assert torch.equal(tensors[name + ".dora_scale"], src[name + ".dora_scale"])
        ref = flat(em.delta)
        trunc, _ = truncated(ref, 2)
        got = out_delta(tensors, name)
        assert float((got - trunc).norm()) <= 1e-9 * float(ref.norm())
        # merged magnitude: each row of W' = m (W + dW') / ||W + dW'|| has norm m, whatever dW' is
        base = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.02
        merged = base + got
        merged = merged * (src[name + ".dora_scale"].reshape(-1, 1) / merged.norm(dim=1, keepdim=True))
        assert torch.allclose(merged.norm(dim=1), src[name + ".dora_scale"].reshape(-1).to(F64), rtol=1e-12)
    assert all(r.algo == "lora+dora" for r in result.outputs[0].modules)


def test_fixed_rank_caps_at_the_available_rank_and_keeps_full_modules_unchanged(tmp_path: Path) -> None:
    fx = make_lora(arch("sd1"), tmp_path / "in.safetensors", rank=8, limit=8, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=1000)
    src = load_file(str(fx.path))
    tensors = load_file(str(out))
    for rec in result.outputs[0].modules:
        em = fx.modules[rec.name]
        available = min(8, *flat(em.delta).shape)
        assert rec.available_rank == available
        assert rec.new_rank == available
        if available == 8:
            # every triplet kept: the module is copied bit for bit
            assert rec.status == "unchanged"
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                assert torch.equal(tensors[rec.name + suffix], src[rec.name + suffix])
        else:
            # a module whose stored rank exceeds its dimensions is re-factored at its true rank
            assert rec.status == "resized"
            assert float((out_delta(tensors, rec.name) - flat(em.delta)).norm()) <= 1e-9 * float(
                em.delta.norm()
            )
    assert any(r.status == "resized" for r in result.outputs[0].modules)


# -------------------------------------------------------------------------------------------- dynamic
def minimal_rank(s: torch.Tensor, method: str, t: float) -> int:
    """The exact minimal rank, written from the definitions (FORMATS.md section 3)."""
    s = s.to(F64)
    if method == "sv_ratio":
        return max(1, int((s > s[0] / t).sum()))
    w = s * s if method == "sv_fro" else s
    target = (t * t if method == "sv_fro" else t) * float(w.sum())
    cum = torch.cumsum(w, 0)
    k = int((cum < target).sum()) + 1
    # minimality: k values reach the target, k - 1 do not
    assert float(cum[k - 1]) >= target and (k == 1 or float(cum[k - 2]) < target)
    return min(k, len(s))


def kohya_rank(s: torch.Tensor, method: str, t: float, cap: int) -> int:
    """sd-scripts' count (networks/resize_lora.py, 2026-02): one more than the index, at least 2."""
    s = s.to(F64)
    if float(s[0]) <= 1e-6:
        return 1
    if method == "sv_ratio":
        index = int((s > s[0] / t).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), t)) + 1
    else:
        sq = s * s
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), t * t)) + 1
    index = max(1, min(index, len(s) - 1))
    return min(index + 1, cap, len(s))


@pytest.mark.parametrize(("method", "param"), [("sv_ratio", 2.5), ("sv_fro", 0.83), ("sv_cumulative", 0.71)])
def test_dynamic_rank_is_the_exact_minimum(tmp_path: Path, method: str, param: float) -> None:
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", rank=10, limit=10, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, dynamic=method, param=param)
    check_truncation(fx, out, result, lambda s: minimal_rank(s, method, param))
    ranks = {m.new_rank for m in result.outputs[0].modules}
    assert len(ranks) > 1, "the fixture should give different ranks per module"
    assert result.outputs[0].network_dim == "Dynamic"


def test_dynamic_rank_respects_the_cap(tmp_path: Path) -> None:
    fx = make_lora(arch("flux"), tmp_path / "in.safetensors", rank=10, limit=6, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, dynamic="sv_fro", param=0.999, rank=2)
    check_truncation(fx, out, result, lambda s: min(2, minimal_rank(s, "sv_fro", 0.999)))


@pytest.mark.parametrize("method", ["sv_ratio", "sv_fro", "sv_cumulative"])
def test_kohya_compat_reproduces_sd_scripts(tmp_path: Path, method: str) -> None:
    fx = make_lora(arch("sd1"), tmp_path / "in.safetensors", rank=8, limit=8, dtype=F64)
    param = {"sv_ratio": 3.0, "sv_fro": 0.8, "sv_cumulative": 0.6}[method]
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, dynamic=method, param=param, kohya_compat=True, rank=6)
    exact = run([fx.path], tmp_path / "exact.safetensors", dynamic=method, param=param, rank=6)
    check_truncation(fx, out, result, lambda s: kohya_rank(s, method, param, 6))
    more = [
        a.new_rank - b.new_rank
        for a, b in zip(result.outputs[0].modules, exact.outputs[0].modules, strict=True)
    ]
    assert any(d == 1 for d in more) and all(d >= 0 for d in more)


# ---------------------------------------------------------------------------------------- merges & spellings
def test_merge_spec_is_the_exact_weighted_sum(tmp_path: Path) -> None:
    sdxl = arch("sdxl")
    a = make_lora(sdxl, tmp_path / "a.safetensors", rank=4, limit=5, seed=1, dtype=F64)
    b = make_lora(sdxl, tmp_path / "b.safetensors", rank=3, limit=5, seed=2, alpha=1.0, dtype=F64)
    spec = f"{a.path}:0.7,{b.path}:-0.3"
    full = tmp_path / "full.safetensors"
    result = run([spec], full, rank=64)
    tensors = load_file(str(full))
    for name in a.modules:
        want = 0.7 * flat(a.modules[name].delta) - 0.3 * flat(b.modules[name].delta)
        assert float((out_delta(tensors, name) - want).norm()) <= 1e-10 * float(want.norm())
    assert {m.algo for m in result.outputs[0].modules} == {"merge(lora,lora)"}
    low = tmp_path / "low.safetensors"
    run([spec], low, rank=2)
    tensors = load_file(str(low))
    for name in a.modules:
        want = 0.7 * flat(a.modules[name].delta) - 0.3 * flat(b.modules[name].delta)
        trunc, _ = truncated(want, 2)
        assert float((out_delta(tensors, name) - trunc).norm()) <= 1e-9 * float(want.norm())


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_self_merge_keeps_the_exact_sum(tmp_path: Path, precision: str) -> None:
    """A LoRA merged with itself has linearly dependent factors: the noise triplets come out as zeros,
    not as wrongly scaled vectors, so any rank gives the exact sum."""
    a = make_lora(arch("sd1"), tmp_path / "a.safetensors", rank=6, limit=4, seed=3, dtype=F64)
    out = tmp_path / "o.safetensors"
    run([f"{a.path}:0.5,{a.path}:0.5"], out, rank=12, precision=precision)
    tensors = load_file(str(out))
    tol = 1e-5 if precision == "float32" else 1e-10
    for name in a.modules:
        want = flat(a.modules[name].delta)
        assert float((out_delta(tensors, name) - want).norm()) <= tol * float(want.norm())


def test_merge_of_two_spellings_meets_on_the_same_modules(tmp_path: Path) -> None:
    sdxl = arch("sdxl")
    a = make_lora(sdxl, tmp_path / "a.safetensors", spelling="kohya", rank=4, limit=4, dtype=F64)
    table = sdxl.alias_table("base")
    by_target = {(al.target, al.spelling): al.name for al in table.values()}
    peft_names = [by_target[(em.alias.target, "peft")] for em in a.modules.values()]
    b = make_lora(sdxl, tmp_path / "b.safetensors", modules=peft_names, rank=2, seed=5, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([f"{a.path},{b.path}"], out, rank=64)
    tensors = load_file(str(out))
    assert {m.name for m in result.outputs[0].modules} == set(a.modules)
    for name, em in a.modules.items():
        peft = by_target[(em.alias.target, "peft")]
        want = flat(em.delta) + flat(b.modules[peft].delta)
        assert float((out_delta(tensors, name) - want).norm()) <= 1e-10 * float(want.norm())


def test_to_peft_renames_and_bakes_alpha(tmp_path: Path) -> None:
    sdxl = arch("sdxl")
    fx = make_lora(sdxl, tmp_path / "in.safetensors", rank=6, limit=6, dtype=F64)
    out = tmp_path / "out.safetensors"
    run([fx.path], out, rank=3, to="peft")
    tensors = load_file(str(out))
    table = sdxl.alias_table("base")
    by_target: dict[tuple[object, str], str] = {}
    for al in table.values():  # the first name of a weight (PEFT also knows ``processor.to_k``)
        by_target.setdefault((al.target, al.spelling), al.name)
    assert not any(k.endswith(".alpha") for k in tensors)
    assert len([k for k in tensors if k.endswith(".lora_A.weight")]) == len(fx.modules)  # each once
    for em in fx.modules.values():
        name = by_target[(em.alias.target, "peft")]
        trunc, _ = truncated(flat(em.delta), min(3, *flat(em.delta).shape))
        assert float((out_delta(tensors, name) - trunc).norm()) <= 1e-9 * float(em.delta.norm())


def _flux_rows(alias: Alias, factor: int = 64) -> slice:
    flux = arch("flux")
    real_rows = flux.canonical_inventory("dev").tensors[alias.target.key].shape[0]
    assert alias.target.slice is not None
    _dim, start, length = shrink_slice(alias.target.slice, factor, dim_size=real_rows)
    return slice(start, start + length)


def test_split_fused_qkv_into_peft_parts(tmp_path: Path) -> None:
    flux = arch("flux")
    fx = make_lora(
        flux,
        tmp_path / "in.safetensors",
        modules=lambda a: a.name.endswith(("_img_attn_qkv", "_linear1")),
        spelling="kohya",
        rank=6,
        limit=2,
        dtype=F64,
    )
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=64, to="peft")
    tensors = load_file(str(out))
    peft = {a.name: a for a in flux.aliases("dev", spelling="peft")}
    seen = 0
    for rec in result.outputs[0].modules:
        alias = peft[rec.name]
        em = next(m for m in fx.modules.values() if m.alias.target.key == alias.target.key)
        want = flat(em.delta)[_flux_rows(alias)]
        assert float((out_delta(tensors, rec.name) - want).norm()) <= 1e-10 * float(em.delta.norm())
        seen += 1
    assert seen >= 7  # q, k, v of the double block; q, k, v, mlp of the single block


def test_fuse_split_parts_into_kohya_qkv(tmp_path: Path) -> None:
    flux = arch("flux")
    names = [
        a.name
        for a in flux.aliases("dev", spelling="peft")
        if a.target.key.startswith("double_blocks.3.img_attn.qkv")
    ]
    assert len(names) == 3
    fx = make_lora(flux, tmp_path / "in.safetensors", modules=names, rank=3, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=64, to="kohya", arch="flux")  # q/k/v alone: SD3 has the same names
    (rec,) = result.outputs[0].modules
    assert rec.name == "lora_unet_double_blocks_3_img_attn_qkv"
    tensors = load_file(str(out))
    rows = flux.canonical_inventory("dev").tensors["double_blocks.3.img_attn.qkv.weight"].shape[0] // 64
    want = torch.zeros(rows, flat(next(iter(fx.modules.values())).delta).shape[1], dtype=F64)
    for name, em in fx.modules.items():
        want[_flux_rows(em.alias)] = flat(em.delta)
    assert rec.new_rank == 9
    assert float((out_delta(tensors, rec.name) - want).norm()) <= 1e-10 * float(want.norm())
    trunc_out = tmp_path / "low.safetensors"
    run([fx.path], trunc_out, rank=4, to="kohya", arch="flux")
    trunc, _ = truncated(want, 4)
    got = out_delta(load_file(str(trunc_out)), rec.name)
    assert float((got - trunc).norm()) <= 1e-9 * float(want.norm())


# ---------------------------------------------------------------------------------------- metadata, files
def test_metadata_is_kept_and_updated_and_hashes_are_valid(tmp_path: Path) -> None:
    meta = {
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_output_name": "mine",
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}),
        "custom": "kept",
        "sshs_model_hash": "stale",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": "mine",
    }
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", rank=8, limit=6, dtype=F64, metadata=meta)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, rank=3)
    from lorasmith.io.header import read_header

    got = read_header(out).metadata
    assert got["custom"] == "kept" and got["ss_output_name"] == "mine" and got["modelspec.title"] == "mine"
    assert got["ss_network_dim"] == "3"
    assert float(got["ss_network_alpha"]) == pytest.approx(4.0 / 8 * 3)
    assert "conv_dim" not in json.loads(got["ss_network_args"])  # no conv module is written
    record = json.loads(got["lorasmith_resize"])
    assert record["rank"] == 3 and record["inputs"][0]["file"] == "in.safetensors"
    model, legacy = sshs_hashes_of_file(out)
    assert got["sshs_model_hash"] == model == result.outputs[0].sshs_model_hash
    assert got["sshs_legacy_hash"] == legacy
    assert got["modelspec.hash_sha256"] == "0x" + model
    assert result.outputs[0].file_bytes == out.stat().st_size


def test_output_dir_names_globs_and_many_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        make_lora(arch("sd3"), src / f"l{i}.safetensors", rank=4, limit=3, seed=i, dtype=torch.float32)
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = resize(
        [str(src / "l*.safetensors")], output_dir=outdir, dynamic="sv_fro", param=0.9, rank=3, device="cpu"
    )
    names = sorted(Path(o.path).name for o in result.outputs)
    assert names == [f"l{i}_svfro0.9_r3.safetensors" for i in range(3)]
    fixed = resize([src / "l0.safetensors"], output_dir=outdir, rank=2, conv_rank=1, device="cpu")
    assert Path(fixed.outputs[0].path).name == "l0_r2_c1.safetensors"


def test_float32_precision_matches_float64(tmp_path: Path) -> None:
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", rank=8, limit=6, dtype=torch.float32)
    a = run([fx.path], tmp_path / "a.safetensors", rank=4, precision="float32")
    b = run([fx.path], tmp_path / "b.safetensors", rank=4, precision="float64")
    ta, tb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    for name in fx.modules:
        da, db = out_delta(ta, name), out_delta(tb, name)
        assert float((da - db).norm()) <= 1e-5 * float(db.norm())
    for ra, rb in zip(a.outputs[0].modules, b.outputs[0].modules, strict=True):
        assert ra.rel_error_lora == pytest.approx(rb.rel_error_lora, rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------------------- GPU batching
def test_batched_decomposition_equals_one_by_one() -> None:
    """The GPU path stacks same-shape problems; the batched result equals the one-problem result."""
    from lorasmith.ops.resize import _gram_batch

    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(30, 5, generator=g, dtype=F64) for _ in range(4)]
    downs = [torch.randn(5, 12, generator=g, dtype=F64) for _ in range(4)]
    downs[2][3] = downs[2][1] * 2  # a rank-deficient down factor: the eigendecomposition fallback
    scales = [torch.full((5,), 0.5 * (i + 1), dtype=F64) for i in range(4)]
    together = _gram_batch(ups, downs, scales, F64)
    for i in range(4):
        (alone,) = _gram_batch([ups[i]], [downs[i]], [scales[i]], F64)
        want = torch.linalg.svdvals((ups[i] * scales[i]) @ downs[i])[:5]
        # a zero singular value comes out at the square root of eigenvalue rounding: ~1e-8 of s_0
        tol = 1e-7 * float(want[0])
        assert torch.allclose(together[i].S, want, rtol=1e-9, atol=tol)
        assert torch.allclose(alone.S, want, rtol=1e-9, atol=tol)
        # the leading coefficients, asked for separately, agree too (the vectors of the kept triplets)
        live = int((want > 1e-6 * want[0]).sum())
        for a, b in zip(together[i].coefficients(live), alone.coefficients(live), strict=True):
            assert a.shape == (5, live)
            assert torch.allclose(a.abs(), b.abs(), rtol=1e-7, atol=1e-9)


def test_the_gpu_chunk_path_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorasmith.ops.resize as resize_mod

    monkeypatch.setattr(resize_mod, "_batch_size", lambda dev: 8)
    fx = make_lora(arch("sdxl"), tmp_path / "in.safetensors", rank=6, limit=12, dtype=F64)
    out = tmp_path / "out.safetensors"
    result = run([fx.path], out, dynamic="sv_fro", param=0.8)
    check_truncation(fx, out, result, lambda s: minimal_rank(s, "sv_fro", 0.8))


def test_bias_deltas_passthrough_modules_and_extra_tensors_are_kept(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    fx = make_lora(arch("sdxl"), tmp_path / "full.safetensors", algo="full", limit=4, dtype=F64)
    tensors = load_file(str(fx.path))
    name = next(iter(fx.modules))
    bias = torch.randn(fx.modules[name].delta.shape[0], dtype=F64)
    tensors[name + ".diff_b"] = bias
    tensors["lora_unet_extra_norm.w_norm"] = torch.randn(7, dtype=F64)  # a norm module: copied
    tensors["lora_unet_extra_norm.b_norm"] = torch.randn(7, dtype=F64)
    tensors["emb_params.string_to_param"] = torch.randn(2, 8, dtype=F64)  # not an adapter module: copied
    save_file(tensors, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    result = run([tmp_path / "in.safetensors"], out, rank=2)
    got = load_file(str(out))
    assert torch.equal(got[name + ".diff_b"], bias)
    for key in ("lora_unet_extra_norm.w_norm", "lora_unet_extra_norm.b_norm", "emb_params.string_to_param"):
        assert torch.equal(got[key], tensors[key]), key
    status = {m.name: m.status for m in result.outputs[0].modules}
    assert status["lora_unet_extra_norm"] == "copied"
    trunc, _ = truncated(flat(fx.modules[name].delta), 2)
    assert float((out_delta(got, name) - trunc).norm()) <= 1e-9 * float(trunc.norm())
