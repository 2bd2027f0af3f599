"""convert --assemble/--split with --to: honoured where it names what they write (``--to single`` for an
assembly, ``keep`` for both), otherwise a one-line usage error (exit 2) before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.archs.parts import PART_KINDS, form_inventory
from lorasmith.cli import app
from lorasmith.io.writer import save_file
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, shrink_shape


def _part(kind: str, path: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        key: (torch.randn(shrink_shape(spec.shape), generator=gen) * 0.02).half()
        for key, spec in form_inventory(PART_KINDS[kind], None).items()
    }
    save_file(tensors, path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--assemble`` options of a Z-Image transformer, VAE and Qwen3 text encoder."""
    tmp = tmp_path_factory.mktemp("parts")
    make_checkpoint(get("zimage"), tmp / "z.safetensors", dtype=torch.bfloat16)
    _part("vae16", tmp / "ae.safetensors", 1)
    _part("qwen3_4b", tmp / "qwen.safetensors", 2)
    return [
        "--transformer",
        str(tmp / "z.safetensors"),
        "--vae",
        str(tmp / "ae.safetensors"),
        "--text-encoder",
        str(tmp / "qwen.safetensors"),
    ]


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["convert", *args])
    assert "Traceback" not in res.output
    return res.exit_code, res.stderr


@pytest.mark.parametrize("to", [None, "single", "original", "bfl", "keep", " Single "])
def test_assemble_honours_to_single(parts: list[str], tmp_path: Path, to: str | None) -> None:
    plain = tmp_path / "plain.safetensors"
    code, err = _run(["--assemble", *parts, "-o", str(plain)])
    assert code == 0, err
    out = tmp_path / "out.safetensors"
    code, err = _run(["--assemble", *parts, "-o", str(out), *(["--to", to] if to else [])])
    assert code == 0, err
    assert out.read_bytes() == plain.read_bytes()  # what --assemble writes: the single file


@pytest.mark.parametrize(
    ("to", "says", "hint"),
    [
        ("diffusers", "--to diffusers does not apply to --assemble", "--to diffusers -o FOLDER"),
        ("kohya", "--to kohya does not apply to --assemble", "drop --to"),
        ("nonsense", "--to nonsense does not apply to --assemble", "drop --to"),
    ],
)
def test_assemble_refuses_other_to(parts: list[str], tmp_path: Path, to: str, says: str, hint: str) -> None:
    code, err = _run(["--assemble", *parts, "-o", str(tmp_path / "o.safetensors"), "--to", to])
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(lines) == 2 and says in lines[0] and hint in lines[1]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def single(parts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "z_aio.safetensors"
    code, err = _run(["--assemble", *parts, "-o", str(out)])
    assert code == 0, err
    return out


@pytest.mark.parametrize("to", ["diffusers", "single", "kohya"])
def test_split_refuses_to(single: Path, tmp_path: Path, to: str) -> None:
    code, err = _run(["--split", str(single), "--output-dir", str(tmp_path), "--to", to])
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    assert (
        lines[0] == f"error: --to {to} does not apply to --split, which writes each part as its separate file"
    )
    assert "drop --to" in lines[1]
    assert list(tmp_path.iterdir()) == []


def test_split_with_to_keep(single: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _run(["--split", str(single), "--output-dir", str(tmp_path / "a")])[0] == 0
    assert _run(["--split", str(single), "--output-dir", str(tmp_path / "b"), "--to", "keep"])[0] == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 3
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_both_modes_still_say_so(parts: list[str], single: Path, tmp_path: Path) -> None:
    code, err = _run(
        ["--assemble", "--split", str(single), "--output-dir", str(tmp_path), "--to", "diffusers"]
    )
    assert code == 2 and "cannot be combined" in err
