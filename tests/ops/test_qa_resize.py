"""resize: regressions found by the acceptance pass."""

from __future__ import annotations

from pathlib import Path

import torch
from _deltas import full_deltas

from lorasmith.io.reader import load_all
from lorasmith.ops.resize import resize
from lorasmith.registry import get
from lorasmith.testing import make_lora


def _assert_sum(path: Path, *pairs: tuple[object, float]) -> None:
    exp: dict[str, torch.Tensor] = {}
    for fx, w in pairs:
        for k, v in fx.dense_deltas().items():  # type: ignore[attr-defined]
            v = w * v.reshape(v.shape[0], -1)
            exp[k] = exp[k] + v if k in exp else v
    got = full_deltas(path)
    assert set(got) == set(exp)
    for k, e in exp.items():
        torch.testing.assert_close(got[k], e, rtol=1e-6, atol=1e-8)


def test_merge_spec_alternate_names_counted_once(tmp_path: Path) -> None:
    """SDXL PEFT names some weights twice (``to_k``, ``processor.to_k``): a later input's module was written
    under both names, doubling its delta."""
    xl = get("sdxl")
    fa = make_lora(xl, tmp_path / "a.safetensors", rank=2, limit=6, spelling="peft", seed=1)
    fb = make_lora(xl, tmp_path / "b.safetensors", rank=3, limit=12, spelling="comfy", seed=2)
    resize([f"{fa.path}:0.8,{fb.path}:-0.6"], output=tmp_path / "o.safetensors", rank=64, precision="float64")
    _assert_sum(tmp_path / "o.safetensors", (fa, 0.8), (fb, -0.6))


def test_to_peft_writes_each_module_once(tmp_path: Path) -> None:
    xl = get("sdxl")
    fx = make_lora(xl, tmp_path / "a.safetensors", rank=3, limit=12, spelling="kohya")
    resize([fx.path], output=tmp_path / "o.safetensors", rank=64, to="peft", precision="float64")
    downs = [k for k in load_all(tmp_path / "o.safetensors") if k.endswith(".lora_A.weight")]
    assert len(downs) == len(fx.modules)
    _assert_sum(tmp_path / "o.safetensors", (fx, 1.0))


def test_merge_spec_with_modules_the_first_spelling_cannot_name(tmp_path: Path) -> None:
    """A text-encoder module of a later input against a first input in SD1 ``kohya-ldm`` (UNet names only)
    was refused as having no counterpart, although no --to was given."""
    sd = get("sd1")
    fa = make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=8, spelling="kohya-ldm", seed=1)
    fb = make_lora(sd, tmp_path / "b.safetensors", rank=2, limit=12, spelling="kohya", seed=2)
    resize([f"{fa.path},{fb.path}:0.5"], output=tmp_path / "o.safetensors", rank=64, precision="float64")
    assert any(k.startswith("lora_te_") for k in load_all(tmp_path / "o.safetensors"))
    _assert_sum(tmp_path / "o.safetensors", (fa, 1.0), (fb, 0.5))


def test_size_target_is_never_exceeded_by_a_fraction(tmp_path: Path) -> None:
    """``size=0.015`` MiB is 15728.64 bytes: the budget was rounded up to 15729."""
    fx = make_lora(get("sdxl"), tmp_path / "a.safetensors", rank=8, limit=10, seed=3)
    res = resize([fx.path], output_dir=tmp_path, recipe="spn_lora=1,size=0.015", precision="float64")
    out = res.outputs[0]
    assert out.target_bytes == 15728
    assert out.file_bytes <= 0.015 * 1024 * 1024
    assert Path(out.path).stat().st_size == out.file_bytes


def test_cli_messages_for_a_bad_weight_and_a_file_as_output_dir(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasmith.cli import app

    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", rank=4, limit=4)
    runner = CliRunner()
    o = str(tmp_path / "o.safetensors")
    for spec, needle in (
        (f"{fx.path}:abc", "merge weight 'abc' is not a number"),
        (f"{fx.path}:1,{fx.path}:nan", "'nan'"),
    ):
        res = runner.invoke(app, ["resize", spec, "-o", o, "--rank", "2"])
        assert res.exit_code == 1 and needle in res.output and "hint:" in res.output, res.output
    res = runner.invoke(app, ["resize", str(fx.path), "--output-dir", str(fx.path), "--rank", "2"])
    assert res.exit_code == 1 and "is not a directory" in res.output, res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_lycoris_algo_metadata_follows_the_output(tmp_path: Path) -> None:
    """A LoHa file resized into LoRA modules kept ``lycoris.kohya`` and ``"algo": "loha"``."""
    import json

    from lorasmith.io.header import read_header

    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha", "preset": "full"}'}
    fx = make_lora(get("sdxl"), tmp_path / "a.safetensors", algo="loha", rank=4, limit=4, metadata=meta)
    resize([fx.path], output=tmp_path / "o.safetensors", rank=2)
    out = read_header(tmp_path / "o.safetensors").metadata
    assert out["ss_network_module"] == "networks.lora"
    assert json.loads(out["ss_network_args"]) == {"preset": "full"}
    # a LoCon file keeps its LyCORIS metadata
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'}
    fx = make_lora(get("sdxl"), tmp_path / "b.safetensors", rank=4, limit=4, metadata=meta)
    resize([fx.path], output=tmp_path / "p.safetensors", rank=2)
    out = read_header(tmp_path / "p.safetensors").metadata
    assert out["ss_network_module"] == "lycoris.kohya" and json.loads(out["ss_network_args"]) == {
        "algo": "locon"
    }


def test_to_comfy_means_the_default_spelling(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", rank=4, limit=12, spelling="peft")
    resize([fx.path], output=tmp_path / "o.safetensors", rank=8, to="comfy", precision="float64")
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in load_all(tmp_path / "o.safetensors"))
    _assert_sum(tmp_path / "o.safetensors", (fx, 1.0))


def test_to_an_unknown_word_is_a_usage_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasmith.cli import app

    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", rank=4, limit=4)
    o = str(tmp_path / "o.safetensors")
    res = CliRunner().invoke(app, ["resize", str(fx.path), "-o", o, "--rank", "2", "--to", "nope"])
    assert res.exit_code == 2 and "unknown target spelling 'nope'" in res.output and "hint:" in res.output
    assert not (tmp_path / "o.safetensors").exists()
