"""The family layer (``lorasmith.archs``) never imports the layers above it (DESIGN.md, "Layers").

An AST scan of every module under ``lorasmith/archs``: module-level imports, imports inside functions and
``TYPE_CHECKING`` blocks, relative imports that climb out of the package, and ``import_module``/
``__import__`` calls with a literal name all count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorasmith.archs

PACKAGE_DIR = Path(lorasmith.archs.__file__).resolve().parent
#: layers above the families: the registry that loads them, the operations, the commands and the CLI.
FORBIDDEN = ("lorasmith.registry", "lorasmith.ops", "lorasmith.commands", "lorasmith.cli")


def _resolve(module: str | None, level: int, names: list[str], package: str) -> list[str]:
    """Absolute module names a ``from`` import can reach (``from lorasmith import ops`` reaches ops)."""
    if level:
        parts = package.split(".")
        if level > len(parts):
            return []
        base = ".".join(parts[: len(parts) - level + 1])
        module = f"{base}.{module}" if module else base
    assert module is not None
    return [module, *(f"{module}.{n}" for n in names)]


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def violations(source: str, filename: str, package: str = "lorasmith.archs") -> list[str]:
    """``file:line: module`` of every import of a forbidden layer in ``source``."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []
    for node in ast.walk(tree):
        reached: list[str] = []
        if isinstance(node, ast.Import):
            reached = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            reached = _resolve(node.module, node.level, [a.name for a in node.names], package)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"__import__", "import_module"} and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    reached = [arg.value]
        found += [f"{filename}:{node.lineno}: {m}" for m in reached if _forbidden(m)]
    return found


def test_no_archs_module_imports_ops_commands_or_cli() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert any(f.name == "parts.py" for f in files)
    problems = []
    for f in files:
        rel = f.relative_to(PACKAGE_DIR.parent)
        package = "lorasmith." + ".".join(rel.parent.parts)
        problems += violations(f.read_text(encoding="utf-8"), str(rel), package)
    assert problems == []


def test_the_checker_finds_every_spelling() -> None:
    source = """
import lorasmith.ops.layouts
from lorasmith.ops import merge
from lorasmith import ops
from lorasmith import commands as c
from ..ops.layouts import layout_shape
import importlib

def lazy():
    from lorasmith.ops.layouts import layout_parts
    importlib.import_module("lorasmith.cli")

if TYPE_CHECKING:
    from lorasmith.commands._common import JsonOpt
"""
    problems = violations(source, "bad.py")
    lines = sorted({int(p.split(":")[1]) for p in problems})
    assert lines == [2, 3, 4, 5, 6, 10, 11, 14]


def test_the_checker_allows_the_layers_below() -> None:
    source = """
import lorasmith.archs.base
from lorasmith.archs.layout_shapes import layout_parts
from lorasmith import errors, io
from . import base
from .base import LayoutEntry
from lorasmith.opsx import thing

def lazy():
    from lorasmith.io.header import read_header
"""
    assert violations(source, "good.py") == []


def test_layout_shape_helpers_are_one_definition() -> None:
    from lorasmith.archs import layout_shapes
    from lorasmith.ops import layouts

    for name in ("layout_parts", "layout_shape", "canonical_shape"):
        assert getattr(layouts, name) is getattr(layout_shapes, name)
