"""Acceptance pass over ``inspect``: regressions for what a user's round of inspections found."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import DetectionError, InvalidFileError
from lorasmith.ops.convert import convert
from lorasmith.ops.inspect import inspect_file
from lorasmith.registry import get
from lorasmith.testing import make_lora


def test_dora_modules_are_reported(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "d.safetensors", algo="dora", limit=3)
    r = inspect_file(fx.path, keys=True)
    assert r.lora is not None and r.lora.dora == 3 and r.lora.algos == {"lora": 3}
    assert r.modules is not None and all(m.dora for m in r.modules)
    plain = inspect_file(make_lora(get("sd1"), tmp_path / "p.safetensors", limit=3).path, keys=True)
    assert plain.lora is not None and plain.lora.dora == 0
    assert plain.modules is not None and not any(m.dora for m in plain.modules)
    res = CliRunner().invoke(app, ["inspect", str(fx.path)])
    assert res.exit_code == 0 and "(DoRA: 3)" in res.stdout
    res = CliRunner().invoke(app, ["inspect", str(fx.path), "--json"])
    assert json.loads(res.stdout)["lora"]["dora"] == 3


def test_blocks_says_which_modules_it_left_out(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "d.safetensors", algo="dora", limit=3)
    r = inspect_file(fx.path, blocks=True)
    assert r.blocks == []
    assert any("left out 3 module(s)" in w for w in r.warnings)


def test_header_that_is_a_json_list_is_named_so(tmp_path: Path) -> None:
    raw = json.dumps([{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}]).encode()
    assert len(raw) == 60  # its length's low byte is '<', which once made it "look like a text file"
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(InvalidFileError, match=r"not a safetensors file \(the header is not a JSON object\)"):
        inspect_file(p)


def test_ambiguous_family_is_not_reported_as_unloadable(tmp_path: Path) -> None:
    # CLIP-L modules only: SDXL, FLUX and SD3 name them alike
    fx = make_lora(get("sdxl"), tmp_path / "te.safetensors", modules=lambda a: a.component == "te1", limit=3)
    r = inspect_file(fx.path)
    assert r.arch is None and r.lora is not None and r.lora.unresolved == []
    assert any("ambiguous" in w for w in r.warnings)
    assert not any("would not load" in w for w in r.warnings)
    with pytest.raises(DetectionError, match="ambiguous family"):
        convert(fx.path, tmp_path / "o.safetensors", to="peft")
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------- folders, indexes, shards
@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX dev checkpoint as a sharded diffusers folder (the guidance embedder lands in a later shard)."""
    from lorasmith.testing import make_checkpoint

    root = tmp_path_factory.mktemp("flux")
    single = root / "flux.safetensors"
    make_checkpoint(get("flux"), single, metadata={"ss_x": "1"})
    folder = root / "folder"
    convert(single, folder, to="diffusers", shard_size="1MB")
    return folder


def test_shard_index_is_the_whole_model(flux_folder: Path) -> None:
    index = flux_folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    r = inspect_file(index, verify_hash=True)
    shards = sorted(index.parent.glob("*-of-*.safetensors"))
    assert r.kind == "checkpoint" and r.arch == "flux" and r.variant == "dev"
    assert r.shards == len(shards) > 1
    assert r.file_bytes == index.stat().st_size + sum(s.stat().st_size for s in shards)
    # the first shard's own hashes are not the model's
    assert r.hashes.sshs_model_hash is None and r.hashes.status == "not-checked"
    assert any("--verify-hash checks one file" in w for w in r.warnings)


def test_lone_shard_says_it_is_one(flux_folder: Path) -> None:
    shard = sorted((flux_folder / "transformer").glob("*-of-*.safetensors"))[0]
    r = inspect_file(shard)
    assert r.shards is None
    assert any("shard 1 of" in w and "index.json" in w for w in r.warnings)


