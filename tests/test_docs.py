"""Meta-tests: every command has a docs page; every hook is documented and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

from lorasmith import hookspecs
from lorasmith.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_command_has_a_page() -> None:
    for name in COMMANDS:
        page = DOCS / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        assert f"lorasmith {name}" in page.read_text()


def _hooks() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("lorasmith_")]


def test_every_hook_is_documented() -> None:
    text = (DOCS / "plugins.md").read_text()
    for name in _hooks():
        assert name in text, f"hook {name} is not documented in docs/plugins.md"
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"hook {name} has no docstring"


def test_every_hook_is_tested() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py")
    for name in _hooks():
        assert f"def {name}" in tests, f"no test implements hook {name}"


def test_readme_starts_with_install_and_test() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:8])
    assert "pip install" in head and "pytest" in head
