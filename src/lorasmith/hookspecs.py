"""The hooks a lorasmith plugin may implement (entry-point group ``lorasmith``).

A plugin is a module (or object) with functions decorated by :data:`hookimpl`. An implementation may
take fewer arguments than the spec, so specs can grow without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lorasmith.archs.base import Alias, Architecture

PROJECT = "lorasmith"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate a plugin's hook implementations with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lorasmith_register_architectures() -> Sequence[type[Architecture]]:  # type: ignore[empty-body]
    """Return the :class:`~lorasmith.archs.base.Architecture` subclasses this plugin provides.

    :return: a list of classes (not instances); each ``id`` must be unique across all plugins.
    """


@hookspec
def lorasmith_extra_aliases(arch_id: str, variant: str) -> Iterable[Alias] | None:  # type: ignore[empty-body]
    """Add LoRA key aliases to a family this plugin does not own (a new trainer's spelling).

    :param arch_id: the family being built (``"sdxl"``).
    :param variant: the variant whose alias table is being built.
    :return: aliases to add, or ``None`` for a family the plugin has nothing for. An alias whose name is
        already claimed with another target is an error naming both plugins.
    """
