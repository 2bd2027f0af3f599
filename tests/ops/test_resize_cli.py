"""``lorasmith resize`` on the command line: rendering, JSON, and one-line errors with exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint, make_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    sdxl, sd1 = get_registry().get("sdxl"), get_registry().get("sd1")
    make_lora(sdxl, d / "lora.safetensors", rank=6, limit=6, metadata={"ss_network_dim": "6"})
    make_lora(sdxl, d / "other.safetensors", rank=4, limit=6, seed=3)
    make_checkpoint(sdxl, d / "base.safetensors")
    make_checkpoint(sd1, d / "sd1.safetensors", components=("unet",))
    save_file({"w": torch.zeros(2, 2)}, str(d / "plain.safetensors"))
    (d / "out").mkdir()
    return {
        "dir": d,
        "lora": d / "lora.safetensors",
        "other": d / "other.safetensors",
        "base": d / "base.safetensors",
        "sd1": d / "sd1.safetensors",
        "plain": d / "plain.safetensors",
        "out": d / "out",
    }


def invoke(*args: str | Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["resize", *map(str, args)], env=env)


def assert_user_error(result, message: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: "))
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_resize_human_output(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = invoke(files["lora"], "-o", out, "--rank", "3", "-q")
    assert result.exit_code == 0, result.stderr
    assert str(out) in result.stdout and "6 modules: 6 resized" in result.stdout
    assert "rank 3..3" in result.stdout and "ss_network_dim 3" in result.stdout
    verbose = invoke(files["lora"], "-o", out, "--rank", "2", "-q", "-v", "--overwrite")
    assert verbose.exit_code == 0
    assert "6 -> 2" in verbose.stdout and "err LoRA" in verbose.stdout


def test_resize_json(files: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        files["lora"],
        "--output-dir",
        tmp_path,
        "--dynamic",
        "sv_fro",
        "--param",
        "0.9",
        "--json",
        "--base",
        files["base"],
        env={"LORASMITH_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    (out,) = data["outputs"]
    assert Path(out["path"]).name == "lora_svfro0.9.safetensors"
    assert len(out["modules"]) == 6 and out["summary"]["modules"] == 6
    assert all(m["rel_error_base"] is not None for m in out["modules"])
    assert data["base"][0]["computed"] == 6
    assert (tmp_path / "cache" / "norms").is_dir()


def test_progress_goes_to_stderr(files: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorasmith",
            "resize",
            str(files["lora"]),
            "-o",
            str(tmp_path / "p.safetensors"),
            "--rank",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "decompose:" in proc.stderr and "it/s" not in proc.stdout


def test_existing_output_is_refused_and_left_intact(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert_user_error(invoke(files["lora"], "-o", out, "--rank", "2"), "already exists")
    assert out.read_bytes() == b"precious"
    assert invoke(files["lora"], "-o", out, "--rank", "2", "--overwrite", "-q").exit_code == 0
    assert out.read_bytes() != b"precious"


def test_the_input_is_never_the_output(files: dict[str, Path]) -> None:
    before = files["lora"].read_bytes()
    assert_user_error(
        invoke(files["lora"], "-o", files["lora"], "--rank", "2", "--overwrite"), "its own input"
    )
    assert files["lora"].read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{plain}", "-o", "{tmp}/o.safetensors", "--rank", "2"], "no LoRA modules"),
        (["{sd1}", "-o", "{tmp}/o.safetensors", "--rank", "2"], "checkpoint, not a LoRA"),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--rank", "0"], "--rank must be at least 1"),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--conv-rank", "0"], "--conv-rank must be at least 1"),
        (
            ["{lora}", "-o", "{tmp}/o.safetensors", "--recipe", "spn_lora=1,thr=-1,nope=2"],
            "unknown key 'nope'",
        ),
        (
            ["{lora}", "-o", "{tmp}/o.safetensors", "--recipe", "fro_ckpt=1,thr=-2", "--base", "{sd1}"],
            "checkpoint but lora.safetensors is a Stable Diffusion XL LoRA",
        ),
        (["{lora}", "--rank", "2"], "exactly one of -o/--output and --output-dir"),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--output-dir", "{tmp}", "--rank", "2"], "exactly one of"),
        (
            ["{lora}", "{other}", "-o", "{tmp}/o.safetensors", "--rank", "2"],
            "-o names one output but 2 inputs",
        ),
        (["{lora}", "-o", "{tmp}/o.safetensors"], "nothing to do"),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--dynamic", "sv_fro"], "needs --param"),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--dynamic", "sv_fro", "--param", "1.5"], "--param"),
        (
            ["{lora}", "-o", "{tmp}/o.safetensors", "--dynamic", "svd", "--param", "1"],
            "unknown dynamic method",
        ),
        (
            ["{lora}", "-o", "{tmp}/o.safetensors", "--rank", "2", "--to", "onetrainer"],
            "no 'onetrainer' spelling",
        ),
        (["{lora}", "-o", "{tmp}/o.safetensors", "--rank", "2", "--device", "tpu"], "unknown device"),
        (["{dir}/missing.safetensors", "-o", "{tmp}/o.safetensors", "--rank", "2"], "no such file"),
        (["{dir}/*.nothing", "-o", "{tmp}/o.safetensors", "--rank", "2"], "no file matches"),
        (["{lora}", "--output-dir", "{tmp}/absent", "--rank", "2"], "output folder does not exist"),
        (
            ["{lora}", "-o", "{tmp}/o.safetensors", "--recipe", "subspace=1,thr=0"],
            "needs the base checkpoint",
        ),
        (["{lora}:0.5,{sd1}", "-o", "{tmp}/o.safetensors", "--rank", "2"], "checkpoint, not a LoRA"),
    ],
)
def test_user_errors_are_one_line_with_exit_1(
    files: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    values = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    result = invoke(*[a.format(**values) for a in args])
    assert_user_error(result, message)
    assert not (tmp_path / "o.safetensors").exists()


def test_errors_in_a_fresh_process(files: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorasmith",
            "resize",
            str(files["sd1"]),
            "-o",
            str(tmp_path / "o.safetensors"),
            "--rank",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_merge_spec_and_recipes_from_the_command_line(files: dict[str, Path], tmp_path: Path) -> None:
    spec = f"{files['lora']}:0.7,{files['other']}:0.3"
    result = invoke(
        spec,
        "--output-dir",
        tmp_path,
        "--recipe",
        "spn_lora=1,thr=-0.7:fro_ckpt=1,thr=-2",
        "--base",
        files["base"],
        "--json",
        env={"LORASMITH_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.exit_code == 0, result.stderr
    names = sorted(Path(o["path"]).name for o in json.loads(result.stdout)["outputs"])
    assert names == [
        "lora0.7+other0.3_frockpt1_th-2.safetensors",
        "lora0.7+other0.3_spnlora1_th-0.7.safetensors",
    ]
