"""convert (checkpoint layouts): diffusers folders whose weights are sharded safetensors, ``.bin`` pickles
(one file or shards) or variant files read back bit-exactly, one tensor (one pickle shard) at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lorasmith.errors import InvalidFileError
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops import _diffusers_weights
from lorasmith.ops._diffusers_weights import find_weights, open_weights
from lorasmith.ops.convert import convert
from lorasmith.ops.layouts import LayoutSource, diffusers_inventory, main_header
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

STEMS = {
    "safetensors": ("diffusion_pytorch_model", "model"),
    "bin": ("diffusion_pytorch_model", "pytorch_model"),
}


def _stem(sub: str, fmt: str) -> str:
    te = sub.startswith("text_encoder")
    return STEMS[fmt][1 if te else 0]


def reshard(folder: Path, sub: str, fmt: str, shards: int, tag: str = "") -> list[Path]:
    """Rewrite ``folder/sub``'s weights as ``shards`` files of ``fmt`` (``safetensors``/``bin``) with an index
    (one file, no index, when ``shards`` is 1), as ``save_pretrained`` names them; return the new files."""
    model = folder / sub
    found = find_weights(model)
    assert found is not None
    tensors = load_all(found[0])
    found[0].unlink()
    stem = _stem(sub, fmt)
    dot = f".{tag}" if tag else ""
    if shards == 1:
        path = model / f"{stem}{dot}.{fmt}"
        if fmt == "bin":
            torch.save(tensors, path)
        else:
            save_file(tensors, path)
        return [path]
    names = list(tensors)
    size = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    out = []
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        shard = f"{stem}{dot}-{i + 1:05d}-of-{shards:05d}.{fmt}"
        if fmt == "bin":
            torch.save(part, model / shard)
        else:
            save_file(part, model / shard)
        weight_map.update(dict.fromkeys(part, shard))
        out.append(model / shard)
    index = model / f"{stem}.{fmt}.index{dot}.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return [index, *out]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SDXL single file (fp16, so that dtypes survive the pickles too) and its tensors."""
    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    make_checkpoint(get("sdxl"), path, dtype=torch.float16, metadata={"modelspec.title": "x"})
    return path, load_all(path)


def _folder(tmp_path: Path, src: Path) -> Path:
    folder = tmp_path / "pipe"
    convert(src, folder, to="diffusers")
    return folder


