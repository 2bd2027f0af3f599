"""Meta-tests: every command has a docs page; every hook is documented and exercised by a test."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

from lorasmith import hookspecs
from lorasmith.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PLUGIN_DOCS = DOCS / "plugins"
EXAMPLE = ROOT / "plugins" / "lorasmith-qwenimage"


def test_every_command_has_a_page() -> None:
    for name in COMMANDS:
        page = DOCS / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        assert f"lorasmith {name}" in page.read_text()


def _hooks() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("lorasmith_")]


def test_every_hook_is_documented() -> None:
    for name in _hooks():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"hook {name} has no docstring"
        for page in ("plugins.md", "plugins/reference.md", "plugins/tutorial.md"):
            assert name in (DOCS / page).read_text(), f"hook {name} is not documented in docs/{page}"


def test_plugin_pages_exist_and_are_linked() -> None:
    index = (DOCS / "plugins.md").read_text()
    for page in ("tutorial.md", "reference.md", "testing.md"):
        assert (PLUGIN_DOCS / page).is_file(), f"docs/plugins/{page} is missing"
        assert f"plugins/{page}" in index, f"docs/plugins.md does not link to plugins/{page}"
    testing = (PLUGIN_DOCS / "testing.md").read_text()
    for name in ("ArchitectureConformance", "make_checkpoint", "make_lora", "check_architecture"):
        assert name in testing, f"docs/plugins/testing.md does not cover {name}"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_reference_is_up_to_date() -> None:
    gen = _load_script("gen_plugin_reference")
    page = PLUGIN_DOCS / "reference.md"
    assert page.read_text() == gen.render(), "run: python scripts/gen_plugin_reference.py"
    text = page.read_text()
    for name in _hooks():
        assert f"### `{name}(" in text
    assert "Architecture._build_aliases" in text and "Architecture.detect(" in text


def _test_sources() -> str:
    roots = [ROOT / "tests", *sorted((ROOT / "plugins").glob("*/tests"))]
    return "\n".join(p.read_text() for r in roots for p in r.rglob("test_*.py") if p.name != "test_docs.py")


def test_every_hook_is_tested() -> None:
    tests = _test_sources()
    example = "\n".join(p.read_text() for p in (EXAMPLE / "src").rglob("*.py"))
    for name in _hooks():
        assert f"def {name}" in tests, f"no test implements hook {name}"
        # the example plugin implements every hook, and its tests exercise each one
        assert f"def {name}" in example, f"the example plugin does not implement hook {name}"
        assert f"{name}(" in tests.replace(f"def {name}(", ""), f"no test calls hook {name}"


def test_readme_starts_with_install_and_test() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:8])
    assert "pip install" in head and "pytest" in head
