"""merge: exact LoRA merges, SVD merge, bake with fused slices, checkpoint methods, CLI errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _deltas import expected_sum, full_deltas
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.io.reader import load_all
from lorasmith.ops._merge_lora import load_lora
from lorasmith.ops.merge import merge
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

Key = tuple[str, tuple[int, int, int] | None]


def _dense(path: Path) -> dict[Key, torch.Tensor]:
    lora = load_lora(path, 1.0)
    out = {}
    for name, mod in lora.modules.items():
        d = mod.delta(dtype=torch.float64)
        out[lora.group_of(name)] = d.reshape(d.shape[0], -1)
    return out


def _expected(*pairs: tuple[Any, float]) -> dict[Key, torch.Tensor]:
    out: dict[Key, torch.Tensor] = {}
    for fx, w in pairs:
        for m in fx.modules.values():  # type: ignore[attr-defined]
            key = (m.target.key, m.alias.target.slice)
            d = w * m.delta.reshape(m.delta.shape[0], -1)
            out[key] = out[key] + d if key in out else d
    return out


@pytest.mark.parametrize("ratio", [0.7, -0.5, 1.0])
def test_single_lora_ratio_is_linear(tmp_path: Path, ratio: float) -> None:
    a = get("sdxl")
    fx = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=10)
    merge([f"{fx.path}:{ratio}"], output=tmp_path / "o.safetensors", precision="float64")
    got = _dense(tmp_path / "o.safetensors")
    exp = _expected((fx, ratio))
    assert set(got) == set(exp)
    for k in exp:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-6)


def test_several_loras_sum_ranks_spellings(tmp_path: Path) -> None:
    a = get("flux")
    fa = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=12, spelling="kohya", seed=1)
    fb = make_lora(a, tmp_path / "b.safetensors", rank=2, limit=12, spelling="peft", seed=2)
    fc = make_lora(a, tmp_path / "c.safetensors", rank=3, limit=12, spelling="kohya", seed=3, algo="loha")
    merge([f"{fa.path}:0.6", f"{fb.path}:-0.4", f"{fc.path}:1.5"], output=tmp_path / "o.safetensors")
    # the split PEFT modules land on the rows of the fused kohya ones (FLUX qkv, linear1)
    got = full_deltas(tmp_path / "o.safetensors")
    exp = expected_sum((fa, 0.6), (fb, -0.4), (fc, 1.5))
    assert set(got) == set(exp)
    for k in exp:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-4, atol=1e-5)


def test_svd_merge_is_truncated_sum(tmp_path: Path) -> None:
    a = get("sdxl")
    fa = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=6, seed=1)
    fb = make_lora(a, tmp_path / "b.safetensors", rank=4, limit=6, seed=2)
    merge([fa.path, f"{fb.path}:0.5"], output=tmp_path / "o.safetensors", rank=3, precision="float64")
    got = _dense(tmp_path / "o.safetensors")
    for k, total in _expected((fa, 1.0), (fb, 0.5)).items():
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        ref = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-6)


def test_block_weights_applied_once(tmp_path: Path) -> None:
    a = get("sdxl")
    fx = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=20)
    bw = "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"
    merge([f"{fx.path}:0.8"], output=tmp_path / "o.safetensors", blocks=bw, precision="float64")
    got = _dense(tmp_path / "o.safetensors")
    for k, e in _expected((fx, 0.8)).items():
        label = a.block_of(k[0])
        w = 0.5 if label in a.block_notations()["sdxl-12"] else 1.0
        torch.testing.assert_close(got[k], w * e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("fam", "spelling"), [("flux", "peft"), ("zimage", "musubi")])
def test_bake_fused_slices(tmp_path: Path, fam: str, spelling: str) -> None:
    a = get(fam)
    base = make_checkpoint(a, tmp_path / "base.safetensors", dtype=torch.float32)
    fa = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=40, spelling=spelling, seed=1)
    fb = make_lora(a, tmp_path / "b.safetensors", rank=2, limit=40, seed=2)
    assert any(m.target.slice for m in fa.modules.values())
    r = merge(
        [f"{fa.path}:0.8", f"{fb.path}:-0.5"],
        base=tmp_path / "base.safetensors",
        output=tmp_path / "o.safetensors",
        precision="float64",
    )
    assert r.unmatched == []
    out = load_all(tmp_path / "o.safetensors")
    exp = {k: v.to(torch.float64).clone() for k, v in base.items()}
    for fx, w in ((fa, 0.8), (fb, -0.5)):
        for m in fx.modules.values():
            part = exp[m.target.key] if m.target.slice is None else exp[m.target.key].narrow(*m.target.slice)
            part += w * m.delta
    for k, v in exp.items():
        torch.testing.assert_close(out[k].to(torch.float64), v, rtol=1e-5, atol=1e-6)


def test_bake_dora(tmp_path: Path) -> None:
    a = get("sdxl")
    base = make_checkpoint(a, tmp_path / "base.safetensors")
    fx = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=8, algo="dora")
    merge([fx.path], base=tmp_path / "base.safetensors", output=tmp_path / "o.safetensors")
    out = load_all(tmp_path / "o.safetensors")
    for k, v in fx.expected_weights(base).items():
        torch.testing.assert_close(out[k].to(torch.float64), v, rtol=1e-4, atol=1e-5)


def _ckpts(tmp_path: Path, n: int) -> list[dict[str, torch.Tensor]]:
    a = get("sd1")
    return [make_checkpoint(a, tmp_path / f"m{i}.safetensors", seed=i) for i in range(n)]


def test_checkpoint_weighted_sum_and_add_difference(tmp_path: Path) -> None:
    m = _ckpts(tmp_path, 3)
    p = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    merge(models=[f"{p[0]}:0.7", f"{p[1]}:0.3"], output=tmp_path / "ws.safetensors")
    merge(models=[p[0], f"{p[1]}:0.5", p[2]], method="add-difference", output=tmp_path / "ad.safetensors")
    ws, ad = load_all(tmp_path / "ws.safetensors"), load_all(tmp_path / "ad.safetensors")
    for k in m[0]:
        if m[0][k].is_floating_point():
            torch.testing.assert_close(ws[k], 0.7 * m[0][k] + 0.3 * m[1][k])
            torch.testing.assert_close(ad[k], m[0][k] + 0.5 * (m[1][k] - m[2][k]))


def test_checkpoint_ties_and_dare(tmp_path: Path) -> None:
    m = _ckpts(tmp_path, 3)
    p = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    merge(models=p, method="ties", density=0.5, output=tmp_path / "t.safetensors")
    merge(models=p, method="dare", drop=0.5, seed=3, output=tmp_path / "d1.safetensors")
    merge(models=p, method="dare", drop=0.5, seed=3, output=tmp_path / "d2.safetensors")
    t = load_all(tmp_path / "t.safetensors")
    d1, d2 = load_all(tmp_path / "d1.safetensors"), load_all(tmp_path / "d2.safetensors")
    key = next(k for k, v in m[0].items() if v.ndim == 2 and v.numel() > 100)
    a, b, c = (x[key].double() for x in m)
    taus = []
    for x in (b, c):
        tau = x - a
        kk = -(-tau.numel() // 2)
        thr = tau.abs().flatten().kthvalue(tau.numel() - kk + 1).values
        taus.append(torch.where(tau.abs() >= thr, tau, 0.0))
    sign = torch.sign(taus[0] + taus[1])
    agree = [(torch.sign(x) == sign) & (x != 0) for x in taus]
    num = torch.where(agree[0], taus[0], 0.0) + torch.where(agree[1], taus[1], 0.0)
    den = agree[0].double() + agree[1].double()
    ref = a + torch.where(den > 0, num / den.clamp(min=1), 0.0)
    torch.testing.assert_close(t[key].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(d1[key], d2[key])
    tau_sum = d1[key].double() - a
    kept = tau_sum != 0
    assert 0.2 < kept.double().mean() < 0.95  # about 1 - 0.5^2 of entries keep some delta


runner = CliRunner()


def _err(args: list[str]) -> str:
    res = runner.invoke(app, ["merge", *args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "error:" in res.output
    return res.output


def test_cli_errors(tmp_path: Path) -> None:
    sd = make_lora(get("sdxl"), tmp_path / "x.safetensors", rank=2, limit=4)
    fl = make_lora(get("flux"), tmp_path / "f.safetensors", rank=2, limit=4)
    o = str(tmp_path / "o.safetensors")
    assert "different families" in _err([str(sd.path), str(fl.path), "-o", o])
    assert "ratio count" in _err([str(sd.path), "--ratios", "0.5,0.5", "-o", o])
    assert "block" in _err([str(sd.path), "--blocks", "1,2,3", "-o", o])
    _ckpts(tmp_path, 1)
    make_checkpoint(get("sd1"), tmp_path / "u.safetensors", components=("unet",))
    make_checkpoint(get("sd1"), tmp_path / "s.safetensors", variant="sd2")
    m0, u, s2 = (str(tmp_path / n) for n in ("m0.safetensors", "u.safetensors", "s.safetensors"))
    assert "missing tensor" in _err(["--models", m0, u, "-o", o])
    assert "shape" in _err(["--models", m0, s2, "--unet-only", "-o", o])
    assert "sdxl" in _err([str(sd.path), "--base", m0, "-o", o])
    xl = get("sdxl")
    make_checkpoint(xl, tmp_path / "xu.safetensors", components=("unet",))
    te = make_lora(xl, tmp_path / "te.safetensors", rank=2, limit=30)
    assert any(m.alias.component != "unet" for m in te.modules.values())
    assert "match no weight" in _err(
        [str(te.path), "--base", str(tmp_path / "xu.safetensors"), "--strict", "-o", o]
    )


def test_cli_ok_json(tmp_path: Path) -> None:
    sd = make_lora(
        get("sdxl"),
        tmp_path / "x.safetensors",
        rank=2,
        limit=4,
        metadata={"ss_tag_frequency": '{"a": {"t": 1}}'},
    )
    res = runner.invoke(
        app, ["merge", f"{sd.path}:0.5", f"{sd.path}:0.5", "-o", str(tmp_path / "o.safetensors"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert '"mode": "lora"' in res.output
