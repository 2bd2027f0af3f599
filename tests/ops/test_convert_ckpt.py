"""convert (checkpoints): dtypes per component with overflow counts, pickles read safely."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, UsageError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops._convert_dtype import cast_tensor
from lorasmith.ops.convert import convert
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora


def test_cast_counts_overflow_and_flush() -> None:
    t = torch.tensor([1e6, -1e6, 1e-9, 0.0, 1.0, float("inf"), float("nan")], dtype=torch.float32)
    out, st = cast_tensor(t, "F16")
    assert out.dtype == torch.float16
    assert st.overflowed == 2 and st.flushed == 1
    assert float(out[0]) == 65504.0 and float(out[1]) == -65504.0  # saturated, not inf
    assert torch.isinf(out[5]) and torch.isnan(out[6])  # already non-finite: kept
    f8, st8 = cast_tensor(t, "F8_E4M3")
    assert st8.overflowed == 2 and float(f8[0].float()) == 448.0
    ints = torch.arange(4)
    same, sti = cast_tensor(ints, "F16")
    assert same is ints and sti.tensors == 0


def test_checkpoint_per_component_dtype(tmp_path: Path) -> None:
    arch = get("sdxl")
    src = tmp_path / "sdxl.safetensors"
    make_checkpoint(arch, src, metadata={"modelspec.title": "t"})
    out = tmp_path / "o.safetensors"
    r = convert(src, out, dtype="fp16", unet_dtype="bf16", vae_dtype="fp32")
    assert r.kind == "checkpoint" and r.arch == "sdxl"
    h = read_header(out)
    inv = arch.canonical_inventory()
    src_h = read_header(src)
    for key, info in h.tensors.items():
        if not src_h.tensors[key].dtype.startswith(("F", "BF")):
            assert info.dtype == src_h.tensors[key].dtype  # ints untouched
            continue
        comp = inv.component_of(key)
        want = {"unet": "BF16", "vae": "F32"}.get(comp or "", "F16")
        assert info.dtype == want, key
    assert h.metadata["modelspec.title"] == "t" and "sshs_model_hash" in h.metadata
    back = load_all(out)
    orig = load_all(src)
    assert set(back) == set(orig)
    # an fp32 round trip of an fp32 VAE is bit-exact
    for key in orig:
        if inv.component_of(key) == "vae" and orig[key].dtype == torch.float32:
            assert torch.equal(orig[key], back[key])


def test_checkpoint_ints_untouched_and_nothing_to_do(tmp_path: Path) -> None:
    src = tmp_path / "c.safetensors"
    save_file({"a.weight": torch.ones(2, 2), "ids": torch.arange(3)}, src)
    out = tmp_path / "o.safetensors"
    r = convert(src, out, dtype="bf16")
    t = load_all(out)
    assert t["ids"].dtype == torch.int64 and t["a.weight"].dtype == torch.bfloat16
    assert r.cast.untouched == 1 and r.cast.tensors == 1
    with pytest.raises(UsageError):
        convert(src, tmp_path / "p.safetensors")
    with pytest.raises(UsageError, match="checkpoint"):
        convert(src, tmp_path / "p.safetensors", to="peft")
    with pytest.raises(UsageError, match="unknown --dtype"):
        convert(src, tmp_path / "p.safetensors", dtype="fp7")


def test_pickle_state_dict_unwrapped_and_non_tensors_dropped(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    w = torch.randn(3, 3)
    sd = {"a.weight": w, "b.bias": torch.randn(3), "nested": {"c": torch.ones(2)}}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, src)
    out = tmp_path / "m.safetensors"
    r = convert(src, out)
    t = load_all(out)
    assert set(t) == {"a.weight", "b.bias", "nested.c"}
    assert torch.equal(t["a.weight"], w)
    assert any("epoch" in d for d in r.dropped) and any("global_step" in d for d in r.dropped)
    r16 = convert(src, tmp_path / "h.safetensors", dtype="fp16")
    assert r16.dtypes == {"F16": 3}


def test_pickle_lora_alphas_keep_their_dtype(tmp_path: Path) -> None:
    """A LoRA pickle cast with --dtype keeps its alpha scalars (0.7 is not exact in fp16)."""
    src = tmp_path / "l.pt"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd = {
        f"{name}.lora_down.weight": torch.randn(2, 8),
        f"{name}.lora_up.weight": torch.randn(8, 2),
        f"{name}.alpha": torch.tensor(0.7),
    }
    torch.save(sd, src)
    convert(src, tmp_path / "l.safetensors", dtype="fp16")
    t = load_all(tmp_path / "l.safetensors")
    assert t[f"{name}.alpha"].dtype == torch.float32 and float(t[f"{name}.alpha"]) == float(torch.tensor(0.7))
    assert t[f"{name}.lora_up.weight"].dtype == torch.float16


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pt"
    # torch.save pickles the object into its zip container; __reduce__ only *describes* the call here
    torch.save({"w": torch.ones(1), "x": _Evil(marker)}, src)
    assert zipfile.is_zipfile(src) and not marker.exists()
    out = tmp_path / "o.safetensors"
    with pytest.raises(InvalidFileError, match="refused") as info:
        convert(src, out)
    assert "nothing was run" in (info.value.hint or "")
    assert not marker.exists() and not out.exists()
    # through the CLI too: exit 1, one clear line, no traceback, still nothing ran
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(out)])
    assert res.exit_code == 1 and "refused" in res.stderr and "Traceback" not in res.output
    assert not marker.exists()


def test_legacy_pickle_without_zip(tmp_path: Path) -> None:
    src = tmp_path / "old.pth"
    torch.save({"w": torch.arange(4.0)}, src, _use_new_zipfile_serialization=False)
    out = tmp_path / "o.safetensors"
    convert(src, out)
    assert torch.equal(load_all(out)["w"], torch.arange(4.0))


def test_garbage_pickle(tmp_path: Path) -> None:
    src = tmp_path / "bad.ckpt"
    src.write_bytes(b"not a pickle at all")
    with pytest.raises(InvalidFileError):
        convert(src, tmp_path / "o.safetensors")


def test_lora_given_with_component_dtypes(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", limit=2)
    with pytest.raises(UsageError, match="checkpoints"):
        convert(fx.path, tmp_path / "o.safetensors", unet_dtype="fp16")


def test_cli_checkpoint_json(tmp_path: Path) -> None:
    src = tmp_path / "c.safetensors"
    save_file({"a.weight": torch.full((2, 2), 1e5)}, src)
    res = CliRunner().invoke(
        app, ["convert", str(src), "-o", str(tmp_path / "o.safetensors"), "--dtype", "fp16", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["cast"]["overflowed"] == 4
