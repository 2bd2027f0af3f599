"""The plugin manager and the typed facade over it.

Built-in families are registered through the same hook as third-party ones (listed in
:data:`DEFAULT_PLUGINS`). Third-party plugins come from the entry-point group ``lorasmith``.

Environment switches:

- ``LORASMITH_DISABLE_PLUGIN_AUTOLOAD=1``: do not load entry-point plugins (built-ins still load).
- ``LORASMITH_BLOCK_PLUGINS=name1,name2``: skip the named plugins (entry-point names or built-in module
  names).
- ``LORASMITH_TRACE_PLUGINS=1``: log every hook call on stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pluggy

from lorasmith import hookspecs
from lorasmith.archs.base import Architecture, Detection, KeyView, lora_modules, split_lora_key
from lorasmith.errors import DetectionError, PluginError, UnknownArchError

if TYPE_CHECKING:
    from lorasmith.archs.parts import PartCatalog, PartMatch

#: Modules of the built-in families, registered exactly like third-party plugins.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "lorasmith.archs.sd1",
    "lorasmith.archs.sdxl",
    "lorasmith.archs.flux",
    "lorasmith.archs.sd3",
    "lorasmith.archs.zimage",
)

#: Two detections whose scores differ by less than this are a tie.
TIE_MARGIN = 1e-9


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, where it came from, its version and the families it provides."""

    name: str
    source: str
    version: str
    families: tuple[str, ...]


