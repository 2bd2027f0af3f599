"""Every built-in family passes the conformance suite, and the fixture factory works on each of them.

A built-in module that does not exist yet is skipped; one that exists but fails to import fails.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open

from lorasmith.archs.base import Architecture
from lorasmith.registry import DEFAULT_PLUGINS, Registry
from lorasmith.testing import check_architecture, make_checkpoint, make_lora, shrink_shape


def _present(modname: str) -> bool:
    try:
        return importlib.util.find_spec(modname) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The built-in families that exist so far, without third-party plugins."""
    return Registry(builtins=[m for m in DEFAULT_PLUGINS if _present(m)], autoload=False)


def _families(modname: str, registry: Registry) -> list[Architecture]:
    module = pytest.importorskip(modname)
    classes = module.lorasmith_register_architectures()
    assert classes, f"{modname} registers no family"
    return [registry.get(cls.id) for cls in classes]


@pytest.mark.parametrize("modname", DEFAULT_PLUGINS)
def test_builtin_family_conforms(modname: str, registry: Registry) -> None:
    for arch in _families(modname, registry):
        failures = check_architecture(arch, registry=registry)
        assert not failures, f"{arch.id}:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("modname", DEFAULT_PLUGINS)
def test_fixture_factory_on_builtin_family(modname: str, registry: Registry, tmp_path: Path) -> None:
    for arch in _families(modname, registry):
        inv = arch.canonical_inventory()
        path = tmp_path / f"{arch.id}.safetensors"
        tensors = make_checkpoint(arch, path, dtype=None)
        assert len(tensors) == len(inv.tensors)
        assert path.stat().st_size < 32 * 2**20, "shrunk fixtures must stay small"
        with safe_open(path, "pt") as fh:
            for key in list(inv.tensors)[:: max(1, len(inv.tensors) // 50)]:
                assert tuple(fh.get_slice(key).get_shape()) == shrink_shape(inv.tensors[key].shape)
        for spelling in arch.spellings:
            if not arch.aliases(None, spelling):
                continue
            fx = make_lora(arch, tmp_path / f"{arch.id}-{spelling}.safetensors", spelling=spelling, limit=12)
            for name, m in fx.modules.items():
                assert arch.base_weight(name) == m.alias.target
                if m.target.key not in tensors:  # a text encoder of another inventory of the family
                    continue
                part = tensors[m.target.key]
                if m.target.slice is not None:
                    part = part.narrow(*m.target.slice)
                assert tuple(m.delta.shape) == tuple(part.shape), name
