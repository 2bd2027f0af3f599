"""convert: every input kind with every ``--to`` (and with a dtype) either works or is a one-line error.

Input kinds: a single-file safetensors checkpoint, the same as a pickle (``.ckpt``), a diffusers-layout
pickle (``diffusion_pytorch_model.bin``), a lone diffusers weights file, a diffusers folder, a sharded
folder, its shard index, a sharded single file (canonical keys, with an index), one lone shard, a LoRA
and a LoRA pickle (``.pt``). ``--to`` values: none, ``single`` (and its synonyms ``original``, ``bfl``),
``diffusers``, ``keep`` and LoRA spellings (``kohya``, ``peft``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, LorasmithError, UsageError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops.convert import convert
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

SHARD = "1MB"  # splits the Z-Image fixture (about 6 MB) into several shards


@dataclass(frozen=True)
class Inputs:
    """Every input kind, made once from one Z-Image single file."""

    root: Path
    original: dict[str, torch.Tensor]  # the canonical tensors
    diffusers: dict[str, torch.Tensor]  # the transformer's tensors in the diffusers layout
    lora: dict[str, torch.Tensor]
    paths: dict[str, Path]


def _shard_single_file(src: Path, folder: Path) -> Path:
    """The canonical file as two shards + an index (as some repositories ship big single files)."""
    folder.mkdir()
    tensors = load_all(src)
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"modelspec.title": "z"})
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    arch = get("zimage")
    single = root / "z.safetensors"
    make_checkpoint(arch, single, metadata={"modelspec.title": "z"})
    original = load_all(single)
    folder = root / "folder"
    convert(single, folder, to="diffusers")
    dfile = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    diffusers = load_all(dfile)
    sharded = root / "sharded"
    convert(single, sharded, to="diffusers", shard_size=SHARD)
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    lone = sharded / "transformer" / "diffusion_pytorch_model-00002-of-00007.safetensors"
    assert lone.is_file()
    ckpt = root / "z.ckpt"
    torch.save(original, ckpt)
    dbin = root / "bin" / "diffusion_pytorch_model.bin"
    dbin.parent.mkdir()
    torch.save(diffusers, dbin)
    fx = make_lora(arch, root / "lora.safetensors", limit=3)
    lora = load_all(fx.path)
    lora_pt = root / "lora.pt"
    torch.save(lora, lora_pt)
    paths = {
        "single": single,
        "ckpt": ckpt,
        "diffusers-bin": dbin,
        "diffusers-file": dfile,
        "folder": folder,
        "sharded-folder": sharded,
        "shard-index": index,
        "sharded-single": _shard_single_file(single, root / "sharded-single"),
        "lone-shard": lone,
        "lora": fx.path,
        "lora-pt": lora_pt,
    }
    return Inputs(root, original, diffusers, lora, paths)


# what each (input, --to) gives: "single" (the canonical file), "folder" (a diffusers folder that
# converts back to the canonical file), "as-is" (the same tensors as safetensors), "lora" (a LoRA file),
# or (error class, message fragment).
Outcome = str | tuple[type[LorasmithError], str]
NOTHING = (UsageError, "nothing to do")
SPELLING = (UsageError, "names a LoRA spelling")
ALREADY = (UsageError, "already")
INDEX = (UsageError, "shard index")
LONE = (UsageError, "one shard of a sharded model")

# a diffusers folder (plain or sharded): every --to value in column order
FOLDER_ROW: list[Outcome] = [
    (InvalidFileError, "is a folder"),
    "single",
    "single",
    "single",
    ALREADY,
    (InvalidFileError, "is a folder"),
    SPELLING,
    SPELLING,
]

TOS = [None, "single", "original", "bfl", "diffusers", "keep", "kohya", "peft"]
EXPECTED: dict[str, list[Outcome]] = {
    # input:           None     single    original  bfl       diffusers keep     kohya     peft
    "single": [NOTHING, ALREADY, ALREADY, ALREADY, "folder", NOTHING, SPELLING, SPELLING],
    "ckpt": ["single", "single", "single", "single", "folder", "single", SPELLING, SPELLING],
    "diffusers-bin": ["as-is", "single", "single", "single", ALREADY, "as-is", SPELLING, SPELLING],
    "diffusers-file": [NOTHING, "single", "single", "single", ALREADY, NOTHING, SPELLING, SPELLING],
    "folder": FOLDER_ROW,
    "sharded-folder": FOLDER_ROW,
    "shard-index": [INDEX, "single", "single", "single", ALREADY, INDEX, INDEX, INDEX],
    "sharded-single": [INDEX, "single", "single", "single", "folder", INDEX, INDEX, INDEX],
    "lone-shard": [NOTHING, LONE, LONE, LONE, LONE, NOTHING, SPELLING, SPELLING],
    "lora": [
        "lora",
        (UsageError, "is a checkpoint layout"),
        (UsageError, "is a checkpoint layout"),
        (UsageError, "is a checkpoint layout"),
        "lora",
        "lora",
        "lora",
        "lora",
    ],
    "lora-pt": [
        "as-is",
        (InvalidFileError, "this is a LoRA"),
        (InvalidFileError, "this is a LoRA"),
        (InvalidFileError, "this is a LoRA"),
        (InvalidFileError, "this is a LoRA"),
        "as-is",
        (UsageError, "cannot be converted to directly"),
        (UsageError, "cannot be converted to directly"),
    ],
}
CASES = [(kind, to, outcome) for kind, row in EXPECTED.items() for to, outcome in zip(TOS, row)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _fingerprint(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def test_the_matrix_is_complete() -> None:
    assert all(len(row) == len(TOS) for row in EXPECTED.values())


@pytest.mark.parametrize(("kind", "to", "outcome"), CASES, ids=[f"{k}-{t}" for k, t, _ in CASES])
def test_every_input_with_every_to(
    inputs: Inputs, tmp_path: Path, kind: str, to: str | None, outcome: Outcome
) -> None:
    src = inputs.paths[kind]
    before = _fingerprint(src)
    out = tmp_path / ("out" if outcome == "folder" else "out.safetensors")
    if isinstance(outcome, tuple):
        cls, fragment = outcome
        with pytest.raises(cls, match=fragment) as info:
            convert(src, out, to=to)
        assert "\n" not in str(info.value) and info.value.hint
        assert not list(tmp_path.iterdir())  # nothing written, not even a temporary
    else:
        r = convert(src, out, to=to)
        if outcome == "single":
            assert _equal(load_all(out), inputs.original)
            assert r.kind == "checkpoint" and r.to_spelling == (None if to in (None, "keep") else "single")
        elif outcome == "folder":
            assert r.to_spelling == "diffusers-transformer"
            back = tmp_path / "back.safetensors"
            convert(out, back, to="single")
            assert _equal(load_all(back), inputs.original)
        elif outcome == "as-is":
            want = inputs.diffusers if kind == "diffusers-bin" else inputs.lora
            assert _equal(load_all(out), want)
        else:
            assert r.kind == "lora"
    assert _fingerprint(src) == before  # inputs are never touched


# the inputs whose layout conversions work, with the dtype applied on the way
DTYPE_CASES = [
    ("single", "diffusers"),
    ("ckpt", "diffusers"),
    ("ckpt", "single"),
    ("sharded-single", "diffusers"),
    ("sharded-single", "single"),
    ("single", "single"),
    ("diffusers-bin", "single"),
    ("diffusers-file", "single"),
    ("folder", "single"),
    ("sharded-folder", "single"),
    ("shard-index", "single"),
]


@pytest.mark.parametrize(("kind", "to"), DTYPE_CASES)
def test_layout_conversions_apply_the_dtype(inputs: Inputs, tmp_path: Path, kind: str, to: str) -> None:
    out = tmp_path / ("out" if to == "diffusers" else "out.safetensors")
    r = convert(inputs.paths[kind], out, to=to, dtype="fp16")
    assert r.dtypes == {"F16": r.tensors} and r.cast.tensors == len(inputs.original)
    single = out
    if to == "diffusers":
        single = tmp_path / "back.safetensors"
        convert(out, single, to="single")
    want = {k: t.to(torch.float16) for k, t in inputs.original.items()}
    assert _equal(load_all(single), want)
    record = json.loads(
        read_header(
            single if to == "single" else out / "transformer" / "diffusion_pytorch_model.safetensors"
        ).metadata["lorasmith_convert"]
    )
    assert record["dtype"] == {"all": "F16"}


def test_per_component_dtypes_through_a_folder(tmp_path: Path) -> None:
    """--unet-dtype/--te-dtype/--vae-dtype land on the right models of an SD1 folder, and back."""
    src = tmp_path / "sd1.safetensors"
    arch = get("sd1")
    make_checkpoint(arch, src)
    folder = tmp_path / "pipe"
    convert(src, folder, to="diffusers", unet_dtype="bf16", te_dtype="fp16")
    assert {
        i.dtype for i in read_header(folder / "unet/diffusion_pytorch_model.safetensors").tensors.values()
    } == {"BF16"}
    te = read_header(folder / "text_encoder/model.safetensors").tensors.values()
    assert {i.dtype for i in te if i.dtype.startswith(("F", "BF"))} == {"F16"}
    assert {
        i.dtype for i in read_header(folder / "vae/diffusion_pytorch_model.safetensors").tensors.values()
    } == {"F32"}
    assert json.loads((folder / "unet/config.json").read_text()).get("torch_dtype") in (None, "bfloat16")
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single", vae_dtype="fp16")
    inv = arch.canonical_inventory()
    for key, info in read_header(back).tensors.items():
        comp = inv.component_of(key)
        if comp == "vae":
            assert info.dtype == "F16", key
        elif comp == "unet":
            assert info.dtype == "BF16", key


def test_a_pickle_single_to_keeps_the_dropped_entries(tmp_path: Path) -> None:
    """A .ckpt with training state: --to single writes it exactly as a plain pickle conversion."""
    src = tmp_path / "z.safetensors"
    make_checkpoint(get("zimage"), src)
    ckpt = tmp_path / "z.ckpt"
    torch.save({"state_dict": load_all(src), "epoch": 3}, ckpt)
    a = convert(ckpt, tmp_path / "a.safetensors", to="single")
    b = convert(ckpt, tmp_path / "b.safetensors")
    assert a.dropped == b.dropped == ["epoch (outside state_dict)"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("kind", "args", "code", "fragment"),
    [
        ("ckpt", ["--to", "kohya"], 2, "cannot be converted to directly"),
        ("folder", ["--to", "kohya"], 2, "names a LoRA spelling"),
        ("folder", ["--dtype", "fp16"], 1, "is a folder"),
        ("lone-shard", ["--to", "single"], 2, "one shard"),
        ("shard-index", ["--dtype", "fp16"], 2, "shard index"),
        ("lora", ["--to", "single"], 2, "checkpoint layout"),
        ("lora-pt", ["--to", "single"], 1, "this is a LoRA"),
        ("single", ["--to", "single"], 2, "already a single-file"),
    ],
)
def test_cli_errors_are_one_line(
    inputs: Inputs, tmp_path: Path, kind: str, args: list[str], code: int, fragment: str
) -> None:
    res = CliRunner().invoke(app, ["convert", str(inputs.paths[kind]), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == code, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())


def test_cli_pickle_to_single_json(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    res = CliRunner().invoke(
        app, ["convert", str(inputs.paths["diffusers-bin"]), "-o", str(out), "--to", "single", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["to_spelling"] == "single" and data["arch"] == "zimage"
    assert _equal(load_all(out), inputs.original)
    res = CliRunner().invoke(
        app, ["convert", str(inputs.paths["diffusers-bin"]), "-o", str(out), "--to", "single"]
    )
    assert res.exit_code == 1 and "already exists" in res.stderr  # no --overwrite
