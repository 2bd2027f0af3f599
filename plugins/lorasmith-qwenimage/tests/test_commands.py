"""lorasmith's commands work on Qwen-Image files with no change to lorasmith: the family comes in through
the entry point only. Commands not in the tree yet (resize, extract, convert) are skipped, by name."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lorasmith.cli import app
from lorasmith.registry import get_registry, reset_registry
from lorasmith.testing import make_checkpoint, make_lora
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorasmith_qwenimage import QwenImage

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_registry() -> None:
    reset_registry()  # the process-wide registry, with this plugin loaded from its entry point
    assert "qwenimage" in get_registry().archs()


def _has(command: str) -> bool:
    return importlib.util.find_spec(f"lorasmith.commands.{command}") is not None


def _invoke(*args: str) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def test_inspect_checkpoint_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "qwen.safetensors"
    make_checkpoint(QwenImage(), path)
    proc = subprocess.run(
        [sys.executable, "-m", "lorasmith", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    row = data[0] if isinstance(data, list) else data
    assert row["arch"] == "qwenimage"
    assert row["kind"] == "checkpoint"


@pytest.mark.parametrize("spelling", QwenImage.spellings)
def test_inspect_lora(tmp_path: Path, spelling: str) -> None:
    lora = make_lora(QwenImage(), tmp_path / f"{spelling}.safetensors", spelling=spelling, rank=2, limit=40)
    data = json.loads(_invoke("inspect", str(lora.path), "--json"))
    row = data[0] if isinstance(data, list) else data
    assert row["arch"] == "qwenimage"
    assert row["kind"] == "lora"
    assert row["layout"] == spelling


@pytest.mark.skipif(not _has("merge"), reason="lorasmith merge is not in the tree yet")
def test_merge_bakes_a_lora_into_the_base(tmp_path: Path) -> None:
    base_path = tmp_path / "base.safetensors"
    base = make_checkpoint(QwenImage(), base_path)
    lora = make_lora(QwenImage(), tmp_path / "l.safetensors", spelling="musubi", rank=2, limit=30)
    out = tmp_path / "merged.safetensors"
    _invoke("merge", str(lora.path), "--base", str(base_path), "-o", str(out), "--json")
    merged = load_file(str(out))
    expected = lora.expected_weights(base)
    assert expected
    for key, want in expected.items():
        torch.testing.assert_close(merged[key].double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not _has("merge"), reason="lorasmith merge is not in the tree yet")
def test_merge_two_loras_stays_qwen_image(tmp_path: Path) -> None:
    a = make_lora(QwenImage(), tmp_path / "a.safetensors", spelling="peft", rank=2, limit=20, seed=1)
    b = make_lora(QwenImage(), tmp_path / "b.safetensors", spelling="aitk", rank=2, limit=20, seed=2)
    out = tmp_path / "ab.safetensors"
    _invoke("merge", f"{a.path}:0.5", f"{b.path}:0.5", "-o", str(out), "--json")
    data = json.loads(_invoke("inspect", str(out), "--json"))
    row = data[0] if isinstance(data, list) else data
    assert (row["arch"], row["kind"]) == ("qwenimage", "lora")


def _inspect(path: Path) -> dict[str, object]:
    data = json.loads(_invoke("inspect", str(path), "--json"))
    row: dict[str, object] = data[0] if isinstance(data, list) else data
    return row


@pytest.mark.skipif(not _has("resize"), reason="lorasmith resize is not in the tree yet")
def test_resize(tmp_path: Path) -> None:
    lora = make_lora(QwenImage(), tmp_path / "l.safetensors", spelling="peft", rank=4, limit=20)
    out = tmp_path / "r.safetensors"
    _invoke("resize", str(lora.path), "-o", str(out), "--rank", "2", "--json")
    row = _inspect(out)
    assert (row["arch"], row["kind"], row["layout"]) == ("qwenimage", "lora", "peft")
    tensors = load_file(str(out))
    downs = [t for k, t in tensors.items() if k.endswith(".lora_A.weight")]
    # rank 2, or less where a shrunk module is narrower (img_in has 64 / 64 = 1 input)
    assert len(downs) == 20 and all(t.shape[0] == min(2, t.shape[1]) for t in downs)


@pytest.mark.skipif(not _has("convert"), reason="lorasmith convert is not in the tree yet")
@pytest.mark.parametrize("to", ["musubi", "aitk", "lycoris"])
def test_convert_between_spellings(tmp_path: Path, to: str) -> None:
    lora = make_lora(QwenImage(), tmp_path / "l.safetensors", spelling="peft", rank=3, limit=20)
    out = tmp_path / f"{to}.safetensors"
    _invoke("convert", str(lora.path), "-o", str(out), "--to", to, "--json")
    row = _inspect(out)
    assert (row["arch"], row["kind"], row["layout"]) == ("qwenimage", "lora", to)


@pytest.mark.skipif(not _has("extract"), reason="lorasmith extract is not in the tree yet")
def test_extract_recovers_a_planted_delta(tmp_path: Path) -> None:
    from lorasmith.adapters import parse_module
    from lorasmith.archs.base import lora_modules
    from lorasmith.io.reader import load_all
    from lorasmith.testing import make_tuned

    arch = QwenImage()
    base_path, tuned_path, out = (
        tmp_path / "b.safetensors",
        tmp_path / "t.safetensors",
        tmp_path / "l.safetensors",
    )
    base = make_checkpoint(arch, base_path)
    keys = [
        k
        for k, t in base.items()
        if k.startswith("transformer_blocks.3.") and t.ndim == 2 and min(t.shape) >= 8
    ]
    assert keys
    deltas = make_tuned(arch, base, tuned_path, modules=keys, rank=2)
    _invoke("extract", "--base", str(base_path), "--tuned", str(tuned_path), "-o", str(out), "--rank", "2")
    assert _inspect(out)["arch"] == "qwenimage"
    tensors = load_all(out)
    table = arch.alias_table()
    got: dict[str, torch.Tensor] = {}
    for name, parts in lora_modules(tensors).items():
        module = parse_module(name, {suffix: tensors[key] for suffix, key in parts.items()})
        got[table[name].target.key] = module.delta(dtype=torch.float64)
    for key in keys:
        want = deltas[key].double()
        err = (got[key] - want).norm() / want.norm()
        assert err < 1e-3, (key, float(err))