def test_every_storage_form_reads_back_bit_exact(
    tmp_path: Path, sdxl: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    src, original = sdxl
    folder = _folder(tmp_path, src)
    reshard(folder, "unet", "safetensors", 3)
    reshard(folder, "vae", "bin", 1)
    reshard(folder, "text_encoder", "bin", 2)
    reshard(folder, "text_encoder_2", "safetensors", 2)
    back = tmp_path / "back.safetensors"
    r = convert(folder, back, to="single")
    assert r.arch == "sdxl" and r.variant == "base"
    assert _equal(original, load_all(back))
    assert not list(tmp_path.glob(".*"))


def test_a_shard_index_given_as_the_input(tmp_path: Path) -> None:
    arch = get("flux")
    src = tmp_path / "flux.safetensors"
    make_checkpoint(arch, src, variant="dev")
    folder = _folder(tmp_path, src)
    files = reshard(folder, "transformer", "safetensors", 4)
    assert main_header(files[0]).tensors.keys() == main_header(folder).tensors.keys()
    back = tmp_path / "back.safetensors"
    r = convert(files[0], back, to="single")
    assert r.variant == "dev"  # guidance keys sit in a later shard: every shard is listed
    assert _equal(load_all(src), load_all(back))


def test_variant_files_are_read_when_alone(tmp_path: Path) -> None:
    arch = get("zimage")
    src = tmp_path / "z.safetensors"
    make_checkpoint(arch, src)
    folder = _folder(tmp_path, src)
    reshard(folder, "transformer", "safetensors", 2, tag="fp16")
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    assert _equal(load_all(src), load_all(back))
    (folder / "transformer" / "diffusion_pytorch_model.bf16.safetensors").write_bytes(b"")
    with pytest.raises(InvalidFileError, match="several variants"):
        convert(folder, tmp_path / "again.safetensors", to="single")


def test_pickle_shards_are_held_one_at_a_time(
    tmp_path: Path, sdxl: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, original = sdxl
    folder = _folder(tmp_path, src)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        reshard(folder, sub, "bin", 3)
    real = _diffusers_weights._load_pickle
    alive: list[int] = []
    loads: dict[str, int] = {}
    peak = 0

    def counting(path: Path) -> dict[str, torch.Tensor]:
        nonlocal peak
        tensors = real(path)
        name = f"{path.parent.name}/{path.name}"
        loads[name] = loads.get(name, 0) + 1
        # a shard dict is "alive" while any of its tensors' storage is still referenced by the reader
        alive.append(id(tensors))
        peak = max(peak, len(alive))
        return _Tracked(tensors, alive)

    monkeypatch.setattr(_diffusers_weights, "_load_pickle", counting)
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    assert _equal(original, load_all(back))
    assert peak == 1  # the previous shard is released before the next one is loaded
    # listing + main header + reading: storage order reads each shard a bounded number of times
    assert max(loads.values()) <= 4, loads


class _Tracked(dict):  # type: ignore[type-arg]
    """A shard's tensor dict that removes itself from ``alive`` when it is garbage collected."""

    def __init__(self, tensors: dict[str, torch.Tensor], alive: list[int]) -> None:
        super().__init__(tensors)
        self._alive = alive
        self._id = id(tensors)

    def __del__(self) -> None:
        if self._id in self._alive:
            self._alive.remove(self._id)


def test_layout_source_lists_every_shard_file(
    tmp_path: Path, sdxl: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    src, _ = sdxl
    folder = _folder(tmp_path, src)
    files = reshard(folder, "unet", "safetensors", 2)
    arch = get("sdxl")
    with LayoutSource(folder, arch, diffusers_inventory(arch, "base")) as source:
        assert set(files) <= set(source.paths)
        order = source.read_order()
        assert sorted(order) == sorted(source.keys)
    # an output that is one of the shards is refused: inputs are never written
    with pytest.raises(Exception, match="own input"):
        convert(folder, files[1], to="single", overwrite=True)


def test_bad_indexes_are_clear_errors(tmp_path: Path) -> None:
    arch = get("zimage")
    src = tmp_path / "z.safetensors"
    make_checkpoint(arch, src)
    folder = _folder(tmp_path, src)
    index, first, second = reshard(folder, "transformer", "safetensors", 2)
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))

    def check(weight_map: object, match: str) -> None:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(InvalidFileError, match=match):
            convert(folder, tmp_path / "o.safetensors", to="single")

    check({**data["weight_map"], name: "../escape.safetensors"}, "names the shard")
    other = second.name if data["weight_map"][name] == first.name else first.name
    check({**data["weight_map"], name: other}, "where the index places it")
    check({}, "no 'weight_map'")
    index.write_text("{not json")
    with pytest.raises(InvalidFileError, match="not a readable shard index"):
        convert(folder, tmp_path / "o.safetensors", to="single")
    index.write_text(json.dumps(data))
    second.unlink()
    with pytest.raises(InvalidFileError, match="is missing"):
        convert(folder, tmp_path / "o.safetensors", to="single")
    assert not (tmp_path / "o.safetensors").exists()


class _Boom:
    """Pickles into a call of os.system: loading it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_bin_shard_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    arch = get("zimage")
    src = tmp_path / "z.safetensors"
    make_checkpoint(arch, src)
    folder = _folder(tmp_path, src)
    _index, first, _second = reshard(folder, "transformer", "bin", 2)
    marker = tmp_path / "ran"
    tensors = torch.load(first, weights_only=True)
    tensors["evil"] = _Boom(marker)
    torch.save(tensors, first)
    with pytest.raises(InvalidFileError, match="refused"):
        convert(folder, tmp_path / "o.safetensors", to="single")
    assert not marker.exists()


def test_open_weights_of_a_single_pickle(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.ones(2)}, path)
    with open_weights(path) as w:
        assert w.kind == "pickle"
        listed = {k: (i.dtype, i.shape) for k, i in w.tensors.items()}
        assert listed == {"a": ("I32", (2, 3)), "b": ("F32", (2,))}
        assert torch.equal(w.get("a"), torch.arange(6, dtype=torch.int32).reshape(2, 3))