def test_folder_lists_its_models(flux_folder: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["inspect", str(flux_folder), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert isinstance(got, dict)  # one model: one object, as for one file
    assert got["path"].endswith("diffusion_pytorch_model.safetensors.index.json") and got["variant"] == "dev"
    # a pickle model of a folder is listed, not read; an empty folder is an error
    import torch

    (tmp_path / "unet").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    res = CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["kind"] == "unknown" and got["path"].endswith(".bin") and "pickle" in got["warnings"][0]
    empty = tmp_path / "vae"
    res = CliRunner().invoke(app, ["inspect", str(empty)])
    assert res.exit_code == 1 and "is a directory" in res.stderr and "Traceback" not in res.output


def test_missing_shard_is_one_line(flux_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(flux_folder, folder)
    shard = sorted((folder / "transformer").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    res = CliRunner().invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 1 and "is missing" in res.stderr and "Traceback" not in res.output


def test_all_in_one_flux_checkpoint_names_its_parts(tmp_path: Path) -> None:
    """ComfyUI's FLUX.1 single file: the transformer under model.diffusion_model., plus vae. and
    text_encoders.* parts, which the FLUX layouts (the bare transformer) do not list."""
    import torch
    from safetensors.torch import save_file

    from lorasmith.io.reader import load_all
    from lorasmith.testing import make_checkpoint

    flux = make_checkpoint(get("flux"), tmp_path / "t.safetensors", dtype=torch.float16)
    parts = make_checkpoint(
        get("sd3"), tmp_path / "p.safetensors", components=("vae", "clip_l", "t5xxl"), dtype=torch.float16
    )
    tensors = {"model.diffusion_model." + k: v for k, v in flux.items()}
    for k, v in parts.items():
        tensors[
            "vae." + k.removeprefix("first_stage_model.") if k.startswith("first_stage_model.") else k
        ] = v
    aio = tmp_path / "flux1-dev-aio.safetensors"
    save_file(tensors, str(aio))
    r = inspect_file(aio)
    assert r.arch == "flux" and r.variant == "dev" and r.kind == "checkpoint"
    assert set(r.components) >= {"vae", "clip_l", "t5xxl"}
    assert r.unknown_keys == 0 and r.confidence == 1.0
    assert not any("not in any known" in w for w in r.warnings)
    # and it is what split reads: the same parts come out
    out = tmp_path / "parts"
    out.mkdir()
    from lorasmith.ops.components import split

    res = split(aio, out)
    assert {o.slot for o in res.outputs} == {"transformer", "vae", "clip_l", "t5xxl"}
    assert load_all(out / "flux1-dev-aio.safetensors").keys() == flux.keys()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "int8", "int16", "bfloat16"])
def test_alphas_of_every_scalar_dtype_are_read(tmp_path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    from lorasmith.io.reader import load_all

    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", limit=2, rank=4, alpha=2.0)
    tensors = {
        k: (v.to(getattr(torch, dtype)) if k.endswith(".alpha") else v) for k, v in load_all(fx.path).items()
    }
    p = tmp_path / "b.safetensors"
    save_file(tensors, str(p))
    r = inspect_file(p)
    assert r.lora is not None and r.lora.alphas == {"2": 2}


def test_peft_dora_magnitude_is_flagged_for_comfyui(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "d.safetensors", algo="dora", limit=3)
    peft = tmp_path / "p.safetensors"
    convert(fx.path, peft, to="peft")
    r = inspect_file(peft, keys=True)
    assert r.lora is not None and r.lora.dora == 3 and len(r.lora.comfyui_unloaded) == 3
    assert r.modules is not None and not any(m.comfyui_loads for m in r.modules)
    assert any("lora_magnitude_vector" in w for w in r.warnings)
    assert not any("spelling ComfyUI does not load" in w for w in r.warnings)
    kohya = inspect_file(fx.path)
    assert kohya.lora is not None and kohya.lora.comfyui_unloaded == [] and kohya.warnings == []
