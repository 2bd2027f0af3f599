"""Tests of ``lorasmith extract`` on every family's fixtures with planted low-rank deltas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorasmith.adapters.parse import parse_modules
from lorasmith.io.reader import load_all
from lorasmith.ops.extract import extract
from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint, make_tuned

FAMILIES = ("sd1", "sdxl", "flux", "sd3", "zimage")
FACTOR = 32


def _targets(family: str, n: int = 3, component: str | None = None) -> list[str]:
    """A few canonical 2-D weights of the family that have a whole-weight default-spelling alias."""
    arch = get_registry().get(family)
    inv = arch.canonical_inventory()
    names = {a.target.key for a in arch.aliases(None, arch.spellings[0]) if a.target.slice is None}
    keys = [
        k
        for k, s in inv.tensors.items()
        if len(s.shape) == 2
        and k in names
        and "embedding" not in k
        and "embed_tokens" not in k
        and min(s.shape) >= 512
        and (component is None or inv.component_of(k) == component)
    ]
    step = max(1, len(keys) // n)
    return keys[::step][:n]


def _fixture(tmp_path: Path, family: str, rank: int, keys: list[str], noise: float = 0.0):
    arch = get_registry().get(family)
    base = make_checkpoint(arch, tmp_path / "base.safetensors", factor=FACTOR, dtype=torch.float64)
    deltas = make_tuned(arch, base, tmp_path / "tuned.safetensors", modules=keys, rank=rank, noise=noise)
    return arch, base, deltas


def _lora_deltas(path: Path, family: str) -> dict[str, torch.Tensor]:
    """Canonical key -> the delta the written LoRA applies (full weights; fused slices placed)."""
    arch = get_registry().get(family)
    out: dict[str, torch.Tensor] = {}
    for name, mod in parse_modules(load_all(path)).items():
        alias = arch.resolve(name)
        assert alias is not None, name
        out[alias.target.key] = mod.delta(dtype=torch.float64)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_rank_recovered(tmp_path: Path, family: str) -> None:
    keys = _targets(family)
    _arch, _base, deltas = _fixture(tmp_path, family, 3, keys)
    out = tmp_path / "lora.safetensors"
    res = extract(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        output=out,
        rank=3,
        device="cpu",
        precision="float64",
        save_dtype="fp32",
    )
    assert res.modules == len(keys)
    got = _lora_deltas(out, family)
    for k in keys:
        d = deltas[k]
        err = float(torch.linalg.vector_norm(got[k].reshape(d.shape) - d) / torch.linalg.vector_norm(d))
        assert err < 1e-4, (k, err)
    assert all(r.rel_error < 1e-4 for r in res.records)


def _run(tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("device", "cpu")
    kw.setdefault("precision", "float64")
    kw.setdefault("save_dtype", "fp32")
    out = kw.pop("output", tmp_path / "lora.safetensors")
    return extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", output=out, **kw), out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.reshape(b.shape) - b) / torch.linalg.vector_norm(b))


def test_auto_rank_finds_planted_rank(tmp_path: Path) -> None:
    keys = _targets("sdxl")
    _fixture(tmp_path, "sdxl", 5, keys)
    res, _ = _run(tmp_path, auto=True, energy=0.999999, rank_max=16)
    assert {r.rank for r in res.records} == {5}
    assert res.max_rel_error < 1e-4


def test_lycoris_modes(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2)
    _fixture(tmp_path, "sdxl", 4, keys)
    res, _ = _run(tmp_path, ratio=1e-6)
    assert {r.rank for r in res.records} == {4}
    res, _ = _run(tmp_path, threshold=1e-9, output=tmp_path / "b.safetensors")
    assert {r.rank for r in res.records} == {4}
    # LyCORIS counts the prefixes strictly below the target: the one that reaches 99.9% is left out
    res, _ = _run(tmp_path, quantile=0.999, output=tmp_path / "c.safetensors")
    assert {r.rank for r in res.records} == {3}


def test_dense_diff_and_detail_add_up(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2)
    _a, _b, deltas = _fixture(tmp_path, "sdxl", 6, keys)
    # rank 3 of a rank-6 delta: the residual is rank 3, so LoRA + detail at rank 3 is exact
    res, out = _run(tmp_path, rank=3, detail=tmp_path / "detail.safetensors")
    main = _lora_deltas(out, "sdxl")
    resid = _lora_deltas(tmp_path / "detail.safetensors", "sdxl")
    for k in keys:
        assert _rel(main[k], deltas[k]) > 1e-3
        assert _rel(main[k].reshape(deltas[k].shape) + resid[k].reshape(deltas[k].shape), deltas[k]) < 1e-6
    # a rank too large for the module is stored as the exact dense diff
    res, out = _run(tmp_path, rank=100000, output=tmp_path / "dense.safetensors")
    assert res.diffs == len(keys)
    dense = _lora_deltas(out, "sdxl")
    for k in keys:
        assert _rel(dense[k], deltas[k]) < 1e-6


def test_text_encoder_only_change_is_extracted(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2, component="te1")
    _fixture(tmp_path, "sdxl", 2, keys)
    res, out = _run(tmp_path, rank=2)
    comps = {c.component: c for c in res.components}
    assert comps["te1"].extracted == len(keys)
    assert comps["unet"].extracted == 0
    assert comps["unet"].changed == 0
    assert set(_lora_deltas(out, "sdxl")) == set(keys)


def test_bare_unet_files(tmp_path: Path) -> None:
    arch = get_registry().get("sdxl")
    keys = _targets("sdxl", 2, component="unet")
    base = make_checkpoint(
        arch,
        tmp_path / "base.safetensors",
        factor=FACTOR,
        dtype=torch.float64,
        components=("unet",),
        key_prefix_strip="model.diffusion_model.",
    )
    bare = [k[len("model.diffusion_model.") :] for k in keys]
    deltas = make_tuned(arch, base, tmp_path / "tuned.safetensors", modules=bare, rank=2)
    _res, out = _run(tmp_path, rank=2)
    got = _lora_deltas(out, "sdxl")
    for k, bk in zip(keys, bare, strict=True):
        assert _rel(got[k], deltas[bk]) < 1e-4


def _orthogonal_parts(m: int, n: int, ranks: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Low-rank matrices with mutually orthogonal column and row spaces."""
    g = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    qu = torch.linalg.qr(torch.randn(m, total, generator=g, dtype=torch.float64)).Q
    qv = torch.linalg.qr(torch.randn(n, total, generator=g, dtype=torch.float64)).Q
    out, at = [], 0
    for r in ranks:
        s = torch.linspace(2.0, 1.0, r, dtype=torch.float64) * 0.05
        out.append((qu[:, at : at + r] * s) @ qv[:, at : at + r].T)
        at += r
    return out


