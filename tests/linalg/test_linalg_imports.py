"""lorasmith.linalg is a leaf package: it imports only torch and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import lorasmith.linalg

PACKAGE_DIR = Path(lorasmith.linalg.__file__).resolve().parent
ALLOWED_THIRD_PARTY = {"torch"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
                    found.append(f"{path.name}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                found.append(f"{path.name}:{node.lineno}: relative import leaves the package")
            elif node.level == 0:
                top = (node.module or "").split(".")[0]
                if top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"__import__", "import_module"}:
                found.append(f"{path.name}:{node.lineno}: dynamic import")
    return found


def test_linalg_imports_only_torch_and_stdlib() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert any(f.name == "svd.py" for f in files)
    problems = [v for f in files for v in _violations(f)]
    assert problems == []


def test_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import numpy\nfrom lorasmith import errors\nfrom .. import errors\n"
        "import importlib\nimportlib.import_module('x')\nimport os, torch.linalg\nfrom . import svd\n",
        encoding="utf-8",
    )
    problems = _violations(bad)
    assert len(problems) == 4
    assert any("numpy" in p for p in problems)
    assert any("from lorasmith" in p for p in problems)
