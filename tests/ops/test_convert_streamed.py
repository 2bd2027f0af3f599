"""convert of sharded single files and diffusers folders through the streaming pipeline: byte-identical to
the whole-tensor path (``convert.PIPELINE = False``), with the same results, reads no larger than a part
(but for the few tensors a transpose rewrites), and pickles still read tensor by tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorasmith.io import pipeline
from lorasmith.io.reader import TensorFile, load_all
from lorasmith.io.writer import NonFiniteError, save_file, write_policy
from lorasmith.ops import convert as convert_mod
from lorasmith.ops._diffusers_weights import find_weights
from lorasmith.ops.convert import ConvertResult, convert
from lorasmith.progress import ProgressEvent
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

PART = 4096


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 4 KiB, so that the shrunk tensors are cut into many parts (as real ones are)."""
    monkeypatch.setattr(pipeline, "BUFFER_BYTES", PART)


# ----------------------------------------------------------------------------------------------- inputs
def shard_single(src: Path, folder: Path, shards: int) -> Path:
    """Write the tensors of ``src`` as ``shards`` safetensors shards with an index; return the index."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_all(src)
    from lorasmith.io.header import read_header

    meta = dict(read_header(src).metadata)
    names = list(tensors)
    size = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / name, metadata=meta)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def reshard_model(model: Path, shards: int, fmt: str = "safetensors") -> None:
    """Rewrite the weights of diffusers model folder ``model`` as ``shards`` files of ``fmt`` (``bin``: torch
    pickles) with an index, as ``save_pretrained`` names them (one file, no index, for 1)."""
    found = find_weights(model)
    assert found is not None
    tensors = load_all(found[0])
    found[0].unlink()
    te = model.name.startswith("text_encoder")
    stem = (
        ("model" if te else "diffusion_pytorch_model")
        if fmt == "safetensors"
        else ("pytorch_model" if te else "diffusion_pytorch_model")
    )

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        if fmt == "bin":
            torch.save(part, path)
        else:
            save_file(part, path)

    if shards == 1:
        save(tensors, model / f"{stem}.{fmt}")
        return
    names = list(tensors)
    size = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{fmt}"
        save(part, model / name)
        weight_map.update(dict.fromkeys(part, name))
    (model / f"{stem}.{fmt}.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _folder(tmp_path: Path, family: str, *, variant: str | None = None, shards: int = 1) -> Path:
    """A diffusers folder of a shrunk fp32 checkpoint, its main model in ``shards`` safetensors shards."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / f"{family}.safetensors"
    make_checkpoint(get(family), src, variant=variant, metadata={"modelspec.title": "t"})
    folder = tmp_path / f"{family}_pipe"
    convert(src, folder, to="diffusers")
    if shards > 1:
        main = folder / ("unet" if (folder / "unet").is_dir() else "transformer")
        reshard_model(main, shards)
    return folder


# ------------------------------------------------------------------------------------------- comparing
def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


Run = Callable[[Path, Callable[[ProgressEvent], None]], ConvertResult]


def _both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run: Run, *, streamed: bool = True
) -> tuple[ConvertResult, list[ProgressEvent]]:
    """``run`` with the pipeline and with whole tensors: the outputs are the same bytes, the results the
    same (but for the output path), and progress counts every output tensor once in both."""
    calls: list[int] = []
    real = pipeline.run_steps

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    new_events: list[ProgressEvent] = []
    old_events: list[ProgressEvent] = []
    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_steps", counted)
        new = run(tmp_path / "new", new_events.append)
        assert bool(calls) == streamed
        m.setattr(convert_mod, "PIPELINE", False)
        calls.clear()
        old = run(tmp_path / "old", old_events.append)
        assert not calls
    assert _tree(tmp_path / "new") == _tree(tmp_path / "old")
    assert new.model_dump(exclude={"output"}) == old.model_dump(exclude={"output"})
    for events in (new_events, old_events):
        assert [e.done for e in events] == list(range(1, new.tensors + 1))
        assert {e.total for e in events} == {new.tensors}
    assert sorted(e.item for e in new_events) == sorted(e.item for e in old_events)
    return new, new_events


