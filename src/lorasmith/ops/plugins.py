"""List loaded plugins and families (torch-free)."""

from __future__ import annotations

from pydantic import BaseModel

from lorasmith.registry import get_registry


class PluginRow(BaseModel):
    """One loaded plugin."""

    name: str
    version: str
    source: str
    families: list[str]


class FamilyRow(BaseModel):
    """One loaded family."""

    id: str
    name: str
    plugin: str
    variants: list[str]
    spellings: list[str]
    layouts: list[str]
    block_notations: list[str]


class PluginsResult(BaseModel):
    """What ``lorasmith plugins`` shows."""

    plugins: list[PluginRow]
    families: list[FamilyRow]


def list_plugins() -> PluginsResult:
    """Every registered plugin with its families."""
    reg = get_registry()
    plugins = [
        PluginRow(name=p.name, version=p.version, source=p.source, families=list(p.families))
        for p in reg.plugins()
    ]
    families = []
    for arch_id, arch in reg.archs().items():
        d = arch.describe()
        families.append(
            FamilyRow(
                id=arch_id,
                name=d["name"],
                plugin=reg.owner(arch_id),
                variants=d["variants"],
                spellings=d["spellings"],
                layouts=d["layouts"],
                block_notations=d["block_notations"],
            )
        )
    return PluginsResult(plugins=plugins, families=families)
