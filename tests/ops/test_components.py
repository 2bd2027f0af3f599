"""Checkpoint components: assemble, split, part detection, bake into separate text-encoder files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.archs.parts import PART_KINDS, form_inventory
from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, UsageError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops.components import assemble, bake_parts, split
from lorasmith.ops.inspect import inspect_file
from lorasmith.ops.merge import merge
from lorasmith.registry import detect_part, get
from lorasmith.testing import make_checkpoint, make_lora, shrink_shape


def write_part(kind: str, path: Path, seed: int = 0, form: str | None = None) -> dict[str, torch.Tensor]:
    """A shrunk separate part file of ``kind`` (in ``form``: default its file form) with every key."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, spec in form_inventory(PART_KINDS[kind], form).items():
        shape = shrink_shape(spec.shape)
        if spec.dtype.startswith("I"):
            tensors[key] = torch.zeros(shape, dtype=torch.int64)
        else:
            tensors[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
    save_file(tensors, path)
    return tensors


def same(a: Path, b: Path) -> None:
    """Same keys, dtypes, shapes and bytes."""
    ta, tb = load_all(a), load_all(b)
    assert set(ta) == set(tb), (set(ta) ^ set(tb)) and sorted(set(ta) ^ set(tb))[:5]
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k


def flux_parts(tmp: Path) -> dict[str, Path]:
    parts = {
        "transformer": tmp / "flux1-dev.safetensors",
        "vae": tmp / "ae.safetensors",
        "clip_l": tmp / "clip_l.safetensors",
        "t5xxl": tmp / "t5xxl_fp16.safetensors",
    }
    make_checkpoint(get("flux"), parts["transformer"], dtype=torch.bfloat16)
    write_part("vae16", parts["vae"], 1)
    write_part("clip_l", parts["clip_l"], 2)
    write_part("t5xxl", parts["t5xxl"], 3)
    return parts


def zimage_parts(tmp: Path) -> dict[str, Path]:
    parts = {
        "transformer": tmp / "z_image_turbo_bf16.safetensors",
        "vae": tmp / "ae.safetensors",
        "text_encoder": tmp / "qwen_3_4b.safetensors",
    }
    make_checkpoint(get("zimage"), parts["transformer"], dtype=torch.bfloat16)
    write_part("vae16", parts["vae"], 1)
    write_part("qwen3_4b", parts["text_encoder"], 2)
    return parts


# ------------------------------------------------------------------------------------- part detection
@pytest.mark.parametrize(
    ("kind", "form"), [(k, f.id) for k in sorted(PART_KINDS) for f in PART_KINDS[k].forms]
)
def test_every_part_kind_and_form_is_detected(kind: str, form: str, tmp_path: Path) -> None:
    write_part(kind, tmp_path / "p.safetensors", form=form)
    found = detect_part(read_header(tmp_path / "p.safetensors"))
    assert found is not None and (found.kind, found.form) == (kind, form)


def test_inspect_reports_a_shared_part_with_its_users(tmp_path: Path) -> None:
    write_part("clip_l", tmp_path / "clip_l.safetensors")
    r = inspect_file(tmp_path / "clip_l.safetensors")
    assert r.kind == "part" and r.components == ["clip_l"]
    assert r.reason == "clip_l text encoder (used by sd1, sdxl, flux, sd3)"
    assert r.used_by == ["sd1", "sdxl", "flux", "sd3"] and r.arch is None and not r.warnings
    write_part("qwen3_4b", tmp_path / "q.safetensors")
    r = inspect_file(tmp_path / "q.safetensors")
    assert r.kind == "part" and r.arch == "zimage"


def test_checkpoints_and_loras_are_no_parts(tmp_path: Path) -> None:
    make_checkpoint(get("sd1"), tmp_path / "sd1.safetensors")
    make_lora(get("flux"), tmp_path / "l.safetensors", limit=4)
    assert detect_part(read_header(tmp_path / "sd1.safetensors")) is None
    assert detect_part(read_header(tmp_path / "l.safetensors")) is None


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_split_then_assemble_gives_back_the_single_file(family: str, tmp_path: Path) -> None:
    single = tmp_path / f"{family}.safetensors"
    make_checkpoint(get(family), single, dtype=None)
    (tmp_path / "parts").mkdir()
    r = split(single, tmp_path / "parts")
    assert r.outputs[0].slot == "transformer" and Path(r.outputs[0].path).name == single.name
    back = assemble({o.slot: o.path for o in r.outputs}, tmp_path / "back.safetensors")
    same(single, tmp_path / "back.safetensors")
    assert back.arch == family
    # and again: assemble then split gives the parts back
    (tmp_path / "again").mkdir()
    r2 = split(tmp_path / "back.safetensors", tmp_path / "again")
    for a, b in zip(r.outputs, r2.outputs, strict=True):
        same(Path(a.path), Path(b.path))


@pytest.mark.parametrize("maker", [flux_parts, zimage_parts], ids=["flux", "zimage"])
def test_assemble_then_split_gives_back_the_parts(maker: object, tmp_path: Path) -> None:
    assert callable(maker)
    parts: dict[str, Path] = maker(tmp_path)
    res = assemble(parts, tmp_path / "single.safetensors")
    keys = set(read_header(tmp_path / "single.safetensors").tensors)
    assert all(k.startswith(("model.diffusion_model.", "vae.", "text_encoders.")) for k in keys)
    assert any(k.startswith("vae.decoder.") for k in keys)  # ComfyUI's vae_key_prefix for FLUX/Z-Image
    out = tmp_path / "out"
    out.mkdir()
    r = split(tmp_path / "single.safetensors", out)
    assert r.arch == res.arch
    got = {o.slot: Path(o.path) for o in r.outputs}
    assert set(got) == set(parts)
    for slot, path in parts.items():
        same(path, got[slot])
    # split then assemble gives back the single file
    assemble(got, tmp_path / "again.safetensors")
    same(tmp_path / "single.safetensors", tmp_path / "again.safetensors")


def test_split_names_and_keys_like_the_distributions(tmp_path: Path) -> None:
    assemble(flux_parts(tmp_path), tmp_path / "single.safetensors")
    (tmp_path / "out").mkdir()
    r = split(tmp_path / "single.safetensors", tmp_path / "out", te_dtype="fp8_e4m3fn")
    names = sorted(Path(o.path).name for o in r.outputs)
    assert names == [
        "ae.safetensors",
        "clip_l.safetensors",
        "single.safetensors",
        "t5xxl_fp8_e4m3fn.safetensors",
    ]
    t5 = read_header(tmp_path / "out" / "t5xxl_fp8_e4m3fn.safetensors")
    assert "shared.weight" in t5.tensors and {i.dtype for i in t5.tensors.values()} == {"F8_E4M3"}
    assert (
        "double_blocks.0.img_attn.qkv.weight" in read_header(tmp_path / "out" / "single.safetensors").tensors
    )


def test_assemble_with_component_dtypes(tmp_path: Path) -> None:
    r = assemble(flux_parts(tmp_path), tmp_path / "s.safetensors", te_dtype="bf16", vae_dtype="fp32")
    h = read_header(tmp_path / "s.safetensors")
    assert h.tensors["text_encoders.t5xxl.transformer.shared.weight"].dtype == "BF16"
    assert h.tensors["vae.decoder.conv_in.weight"].dtype == "F32"
    assert h.tensors["model.diffusion_model.img_in.weight"].dtype == "BF16"
    assert r.cast["tensors"] > 0


# ---------------------------------------------------------------------------------------- bad inputs
def test_vae_of_another_family(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    write_part("vae4", tmp_path / "sdxl_vae.safetensors")
    parts["vae"] = tmp_path / "sdxl_vae.safetensors"
    with pytest.raises(InvalidFileError, match=r"--vae sdxl_vae.safetensors: is the 4-channel VAE") as e:
        assemble(parts, tmp_path / "o.safetensors")
    assert "\n" not in e.value.message and "16-channel VAE" in e.value.message


def test_text_encoder_given_as_the_transformer(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    parts["transformer"] = parts["clip_l"]
    with pytest.raises(
        InvalidFileError, match=r"--transformer clip_l.safetensors: is the clip_l text encoder"
    ):
        assemble(parts, tmp_path / "o.safetensors")


def test_missing_required_part(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    del parts["t5xxl"]
    with pytest.raises(InvalidFileError, match=r"flux needs the t5xxl text encoder: give --t5xxl FILE"):
        assemble(parts, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_part_in_the_wrong_slot_and_unknown_slot(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    parts["clip_l"], parts["t5xxl"] = parts["t5xxl"], parts["clip_l"]
    with pytest.raises(InvalidFileError, match=r"--clip-l t5xxl_fp16.safetensors: is the t5xxl text encoder"):
        assemble(parts, tmp_path / "o.safetensors")
    parts["clip_l"], parts["t5xxl"] = parts["t5xxl"], parts["clip_l"]
    parts["clip_g"] = parts["clip_l"]
    with pytest.raises(UsageError, match="flux has no clip_g part"):
        assemble(parts, tmp_path / "o.safetensors")


# ------------------------------------------------------------------------------------------------ bake
def _te_lora(family: str, path: Path) -> None:
    """A kohya LoRA with transformer and text-encoder modules (shapes of the shrunk fixtures); SDXL's
    CLIP-G modules are row slices of OpenCLIP's fused in_proj_weight."""
    arch = get(family)
    names = arch.aliases(spelling="kohya")
    pick = [
        a
        for a in names
        if a.name.startswith("lora_unet_") and a.target.key.endswith(".weight") and a.target.slice is None
    ][:12]
    for prefix in ("lora_te1_", "lora_te2_", "lora_te3_"):
        ends = ("_q_proj", "_fc1", "SelfAttention_q")
        pick += [a for a in names if a.name.startswith(prefix) and a.name.endswith(ends)][:3]
    gen = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for a in pick:
        spec = arch.canonical_inventory().tensors.get(a.target.key)
        if spec is None:
            spec = arch.target_spec(a.target.key)  # type: ignore[attr-defined]
        shape = list(spec.shape)
        if len(shape) != 2:  # linear layers only
            continue
        if a.target.slice is not None:
            shape[a.target.slice[0]] = a.target.slice[2]
        out_f, in_f = shrink_shape(tuple(shape))[:2]
        tensors[a.name + ".lora_down.weight"] = torch.randn(2, in_f, generator=gen) * 0.1
        tensors[a.name + ".lora_up.weight"] = torch.randn(out_f, 2, generator=gen) * 0.1
        tensors[a.name + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, path)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bake_into_separate_text_encoders_equals_bake_and_split(family: str, tmp_path: Path) -> None:
    if family == "flux":
        parts = flux_parts(tmp_path)
    else:
        make_checkpoint(get("sd3"), tmp_path / "sd3.safetensors", dtype=torch.float16)
        (tmp_path / "p").mkdir()
        parts = {o.slot: Path(o.path) for o in split(tmp_path / "sd3.safetensors", tmp_path / "p").outputs}
    _te_lora(family, tmp_path / "lora.safetensors")
    assemble(parts, tmp_path / "single.safetensors")
    merge(
        [f"{tmp_path / 'lora.safetensors'}:0.7"],
        base=tmp_path / "single.safetensors",
        output=tmp_path / "baked.safetensors",
    )
    (tmp_path / "ref").mkdir()
    ref = {o.slot: Path(o.path) for o in split(tmp_path / "baked.safetensors", tmp_path / "ref").outputs}
    tes = [s for s in ("clip_l", "clip_g", "t5xxl") if s in parts]
    res = bake_parts(
        parts["transformer"],
        [f"{tmp_path / 'lora.safetensors'}:0.7"],
        tmp_path / "t.safetensors",
        parts={s: (parts[s], tmp_path / f"{s}_out.safetensors") for s in tes},
    )
    assert not res.unmatched and not res.skipped
    assert {o.slot: o.changed > 0 for o in res.outputs} == {"transformer": True, **dict.fromkeys(tes, True)}
    same(ref["transformer"], tmp_path / "t.safetensors")
    for s in tes:
        same(ref[s], tmp_path / f"{s}_out.safetensors")


def test_bake_reports_text_encoder_modules_without_a_file(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    _te_lora("flux", tmp_path / "lora.safetensors")
    res = bake_parts(
        parts["transformer"],
        [tmp_path / "lora.safetensors"],
        tmp_path / "t.safetensors",
        parts={"clip_l": (parts["clip_l"], tmp_path / "c.safetensors")},
    )
    assert res.skipped == {"t5xxl": 3} and any("--t5xxl" in w for w in res.warnings)
    with pytest.raises(Exception, match="match no weight"):
        bake_parts(
            parts["transformer"],
            [tmp_path / "lora.safetensors"],
            tmp_path / "t2.safetensors",
            parts={},
            strict=True,
        )


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_assemble_and_split(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    runner = CliRunner()
    args = ["convert", "--assemble", "--transformer", str(parts["transformer"]), "--vae", str(parts["vae"])]
    args += ["--clip-l", str(parts["clip_l"]), "--t5xxl", str(parts["t5xxl"])]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "s.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["arch"] == "flux"
    (tmp_path / "o").mkdir()
    res = runner.invoke(
        app, ["convert", "--split", str(tmp_path / "s.safetensors"), "--output-dir", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "ae.safetensors").is_file()
    bad = runner.invoke(app, [*args[:-2], "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 1 and "--t5xxl" in bad.stderr and "Traceback" not in bad.output


def test_cli_merge_with_separate_text_encoders(tmp_path: Path) -> None:
    parts = flux_parts(tmp_path)
    _te_lora("flux", tmp_path / "lora.safetensors")
    args = ["merge", "--base", str(parts["transformer"]), f"{tmp_path / 'lora.safetensors'}:0.5"]
    args += ["-o", str(tmp_path / "t.safetensors"), "--clip-l", str(parts["clip_l"])]
    runner = CliRunner()
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "--clip-l-out" in bad.stderr
    res = runner.invoke(app, [*args, "--clip-l-out", str(tmp_path / "c.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["mode"] == "bake" and out["skipped"] == {"t5xxl": 3}
    assert (tmp_path / "c.safetensors").is_file()