# ----------------------------------------------------------------------------------------------- cases
def test_sharded_single_file_to_one_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), src, dtype=torch.float16, metadata={"modelspec.title": "t"})
    index = shard_single(src, tmp_path / "shards", 3)
    r, _ = _both(
        monkeypatch, tmp_path, lambda out, cb: convert(index, out, to="single", dtype="bf16", progress=cb)
    )
    assert r.cast.tensors > 0 and r.cast.untouched > 0
    # the same tensors as a cast of the one file
    whole = tmp_path / "whole.safetensors"
    convert(src, whole, dtype="bf16")
    want, got = load_all(whole), load_all(tmp_path / "new")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_sharded_single_file_to_a_sharded_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    make_checkpoint(get("flux"), src, variant="dev")
    index = shard_single(src, tmp_path / "shards", 4)
    r, _ = _both(
        monkeypatch,
        tmp_path,
        lambda out, cb: convert(index, out, to="diffusers", dtype="fp16", shard_size="200KB", progress=cb),
    )
    assert r.shards["transformer"] > 1 and r.cast.tensors > 0


@pytest.mark.parametrize(
    ("family", "variant", "options"),
    [
        ("sdxl", None, {"dtype": "fp16", "unet_dtype": "bf16", "vae_dtype": "fp32"}),
        ("sdxl", None, {}),  # no cast: every part a byte copy
        ("flux", "dev", {"dtype": "bf16"}),  # fused qkv/linear1 joined, norm_out halves swapped
        ("sd1", None, {"dtype": "fp16"}),  # 1x1 convs, the extras file
        ("sd3", "sd3-medium", {"te_dtype": "fp8_e4m3fn", "dtype": "bf16"}),
    ],
)
def test_diffusers_folder_to_single(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, family: str, variant: str | None, options: dict[str, str]
) -> None:
    folder = _folder(tmp_path / "in", family, variant=variant, shards=3)
    r, _ = _both(
        monkeypatch, tmp_path, lambda out, cb: convert(folder, out, to="single", progress=cb, **options)
    )
    assert (r.cast.tensors > 0) == bool(options)
    # and the same tensors as the single file it came from, cast the same way
    original = tmp_path / "in" / f"{family}.safetensors"
    if options:
        convert(original, tmp_path / "direct.safetensors", **options)
        original = tmp_path / "direct.safetensors"
    want, got = load_all(original), load_all(tmp_path / "new")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd1"])
def test_single_file_to_diffusers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, family: str) -> None:
    src = tmp_path / f"{family}.safetensors"
    make_checkpoint(get(family), src, metadata={"modelspec.title": "t"})
    r, _ = _both(
        monkeypatch,
        tmp_path,
        lambda out, cb: convert(src, out, to="diffusers", unet_dtype="bf16", te_dtype="fp16", progress=cb),
    )
    assert r.cast.tensors > 0


