"""The command line: --help without torch, stubs, plugins, error formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app

runner = CliRunner()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorasmith", *args], capture_output=True, text=True, timeout=120
    )


def test_help_and_import_do_not_import_torch() -> None:
    code = (
        "import sys, lorasmith, lorasmith.cli, lorasmith.registry;"
        "from lorasmith.registry import get_registry; get_registry();"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    proc = _run("--help")
    assert proc.returncode == 0
    for name in ("inspect", "merge", "resize", "extract", "convert", "cache", "plugins"):
        assert name in proc.stdout


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "lorasmith" in result.output


def test_plugins_lists_builtins_as_json() -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {f["id"] for f in data["families"]} >= {"sd1", "sdxl", "flux", "sd3", "zimage"}
    assert all(p["version"] for p in data["plugins"])


def test_stub_commands_say_not_available() -> None:
    import importlib.util

    from lorasmith.cli import COMMANDS

    missing = [n for n in COMMANDS if importlib.util.find_spec(f"lorasmith.commands.{n}") is None]
    if not missing:
        pytest.skip("every command is implemented")
    for name in missing:
        proc = _run(name, "x")
        assert proc.returncode == 1
        assert "not available yet" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_unknown_option_is_usage_error() -> None:
    proc = _run("inspect", "--no-such-option", "x")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_import_of_the_cli_loads_no_command_module() -> None:
    code = (
        "import sys, lorasmith.cli;"
        "print(sorted(m for m in sys.modules if m.startswith(('lorasmith.commands.', 'lorasmith.ops',"
        " 'lorasmith.registry', 'rich', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command_with_its_own_help() -> None:
    from lorasmith.cli import COMMANDS, command_help, load_command

    proc = _run("--help")
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    for name in COMMANDS:
        # read from the source without importing; the same text the imported command carries
        assert command_help(name) == (load_command(name).help or ""), name


def test_a_mistyped_command_suggests_the_nearest() -> None:
    proc = _run("inspekt", "x")
    assert proc.returncode == 2
    assert "Did you mean 'inspect'?" in proc.stderr


def test_inspect_json_imports_neither_rich_nor_other_commands(tmp_path: Path) -> None:
    from lorasmith.registry import get_registry
    from lorasmith.testing import make_lora

    path = tmp_path / "lora.safetensors"
    make_lora(get_registry().get("sdxl"), path, limit=8)
    code = (
        "import sys; sys.argv = ['lorasmith', 'inspect', '--json', sys.argv[1]]\n"
        "from lorasmith.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rich', 'torch', 'lorasmith.commands.'))),"
        " file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["arch"] == "sdxl"
    loaded = out.stderr.strip().splitlines()[-1]
    assert loaded == "['lorasmith.commands._common', 'lorasmith.commands.inspect']"
