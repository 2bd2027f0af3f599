"""merge recipes: the same operations as the command line, validation errors naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.io.reader import load_all
from lorasmith.ops.merge import merge
from lorasmith.ops.recipes import RecipeError, load_recipe, recipe_arguments
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

runner = CliRunner()


def _same(a: Path, b: Path) -> None:
    ta, tb = load_all(a), load_all(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_lora_recipe_matches_cli(tmp_path: Path) -> None:
    xl = get("sdxl")
    make_lora(xl, tmp_path / "a.safetensors", rank=4, limit=6, seed=1)
    make_lora(xl, tmp_path / "b.safetensors", rank=2, limit=6, seed=2)
    (tmp_path / "r.yaml").write_text(
        "output: out/r.safetensors\n"
        "loras:\n  - a.safetensors:0.6\n  - {path: b.safetensors, ratio: -0.4}\n"
        "rank: 3\nblocks: {BASE: 0, MID: 0.5}\nsave-dtype: fp16\n"
    )
    (tmp_path / "out").mkdir()
    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    cli = runner.invoke(
        app,
        [
            "merge",
            f"{tmp_path / 'a.safetensors'}:0.6",
            f"{tmp_path / 'b.safetensors'}:-0.4",
            "--rank",
            "3",
            "--blocks",
            "BASE=0,MID=0.5",
            "--save-dtype",
            "fp16",
            "-o",
            str(tmp_path / "c.safetensors"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    _same(tmp_path / "out" / "r.safetensors", tmp_path / "c.safetensors")
    assert load_all(tmp_path / "c.safetensors")[next(iter(load_all(tmp_path / "c.safetensors")))].dtype in (
        torch.float16,
        torch.float32,  # alpha tensors stay float32
    )


def test_bake_and_checkpoint_recipes(tmp_path: Path) -> None:
    sd = get("sd1")
    for i in range(3):
        make_checkpoint(sd, tmp_path / f"m{i}.safetensors", seed=i)
    make_lora(sd, tmp_path / "l.safetensors", rank=2, limit=6)
    blocks = ",".join(["0.5"] * 17)
    (tmp_path / "bake.yaml").write_text(
        f"base: m0.safetensors\nloras: [l.safetensors:0.8]\nblocks: [{blocks}]\n"
        "precision: float64\noutput: bake.safetensors\n"
    )
    (tmp_path / "ad.yaml").write_text(
        "models: [m0.safetensors, m1.safetensors:0.5, m2.safetensors]\nmethod: add-difference\n"
        "unet_only: true\noutput: ad.safetensors\n"
    )
    (tmp_path / "dare.yaml").write_text(
        "models: [m0.safetensors, m1.safetensors, m2.safetensors]\nmethod: dare\ndrop: 0.5\nseed: 4\n"
        "lambda: 0.5\noutput: dare.safetensors\n"
    )
    for name in ("bake", "ad", "dare"):
        res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / f"{name}.yaml"), "-q"])
        assert res.exit_code == 0, res.output
    p = [str(tmp_path / f"m{i}.safetensors") for i in range(3)]
    merge(
        [f"{tmp_path / 'l.safetensors'}:0.8"],
        base=p[0],
        blocks=blocks,
        precision="float64",
        output=tmp_path / "bake2.safetensors",
    )
    merge(
        models=[p[0], f"{p[1]}:0.5", p[2]],
        method="add-difference",
        unet_only=True,
        output=tmp_path / "ad2.st",
    )
    merge(models=p, method="dare", drop=0.5, seed=4, lam=0.5, output=tmp_path / "dare2.safetensors")
    _same(tmp_path / "bake.safetensors", tmp_path / "bake2.safetensors")
    _same(tmp_path / "ad.safetensors", tmp_path / "ad2.st")
    _same(tmp_path / "dare.safetensors", tmp_path / "dare2.safetensors")


def test_output_override_and_overwrite(tmp_path: Path) -> None:
    make_lora(get("sdxl"), tmp_path / "a.safetensors", rank=2, limit=3)
    (tmp_path / "r.yaml").write_text("loras: [a.safetensors]\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    with pytest.raises(RecipeError):
        recipe_arguments(recipe, tmp_path, None)
    o = tmp_path / "o.safetensors"
    assert runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "-o", str(o)]).exit_code == 0
    again = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "-o", str(o)])
    assert again.exit_code == 1 and "exists" in again.output
    ok = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "-o", str(o), "--overwrite"])
    assert ok.exit_code == 0, ok.output


def _fail(tmp_path: Path, text: str, code: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = runner.invoke(app, ["merge", "--recipe", str(path), *extra])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return [line for line in res.output.splitlines() if line.startswith("error:")]


def test_errors_name_file_and_field(tmp_path: Path) -> None:
    lines = _fail(
        tmp_path,
        "loras:\n  - a.safetensors:0.5\n  - {path: b.safetensors, ratio: strong}\n"
        "method: average\nrank: 0\nbogus: 1\n",
    )
    assert len(lines) == 4
    assert all("bad.yaml: " in line for line in lines)
    fields = " ".join(lines)
    for field in ("loras[1].ratio", "method", "rank", "bogus: unknown field"):
        assert field in fields
    assert "nothing to merge" in _fail(tmp_path, "output: x.safetensors\n")[0]
    assert "not both" in _fail(tmp_path, "loras: [a]\nmodels: [b, c]\n")[0]
    assert "base needs loras" in _fail(tmp_path, "base: a\n")[0]
    assert "not valid YAML" in _fail(tmp_path, "loras: [a\n  b: c\n")[0]
    assert "mapping" in _fail(tmp_path, "- a\n- b\n")[0]
    assert "drop" in _fail(tmp_path, "models: [a, b]\ndrop: 1\n")[0]
    assert "also given: FILES" in _fail(tmp_path, "loras: [a]\n", 2, ("x.safetensors",))[0]
    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "cannot read the recipe" in res.output


# ------------------------------------------------------------------------- separate text-encoder files
def test_bake_recipe_with_separate_text_encoders(tmp_path: Path) -> None:
    from test_components import _te_lora, flux_parts, same

    from lorasmith.ops.components import ComponentsResult, bake_parts
    from lorasmith.ops.recipes import run_recipe

    parts = flux_parts(tmp_path)
    _te_lora("flux", tmp_path / "lora.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "r.yaml").write_text(
        "base: flux1-dev.safetensors\nloras: [lora.safetensors:0.7]\noutput: out/t.safetensors\n"
        "clip_l: clip_l.safetensors\nclip-l-out: out/clip_l.safetensors\n"
        "t5xxl: t5xxl_fp16.safetensors\nt5xxl_out: out/t5xxl.safetensors\nprecision: float64\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    res = run_recipe(recipe, tmp_path)
    assert isinstance(res, ComponentsResult) and res.mode == "bake" and not res.skipped
    bake_parts(
        parts["transformer"],
        [f"{tmp_path / 'lora.safetensors'}:0.7"],
        tmp_path / "t.safetensors",
        parts={
            "clip_l": (parts["clip_l"], tmp_path / "c.safetensors"),
            "t5xxl": (parts["t5xxl"], tmp_path / "x.safetensors"),
        },
        precision="float64",
    )
    same(tmp_path / "out" / "t.safetensors", tmp_path / "t.safetensors")
    same(tmp_path / "out" / "clip_l.safetensors", tmp_path / "c.safetensors")
    same(tmp_path / "out" / "t5xxl.safetensors", tmp_path / "x.safetensors")
    # the output given apart wins, and an existing output needs overwrite
    with pytest.raises(Exception, match="exists"):
        run_recipe(recipe, tmp_path)
    res = run_recipe(recipe, tmp_path, tmp_path / "other.safetensors", overwrite=True)
    assert res.outputs[0].path == str(tmp_path / "other.safetensors")
    # a recipe without parts runs merge()
    (tmp_path / "plain.yaml").write_text("loras: [lora.safetensors]\noutput: plain.safetensors\n")
    assert run_recipe(load_recipe(tmp_path / "plain.yaml"), tmp_path).mode == "lora"


def test_text_encoder_fields_are_validated(tmp_path: Path) -> None:
    lines = _fail(
        tmp_path,
        "base: m.safetensors\nloras: [l.safetensors]\nclip_l: c.safetensors\nt5xxl_out: t.safetensors\n"
        "clip_g: g.safetensors\nclip_g_out: g2.safetensors\n",
    )
    assert len(lines) == 2 and all("bad.yaml: " in line for line in lines)
    assert "clip_l_out: missing" in lines[0] and "t5xxl: missing" in lines[1]
    line = _fail(
        tmp_path, "loras: [l.safetensors]\ntext_encoder: q.safetensors\ntext_encoder_out: o.safetensors\n"
    )
    assert (
        len(line) == 1
        and "bad.yaml: text_encoder: separate text-encoder files are baked with base" in line[0]
    )
    assert "clip_g_out: unknown field" not in " ".join(_fail(tmp_path, "loras: [a]\nclip_g_out: 1.5\n"))
    assert (
        "bad.yaml: clip_l: Input should be a valid string" in _fail(tmp_path, "loras: [a]\nclip_l: [1]\n")[0]
    )


def test_recipe_arguments_refuse_to_drop_text_encoder_files(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "base: m.safetensors\nloras: [l.safetensors]\nclip_l: c.safetensors\nclip_l_out: o.safetensors\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml: clip_l: separate text-encoder files") as e:
        recipe_arguments(recipe, tmp_path, "x.safetensors")
    assert "\n" not in e.value.message


def test_cli_never_drops_text_encoder_files(tmp_path: Path) -> None:
    make_checkpoint(get("sd1"), tmp_path / "m.safetensors", components=("unet",))
    make_lora(get("sd1"), tmp_path / "l.safetensors", rank=2, limit=3)
    (tmp_path / "r.yaml").write_text(
        "base: m.safetensors\nloras: [l.safetensors]\noutput: o.safetensors\n"
        "clip_l: missing_clip_l.safetensors\nclip_l_out: c.safetensors\n"
    )
    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml")])
    # refused with one error line (or baked with the text encoder): never a bake that leaves it out
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_recipe_bakes_separate_text_encoders(tmp_path: Path) -> None:
    """``merge --recipe`` with text-encoder fields runs the components bake and reports every output."""
    import json

    from test_components import _te_lora, flux_parts, same

    from lorasmith.ops.recipes import run_recipe

    flux_parts(tmp_path)
    _te_lora("flux", tmp_path / "lora.safetensors")
    (tmp_path / "cli").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "r.yaml").write_text(
        "base: flux1-dev.safetensors\nloras: [lora.safetensors:0.7]\noutput: cli/t.safetensors\n"
        "clip_l: clip_l.safetensors\nclip_l_out: cli/clip_l.safetensors\n"
    )
    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["mode"] == "bake" and len(report["outputs"]) == 2
    (tmp_path / "r2.yaml").write_text((tmp_path / "r.yaml").read_text().replace("cli/", "lib/"))
    run_recipe(load_recipe(tmp_path / "r2.yaml"), tmp_path)
    same(tmp_path / "cli" / "t.safetensors", tmp_path / "lib" / "t.safetensors")
    same(tmp_path / "cli" / "clip_l.safetensors", tmp_path / "lib" / "clip_l.safetensors")
    # text-encoder options on the command line clash with --recipe
    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "--clip-l", "x.safetensors"])
    assert res.exit_code == 2 and "--clip-l" in res.output
