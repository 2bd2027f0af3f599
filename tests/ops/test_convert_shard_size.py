"""convert --to diffusers --shard-size: each model's weights as ``save_pretrained(max_shard_size=...)`` shards
with their index, streamed and atomic; single -> sharded folder -> single is bit-exact."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import UsageError
from lorasmith.io import writer as io_writer
from lorasmith.io.dtypes import torch_dtype
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops._diffusers_weights import (
    ModelWeightsWriter,
    index_file_name,
    parse_shard_size,
    plan_shards,
    shard_file_name,
)
from lorasmith.ops.convert import convert
from lorasmith.ops.layouts import default_subfolder, diffusers_inventory, plan_folder
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

SHARD = re.compile(r"^(diffusion_pytorch_model|model)-(\d{5})-of-(\d{5})\.safetensors$")


# ------------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10GiB", 10 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.1GB", 1_100_000_000),
        (" 2 kib ", 2048),
        ("3kb", 3000),
        ("4096", 4096),
        ("7B", 7),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        (".5MB", 500_000),
        (123, 123),
    ],
)
def test_parse_shard_size(text: str | int, size: int) -> None:
    assert parse_shard_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "GB", "5XB", "5G", "0", "0GB", "0.0001KB", "-5GB", "5 G B", "1e9", "nan"]
)
def test_bad_shard_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--shard-size") as info:
        parse_shard_size(text)
    assert info.value.exit_code == 2 and info.value.hint and "\n" not in str(info.value)


def test_plan_shards_follows_save_pretrained() -> None:
    # in order, never reordered; a tensor over the limit gets its own shard where it is met
    sizes = [("a", 6), ("b", 6), ("c", 2), ("d", 20), ("e", 2)]
    assert plan_shards(sizes, 10) == [["a"], ["d"], ["b", "c", "e"]]
    assert plan_shards([("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)], 10) == [
        ["a"],
        ["b", "c"],
        ["d", "e", "f"],
    ]
    assert plan_shards([("a", 5), ("b", 5)], 10) == [["a", "b"]]  # exactly the limit fits
    assert plan_shards([], 10) == []


def test_hf_hub_splits_alike() -> None:
    hub = pytest.importorskip("huggingface_hub")
    sizes = [("a", 6), ("b", 6), ("c", 2), ("d", 20), ("e", 2), ("f", 9), ("g", 1)]
    sd = {n: torch.empty(s, dtype=torch.uint8) for n, s in sizes}
    split = hub.split_torch_state_dict_into_shards(
        sd, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=10
    )
    ours = plan_shards(sizes, 10)
    names = [
        shard_file_name("diffusion_pytorch_model.safetensors", i + 1, len(ours)) for i in range(len(ours))
    ]
    assert split.filename_to_tensors == dict(zip(names, ours))
    assert split.metadata["total_size"] == sum(s for _, s in sizes)


def test_file_names() -> None:
    assert (
        shard_file_name("diffusion_pytorch_model.safetensors", 2, 3)
        == "diffusion_pytorch_model-00002-of-00003.safetensors"
    )
    assert shard_file_name("model.safetensors", 1, 12) == "model-00001-of-00012.safetensors"
    assert index_file_name("model.safetensors") == "model.safetensors.index.json"


def _plan(n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {f"t{i}": ("F32", (4, 4)) for i in range(n)}  # 64 bytes each


def test_writer_streams_one_shard_at_a_time(tmp_path: Path) -> None:
    plan = _plan(10)
    with ModelWeightsWriter(tmp_path, "model.safetensors", plan=plan, max_shard_size=200) as w:
        assert w.sharded and len(w.files) == 4  # 3 + 3 + 3 + 1 tensors
        for i, name in enumerate(plan):
            w.write(name, torch.full((4, 4), float(i)))
            # a shard is finished (renamed into place) as soon as its last tensor is written
            assert len(list(tmp_path.glob(".*.tmp"))) <= 1
        result = w.close()
    assert result.path == tmp_path / "model.safetensors.index.json"
    assert result.total_size == 640 and result.sshs_model_hash is None
    index = json.loads(result.path.read_text())
    assert index["metadata"] == {"total_size": 640}
    assert index["weight_map"]["t9"] == "model-00004-of-00004.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in result.files] + ["model.safetensors.index.json"]
    )
    assert result.file_bytes == sum(p.stat().st_size for p in result.files)


def test_writer_under_the_limit_is_one_file(tmp_path: Path) -> None:
    plan = _plan(3)
    with ModelWeightsWriter(tmp_path, "model.safetensors", plan=plan, max_shard_size=10**9) as w:
        assert not w.sharded
        for name in reversed(list(plan)):  # any order
            w.write(name, torch.zeros(4, 4))
        result = w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert result.sshs_model_hash == read_header(result.path).metadata["sshs_model_hash"]


def test_writer_leaves_nothing_when_incomplete_or_aborted(tmp_path: Path) -> None:
    plan = _plan(6)
    w = ModelWeightsWriter(tmp_path, "model.safetensors", plan=plan, max_shard_size=130)
    for name in list(plan)[:5]:
        w.write(name, torch.zeros(4, 4))
    assert any(tmp_path.iterdir())  # finished shards
    with pytest.raises(ValueError, match="never written"):
        w.close()
    assert not any(tmp_path.iterdir())

    def fail_half_way() -> None:
        with ModelWeightsWriter(tmp_path, "m.safetensors", plan=plan) as w2:
            w2.write("t0", torch.zeros(4, 4))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not planned"):
        ModelWeightsWriter(tmp_path, "m.safetensors", plan=plan).write("nope", torch.zeros(1))


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL single file: UNet, VAE and two text encoders (the ``model-`` names), fp16."""
    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), path, dtype=torch.float16, metadata={"modelspec.title": "x"})
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sizes(folder: Path) -> dict[str, int]:
    """Bytes of tensor data per subfolder of an unsharded diffusers folder."""
    out = {}
    for sub in folder.iterdir():
        for f in sub.glob("*.safetensors"):
            h = read_header(f)
            out[sub.name] = sum(i.end - i.start for i in h.tensors.values())
    return out


