"""The Qwen-Image parts: the transformer slot, listed by ``lorasmith plugins`` and used by assemble/split.

The plugin's data holds the transformer only (no VAE or Qwen2.5-VL key set), so that is its one slot; a
single file's other keys stay with the transformer under their full names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lorasmith.archs.parts import diffusion_model_slot
from lorasmith.cli import app
from lorasmith.io.reader import load_all
from lorasmith.ops.components import assemble, split
from lorasmith.ops.inspect import inspect_file
from lorasmith.ops.plugins import list_plugins
from lorasmith.registry import get_registry, reset_registry
from lorasmith.testing import make_checkpoint
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasmith_qwenimage import QwenImage


@pytest.fixture(autouse=True)
def _fresh_registry() -> None:
    reset_registry()
    assert "qwenimage" in get_registry().archs()


def test_the_transformer_is_the_only_part() -> None:
    slots = QwenImage().part_slots()
    assert slots == (diffusion_model_slot(),)
    assert (slots[0].name, slots[0].kind, slots[0].prefix) == ("transformer", None, "model.diffusion_model.")


def test_plugins_lists_the_part() -> None:
    family = next(f for f in list_plugins().families if f.id == "qwenimage")
    assert [(p.name, p.kind, p.prefix, p.file) for p in family.parts] == [
        ("transformer", None, "model.diffusion_model.", None)
    ]
    assert family.part_kinds == []
    out = CliRunner().invoke(app, ["plugins", "--json"])
    assert out.exit_code == 0, out.output
    rows = {f["id"]: f for f in json.loads(out.stdout)["families"]}
    assert [p["name"] for p in rows["qwenimage"]["parts"]] == ["transformer"]


def test_assemble_and_split_round_trip(tmp_path: Path) -> None:
    bare = tmp_path / "qwen_image.safetensors"
    tensors = make_checkpoint(QwenImage(), bare)
    single = tmp_path / "single.safetensors"
    assemble({"transformer": bare}, single)
    assembled = load_all(single)
    assert set(assembled) == {"model.diffusion_model." + k for k in tensors}
    det = inspect_file(single)
    assert (det.arch, det.kind) == ("qwenimage", "checkpoint")

    folder = tmp_path / "parts"
    folder.mkdir()
    result = split(single, folder)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["single.safetensors"], result
    back = load_all(folder / "single.safetensors")
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key


def test_split_keeps_keys_outside_the_transformer(tmp_path: Path) -> None:
    tensors = make_checkpoint(QwenImage(), tmp_path / "bare.safetensors")
    single = {"model.diffusion_model." + k: v for k, v in tensors.items()}
    single["vae.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)  # a part without a slot
    path = tmp_path / "all_in_one.safetensors"
    save_file(single, str(path))
    folder = tmp_path / "out"
    folder.mkdir()
    split(path, folder)
    back = load_all(folder / "all_in_one.safetensors")
    assert "vae.decoder.conv_in.weight" in back  # kept under its full name, with the transformer
    assert set(back) - {"vae.decoder.conv_in.weight"} == set(tensors)
