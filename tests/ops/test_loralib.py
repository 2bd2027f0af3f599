"""lorasmith.ops.loralib: inputs, loading, unit planning (merge / split / fuse), encoding, metadata, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasmith.errors import AdapterError, ArchMismatchError, InvalidFileError, LorasmithError
from lorasmith.io.writer import save_file as ls_save_file
from lorasmith.ops.loralib import (
    encode_unit,
    expand_inputs,
    expected_file_bytes,
    file_context,
    format_number,
    load_lora,
    lora_tensor_specs,
    output_metadata,
    parse_merge_spec,
    plan_units,
    suffix_style_of,
    unit_dense,
    unit_lowrank,
)
from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint, make_lora

F64 = torch.float64


def fam(name: str):  # type: ignore[no-untyped-def]
    return get_registry().get(name)


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("a.safetensors:0.7,b.safetensors:0.3", [("a.safetensors", 0.7), ("b.safetensors", 0.3)]),
        ("a.safetensors,b.safetensors:-1.5e-1", [("a.safetensors", 1.0), ("b.safetensors", -0.15)]),
        (r"C:\loras\a.safetensors:2", [(r"C:\loras\a.safetensors", 2.0)]),
        (r"C:\loras\a.safetensors", [(r"C:\loras\a.safetensors", 1.0)]),
        (" a.safetensors : .5 ", [("a.safetensors", 0.5)]),
    ],
)
def test_parse_merge_spec(text: str, parsed: list[tuple[str, float]]) -> None:
    assert parse_merge_spec(text) == parsed


def test_parse_merge_spec_rejects_empty_items() -> None:
    with pytest.raises(LorasmithError, match="empty item"):
        parse_merge_spec("a.safetensors:1,,b.safetensors")


def test_expand_inputs(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    specs = expand_inputs([str(tmp_path / "*.safetensors"), f"{tmp_path / 'a.safetensors'}:0.5,x:2"])
    assert [s.label for s in specs] == ["a", "b", "c", "a0.5+x2"]
    assert specs[3].is_merge and not specs[0].is_merge
    assert specs[3].parts == ((tmp_path / "a.safetensors", 0.5), (Path("x"), 2.0))
    with pytest.raises(InvalidFileError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.ckpt")])
    single = expand_inputs([str(tmp_path / "a.safetensors:0.25")])[0]
    assert single.is_merge and single.label == "a0.25"


def test_format_number() -> None:
    assert [format_number(x) for x in (1.0, 0.25, -3.5, 1e-7, float("inf"))] == [
        "1",
        "0.25",
        "-3.5",
        "1e-07",
        "inf",
    ]


# ----------------------------------------------------------------------------------------------- loading
def test_load_lora_detects_family_spelling_and_aliases(tmp_path: Path) -> None:
    fx = make_lora(fam("sdxl"), tmp_path / "l.safetensors", spelling="peft", rank=4, limit=5)
    with load_lora(fx.path) as f:
        assert f.arch is not None and f.arch.id == "sdxl" and f.spelling == "peft"
        assert set(f.modules) == set(fx.modules)
        for name, info in f.modules.items():
            assert info.alias == fx.modules[name].alias
            assert info.summary.algo == "lora"
        read = f.read_module(next(iter(f.modules)))
        assert read.dora is None and read.bias is None
    assert suffix_style_of("peft") == "peft" and suffix_style_of("comfy") == "kohya"


def test_a_checkpoint_is_not_a_lora(tmp_path: Path) -> None:
    make_checkpoint(fam("sd1"), tmp_path / "ckpt.safetensors", components=("unet",))
    with pytest.raises(InvalidFileError, match="checkpoint, not a LoRA"):
        load_lora(tmp_path / "ckpt.safetensors")


def test_a_file_without_lora_modules(tmp_path: Path) -> None:
    save_file({"something": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InvalidFileError, match="no LoRA modules"):
        load_lora(tmp_path / "x.safetensors")


def test_unknown_family_keeps_names(tmp_path: Path) -> None:
    save_file(
        {"my_layer.lora_down.weight": torch.randn(2, 6), "my_layer.lora_up.weight": torch.randn(4, 2)},
        str(tmp_path / "x.safetensors"),
    )
    with load_lora(tmp_path / "x.safetensors") as f:
        assert f.arch is None and f.warnings
        units = plan_units([(f, 1.0)])
        assert [u.name for u in units] == ["my_layer"] and units[0].alias is None
        with pytest.raises(LorasmithError, match="family is unknown"):
            plan_units([(f, 1.0)], spelling="peft")


# ----------------------------------------------------------------------------------------------- units
def test_merge_units_place_each_contribution(tmp_path: Path) -> None:
    sdxl = fam("sdxl")
    a = make_lora(sdxl, tmp_path / "a.safetensors", rank=3, limit=4, seed=1, dtype=F64)
    b = make_lora(sdxl, tmp_path / "b.safetensors", rank=2, limit=4, seed=2, dtype=F64)
    with load_lora(a.path) as fa, load_lora(b.path) as fb:
        units = plan_units([(fa, 0.5), (fb, 2.0)])
        assert sorted(u.name for u in units) == sorted(a.modules)
        for u in units:
            assert [c.weight for c in u.contributions] == [0.5, 2.0]
            assert u.input_rank == 5 and u.lowrank
            reads = [c.file.read_module(c.module) for c in u.contributions]
            up, down = unit_lowrank(u, reads, F64)
            want = 0.5 * a.modules[u.name].delta + 2.0 * b.modules[u.name].delta
            assert torch.allclose(up @ down, want.reshape(want.shape[0], -1), atol=1e-12)
            assert torch.allclose(unit_dense(u, reads, F64), up @ down, atol=1e-12)


def test_merge_of_different_families_is_refused(tmp_path: Path) -> None:
    a = make_lora(fam("sdxl"), tmp_path / "a.safetensors", rank=2, limit=2)
    b = make_lora(fam("sd1"), tmp_path / "b.safetensors", rank=2, limit=2)
    with load_lora(a.path) as fa, load_lora(b.path) as fb, pytest.raises(ArchMismatchError):
        plan_units([(fa, 1.0), (fb, 1.0)])


def test_split_and_fuse_geometry(tmp_path: Path) -> None:
    flux = fam("flux")
    fused = make_lora(flux, tmp_path / "f.safetensors", modules=["lora_unet_single_blocks_0_linear1"], rank=2)
    with load_lora(fused.path) as f:
        units = plan_units([(f, 1.0)], spelling="peft")
        # linear1 rows: q, k, v (3072 each) and the MLP (12288), shrunk by 64
        assert [(u.out_features, u.contributions[0].src_start, u.base_slice) for u in units] == [
            (48, 0, (0, 0, 48)),
            (48, 48, (0, 48, 48)),
            (48, 96, (0, 96, 48)),
            (192, 144, (0, 144, 192)),
        ]
    parts = [
        a.name
        for a in flux.aliases("dev", spelling="peft")
        if a.target.key == "single_blocks.0.linear1.weight"
    ]
    split = make_lora(flux, tmp_path / "s.safetensors", modules=parts, rank=2)
    with load_lora(split.path, arch="flux") as f:
        (unit,) = plan_units([(f, 1.0)], spelling="kohya")
        assert unit.name == "lora_unet_single_blocks_0_linear1" and unit.out_features == 336
        assert sorted(c.dst_start for c in unit.contributions) == [0, 48, 96, 144]
        assert unit.input_rank == 8


def test_a_spelling_the_family_lacks(tmp_path: Path) -> None:
    fx = make_lora(fam("sd1"), tmp_path / "a.safetensors", rank=2, limit=2)
    with load_lora(fx.path) as f, pytest.raises(LorasmithError, match="has no LoRA spelling 'aitk'"):
        plan_units([(f, 1.0)], spelling="aitk")


def test_loha_conv_kernel_comes_from_the_inventory(tmp_path: Path) -> None:
    sdxl = fam("sdxl")
    fx = make_lora(
        sdxl,
        tmp_path / "h.safetensors",
        algo="loha",
        modules=["lora_unet_input_blocks_1_0_in_layers_2"],
        rank=2,
    )
    # one module alone: SD1's kohya-ldm spelling has the same name, so the family is named
    with load_lora(fx.path, arch="sdxl") as f:
        (unit,) = plan_units([(f, 1.0)])
        assert unit.kernel == (3, 3) and unit.conv_shaped and unit.is_conv
        assert unit.in_features * 9 == unit.in_flat


# -------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("style", ["kohya", "peft"])
@pytest.mark.parametrize("conv", [False, True])
def test_encode_unit_matches_its_specs(tmp_path: Path, style: str, conv: bool) -> None:
    sdxl = fam("sdxl")
    name = "lora_unet_input_blocks_1_0_in_layers_2" if conv else "lora_unet_input_blocks_4_1_proj_in"
    fx = make_lora(sdxl, tmp_path / "x.safetensors", modules=[name], rank=4, dtype=F64)
    with load_lora(fx.path, arch="sdxl") as f:
        (unit,) = plan_units([(f, 1.0)])
        specs = lora_tensor_specs(unit, 3, style, "F64")  # type: ignore[arg-type]
        up = torch.randn(unit.out_features, 3, dtype=F64)
        down = torch.randn(3, unit.in_flat, dtype=F64)
        tensors = encode_unit(unit, up, down, 1.5, style, F64)  # type: ignore[arg-type]
        assert {k: ("F64" if t.dtype == F64 else "F32", tuple(t.shape)) for k, t in tensors.items()} == specs
        key = name + (".lora_down.weight" if style == "kohya" else ".lora_A.weight")
        assert tensors[key].ndim == (4 if conv else 2)


def test_expected_file_bytes_is_exact(tmp_path: Path) -> None:
    tensors = {"a.lora_down.weight": torch.zeros(3, 17, dtype=torch.float16), "a.alpha": torch.tensor(2.0)}
    meta = {"ss_network_dim": "3", "modelspec.sai_model_spec": "1.0.0", "x": "é" * 11}
    written = ls_save_file(tensors, tmp_path / "o.safetensors", metadata=meta)
    specs = [("a.lora_down.weight", "F16", (3, 17)), ("a.alpha", "F32", ())]
    assert (
        expected_file_bytes(specs, meta) == written.file_bytes == (tmp_path / "o.safetensors").stat().st_size
    )


def test_output_metadata() -> None:
    base = {
        "ss_network_dim": "16",
        "ss_network_alpha": "8.0",
        "ss_network_args": json.dumps({"conv_dim": "16", "algo": "lora"}),
        "sshs_model_hash": "old",
        "sshs_legacy_hash": "old",
        "modelspec.hash_sha256": "0xold",
        "other": "kept",
    }
    meta = output_metadata(
        base,
        linear=[(4, 2.0), (4, 2.0)],
        conv=[(2, 1.0), (3, 1.5)],
        record_key="lorasmith_x",
        record={"a": 1},
    )
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "Dynamic",
        "conv_alpha": "Dynamic",
        "algo": "lora",
    }
    assert meta["other"] == "kept" and json.loads(meta["lorasmith_x"]) == {"a": 1}
    assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & set(meta)
    dyn = output_metadata({}, linear=[(4, 2.0), (5, 2.5)], conv=[], record_key="lorasmith_x", record={})
    assert dyn["ss_network_dim"] == "Dynamic" and dyn["ss_network_alpha"] == "Dynamic"
    with pytest.raises(ValueError, match="must start with"):
        output_metadata({}, linear=[], conv=[], record_key="resize", record={})


def _broken(tmp_path: Path, name: str, change) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """An SDXL LoRA with one module changed by ``change(tensors, module)``; returns (path, module)."""
    fx = make_lora(fam("sdxl"), tmp_path / "a.safetensors", rank=2, limit=3)
    tensors = dict(fx.tensors)
    module = next(iter(fx.modules))
    change(tensors, module)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path, module


def _zero_rank(t: dict[str, torch.Tensor], m: str) -> None:
    t[m + ".lora_down.weight"] = t[m + ".lora_down.weight"][:0].contiguous()
    t[m + ".lora_up.weight"] = t[m + ".lora_up.weight"][:, :0].contiguous()


def test_a_rank_0_module_is_refused_on_loading(tmp_path: Path) -> None:
    """The shared loader refuses it, so every command does (resize, merge, extract, convert)."""
    path, module = _broken(tmp_path, "zero.safetensors", _zero_rank)
    with pytest.raises(AdapterError, match="rank 0") as info:
        load_lora(path)
    assert info.value.message.startswith(f"{path}: adapter module {module!r}: rank 0")
    assert "\n" not in info.value.message and info.value.hint
    from lorasmith.ops.convert import convert
    from lorasmith.ops.resize import resize

    with pytest.raises(AdapterError, match="rank 0"):
        resize([path], output=tmp_path / "o.safetensors", rank=1)
    with pytest.raises(AdapterError, match="rank 0"):
        convert(path, tmp_path / "c.safetensors", dtype="fp16")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def _rank_mismatch(t: dict[str, torch.Tensor], m: str) -> None:
    t[m + ".lora_down.weight"] = t[m + ".lora_down.weight"][:1].contiguous()


def _only_down(t: dict[str, torch.Tensor], m: str) -> None:
    del t[m + ".lora_up.weight"]


def _alpha_matrix(t: dict[str, torch.Tensor], m: str) -> None:
    t[m + ".alpha"] = torch.ones(2, 2)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_rank_mismatch, "rank mismatch"),
        (_only_down, "only one LoRA factor"),
        (_alpha_matrix, "alpha must be a 0-d or 1-element tensor"),
    ],
)
def test_structure_errors_name_the_file_and_the_module(tmp_path: Path, change, problem: str) -> None:  # type: ignore[no-untyped-def]
    path, module = _broken(tmp_path, "bad.safetensors", change)
    with pytest.raises(AdapterError, match=problem) as info:
        load_lora(path)
    assert info.value.message.startswith(f"{path}: adapter module {module!r}: ")


def test_data_errors_name_the_file_when_a_module_is_read(tmp_path: Path) -> None:
    """What only the data shows (a NaN alpha) is found by read_module, and names the file too."""

    def nan_alpha(t: dict[str, torch.Tensor], m: str) -> None:
        t[m + ".alpha"] = torch.tensor(float("nan"))

    path, module = _broken(tmp_path, "nan_alpha.safetensors", nan_alpha)
    with load_lora(path) as f, pytest.raises(AdapterError, match="alpha is nan") as info:
        f.read_module(module)
    assert info.value.message.startswith(f"{path}: adapter module {module!r}: ")


def test_file_context_prefixes_once() -> None:
    with pytest.raises(AdapterError) as info, file_context("a.safetensors"), file_context("a.safetensors"):
        raise AdapterError("adapter module 'm': broken", hint="h")
    assert info.value.message == "a.safetensors: adapter module 'm': broken"
    assert info.value.hint == "h"
    with pytest.raises(LorasmithError) as other, file_context("a.safetensors"):
        raise LorasmithError("not an adapter error")
    assert other.value.message == "not an adapter error"
