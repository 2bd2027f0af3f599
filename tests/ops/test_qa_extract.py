"""extract: regressions found by the acceptance pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

runner = CliRunner()


@pytest.mark.parametrize(("base", "tuned"), [("sdxl", "sd1"), ("flux", "zimage")])
def test_tuned_checkpoint_of_another_family(tmp_path: Path, base: str, tuned: str) -> None:
    """A tuned checkpoint of another family was read in the base's and failed on the first shape."""
    make_checkpoint(get(base), tmp_path / "b.safetensors")
    make_checkpoint(get(tuned), tmp_path / "t.safetensors")
    res = runner.invoke(
        app,
        [
            "extract",
            "--base",
            str(tmp_path / "b.safetensors"),
            "--tuned",
            str(tmp_path / "t.safetensors"),
            "-o",
            str(tmp_path / "o.safetensors"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 1, res.output
    assert f"is a {tuned} checkpoint" in res.output and f"a {base} checkpoint" in res.output
    assert "hint:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--rank", "4", "--auto"], "--rank and --auto"), (["--rank", "0", "--ratio", "0.1"], "--rank 0")],
)
def test_rank_options_that_were_ignored(tmp_path: Path, args: list[str], needle: str) -> None:
    """--rank was silently ignored with --auto, and --rank 0 accepted as the cap of a LyCORIS rule."""
    sd = get("sd1")
    make_checkpoint(sd, tmp_path / "b.safetensors", components=("unet",))
    make_checkpoint(sd, tmp_path / "t.safetensors", components=("unet",), seed=1)
    res = runner.invoke(
        app,
        [
            "extract",
            "--base",
            str(tmp_path / "b.safetensors"),
            "--tuned",
            str(tmp_path / "t.safetensors"),
            "-o",
            str(tmp_path / "o.safetensors"),
            "--device",
            "cpu",
            *args,
        ],
    )
    assert res.exit_code == 2, res.output
    assert needle in res.output and "hint:" in res.output
    assert not (tmp_path / "o.safetensors").exists()
