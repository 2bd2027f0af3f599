"""A broken third-party plugin makes ``lorasmith`` exit 3 with a message naming it and how to block it.

Each case is a tiny distribution written into a temporary folder (a module plus a ``.dist-info`` with an
``entry_points.txt``), found through the real entry-point mechanism by ``python -m lorasmith plugins``
run with that folder on ``PYTHONPATH``. ``LORASMITH_BLOCK_PLUGINS=<name>`` makes the command work again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorasmith.errors import EXIT_PLUGIN

#: entry-point name -> (module source, words the error message must contain)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "brokenimport": (
        "import lorasmith_module_that_does_not_exist\n",
        ("failed to load", "ModuleNotFoundError"),
    ),
    "dupid": (
        """
        from lorasmith.archs.base import Architecture
        from lorasmith.hookspecs import hookimpl

        class NotSdxl(Architecture):
            id = "sdxl"
            name = "Not SDXL"
            variants = ("base",)

        @hookimpl
        def lorasmith_register_architectures():
            return [NotSdxl]
        """,
        ("family id 'sdxl' is registered twice", "lorasmith.archs.sdxl"),
    ),
    "aliasclash": (
        """
        from lorasmith.archs.base import Alias, Target
        from lorasmith.hookspecs import hookimpl

        @hookimpl
        def lorasmith_extra_aliases(arch_id, variant):
            if arch_id != "sdxl":
                return None
            # a name the built-in SDXL family already maps to attn1.to_q, onto another weight
            name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
            return [Alias(name, "peft", Target(key), "unet")]
        """,
        ("alias conflict in family 'sdxl'", "attn1.to_q"),
    ),
    "typohook": (
        """
        from lorasmith.hookspecs import hookimpl

        @hookimpl
        def lorasmith_register_architecture():
            return []
        """,
        ("unknown hook", "lorasmith_register_architecture"),
    ),
    "badargs": (
        """
        from lorasmith.hookspecs import hookimpl

        @hookimpl
        def lorasmith_extra_aliases(family):
            return None
        """,
        ("is invalid", "family"),
    ),
    "badparts": (
        """
        from lorasmith.archs.parts import PartSlot, diffusion_model_slot
        from lorasmith.hookspecs import hookimpl
        from lorasmith.testing.toy import ToyArch

        class BadParts(ToyArch):
            id = "badparts"
            part_kinds = ()
            component_parts = (diffusion_model_slot(), PartSlot("text_encoder", "nobody_te", "te."))

        @hookimpl
        def lorasmith_register_architectures():
            return [BadParts]
        """,
        ("the parts of family 'badparts' are broken", "unknown kind 'nobody_te'"),
    ),
}


def _install(root: Path, name: str, source: str) -> None:
    """Write module ``lsplug_<name>`` and its dist-info, entry point ``<name>`` in group ``lorasmith``."""
    module = f"lsplug_{name}"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"lsplug_{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lsplug-{name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[lorasmith]\n{name} = {module}\n")


def _run(root: Path, *args: str, block: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.pop("LORASMITH_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("LORASMITH_BLOCK_PLUGINS", None)
    if block:
        env["LORASMITH_BLOCK_PLUGINS"] = block
    return subprocess.run(
        [sys.executable, "-m", "lorasmith", "plugins", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_plugin_exits_3_naming_it(tmp_path: Path, name: str) -> None:
    source, words = CASES[name]
    _install(tmp_path, name, source)
    proc = _run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_PLUGIN, out
    assert repr(name) in out, out
    assert f"LORASMITH_BLOCK_PLUGINS={name}" in out, out
    for word in words:
        assert word in out, out
    assert "Traceback" not in out, out

    ok = _run(tmp_path, "--json", block=name)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    listed = {p["name"] for p in json.loads(ok.stdout)["plugins"]}
    assert name not in listed


def test_a_working_plugin_is_listed_with_its_version(tmp_path: Path) -> None:
    source = """
    from lorasmith.hookspecs import hookimpl

    @hookimpl
    def lorasmith_extra_aliases(arch_id):
        return None
    """
    _install(tmp_path, "fine", source)
    proc = _run(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert rows["fine"]["version"] == "0.3"