def test_common_component_is_shared_part() -> None:
    from lorasmith.ops._extract_math import RankPolicy, combine, common_component

    a, b1, b2 = _orthogonal_parts(40, 30, [2, 2, 2])
    c = common_component(a + b1, a + b2, RankPolicy("fixed", 4.0), seed=0)
    assert _rel(c, a) < 1e-10
    u = combine(a + b1, a + b2, 0.25)
    assert _rel(u, 0.5 * (a + b1) + 1.5 * (a + b2)) < 1e-12


def test_common_and_union_end_to_end(tmp_path: Path) -> None:
    arch = get_registry().get("sdxl")
    key = _targets("sdxl", 1)[0]
    base = make_checkpoint(arch, tmp_path / "base.safetensors", factor=FACTOR, dtype=torch.float64)
    w = base[key]
    a, b1, b2 = _orthogonal_parts(w.shape[0], w.shape[1], [2, 2, 2], seed=3)
    make_checkpoint(
        arch, tmp_path / "tuned.safetensors", factor=FACTOR, dtype=torch.float64, planted={key: w + a + b1}
    )
    make_checkpoint(
        arch, tmp_path / "t2.safetensors", factor=FACTOR, dtype=torch.float64, planted={key: w + a + b2}
    )
    _res, out = _run(tmp_path, tuned2=tmp_path / "t2.safetensors", mode="common", rank=4)
    assert _rel(_lora_deltas(out, "sdxl")[key], a) < 1e-6
    _res, out = _run(
        tmp_path,
        tuned2=tmp_path / "t2.safetensors",
        mode="union",
        alpha=0.5,
        rank=6,
        output=tmp_path / "u.safetensors",
    )
    assert _rel(_lora_deltas(out, "sdxl")[key], 2 * a + b1 + b2) < 1e-6