def test_single_to_sharded_folder_and_back_is_bit_exact(tmp_path: Path, sdxl: Path) -> None:
    before = _digest(sdxl)
    plain = tmp_path / "plain"
    convert(sdxl, plain, to="diffusers")
    sizes = _sizes(plain)
    # shard the UNet and both text encoders; the VAE stays one unsharded file
    limit = sizes["vae"] + 1
    assert sizes["unet"] > limit and sizes["text_encoder"] > limit and sizes["text_encoder_2"] > limit
    sharded = tmp_path / "sharded"
    r = convert(sdxl, sharded, to="diffusers", shard_size=limit)
    assert r.shards["vae"] == 1 and r.shards["unet"] > 1 and r.shards["text_encoder_2"] > 1
    assert r.sshs_model_hash is None  # the UNet is sharded: no one file to hash
    assert sorted(p.name for p in (sharded / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    for sub, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ):
        files = sorted(p.name for p in (sharded / sub).iterdir() if p.name != "config.json")
        index_name = f"{stem}.safetensors.index.json"
        assert index_name in files and f"{stem}.safetensors" not in files
        shards = [f for f in files if f != index_name]
        n = r.shards[sub]
        assert len(shards) == n
        assert all(
            SHARD.match(f) and f.startswith(f"{stem}-") and f.endswith(f"-of-{n:05d}.safetensors")
            for f in shards
        )
        index = json.loads((sharded / sub / index_name).read_text())
        assert set(index) == {"metadata", "weight_map"}
        assert index["metadata"] == {"total_size": sizes[sub]}
        assert set(index["weight_map"].values()) == set(shards)
        tensors: dict[str, str] = {}
        for f in shards:
            h = read_header(sharded / sub / f)
            data = sum(i.end - i.start for i in h.tensors.values())
            assert data <= limit or len(h.tensors) == 1  # only a lone tensor may exceed the limit
            tensors.update(dict.fromkeys(h.tensors, f))
        assert tensors == index["weight_map"]
        assert load_all(plain / sub / f"{stem}.safetensors").keys() == tensors.keys()
    # configs, model_index and extras are those of the unsharded folder
    for rel in (
        "model_index.json",
        "unet/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (sharded / rel).read_text() == (plain / rel).read_text()
    back_plain = tmp_path / "back_plain.safetensors"
    back = tmp_path / "back.safetensors"
    convert(plain, back_plain, to="single")
    convert(sharded, back, to="single")
    assert back.read_bytes() == back_plain.read_bytes()
    a, b = load_all(sdxl), load_all(back)
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert read_header(back).metadata["modelspec.title"] == "x"
    assert _digest(sdxl) == before  # the input is never touched
    assert not list(tmp_path.glob(".*"))


def test_shard_order_matches_hf_hub_for_a_model(tmp_path: Path) -> None:
    """The weight_map of a sharded model is what huggingface_hub's splitter gives for the same tensors in
    the order lorasmith writes them (canonical order, fused tensors' parts in order)."""
    hub = pytest.importorskip("huggingface_hub")
    arch = get("flux")
    src = tmp_path / "flux.safetensors"
    make_checkpoint(arch, src, variant="dev")
    inv = diffusers_inventory(arch, "dev")
    specs = {k: (i.dtype, tuple(i.shape)) for k, i in read_header(src).tensors.items()}
    plan = plan_folder(arch, arch.layout_map(inv.id), default_subfolder(inv), specs).plans["transformer"]
    limit = 200_000
    r = convert(src, tmp_path / "out", to="diffusers", shard_size=limit)
    sd = {k: torch.empty(shape, dtype=torch_dtype(dt)) for k, (dt, shape) in plan.items()}
    split = hub.split_torch_state_dict_into_shards(
        sd, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=limit
    )
    index = json.loads(
        (tmp_path / "out/transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    assert r.shards == {"transformer": len(split.filename_to_tensors)}


def test_sharded_output_with_dtype_and_a_pickle_input(tmp_path: Path) -> None:
    arch = get("zimage")
    src = tmp_path / "z.safetensors"
    make_checkpoint(arch, src)
    ckpt = tmp_path / "z.ckpt"
    torch.save(load_all(src), ckpt)
    out = tmp_path / "out"
    r = convert(ckpt, out, to="diffusers", shard_size="1MB", dtype="bf16")
    assert r.shards["transformer"] > 1 and r.dtypes == {"BF16": r.tensors}
    assert r.cast.tensors == len(read_header(src).tensors)  # counted per input tensor
    back = tmp_path / "back.safetensors"
    convert(out, back, to="single")
    want = {k: t.to(torch.bfloat16) for k, t in load_all(src).items()}
    got = load_all(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_an_interrupted_sharded_folder_leaves_nothing(
    tmp_path: Path, sdxl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = io_writer.SafetensorsWriter.write_part
    calls = 0
    finished: list[Path] = []

    def write_part(
        self: io_writer.SafetensorsWriter, name: str, offset: int, part: torch.Tensor, **kwargs: bool
    ) -> None:
        nonlocal calls
        calls += offset == 0  # the first part of each streamed tensor
        if calls == 200 and offset == 0:
            # half way: shards of the first models are already finished inside the hidden folder
            finished.extend(tmp_path.glob(".out.*.tmp/*/*-of-*.safetensors"))
            raise KeyboardInterrupt
        real(self, name, offset, part, **kwargs)

    monkeypatch.setattr(io_writer.SafetensorsWriter, "write_part", write_part)
    with pytest.raises(KeyboardInterrupt):
        convert(sdxl, tmp_path / "out", to="diffusers", shard_size="30KB")
    assert len(finished) > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    make_checkpoint(get("flux"), src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="already exists"):
        convert(src, out, to="diffusers", shard_size="1MB")
    assert (out / "keep.txt").read_text() == "mine"
    r = convert(src, out, to="diffusers", shard_size="1MB", overwrite=True)
    assert r.shards["transformer"] > 1 and not (out / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_shard_size(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    make_checkpoint(get("flux"), src)
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(
        app, ["convert", str(src), "-o", str(out), "--to", "diffusers", "--shard-size", "1MB", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["shards"]["transformer"] > 1 and data["sshs_model_hash"] is None
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    res = runner.invoke(
        app, ["convert", str(src), "-o", str(tmp_path / "h"), "--to", "diffusers", "--shard-size", "1MB"]
    )
    assert res.exit_code == 0 and "shards: transformer" in res.stdout


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--to", "diffusers", "--shard-size", "5XB"], "unknown unit"),
        (["--to", "diffusers", "--shard-size", "0"], "less than one byte"),
        (["--to", "single", "--shard-size", "5GB"], "applies to --to diffusers"),
        (["--dtype", "fp16", "--shard-size", "5GB"], "applies to --to diffusers"),
        (["--to", "kohya", "--shard-size", "5GB"], "applies to --to diffusers"),
    ],
)
def test_cli_shard_size_usage_errors(tmp_path: Path, args: list[str], match: str) -> None:
    src = tmp_path / "flux.safetensors"
    make_checkpoint(get("flux"), src)
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert match in res.stderr and "Traceback" not in res.output
    assert sum(line.startswith("error:") for line in res.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux.safetensors"]


def test_a_lora_with_shard_size_is_a_usage_error(tmp_path: Path) -> None:
    fx = make_lora(get("flux"), tmp_path / "l.safetensors", limit=2)
    with pytest.raises(UsageError, match="LoRA"):
        convert(fx.path, tmp_path / "o.safetensors", to="diffusers", shard_size="1GB")
    res = CliRunner().invoke(
        app,
        [
            "convert",
            str(fx.path),
            "-o",
            str(tmp_path / "o.safetensors"),
            "--to",
            "diffusers",
            "--shard-size",
            "1GB",
        ],
    )
    assert res.exit_code == 2 and "LoRA" in res.stderr


@pytest.mark.parametrize("what", ["file", "index", "folder"])
def test_no_sharded_single_file(tmp_path: Path, what: str) -> None:
    """A single-file output is never sharded (its loaders read one file): a usage error saying so, from a
    single file, a shard index or a diffusers folder, with nothing written."""
    src = tmp_path / "zimage.safetensors"
    make_checkpoint(get("zimage"), src)
    given = src
    if what != "file":
        folder = tmp_path / "pipe"
        convert(src, folder, to="diffusers", shard_size="100KB")
        given = (
            folder
            if what == "folder"
            else folder / "transformer" / index_file_name("diffusion_pytorch_model.safetensors")
        )
        assert given.exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match="single-file output is written as one file") as info:
        convert(given, tmp_path / "one.safetensors", to="single", shard_size="100KB")
    assert info.value.hint is not None and "from_single_file" in info.value.hint
    assert "--to diffusers --shard-size" in info.value.hint
    res = CliRunner().invoke(
        app,
        [
            "convert",
            str(given),
            "--to",
            "single",
            "--shard-size",
            "1GB",
            "-o",
            str(tmp_path / "o.safetensors"),
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [line for line in res.stderr.splitlines() if line.startswith(("error:", "hint:"))] == [
        "error: --shard-size applies to --to diffusers: a single-file output is written as one file",
        "hint: ComfyUI, A1111/Forge and from_single_file load no shards; drop --shard-size, or write a "
        "diffusers folder with --to diffusers --shard-size SIZE",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