def test_reads_are_parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tensor is read whole, and no read is larger than a part, but for the tensors a transpose
    rewrites (SDXL's text projection): memory is the buffer pools, not the largest tensor."""
    folder = _folder(tmp_path / "in", "sdxl", shards=2)
    sizes: dict[str, int] = {}
    real_part = TensorFile.read_part

    def read_part(self: TensorFile, name: str, start: int, count: int, into: Any = None) -> torch.Tensor:
        out = real_part(self, name, start, count, into)
        sizes[name] = max(sizes.get(name, 0), out.numel() * out.element_size())
        return out

    def whole(self: TensorFile, name: str) -> torch.Tensor:
        raise AssertionError(f"{name} read whole")

    monkeypatch.setattr(TensorFile, "read_part", read_part)
    monkeypatch.setattr(TensorFile, "get", whole)
    convert(folder, tmp_path / "single.safetensors", to="single", dtype="fp16")
    convert(tmp_path / "single.safetensors", tmp_path / "again", to="diffusers", dtype="bf16")
    big = {name for name, n in sizes.items() if n > PART}
    assert all("text_projection" in name for name in big), big
    assert max(n for name, n in sizes.items() if name not in big) == PART


def test_a_pickle_model_is_read_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A folder with a ``.bin`` model is read tensor by tensor (the whole folder), and gives the same file."""
    folder = _folder(tmp_path / "in", "sdxl")
    safe = tmp_path / "safe.safetensors"
    convert(folder, safe, to="single", dtype="fp16")
    reshard_model(folder / "vae", 2, fmt="bin")
    _both(
        monkeypatch,
        tmp_path,
        lambda out, cb: convert(folder, out, to="single", dtype="fp16", progress=cb),
        streamed=False,
    )
    assert (tmp_path / "new").read_bytes() != b""
    want, got = load_all(safe), load_all(tmp_path / "new")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_nonfinite_tensor_in_a_folder_names_its_whole_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = tmp_path / "flux.safetensors"
    key = "double_blocks.0.img_attn.qkv.weight"
    shape = tuple(make_checkpoint(get("flux"), tmp_path / "probe.safetensors")[key].shape)
    bad = torch.zeros(shape)
    bad.view(-1)[::50] = float("nan")  # in many parts, and in each of q, k and v
    make_checkpoint(get("flux"), src, planted={key: bad})
    folder = tmp_path / "pipe"
    with write_policy(allow_nonfinite=True):
        convert(src, folder, to="diffusers")

    def refusal() -> str:
        with pytest.raises(NonFiniteError) as info:
            convert(folder, tmp_path / "o.safetensors", to="single", dtype="bf16")
        return str(info.value)

    new = refusal()
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "PIPELINE", False)
        old = refusal()
    assert new == old and key in new and f"{bad.isnan().sum()} NaN" in new
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(("dtype", "legacy"), [("fp16", False), (None, False), ("fp16", True)])
def test_a_pickle_lets_each_tensor_go_once_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: str | None, legacy: bool
) -> None:
    """A pickle is read whole (memory-mapped where it can be), but each tensor is released once written:
    at the n-th write, only the tensors not yet written (and the one being written) are alive."""
    import weakref

    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops import pickles

    src = tmp_path / "model.ckpt"
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(64, generator=gen) for i in range(8)}
    torch.save({"state_dict": state, "epoch": 3}, src, _use_new_zipfile_serialization=not legacy)
    del state
    refs: list[weakref.ref[torch.Tensor]] = []
    real_load = pickles.load_pickle_state_dict

    def tracked(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
        tensors, dropped = real_load(path)
        refs.extend(weakref.ref(t) for t in tensors.values())
        return tensors, dropped

    alive: list[int] = []
    real_write = SafetensorsWriter.write

    def write(self: SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        alive.append(sum(r() is not None for r in refs))
        real_write(self, name, tensor)

    monkeypatch.setattr(pickles, "load_pickle_state_dict", tracked)
    monkeypatch.setattr(SafetensorsWriter, "write", write)
    out = tmp_path / "model.safetensors"
    r = convert(src, out, dtype=dtype)
    assert r.tensors == 8 and r.dropped == ["epoch (outside state_dict)"]
    # cast: the input tensor is let go before its copy is written; uncast: the input is what is written
    held = 0 if dtype is not None else 1
    assert alive == [8 - n - 1 + held for n in range(8)]


_LIMITED = r"""
import os, resource, sys
import torch
torch.set_num_threads(1)
from lorasmith.ops import convert as c
c.PIPELINE = sys.argv[3] == "pipeline"
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[4]), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    c.convert(sys.argv[1], sys.argv[2], to="diffusers", dtype="fp16")
except (MemoryError, RuntimeError) as exc:
    print("out of memory:", str(exc).splitlines()[0][:200])
    sys.exit(3)
"""


def test_a_folder_streams_within_an_address_space_limit(tmp_path: Path) -> None:
    """A model in two shards, one a 128 MiB tensor, is recast in a process limited to 150 MiB more address
    space than it starts with: the pipeline's pools (64 MiB) fit, a whole-tensor cast (128 + 64 MiB) does
    not."""
    import os
    import subprocess
    import sys

    model = tmp_path / "in" / "unet"
    model.mkdir(parents=True)
    big = {"big.weight": torch.ones(8192, 4096), "small.weight": torch.ones(16, 16)}
    save_file(big, model / "diffusion_pytorch_model.safetensors")
    del big
    reshard_model(model, 2)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}

    def run(mode: str) -> subprocess.CompletedProcess[str]:
        out = tmp_path / f"out_{mode}"
        cmd = [sys.executable, "-c", _LIMITED, str(tmp_path / "in"), str(out), mode, str(150 << 20)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    streamed = run("pipeline")
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "out_pipeline" / "unet").glob("*-of-00002.safetensors")):
        out.update(load_all(shard))
    assert out["big.weight"].dtype == torch.float16 and bool((out["big.weight"] == 1).all())
    whole = run("whole")
    assert whole.returncode == 3, whole.stdout + whole.stderr  # the check is not vacuous
    assert not (tmp_path / "out_whole").exists()