def test_lora_as_tuned_and_checkpoint_outputs(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2)
    _a, base, deltas = _fixture(tmp_path, "sdxl", 3, keys)
    _res, lora = _run(tmp_path, rank=3)
    # re-extracting from the LoRA itself gives the same delta
    res2 = extract(
        tmp_path / "base.safetensors",
        lora,
        output=tmp_path / "re.safetensors",
        rank=3,
        device="cpu",
        precision="float64",
        save_dtype="fp32",
    )
    assert res2.modules == len(keys)
    re = _lora_deltas(tmp_path / "re.safetensors", "sdxl")
    for k in keys:
        assert _rel(re[k], deltas[k]) < 1e-4
    # base + exact delta reproduces the tuned weights; base + rank-1 delta does not
    _run(tmp_path, rank=1, as_checkpoint_full=True, output=tmp_path / "full.safetensors")
    _run(tmp_path, rank=1, as_checkpoint=True, output=tmp_path / "low.safetensors")
    full, low, tuned = (
        load_all(tmp_path / f) for f in ("full.safetensors", "low.safetensors", "tuned.safetensors")
    )
    assert set(full) == set(tuned)
    for k in keys:
        assert torch.allclose(full[k], tuned[k], atol=1e-12)
        assert not torch.allclose(low[k], tuned[k], atol=1e-6)
    other = next(k for k in tuned if k not in keys and tuned[k].is_floating_point())
    assert torch.equal(full[other], base[other])


def test_clamp_quantile_and_metadata(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2)
    _fixture(tmp_path, "sdxl", 3, keys)
    res, out = _run(tmp_path, rank=3, clamp_quantile=0.9)
    assert all(0 < r.rel_error < 1 for r in res.records)
    from lorasmith.io import read_header

    meta = read_header(out).metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"].endswith("/lora")
    assert len(meta["sshs_model_hash"]) == 64


def test_abs_quantile_is_exact() -> None:
    from lorasmith.ops._extract_math import _abs_quantile

    x = torch.arange(1, 101, dtype=torch.float64)
    assert _abs_quantile(-x, 0.99) == 99.0
    assert math.isclose(_abs_quantile(x, 1.0), 100.0)


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from lorasmith.cli import app

    r = CliRunner().invoke(app, ["extract", *args])
    return r.exit_code, r.output


def test_cli_and_bad_inputs(tmp_path: Path) -> None:
    keys = _targets("sdxl", 2)
    _arch, base, _deltas = _fixture(tmp_path, "sdxl", 2, keys)
    b, t = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    code, out = _cli(
        "--base",
        b,
        "--tuned",
        t,
        "-o",
        str(tmp_path / "o.safetensors"),
        "--rank",
        "2",
        "--device",
        "cpu",
        "--summary",
        "-q",
    )
    assert code == 0, out
    assert "modules 2" in out
    # identical files
    code, out = _cli(
        "--base", b, "--tuned", b, "-o", str(tmp_path / "x.safetensors"), "--device", "cpu", "-q"
    )
    assert code == 1 and "nothing to extract" in out and "Traceback" not in out
    # a LoRA as base
    code, out = _cli(
        "--base",
        str(tmp_path / "o.safetensors"),
        "--tuned",
        t,
        "-o",
        str(tmp_path / "y.safetensors"),
        "--device",
        "cpu",
        "-q",
    )
    assert code == 1 and "not a checkpoint" in out
    # different families
    make_checkpoint(get_registry().get("flux"), tmp_path / "flux.safetensors", factor=FACTOR)
    code, out = _cli(
        "--base",
        b,
        "--tuned",
        str(tmp_path / "flux.safetensors"),
        "-o",
        str(tmp_path / "z.safetensors"),
        "--device",
        "cpu",
        "-q",
    )
    assert code == 1 and "error:" in out
    # mismatched shapes and missing keys
    k = keys[0]
    shapes = dict(base)
    shapes[k] = torch.zeros(base[k].shape[0] + 1, base[k].shape[1], dtype=torch.float64)
    from safetensors.torch import save_file

    save_file(shapes, str(tmp_path / "bad.safetensors"))
    code, out = _cli(
        "--base",
        b,
        "--tuned",
        str(tmp_path / "bad.safetensors"),
        "-o",
        str(tmp_path / "w.safetensors"),
        "--device",
        "cpu",
        "-q",
    )
    assert code == 1 and "shape" in out
    del shapes[k]
    save_file(shapes, str(tmp_path / "miss.safetensors"))
    code, out = _cli(
        "--base",
        b,
        "--tuned",
        str(tmp_path / "miss.safetensors"),
        "-o",
        str(tmp_path / "v.safetensors"),
        "--device",
        "cpu",
        "-q",
    )
    assert code == 1 and "missing" in out
    # existing output
    code, out = _cli(
        "--base", b, "--tuned", t, "-o", str(tmp_path / "o.safetensors"), "--device", "cpu", "-q"
    )
    assert code == 1 and "already exists" in out
