"""convert FOLDER --to diffusers -o OTHER: a diffusers folder resharded and/or recast into another folder,
every other file carried over unchanged, the input never touched, the output whole or absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, OutputExistsError, UsageError
from lorasmith.io import writer as io_writer
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops import convert as convert_mod
from lorasmith.ops._convert_dtype import cast_tensor
from lorasmith.ops.convert import convert
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

#: files a real pipeline folder carries beside its weights (tokenizers, a feature extractor, a model card)
OTHER_FILES = {
    "tokenizer/vocab.json": b'{"a": 0}\n',
    "tokenizer/merges.txt": b"#version: 0.2\na b\n",
    "tokenizer/tokenizer_config.json": b'{"model_max_length": 77}\n',
    "tokenizer_2/special_tokens_map.json": b"{}\n",
    "feature_extractor/preprocessor_config.json": b'{"crop_size": 224}\n',
    "README.md": b"# a model\n",
    "notes/deeper/more.txt": b"nested\n",
    "unet/README.txt": b"a file of a model folder that is no weights\n",
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _stat_tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Model -> its tensors (every shard's), read back through the index when sharded."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        model = f.parent.relative_to(folder).as_posix()
        key = f.name if model == "." and f.name.startswith("lorasmith_") else model
        out.setdefault(key, {}).update(load_all(f))
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An SDXL single file and its diffusers folder with tokenizers and other files added."""
    base = tmp_path_factory.mktemp("sdxl")
    src = base / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), src, metadata={"modelspec.title": "t"})
    folder = base / "pipe"
    convert(src, folder, to="diffusers")
    for rel, data in OTHER_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return src, folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "in"
    shutil.copytree(folder, dst)
    return dst