def _env_list(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


class Registry:
    """A plugin manager with its families loaded; use :func:`get_registry` for the shared one.

    :param builtins: modules registered as built-in plugins.
    :param autoload: load entry-point plugins (``LORASMITH_DISABLE_PLUGIN_AUTOLOAD=1`` turns it off).
    :param plugins: extra plugin objects to register (tests).
    """

    def __init__(
        self,
        builtins: Iterable[str] = DEFAULT_PLUGINS,
        autoload: bool | None = None,
        plugins: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get("LORASMITH_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda s: sys.stderr.write(s))
            self.pm.enable_tracing()
        blocked = _env_list("LORASMITH_BLOCK_PLUGINS")
        self._sources: dict[str, tuple[str, str]] = {}
        for modname in builtins:
            if modname in blocked or modname.rsplit(".", 1)[-1] in blocked:
                continue
            try:
                module = importlib.import_module(modname)
            except Exception as exc:  # a broken built-in is a bug, but say which
                raise PluginError(f"built-in plugin {modname} failed to import: {exc}") from exc
            self.pm.register(module, name=modname)
            from lorasmith import __version__

            self._sources[modname] = ("built-in", __version__)
        if autoload is None:
            autoload = not os.environ.get("LORASMITH_DISABLE_PLUGIN_AUTOLOAD")
        if autoload:
            self._load_entry_points(blocked)
        for name, obj in plugins:
            self.pm.register(obj, name=name)
            self._sources[name] = ("test", "0")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(
                f"plugin {name!r} implements an unknown hook: {exc}",
                hint=f"fix the hook name, or block it with LORASMITH_BLOCK_PLUGINS={name}",
            ) from None
        self._archs: dict[str, Architecture] = {}
        self._owner: dict[str, str] = {}
        self._load_archs()

    def _load_entry_points(self, blocked: set[str]) -> None:
        for ep in md.entry_points(group=hookspecs.PROJECT):
            if ep.name in blocked or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) is invalid: {exc}",
                    hint=f"block it with LORASMITH_BLOCK_PLUGINS={ep.name}",
                ) from None
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                    hint=f"reinstall or fix it, or block it with LORASMITH_BLOCK_PLUGINS={ep.name}",
                ) from None
            dist = ep.dist
            self._sources[ep.name] = (f"entry point {ep.value}", dist.version if dist else "?")

    def _load_archs(self) -> None:
        for impl in self.pm.hook.lorasmith_register_architectures.get_hookimpls():
            name = impl.plugin_name
            try:
                classes = cast("Iterable[Any]", impl.function() or ())
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} failed in lorasmith_register_architectures: "
                    f"{type(exc).__name__}: {exc}",
                    hint=f"block it with LORASMITH_BLOCK_PLUGINS={name}",
                ) from None
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, Architecture)) or not cls.id:
                    raise PluginError(
                        f"plugin {name!r} registered {cls!r}, "
                        "which is not an Architecture subclass with an id",
                        hint=f"block it with LORASMITH_BLOCK_PLUGINS={name}",
                    )
                if cls.id in self._archs:
                    other = self._owner[cls.id]
                    raise PluginError(
                        f"family id {cls.id!r} is registered twice: by {other!r} "
                        f"({type(self._archs[cls.id]).__qualname__}) and by {name!r} ({cls.__qualname__})",
                        hint=f"block one of them with LORASMITH_BLOCK_PLUGINS={name}",
                    )
                self._archs[cls.id] = cls()
                self._owner[cls.id] = name
        # the second hook: aliases onto families other plugins own
        contributors: dict[str, list[str]] = {}
        for impl in self.pm.hook.lorasmith_extra_aliases.get_hookimpls():
            for arch_id, arch in self._archs.items():
                for variant in arch.variants:
                    kwargs = {"arch_id": arch_id, "variant": variant}
                    try:
                        extra = cast(
                            "Iterable[Any] | None", impl.function(*[kwargs[a] for a in impl.argnames])
                        )
                    except Exception as exc:
                        raise PluginError(
                            f"plugin {impl.plugin_name!r} failed in lorasmith_extra_aliases: {exc}",
                            hint=f"block it with LORASMITH_BLOCK_PLUGINS={impl.plugin_name}",
                        ) from None
                    if extra:
                        arch.add_aliases(extra, source=impl.plugin_name, variant=variant)
                        names = contributors.setdefault(arch_id, [])
                        if impl.plugin_name not in names:
                            names.append(impl.plugin_name)
        self._contributors = contributors

    def check_extra_aliases(self) -> None:
        """Build the alias tables of every family that got extra aliases, so that a conflict is reported now.

        ``lorasmith plugins`` (:func:`lorasmith.ops.plugins.list_plugins`) calls it. Other commands do not:
        building those tables costs tens of milliseconds per process, and a conflict still surfaces as a
        :class:`PluginError` naming the plugin as soon as a file of that family needs the table.

        :raises PluginError: naming the plugin(s) whose aliases conflict and how to block them.
        """
        for arch_id, names in self._contributors.items():
            arch = self._archs[arch_id]
            try:
                for variant in arch.variants:
                    arch.alias_table(variant)
            except PluginError as exc:
                # the conflict message says "(from <source>)" for each side: blame those plugins only
                culprits = [n for n in names if f"(from {n})" in exc.message] or names
                raise PluginError(
                    f"{exc.message}; extra aliases from plugin {', '.join(repr(n) for n in culprits)}",
                    hint=f"block it with LORASMITH_BLOCK_PLUGINS={','.join(culprits)}",
                ) from None

    # ------------------------------------------------------------------------------------------- facade
    def part_catalog(self) -> PartCatalog:
        """Every part kind the loaded families use or declare (built once per registry)."""
        from lorasmith.archs.parts import part_catalog

        cached: PartCatalog | None = self.__dict__.get("_part_catalog")
        if cached is None:
            cached = self.__dict__["_part_catalog"] = part_catalog(self._archs.values())
        return cached

    def archs(self) -> Mapping[str, Architecture]:
        """All loaded families by id, in registration order."""
        return dict(self._archs)

    def get(self, arch_id: str) -> Architecture:
        """The family ``arch_id``; an unknown id suggests the nearest known one."""
        try:
            return self._archs[arch_id]
        except KeyError:
            import difflib

            near = difflib.get_close_matches(arch_id, list(self._archs), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(self._archs)}"
            raise UnknownArchError(f"unknown architecture {arch_id!r}", hint=hint) from None

    def owner(self, arch_id: str) -> str:
        """The name of the plugin that registered ``arch_id``."""
        return self._owner[arch_id]

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its source, version and families."""
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            source, version = self._sources.get(name, ("registered", "?"))
            fams = tuple(a for a, o in self._owner.items() if o == name)
            out.append(PluginInfo(name=name, source=source, version=version, families=fams))
        return out

    def _detect_one(self, arch_id: str, arch: Architecture, view: KeyView) -> Detection | None:
        """``arch.detect(view)``; a failure of plugin code becomes a :class:`PluginError` naming it."""
        try:
            det = arch.detect(view)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"family {arch_id!r} (plugin {self._owner[arch_id]!r}) failed in detect: "
                f"{type(exc).__name__}: {exc}",
                hint=f"block it with LORASMITH_BLOCK_PLUGINS={self._owner[arch_id]}",
            ) from None
        return det if det is not None and det.score > 0 else None

    def detect_all(self, view: KeyView) -> list[Detection]:
        """Every family's detection of ``view`` with a positive score, best first (ties by id).

        Scores every family in full (building every table); :meth:`detect` skips the families that cannot
        change its answer.
        """
        found = [d for a, arch in self._archs.items() if (d := self._detect_one(a, arch, view)) is not None]
        found.sort(key=lambda d: (-d.score, -d.matched, d.arch))
        return found

    def detect_candidates(self, view: KeyView) -> list[Detection]:
        """The detections that decide :meth:`detect`, best first: :meth:`detect_all` less the families
        whose name bound shows they match nothing, or score below the best one by more than a tie.

        Why: a family's tables cost up to tens of milliseconds to build, and one process inspects one file;
        an SDXL LoRA must not pay for the FLUX.1, SD3 and Z-Image tables. Each family's
        :meth:`~lorasmith.archs.base.Architecture.name_bound` (prefix tests, no tables) is an upper bound
        of its score; families are scored most promising first, and one whose bound is below the best
        score found (less :data:`TIE_MARGIN`) could neither win nor tie, so it is skipped. The best
        detection and the ties are those of :meth:`detect_all`.
        """
        modules = list(lora_modules(view.tensors))
        keys = [k for k in view.tensors if split_lora_key(k) is None]
        bounds = [(arch_id, arch, arch.name_bound(modules, keys)) for arch_id, arch in self._archs.items()]
        bounds.sort(key=lambda t: -t[2].score)  # stable: registration order among equals
        found: list[Detection] = []
        best = 0.0
        for arch_id, arch, bound in bounds:
            if bound.score <= 0 or (found and bound.score < best - TIE_MARGIN):
                break  # sorted: no later family can do better
            det = self._detect_one(arch_id, arch, view)
            if det is not None:
                found.append(det)
                best = max(best, det.score)
        found.sort(key=lambda d: (-d.score, -d.matched, d.arch))
        return found

    def detect(self, view: KeyView, arch: str | None = None, source: str = "file") -> Detection:
        """The family of ``view``; ``arch`` forces one (``--arch``).

        :raises DetectionError: nothing matches, or two families score alike (naming both).
        """
        if arch is not None:
            family = self.get(arch)
            det = family.detect(view)
            if det is None:
                return Detection(arch, 0.0, "unknown", None, None, (), f"forced with --arch {arch}")
            return det
        found = self.detect_candidates(view)
        if not found:
            raise DetectionError(
                f"{source}: no known family matches its keys",
                hint="pass --arch to force one; `lorasmith plugins` lists the families",
            )
        best = found[0]
        ties = [d for d in found[1:] if abs(d.score - best.score) <= TIE_MARGIN and d.matched == best.matched]
        if ties:
            names = ", ".join(d.arch for d in [best, *ties])
            raise DetectionError(
                f"{source}: ambiguous family, {names} match equally ({best.reason})",
                hint=f"pass --arch with one of: {names}",
            )
        return best


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry (tests; after installing a plugin)."""
    global _REGISTRY
    _REGISTRY = None


def detect(view: KeyView, arch: str | None = None, source: str = "file") -> Detection:
    """Shortcut for ``get_registry().detect(...)``."""
    return get_registry().detect(view, arch=arch, source=source)


def part_catalog() -> PartCatalog:
    """Shortcut for ``get_registry().part_catalog()``."""
    return get_registry().part_catalog()


def detect_part(view: KeyView) -> PartMatch | None:
    """The part kind and form of a file (:func:`lorasmith.archs.parts.detect_part` over every part kind
    of the process-wide registry's families), or ``None`` when it is no part."""
    from lorasmith.archs.parts import detect_part as detect_in

    return detect_in(view, part_catalog())


def get(arch_id: str) -> Architecture:
    """Shortcut for ``get_registry().get(arch_id)``."""
    return get_registry().get(arch_id)
