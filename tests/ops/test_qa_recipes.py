"""merge recipes: mistakes found by the acceptance pass name the recipe file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

runner = CliRunner()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    sd = get("sd1")
    make_lora(sd, tmp_path / "a.safetensors", rank=2, limit=4, seed=1)
    make_lora(sd, tmp_path / "b.safetensors", rank=2, limit=4, seed=2)
    make_checkpoint(sd, tmp_path / "m.safetensors", components=("unet",))
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loras: [a.safetensors, missing.safetensors:0.5]", "r.yaml: loras[1]: "),
        ("loras: [a.safetensors:abc]", "r.yaml: loras[0]: "),
        ("loras: [sub]", "r.yaml: loras[0]: "),
        ("base: nobase.safetensors\nloras: [a.safetensors]", "r.yaml: base: "),
        ("models: [m.safetensors, gone.safetensors]", "r.yaml: models[1]: "),
        ("base: a.safetensors\nloras: [b.safetensors]", "r.yaml: base: "),
        ("loras: [m.safetensors]", "r.yaml: loras[0]: "),
        ("loras: [{path: a.safetensors, ratio: true}]", "r.yaml: loras[0].ratio: "),
        ("loras: [a.safetensors]\nrank: true", "r.yaml: rank: "),
        ("loras: [a.safetensors]\nblocks: FOO=1", "r.yaml: blocks: "),
        ("loras: [a.safetensors]\ndynamic: sv_fro", "r.yaml: dynamic: "),
        ("loras: [a.safetensors]\ndynamic: sv_fro:x", "r.yaml: dynamic: "),
        ("loras: [a.safetensors]\ndynamic: sv_fro:2", "r.yaml: dynamic: "),
        ("loras: [a.safetensors]\nto: nope", "r.yaml: to: "),
        ("loras: [a.safetensors]\noutput: nodir/o.safetensors", "r.yaml: output: "),
    ],
)
def test_recipe_errors_name_file_and_field(folder: Path, text: str, expected: str) -> None:
    """A missing file, a bad ratio, a bad option value: the error named neither the recipe nor the field."""
    if "output:" not in text:
        text += "\noutput: out.safetensors"
    (folder / "r.yaml").write_text(text + "\n")
    res = runner.invoke(app, ["merge", "--recipe", str(folder / "r.yaml")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint:"), res.output
    assert lines[0].startswith("error: ") and expected in lines[0], res.output
    assert not (folder / "out.safetensors").exists()


def test_recipe_output_missing_names_the_recipe(folder: Path) -> None:
    (folder / "r.yaml").write_text("loras: [a.safetensors]\n")
    res = runner.invoke(app, ["merge", "--recipe", str(folder / "r.yaml")])
    assert res.exit_code == 1
    assert "r.yaml: output: missing" in res.output


def test_recipe_output_exists_names_the_field_only_when_it_is_the_recipes(folder: Path) -> None:
    (folder / "r.yaml").write_text("loras: [a.safetensors]\noutput: out.safetensors\n")
    (folder / "out.safetensors").write_bytes(b"x")
    res = runner.invoke(app, ["merge", "--recipe", str(folder / "r.yaml")])
    assert res.exit_code == 1 and "r.yaml: output: " in res.output and "already exists" in res.output
    o = str(folder / "out.safetensors")
    res = runner.invoke(app, ["merge", "--recipe", str(folder / "r.yaml"), "-o", o])
    assert res.exit_code == 1 and "r.yaml" not in res.output and "already exists" in res.output
    assert (folder / "out.safetensors").read_bytes() == b"x"