# ------------------------------------------------------------------------------------------------- recast
def test_recast_carries_every_other_file_and_leaves_the_input(
    sdxl: tuple[Path, Path], tmp_path: Path
) -> None:
    _, folder = sdxl
    before_tree, before_stat = _tree(folder), _stat_tree(folder)
    out = tmp_path / "out"
    r = convert(folder, out, to="diffusers", dtype="bf16")
    assert _tree(folder) == before_tree and _stat_tree(folder) == before_stat  # the input is untouched
    got = _tree(out)
    # every non-weight file unchanged: configs, model_index.json, scheduler, tokenizers, extra files
    others = {k: v for k, v in before_tree.items() if not k.endswith(".safetensors")}
    assert {k: got[k] for k in others} == others
    assert set(got) == set(before_tree)  # the same files: one weights file per model, as in the input
    assert r.copied == len(others) and r.arch == "sdxl" and r.to_spelling == "diffusers-unet"
    assert r.shards == {"text_encoder": 1, "text_encoder_2": 1, "unet": 1, "vae": 1}
    assert (
        r.sshs_model_hash
        == read_header(out / "unet" / "diffusion_pytorch_model.safetensors").metadata["sshs_model_hash"]
    )
    # every floating tensor cast by the policy of a whole-tensor cast; integers kept
    want, have = _weights(folder), _weights(out)
    assert want.keys() == have.keys()
    for model, tensors in want.items():
        for k, t in tensors.items():
            expected, _ = cast_tensor(t, "BF16")
            assert have[model][k].dtype == expected.dtype and torch.equal(have[model][k], expected), (
                model,
                k,
            )
    assert r.cast.tensors + r.cast.untouched == r.tensors == sum(len(t) for t in want.values())
    meta = read_header(out / "unet" / "diffusion_pytorch_model.safetensors").metadata
    assert meta["modelspec.title"] == "t" and json.loads(meta["lorasmith_convert"])["dtype"] == {
        "all": "BF16"
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_folder_recast_is_a_single_file_written_with_the_dtype(
    sdxl: tuple[Path, Path], tmp_path: Path
) -> None:
    """single --to diffusers --dtype D gives the same weights as single --to diffusers, then the folder
    recast with --dtype D (per-component dtypes included, the extras file too)."""
    src, folder = sdxl
    options: dict[str, Any] = {"dtype": "fp16", "unet_dtype": "bf16", "te_dtype": "fp8_e4m3fn"}
    convert(src, tmp_path / "direct", to="diffusers", **options)
    convert(folder, tmp_path / "recast", to="diffusers", **options)
    direct, recast = _weights(tmp_path / "direct"), _weights(tmp_path / "recast")
    assert direct.keys() == recast.keys() and "lorasmith_extras.safetensors" in direct
    for model in direct:
        assert _equal(direct[model], recast[model]), model


def test_streamed_and_whole_tensor_outputs_are_the_same_bytes(
    sdxl: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorasmith.io import pipeline

    _, folder = sdxl
    monkeypatch.setattr(pipeline, "BUFFER_BYTES", 4096)
    new = convert(folder, tmp_path / "new", to="diffusers", dtype="fp16", shard_size="150KB")
    monkeypatch.setattr(convert_mod, "PIPELINE", False)
    old = convert(folder, tmp_path / "old", to="diffusers", dtype="fp16", shard_size="150KB")
    assert _tree(tmp_path / "new") == _tree(tmp_path / "old")
    assert new.model_dump(exclude={"output"}) == old.model_dump(exclude={"output"})


# ------------------------------------------------------------------------------------------------ reshard
def test_reshard_and_back_to_one_file_is_bit_exact(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    src, folder = sdxl
    out = tmp_path / "out"
    r = convert(folder, out, to="diffusers", shard_size="100KB")
    assert r.cast.tensors == 0 and r.shards["unet"] > 2
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "tokenizer" / "vocab.json").read_bytes() == OTHER_FILES["tokenizer/vocab.json"]
    back = tmp_path / "back.safetensors"
    convert(out, back, to="single")
    assert _equal(load_all(src), load_all(back))
    # and joined again into one file per model
    again = tmp_path / "again"
    r = convert(out, again, to="diffusers", shard_size="10GB")
    assert set(r.shards.values()) == {1}
    assert _tree(again).keys() == _tree(folder).keys()
    assert all(_equal(a, b) for a, b in zip(_weights(folder).values(), _weights(again).values(), strict=True))


def test_without_shard_size_the_input_shards_are_kept(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = sdxl
    sharded = tmp_path / "sharded"
    convert(folder, sharded, to="diffusers", shard_size="100KB")
    out = tmp_path / "out"
    r = convert(sharded, out, to="diffusers", dtype="fp16")
    want = json.loads((sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    got = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert got["weight_map"] == want["weight_map"]  # the same tensors in the same shard files
    assert got["metadata"]["total_size"] * 2 == want["metadata"]["total_size"]  # fp32 -> fp16
    assert r.shards == {sub: len(list((sharded / sub).glob("*.safetensors"))) for sub in r.shards}


def test_pickle_and_variant_weights(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """A ``.bin`` model is written as safetensors under save_pretrained's name; a variant-only model gets
    the untagged name; a variant beside untagged weights is left out, with a warning."""
    _, folder = sdxl
    src = _copy(folder, tmp_path)
    te = load_all(src / "text_encoder" / "model.safetensors")
    (src / "text_encoder" / "model.safetensors").unlink()
    torch.save(te, src / "text_encoder" / "pytorch_model.bin")
    vae = src / "vae" / "diffusion_pytorch_model.safetensors"
    vae.rename(src / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    unet = load_all(src / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(
        {k: v.half() for k, v in unet.items()}, src / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    )
    out = tmp_path / "out"
    r = convert(src, out, to="diffusers", dtype="bf16")
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert not list((out / "text_encoder").glob("*.bin"))
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert any(
        "another variant" in w and "unet/diffusion_pytorch_model.fp16.safetensors" in w for w in r.warnings
    )
    expected = {k: cast_tensor(t, "BF16")[0] for k, t in te.items()}
    assert _equal(expected, load_all(out / "text_encoder" / "model.safetensors"))


def test_one_model_folder(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """A model's own folder (weights at its top) is resharded the same way; its name gives its component."""
    _, folder = sdxl
    out = tmp_path / "unet_out"
    r = convert(folder / "unet", out, to="diffusers", unet_dtype="bf16", te_dtype="fp16", shard_size="200KB")
    assert r.shards["."] > 1 and r.dtypes == {"BF16": r.tensors}
    assert (out / "config.json").read_bytes() == (folder / "unet" / "config.json").read_bytes()
    assert (out / "README.txt").is_file()
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and r.arch == "sdxl"


# ------------------------------------------------------------------------------------------------- errors
def test_nothing_to_do_is_a_usage_error(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = sdxl
    with pytest.raises(UsageError, match="already a diffusers folder") as info:
        convert(folder, tmp_path / "out", to="diffusers")
    assert info.value.hint is not None and "--shard-size" in info.value.hint
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(folder), "--to", "diffusers", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_outputs_that_are_refused(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = sdxl
    src = _copy(folder, tmp_path)
    before = _tree(src)
    with pytest.raises(OutputExistsError, match="inside the input folder"):
        convert(src, src / "converted", to="diffusers", dtype="fp16")
    with pytest.raises(OutputExistsError, match="holds the input"):
        convert(src, src, to="diffusers", dtype="fp16", overwrite=True)
    assert _tree(src) == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(src, out, to="diffusers", dtype="fp16")
    convert(src, out, to="diffusers", dtype="fp16", overwrite=True)
    assert not (out / "mine.txt").exists()  # replaced as a whole


def test_no_weights_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(InvalidFileError, match="no model weights"):
        convert(folder, tmp_path / "out", to="diffusers", dtype="fp16")


@pytest.mark.parametrize("when", ["weights", "copying"])
def test_a_failure_leaves_no_folder(
    sdxl: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    _, folder = sdxl
    before = _tree(folder)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    if when == "weights":
        real = io_writer.SafetensorsWriter.write_part
        calls = 0

        def write_part(
            self: io_writer.SafetensorsWriter, name: str, offset: int, part: Any, **kw: bool
        ) -> None:
            nonlocal calls
            calls += offset == 0
            if calls == 1500:  # the UNet is written, a text encoder is being written
                raise KeyboardInterrupt
            real(self, name, offset, part, **kw)

        monkeypatch.setattr(io_writer.SafetensorsWriter, "write_part", write_part)
    else:

        def copy2(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(shutil, "copy2", copy2)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, outputs / "out", to="diffusers", dtype="fp16", shard_size="100KB")
    assert list(outputs.iterdir()) == []
    assert _tree(folder) == before


def test_links_are_copied_as_files_and_a_broken_one_is_an_error(
    sdxl: tuple[Path, Path], tmp_path: Path
) -> None:
    """A Hugging Face cache snapshot is links into a blob store: the output holds the files' content."""
    _, folder = sdxl
    src = _copy(folder, tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for rel in ("tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        blob = blobs / rel.replace("/", "_")
        (src / rel).rename(blob)
        os.symlink(blob, src / rel)
    out = tmp_path / "out"
    convert(src, out, to="diffusers", dtype="fp16")
    for rel in ("tokenizer/vocab.json", "unet/config.json"):
        assert not (out / rel).is_symlink() and (out / rel).read_bytes() == (src / rel).read_bytes()
    assert not (out / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    os.symlink(tmp_path / "missing", src / "tokenizer" / "gone.json")
    with pytest.raises(InvalidFileError, match=r"gone\.json"):
        convert(src, tmp_path / "again", to="diffusers", dtype="fp16")
    assert not (tmp_path / "again").exists()


def test_cli_json(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = sdxl
    out = tmp_path / "out"
    args = ["convert", str(folder), "--to", "diffusers", "--dtype", "bf16", "--shard-size", "100KB"]
    res = CliRunner().invoke(app, [*args, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["shards"]["unet"] > 1 and data["copied"] == len(OTHER_FILES) + 6
    assert data["dtypes"]["BF16"] > 0 and data["to_spelling"] == "diffusers-unet"
