"""merge: dynamic SVD ranks, output spelling, save dtypes, metadata, OFT/GLoRA bakes, untouched inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

# the dense-delta reader of the main merge tests (pytest puts this folder on sys.path)
from test_merge import _dense

from lorasmith.io.hashes import sshs_hashes_of_file
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops._merge_lora import load_lora
from lorasmith.ops.merge import merge
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dynamic_rank_is_truncated_sum(tmp_path: Path) -> None:
    a = get("sdxl")
    fa = make_lora(a, tmp_path / "a.safetensors", rank=6, limit=6, seed=1)
    fb = make_lora(a, tmp_path / "b.safetensors", rank=6, limit=6, seed=2)
    r = merge(
        [fa.path, f"{fb.path}:0.5"],
        output=tmp_path / "o.safetensors",
        dynamic="sv_fro:0.9",
        rank=8,
        precision="float64",
    )
    assert r.rel_errors and all(0 <= e < 0.5 for e in r.rel_errors.values())
    assert all(1 <= k <= 8 for k in r.ranks.values())
    exact = _dense(tmp_path / "a.safetensors")
    got = _dense(tmp_path / "o.safetensors")
    exp_b = _dense(tmp_path / "b.safetensors")
    for key, da in exact.items():
        total = da + 0.5 * exp_b[key]
        k = torch.linalg.matrix_rank(got[key]).item()
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        # sv_fro: the smallest rank keeping 90 % of the Frobenius norm (capped at 8)
        keep = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
        want = min(8, int((keep < 0.9).sum()) + 1)
        assert k == want
        torch.testing.assert_close(got[key], (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="dynamic"):
        merge([fa.path], output=tmp_path / "x.safetensors", dynamic="sv_what:1")


def test_to_spelling_keeps_deltas(tmp_path: Path) -> None:
    a = get("sdxl")
    fa = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=8, spelling="kohya", seed=1)
    r = merge([f"{fa.path}:0.5"], output=tmp_path / "o.safetensors", to="peft", precision="float64")
    assert r.spelling == "peft"
    keys = list(read_header(tmp_path / "o.safetensors").tensors)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    got = _dense(tmp_path / "o.safetensors")
    for key, d in _dense(fa.path).items():
        torch.testing.assert_close(got[key], 0.5 * d, rtol=1e-6, atol=1e-8)
    with pytest.raises(Exception, match="spelling"):
        merge([fa.path], output=tmp_path / "x.safetensors", to="nonsense")


def test_save_dtype_every_mode(tmp_path: Path) -> None:
    sd = get("sd1")
    base = make_checkpoint(sd, tmp_path / "m0.safetensors", seed=0)
    make_checkpoint(sd, tmp_path / "m1.safetensors", seed=1)
    fx = make_lora(sd, tmp_path / "l.safetensors", rank=2, limit=5)
    merge([fx.path], output=tmp_path / "lo.safetensors", save_dtype="bf16")
    merge([fx.path], base=tmp_path / "m0.safetensors", output=tmp_path / "b.safetensors", save_dtype="fp16")
    merge(
        models=[tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
        output=tmp_path / "c.safetensors",
        save_dtype="fp16",
    )
    lo = load_all(tmp_path / "lo.safetensors")
    assert {t.dtype for k, t in lo.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    for name in ("b.safetensors", "c.safetensors"):
        out = load_all(tmp_path / name)
        for k, t in out.items():
            assert t.dtype == (torch.float16 if base[k].is_floating_point() else base[k].dtype), (name, k)
    with pytest.raises(Exception, match="save-dtype"):
        merge([fx.path], output=tmp_path / "x.safetensors", save_dtype="int8")


def test_metadata(tmp_path: Path) -> None:
    a = get("sdxl")
    ma = {"ss_output_name": "alpha", "ss_tag_frequency": json.dumps({"set": {"cat": 2, "dog": 1}})}
    mb = {"ss_output_name": "beta", "ss_tag_frequency": json.dumps({"set": {"cat": 3}, "x": {"y": 1}})}
    fa = make_lora(a, tmp_path / "a.safetensors", rank=4, limit=4, seed=1, metadata=ma)
    fb = make_lora(a, tmp_path / "b.safetensors", rank=2, limit=4, seed=2, metadata=mb)
    r = merge([f"{fa.path}:0.7", f"{fb.path}:0.3"], output=tmp_path / "o.safetensors")
    meta = read_header(tmp_path / "o.safetensors").metadata
    assert meta["ss_output_name"] == "alpha"
    assert json.loads(meta["ss_tag_frequency"]) == {"set": {"cat": 5, "dog": 1}, "x": {"y": 1}}
    assert meta["ss_network_dim"] == "6" and meta["ss_network_alpha"] == "6"
    inputs = json.loads(meta["lorasmith.merge.inputs"])
    assert [(i["file"], i["ratio"]) for i in inputs] == [("a.safetensors", 0.7), ("b.safetensors", 0.3)]
    assert inputs[1]["metadata"]["ss_output_name"] == "beta"
    assert meta["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    model, legacy = sshs_hashes_of_file(tmp_path / "o.safetensors")
    assert meta["sshs_model_hash"] == model == r.sshs_model_hash
    assert meta["sshs_legacy_hash"] == legacy
    # checkpoint merges: method recorded, hashes valid
    sd = get("sd1")
    make_checkpoint(
        sd, tmp_path / "m0.safetensors", seed=0, metadata={"ss_x": "1", "sshs_model_hash": "stale"}
    )
    make_checkpoint(sd, tmp_path / "m1.safetensors", seed=1)
    merge(
        models=[tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], output=tmp_path / "c.safetensors"
    )
    cm = read_header(tmp_path / "c.safetensors").metadata
    assert cm["lorasmith.merge.method"] == "weighted-sum"
    assert cm["modelspec.merged_from"] == "m0.safetensors, m1.safetensors"
    assert cm["sshs_model_hash"] == sshs_hashes_of_file(tmp_path / "c.safetensors")[0] != "stale"


def _weight_dependent_lora(path: Path, base: dict[str, torch.Tensor], algo: str) -> dict[str, torch.Tensor]:
    """A few OFT or GLoRA modules on 2-D UNet weights of ``base`` (kohya names); returns the tensors."""
    sd = get("sd1")
    names = {al.target.key: al.name for al in sd.aliases(None, "kohya") if al.target.slice is None}
    keys = [k for k, v in base.items() if v.ndim == 2 and k in names and "attn1.to_" in k][:3]
    gen = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        n = names[k]
        rows, cols = base[k].shape
        if algo == "oft":
            blocks = 2 if rows % 2 == 0 else rows  # OFT blocks tile the output rows
            out[f"{n}.oft_blocks"] = torch.randn(rows // blocks, blocks, blocks, generator=gen) * 0.05
            out[f"{n}.alpha"] = torch.tensor(0.0)
        else:
            r = 2
            out[f"{n}.a1.weight"] = torch.randn(cols, r, generator=gen) * 0.1
            out[f"{n}.a2.weight"] = torch.randn(r, cols, generator=gen) * 0.1
            out[f"{n}.b1.weight"] = torch.randn(rows, r, generator=gen) * 0.1
            out[f"{n}.b2.weight"] = torch.randn(r, cols, generator=gen) * 0.1
            out[f"{n}.alpha"] = torch.tensor(1.0)
    save_file(out, path)
    return out


@pytest.mark.parametrize("algo", ["oft", "glora"])
def test_bake_weight_dependent(tmp_path: Path, algo: str) -> None:
    sd = get("sd1")
    base = make_checkpoint(sd, tmp_path / "base.safetensors")
    tensors = _weight_dependent_lora(tmp_path / "l.safetensors", base, algo)
    r = merge(
        [f"{tmp_path / 'l.safetensors'}:0.7"],
        base=tmp_path / "base.safetensors",
        output=tmp_path / "o.safetensors",
        precision="float64",
        arch="sd1",
    )
    assert r.changed == 3 and r.unmatched == []
    out = load_all(tmp_path / "o.safetensors")
    lora = load_lora(tmp_path / "l.safetensors", 1.0, "sd1")
    for name, mod in lora.modules.items():
        alias = lora.aliases[name]
        assert alias is not None
        key = alias.target.key
        ref = mod.apply(base[key].double(), 0.7, dtype=torch.float64)
        assert not torch.allclose(ref, base[key].double())
        torch.testing.assert_close(out[key].double(), ref, rtol=1e-5, atol=1e-6)
    # a weight-dependent module cannot be merged into a LoRA without a base
    with pytest.raises(Exception, match="bake"):
        merge([tmp_path / "l.safetensors"], output=tmp_path / "x.safetensors", arch="sd1")
    assert len(tensors) > 0


def test_inputs_never_modified(tmp_path: Path) -> None:
    sd = get("sd1")
    for i in range(3):
        make_checkpoint(sd, tmp_path / f"m{i}.safetensors", seed=i, dtype=torch.float16)
    make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=5, seed=1, dtype=torch.float16)
    make_lora(sd, tmp_path / "b.safetensors", rank=3, limit=5, seed=2, dtype=torch.float16)
    files = sorted(tmp_path.glob("*.safetensors"))
    before = {p.name: (_sha(p), p.stat().st_mtime_ns) for p in files}
    (tmp_path / "out").mkdir()
    m = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge([a, f"{b}:0.5"], output=tmp_path / "out" / "l.safetensors")
    merge([a, f"{b}:0.5"], rank=2, output=tmp_path / "out" / "s.safetensors")
    merge([a, f"{b}:-1"], base=m[0], output=tmp_path / "out" / "b.safetensors")
    for method in ("weighted-sum", "add-difference", "ties", "dare"):
        merge(models=m, method=method, output=tmp_path / "out" / f"{method}.safetensors")
    after = {p.name: (_sha(p), p.stat().st_mtime_ns) for p in files}
    assert after == before
