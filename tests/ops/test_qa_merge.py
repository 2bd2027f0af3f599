"""merge: regressions found by the acceptance pass (bare and bundled checkpoints, ratio and option checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _deltas import expected_sum, full_deltas
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.io.reader import load_all
from lorasmith.ops.merge import merge
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

runner = CliRunner()
UNET = "model.diffusion_model."


def test_bake_into_bare_unet(tmp_path: Path) -> None:
    """An SD1 UNet saved without ``model.diffusion_model.`` takes the UNet modules (it changed nothing)."""
    sd = get("sd1")
    base = make_checkpoint(sd, tmp_path / "u.safetensors", components=("unet",), key_prefix_strip=UNET)
    fx = make_lora(sd, tmp_path / "l.safetensors", rank=3, limit=12)
    unet = [m for m in fx.modules.values() if m.target.key.startswith(UNET)]
    assert unet and len(unet) < len(fx.modules)
    r = merge(
        [f"{fx.path}:0.5"],
        base=tmp_path / "u.safetensors",
        output=tmp_path / "o.safetensors",
        precision="float64",
    )
    assert r.changed == len({m.target.key for m in unet})
    assert len(r.unmatched) == len(fx.modules) - len(unet)  # the text-encoder modules
    out = load_all(tmp_path / "o.safetensors")
    for m in unet:
        key = m.target.key[len(UNET) :]
        torch.testing.assert_close(
            out[key].double(), base[key].double() + 0.5 * m.delta, rtol=1e-5, atol=1e-7
        )


def test_checkpoint_merge_bare_unet_block_weights(tmp_path: Path) -> None:
    """Block weights reach the keys of a bare UNet file (they were weight 1 there)."""
    sd = get("sd1")
    a = make_checkpoint(sd, tmp_path / "a.safetensors", components=("unet",), key_prefix_strip=UNET, seed=1)
    b = make_checkpoint(sd, tmp_path / "b.safetensors", components=("unet",), key_prefix_strip=UNET, seed=2)
    merge(
        models=[f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:0.5"],
        blocks="IN04=0,OUT11=2",
        output=tmp_path / "o.safetensors",
    )
    out = load_all(tmp_path / "o.safetensors")
    seen = set()
    for k, va in a.items():
        if not va.is_floating_point():
            continue
        w = {"IN04": 0.0, "OUT11": 2.0}.get(sd.block_of(UNET + k) or "", 1.0)
        seen.add(w)
        merged = 0.5 * va.double() + 0.5 * b[k].double()
        torch.testing.assert_close(
            out[k].double(), va.double() + w * (merged - va.double()), rtol=1e-5, atol=1e-7
        )
    assert seen == {0.0, 1.0, 2.0}


def _bundle(src: dict[str, torch.Tensor], path: Path, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {UNET + k: v for k, v in src.items()}
    t["vae.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=gen)
    t["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(12, generator=gen)
    save_file(t, str(path))
    return t


def test_unet_only_flux_bundle_copies_vae_and_text_encoders(tmp_path: Path) -> None:
    """A FLUX file bundling ``vae.`` and ``text_encoders.`` keys: --unet-only merged them too."""
    fl = get("flux")
    a = _bundle(make_checkpoint(fl, tmp_path / "a0.safetensors", seed=1), tmp_path / "a.safetensors", 1)
    b = _bundle(make_checkpoint(fl, tmp_path / "b0.safetensors", seed=2), tmp_path / "b.safetensors", 2)
    r = merge(
        models=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
        unet_only=True,
        output=tmp_path / "o.safetensors",
    )
    out = load_all(tmp_path / "o.safetensors")
    assert r.changed == len(a) - 2
    for k, v in a.items():
        if k.startswith(UNET):
            torch.testing.assert_close(out[k], 0.5 * v + 0.5 * b[k])
        else:
            assert torch.equal(out[k], v), k


def test_unet_only_sd3_merges_the_mmdit_only(tmp_path: Path) -> None:
    s3 = get("sd3")
    a = make_checkpoint(s3, tmp_path / "a.safetensors", seed=1)
    b = make_checkpoint(s3, tmp_path / "b.safetensors", seed=2)
    inv = s3.canonical_inventory(None)
    merge(
        models=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
        unet_only=True,
        output=tmp_path / "o.st",
    )
    out = load_all(tmp_path / "o.st")
    comps = set()
    for k, v in a.items():
        comp = inv.component_of(k)
        if comp == "mmdit" and v.is_floating_point():
            torch.testing.assert_close(out[k], 0.5 * v + 0.5 * b[k])
        else:
            comps.add(comp)
            assert torch.equal(out[k], v), k
    assert {"vae", "clip_l"} <= comps


@pytest.mark.parametrize("blocks", ["", "  "])
def test_empty_blocks_is_an_error(tmp_path: Path, blocks: str) -> None:
    """``--blocks ''`` was silently ignored."""
    fx = make_lora(get("sd1"), tmp_path / "l.safetensors", rank=2, limit=4)
    res = runner.invoke(
        app, ["merge", str(fx.path), "--blocks", blocks, "-o", str(tmp_path / "o.safetensors")]
    )
    assert res.exit_code == 1, res.output
    assert "empty --blocks" in res.output and "hint:" in res.output
    assert not (tmp_path / "o.safetensors").exists()


def _fails(args: list[str], *needles: str) -> str:
    res = runner.invoke(app, ["merge", *args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("error:") and lines[-1].startswith("hint:"), res.output
    for needle in needles:
        assert needle in res.output, res.output
    return res.output


def test_ratio_and_option_errors(tmp_path: Path) -> None:
    """Non-finite --ratios reached the arithmetic; FILE:abc said "no such file"; several had no hint."""
    fx = make_lora(get("sd1"), tmp_path / "l.safetensors", rank=2, limit=4)
    make_checkpoint(get("sd1"), tmp_path / "m.safetensors", components=("unet",))
    lp, m = str(fx.path), str(tmp_path / "m.safetensors")
    o = ["-o", str(tmp_path / "o.safetensors")]
    _fails([lp, "--ratios", "nan", *o], "ratio nan is not a finite number")
    _fails([lp, "--ratios", "inf", *o], "not a finite number")
    _fails([f"{lp}:abc", *o], "ratio 'abc' is not a number")
    _fails([f"{lp}:nan", *o], "ratio 'nan' is not a number")
    _fails([lp, "--dynamic", "sv_fro:x", *o], "'x' is not a number")
    _fails([lp, "--dynamic", "sv_fro:1.5", *o], "between 0 and 1")
    _fails([lp, "--dynamic", "sv_ratio:0.5", *o], "at least 1")
    _fails(["--models", m, m, "--density", "2", *o], "--density")
    _fails([lp, "--blocks", "IN04=inf", *o], "not finite")
    _fails([lp, "--blocks", "BASE=0,base=1", *o], "BASE given twice")
    _fails([lp, "--precision", "fp16", *o], "too narrow")  # was accepted: sums in half precision
    flux = make_lora(get("flux"), tmp_path / "f.safetensors", rank=2, limit=4)
    _fails([str(flux.path), "--blocks", "INS", *o], "IN../OUT..", "ALL and NONE")
    assert not (tmp_path / "o.safetensors").exists()


def _assert_sum(path: Path, *pairs: tuple[object, float]) -> None:
    got, exp = full_deltas(path), expected_sum(*pairs)
    assert set(got) == set(exp)
    for k, e in exp.items():
        torch.testing.assert_close(got[k], e, rtol=1e-5, atol=1e-7)


def test_to_peft_splits_fused_flux_modules(tmp_path: Path) -> None:
    """--to peft wrote kohya names with PEFT suffixes for the fused qkv / linear1 modules."""
    fl = get("flux")
    fx = make_lora(fl, tmp_path / "a.safetensors", rank=3, limit=12, spelling="kohya")
    assert any(".qkv" in m.target.key or "linear1" in m.target.key for m in fx.modules.values())
    merge([f"{fx.path}:0.7"], output=tmp_path / "o.safetensors", to="peft", precision="float64")
    names = list(load_all(tmp_path / "o.safetensors"))
    assert names and all(n.startswith("transformer.") and ".lora_" in n for n in names), names[:4]
    assert not any("lora_unet" in n for n in names)
    _assert_sum(tmp_path / "o.safetensors", (fx, 0.7))
    # and back: split PEFT modules fused into the kohya names
    merge([tmp_path / "o.safetensors"], output=tmp_path / "k.safetensors", to="kohya", precision="float64")
    assert all(n.startswith("lora_unet_") for n in load_all(tmp_path / "k.safetensors"))
    _assert_sum(tmp_path / "k.safetensors", (fx, 0.7))


def test_fused_and_split_inputs_meet_on_rows(tmp_path: Path) -> None:
    fl = get("flux")
    fa = make_lora(fl, tmp_path / "a.safetensors", rank=3, limit=12, spelling="kohya", seed=1)
    fb = make_lora(fl, tmp_path / "b.safetensors", rank=2, limit=12, spelling="peft", seed=2)
    r = merge([f"{fa.path}:0.5", f"{fb.path}:-1"], output=tmp_path / "o.safetensors", precision="float64")
    names = list(load_all(tmp_path / "o.safetensors"))
    assert all(n.startswith("lora_unet_") for n in names)  # one spelling, the first input's
    assert r.modules == len({n.rsplit(".", 2)[0] for n in names if n.endswith("lora_down.weight")})
    _assert_sum(tmp_path / "o.safetensors", (fa, 0.5), (fb, -1.0))


def test_alternate_names_are_not_counted_twice(tmp_path: Path) -> None:
    """SDXL PEFT has two names for one weight (to_k, processor.to_k): a module of a later input was written
    under both, doubling its delta."""
    xl = get("sdxl")
    fa = make_lora(xl, tmp_path / "a.safetensors", rank=2, limit=6, spelling="peft", seed=1)
    fb = make_lora(xl, tmp_path / "b.safetensors", rank=3, limit=12, spelling="comfy", seed=2)
    merge([f"{fa.path}:0.8", f"{fb.path}:-0.6"], output=tmp_path / "o.safetensors", precision="float64")
    _assert_sum(tmp_path / "o.safetensors", (fa, 0.8), (fb, -0.6))
    merge([fb.path], output=tmp_path / "p.safetensors", to="peft", precision="float64")
    _assert_sum(tmp_path / "p.safetensors", (fb, 1.0))


def test_later_module_the_first_spelling_cannot_name_keeps_its_name(tmp_path: Path) -> None:
    """kohya-ldm names no text-encoder module: merging it with a kohya LoRA failed ("no counterpart")."""
    sd = get("sd1")
    fa = make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=8, spelling="kohya-ldm", seed=1)
    fb = make_lora(sd, tmp_path / "b.safetensors", rank=2, limit=12, spelling="kohya", seed=2)
    assert any(m.alias.component != "unet" for m in fb.modules.values())
    merge([fa.path, f"{fb.path}:0.5"], output=tmp_path / "o.safetensors", precision="float64")
    names = list(load_all(tmp_path / "o.safetensors"))
    assert any(n.startswith("lora_te_") for n in names)
    _assert_sum(tmp_path / "o.safetensors", (fa, 1.0), (fb, 0.5))
    res = runner.invoke(
        app, ["merge", str(fb.path), "--to", "kohya-ldm", "-o", str(tmp_path / "x.safetensors")]
    )
    assert res.exit_code == 1 and "no counterpart" in res.output and "hint:" in res.output


@pytest.mark.parametrize("algo", ["loha", "lokr", "full", "locon-tucker"])
def test_conv_modules_are_written_conv_shaped(tmp_path: Path, algo: str) -> None:
    """LoHa / LoKr conv modules store flattened factors; the merged LoRA was written 2-d for them."""
    sd = get("sd1")

    def pick(alias: object) -> bool:
        key = alias.target.key  # type: ignore[attr-defined]
        return "in_layers.2" in key or "attn1.to_q" in key

    fx = make_lora(sd, tmp_path / "a.safetensors", algo=algo, rank=2, limit=8, modules=pick)  # type: ignore[arg-type]
    merge([f"{fx.path}:0.5"], output=tmp_path / "o.safetensors", precision="float64")
    out = load_all(tmp_path / "o.safetensors")
    convs = [m for m in fx.modules.values() if len(m.target_shape) == 4 and m.target_shape[2] > 1]
    assert convs
    for m in convs:
        down = out[m.name + ".lora_down.weight"]
        assert down.ndim == 4 and tuple(down.shape[1:]) == m.target_shape[1:], (m.name, down.shape)
        assert out[m.name + ".lora_up.weight"].shape[2:] == (1, 1)
    _assert_sum(tmp_path / "o.safetensors", (fx, 0.5))


def test_bias_deltas_are_merged(tmp_path: Path) -> None:
    """``diff_b`` of full-diff modules was dropped from a LoRA merge."""
    sd = get("sd1")
    fa = make_lora(sd, tmp_path / "a0.safetensors", algo="full", limit=3, seed=1)
    fb = make_lora(sd, tmp_path / "b0.safetensors", algo="full", limit=3, seed=2)
    biases: dict[tuple[str, str], torch.Tensor] = {}
    for fx, name in ((fa, "a"), (fb, "b")):
        t = dict(load_all(fx.path))
        for m in fx.modules.values():
            b = torch.randn(m.delta.shape[0], generator=torch.Generator().manual_seed(len(biases))) * 0.01
            biases[(name, m.name)] = b.double()
            t[m.name + ".diff_b"] = b
        save_file(t, str(tmp_path / f"{name}.safetensors"))
    merge(
        [f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:-2"],
        output=tmp_path / "o.safetensors",
        precision="float64",
    )
    out = load_all(tmp_path / "o.safetensors")
    for m in fa.modules.values():
        want = 0.5 * biases[("a", m.name)] - 2 * biases[("b", m.name)]
        torch.testing.assert_close(out[m.name + ".diff_b"].double(), want, rtol=1e-6, atol=1e-8)
    _assert_sum(tmp_path / "o.safetensors", (fa, 0.5), (fb, -2.0))


def test_norm_modules_are_scaled_not_turned_into_lora(tmp_path: Path) -> None:
    """A norm module (``w_norm``/``b_norm``) became a bogus 1-column LoRA; at a ratio it was refused."""
    sd = get("sd1")
    fx = make_lora(sd, tmp_path / "a0.safetensors", rank=2, limit=4)
    t = dict(load_all(fx.path))
    name = "lora_unet_down_blocks_0_attentions_0_norm"
    t[name + ".w_norm"] = torch.randn(5, generator=torch.Generator().manual_seed(1))
    t[name + ".b_norm"] = torch.randn(5, generator=torch.Generator().manual_seed(2))
    save_file(t, str(tmp_path / "a.safetensors"))
    merge([f"{tmp_path / 'a.safetensors'}:0.5"], output=tmp_path / "o.safetensors", precision="float64")
    out = load_all(tmp_path / "o.safetensors")
    for sfx in (".w_norm", ".b_norm"):
        torch.testing.assert_close(out[name + sfx], 0.5 * t[name + sfx])
    assert not any(k.startswith(name + ".lora") for k in out)


def test_merged_loha_metadata_says_lora(tmp_path: Path) -> None:
    """The merged file is plain LoRA but kept ``"algo": "loha"`` in ss_network_args."""
    import json

    from lorasmith.io.header import read_header

    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha", "preset": "full"}'}
    fx = make_lora(get("sdxl"), tmp_path / "a.safetensors", algo="loha", rank=4, limit=4, metadata=meta)
    merge([f"{fx.path}:0.5"], output=tmp_path / "o.safetensors")
    out = read_header(tmp_path / "o.safetensors").metadata
    assert out["ss_network_module"] == "networks.lora"
    assert json.loads(out["ss_network_args"]) == {"preset": "full"}


def test_bake_refuses_a_lora_of_another_variant(tmp_path: Path) -> None:
    """An SD2 LoRA baked into SD1: its text-encoder names mean other weights there; it was baked partly."""
    sd = get("sd1")
    make_checkpoint(sd, tmp_path / "sd1.safetensors")
    fx = make_lora(sd, tmp_path / "l.safetensors", variant="sd2", rank=2, limit=12)
    assert any(m.alias.component != "unet" for m in fx.modules.values())
    _fails(
        ["--base", str(tmp_path / "sd1.safetensors"), str(fx.path), "-o", str(tmp_path / "o.safetensors")],
        "is a LoRA for sd2",
        "sd1 checkpoint",
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_bake_dev_lora_into_schnell_reports_guidance_as_unmatched(tmp_path: Path) -> None:
    """FLUX dev and schnell share their module names: a dev LoRA bakes into schnell (guidance unmatched)."""
    fl = get("flux")
    make_checkpoint(fl, tmp_path / "s.safetensors", variant="schnell")
    fx = make_lora(fl, tmp_path / "l.safetensors", rank=2)
    r = merge([fx.path], base=tmp_path / "s.safetensors", output=tmp_path / "o.safetensors")
    assert r.unmatched and all("guidance_in" in u for u in r.unmatched)
    assert r.changed == len({m.target.key for m in fx.modules.values()}) - len(r.unmatched)


def test_to_takes_the_words_convert_takes(tmp_path: Path) -> None:
    """``--to comfy`` means the spelling ComfyUI loads for every component (convert's meaning); merge read it
    as the diffusion-model-only ``comfy`` key spelling and refused the text-encoder modules."""
    sd = get("sd1")
    fx = make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=12, spelling="peft")
    assert any(m.alias.component != "unet" for m in fx.modules.values())
    merge([fx.path], output=tmp_path / "o.safetensors", to="comfy", precision="float64")
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in load_all(tmp_path / "o.safetensors"))
    _assert_sum(tmp_path / "o.safetensors", (fx, 1.0))
    merge([fx.path], output=tmp_path / "d.safetensors", to="diffusers", precision="float64")
    _assert_sum(tmp_path / "d.safetensors", (fx, 1.0))
    res = runner.invoke(app, ["merge", str(fx.path), "--to", "nope", "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "unknown target spelling" in res.output and "hint:" in res.output


@pytest.mark.parametrize("spelling", ["kohya", "kohya-ldm"])
def test_the_same_file_twice_keeps_each_ratio(tmp_path: Path, spelling: str) -> None:
    """The second of two inputs with the same path took the first one's ratio (1 + 1 instead of 1 + 0.5)."""
    sd = get("sd1")
    fa = make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=8, spelling=spelling, seed=1)
    fb = make_lora(sd, tmp_path / "b.safetensors", rank=2, limit=12, spelling="kohya", seed=2)
    merge(
        [fa.path, f"{fb.path}:0.25", f"{fa.path}:0.5", f"{fb.path}:-1"],
        output=tmp_path / "o.safetensors",
        precision="float64",
    )
    _assert_sum(tmp_path / "o.safetensors", (fa, 1.5), (fb, -0.75))
