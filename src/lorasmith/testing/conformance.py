"""The conformance suite every family passes, built-in or third-party.

Two ways to run it:

- :func:`check_architecture` returns a list of readable failures (empty means the family passes); the
  individual ``check_*`` functions run one part each. :func:`conformance_report` also returns notes (things
  that could not be checked, such as aliases onto a text encoder the family ships no inventory for).
- :class:`ArchitectureConformance` is a base class for pytest, one test per check::

      from lorasmith.testing import ArchitectureConformance

      class TestMyFamily(ArchitectureConformance):
          arch_cls = MyArch

The detection checks build what detection sees of shrunk fixture files (:func:`checkpoint_view`,
:func:`lora_view`) without writing any; they expect detection to be scale-invariant (shrunk shapes keep
the real names, ranks and ratios, not the real sizes). This module never imports torch.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from lorasmith.archs.base import SPELLINGS, Alias, Architecture, Detection, KeyView, TensorSpec
from lorasmith.errors import LorasmithError
from lorasmith.registry import Registry
from lorasmith.testing.views import (
    DEFAULT_FACTOR,
    checkpoint_view,
    lora_view,
    shrink_slice,
    target_spec,
)

__all__ = [
    "CHECKS",
    "KNOWN_DTYPES",
    "ArchitectureConformance",
    "ConformanceReport",
    "check_aliases",
    "check_architecture",
    "check_blocks",
    "check_checkpoint_detection",
    "check_describe",
    "check_identity",
    "check_inventories",
    "check_lora_detection",
    "check_name_bounds",
    "conformance_report",
]

#: safetensors dtype strings an inventory may use.
KNOWN_DTYPES: frozenset[str] = frozenset(
    {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
)

#: At most this many failures are listed per check (the rest are counted).
MAX_PER_CHECK = 20

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class _Sink:
    """Collects failures and notes of one check."""

    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)


@dataclass(frozen=True)
class ConformanceReport:
    """What :func:`conformance_report` found.

    :ivar arch: the family id.
    :ivar failures: readable failures, each prefixed with its check (``[aliases] ...``); empty = pass.
    :ivar notes: things not checked and why (never failures).
    """

    arch: str
    failures: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when there is no failure."""
        return not self.failures


# ------------------------------------------------------------------------------------------- identity
def _identity(arch: Architecture, sink: _Sink) -> None:
    if not isinstance(arch.id, str) or not _ID.match(arch.id):
        sink.fail(f"id {arch.id!r} must be a non-empty lowercase id ([a-z0-9][a-z0-9._-]*)")
    if not isinstance(arch.name, str) or not arch.name.strip():
        sink.fail("name is empty")
    variants = tuple(arch.variants)
    if not variants:
        sink.fail("variants is empty")
    if any(not isinstance(v, str) or not v for v in variants):
        sink.fail(f"variants must be non-empty strings: {variants!r}")
    if len(set(variants)) != len(variants):
        sink.fail(f"variants repeat: {variants!r}")
    spellings = tuple(arch.spellings)
    if not spellings:
        sink.fail("spellings is empty")
    if len(set(spellings)) != len(spellings):
        sink.fail(f"spellings repeat: {spellings!r}")
    for s in spellings:
        if s not in SPELLINGS:
            sink.fail(f"spelling {s!r} is not in lorasmith.archs.base.SPELLINGS ({', '.join(SPELLINGS)})")
    for attr in ("modelspec", "base_model_version"):
        extra = set(getattr(arch, attr)) - set(variants)
        if extra:
            sink.fail(f"{attr} names unknown variants: {', '.join(sorted(extra))}")


# ---------------------------------------------------------------------------------------- inventories
def _inventories(arch: Architecture, sink: _Sink) -> None:
    invs = tuple(arch.inventories())
    if not invs:
        sink.fail("inventories() is empty")
        return
    seen: set[str] = set()
    for inv in invs:
        where = f"inventory {inv.id!r}"
        if inv.id in seen:
            sink.fail(f"{where} appears twice")
        seen.add(inv.id)
        if inv.family != arch.id:
            sink.fail(f"{where} belongs to family {inv.family!r}, not {arch.id!r}")
        if inv.variant not in arch.variants:
            sink.fail(f"{where} has unknown variant {inv.variant!r}")
        if not inv.layout:
            sink.fail(f"{where} has no layout name")
        if not inv.tensors:
            sink.fail(f"{where} has no tensors")
        bad_dtypes = sorted({s.dtype for s in inv.tensors.values()} - KNOWN_DTYPES)
        if bad_dtypes:
            sink.fail(f"{where} uses unknown dtypes {', '.join(bad_dtypes)}")
        bad_shapes = [
            k for k, s in inv.tensors.items() if any(not isinstance(n, int) or n < 0 for n in s.shape)
        ]
        if bad_shapes:
            sink.fail(f"{where} has invalid shapes for {len(bad_shapes)} keys, e.g. {bad_shapes[0]!r}")
        stray = sorted(inv.optional - set(inv.tensors))
        if stray:
            sink.fail(f"{where} lists optional keys it does not have, e.g. {stray[0]!r}")
    for v in arch.variants:
        canon = [inv.id for inv in invs if inv.canonical and inv.variant == v]
        if not canon:
            sink.fail(f"variant {v!r} has no canonical inventory")
        elif len(canon) > 1:
            sink.fail(f"variant {v!r} has {len(canon)} canonical inventories: {', '.join(canon)}")


# -------------------------------------------------------------------------------------------- aliases
def _lookup(arch: Architecture, variant: str, alias: Alias) -> tuple[TensorSpec | None, str | None]:
    """The real spec of an alias' target, or ``None`` and why (``None`` reason: not checkable).

    The key must be in the canonical inventory of ``variant`` when one of that inventory's (prefixed)
    components covers it; otherwise (a text encoder that variant's file lacks) any inventory of the family
    will do. Aliases onto a component that no inventory ships cannot be checked.
    """
    key = alias.target.key
    canon = arch.canonical_inventory(variant)
    spec = canon.tensors.get(key)
    if spec is not None:
        return spec, None
    owner = [c for c, prefix in canon.components.items() if prefix and key.startswith(prefix)]
    if owner:
        return None, f"which the {canon.id} inventory lacks (its {owner[0]} component covers the key)"
    spec = target_spec(arch, variant, alias.target)
    if spec is not None:
        return spec, None
    covered = {c for inv in arch.inventories() for c in inv.components}
    if alias.component in covered:
        return None, f"which no inventory of {arch.id} has"
    return None, None


def _aliases(arch: Architecture, sink: _Sink, factor: int) -> None:
    for variant in arch.variants:
        try:
            table = arch.alias_table(variant)
        except Exception as exc:
            sink.fail(f"alias_table({variant!r}) raised {type(exc).__name__}: {exc}")
            continue
        if not table:
            sink.fail(f"variant {variant!r} has no LoRA aliases (override _build_aliases)")
            continue
        per_target: dict[tuple[str, str, object], str] = {}
        slices: dict[tuple[str, str], list[tuple[int, int, int, str]]] = {}
        unchecked: dict[str, int] = {}
        for name, alias in table.items():
            where = f"{variant}: alias {name!r}"
            if alias.name != name:
                sink.fail(f"{where} is stored under another name ({alias.name!r})")
            if alias.spelling not in SPELLINGS:
                sink.fail(f"{where} has unknown spelling {alias.spelling!r}")
            elif alias.spelling not in arch.spellings:
                sink.fail(
                    f"{where} has spelling {alias.spelling!r}, which {arch.id} does not list in spellings"
                )
            if not alias.component:
                sink.fail(f"{where} has no component")
            if arch.base_weight(name, variant) != alias.target:
                sink.fail(f"{where}: base_weight() disagrees with the alias table")
            twin = per_target.setdefault((alias.spelling, alias.component, alias.target), name)
            if twin != name:
                sink.fail(
                    f"{where} and {twin!r} are two {alias.spelling} names for one target {alias.target} "
                    "(a conversion into that spelling could not choose)"
                )
            spec, missing = _lookup(arch, variant, alias)
            if spec is None:
                if missing:
                    sink.fail(f"{where} targets {alias.target.key!r}, {missing}")
                else:
                    unchecked[alias.component] = unchecked.get(alias.component, 0) + 1
                continue
            shape = spec.shape
            if not shape:
                sink.fail(f"{where} targets {alias.target.key!r}, a 0-d tensor")
                continue
            if alias.target.slice is None:
                continue
            dim, start, length = alias.target.slice
            if dim not in (0, 1) or dim >= len(shape):
                sink.fail(f"{where}: slice {alias.target.slice} must cut rows (dim 0) or columns (dim 1)")
                continue
            if start < 0 or length <= 0 or start + length > shape[dim]:
                sink.fail(f"{where}: slice {alias.target.slice} is outside {alias.target.key!r} {shape}")
                continue
            try:
                shrink_slice(alias.target.slice, factor, dim_size=shape[dim])
            except ValueError as exc:
                sink.fail(f"{where}: {exc}")
            slices.setdefault((alias.spelling, alias.target.key), []).append((dim, start, length, name))
        for (spelling, key), parts in slices.items():
            parts.sort()
            for a, b in itertools.pairwise(parts):
                if a[0] == b[0] and b[1] < a[1] + a[2]:
                    sink.fail(
                        f"{variant}: {spelling} aliases {a[3]!r} and {b[3]!r} overlap on {key!r} "
                        f"({a[:3]} and {b[:3]})"
                    )
        for component, n in sorted(unchecked.items()):
            sink.note(
                f"{variant}: {n} {component} aliases not checked ({arch.id} ships no {component} inventory)"
            )
    for spelling in arch.spellings:
        try:
            has = any(arch.aliases(v, spelling) for v in arch.variants)
        except Exception:
            continue  # reported above
        if not has:
            sink.fail(f"spelling {spelling!r} is listed but no variant has an alias in it")


# ---------------------------------------------------------------------------------------- name bounds
def _name_bounds(arch: Architecture, sink: _Sink) -> None:
    """The declared ``lora_prefixes``/``key_prefixes`` cover every alias and every inventory key.

    Detection skips a family whose bound says it cannot match a file: a name outside its prefixes would
    make the registry miss the family (or a tie with it) on such a file.
    """
    if arch.lora_prefixes is None and arch.key_prefixes is None:
        sink.note("no lora_prefixes/key_prefixes: detection scores this family in full on every file")
        return
    if arch.lora_prefixes is not None:
        for variant in arch.variants:
            try:
                names = list(arch.alias_table(variant))
            except Exception:
                continue  # the aliases check reports it
            for name in names:
                if not arch.could_know_module(name):
                    sink.fail(f"{variant}: alias {name!r} starts with none of lora_prefixes")
    if arch.key_prefixes is not None:
        for inv in arch.inventories():
            prefixes = [p for p in inv.components.values() if p]
            for key in inv.tensors:
                # detection also looks keys up with their component prefix removed
                forms = [key, *(key[len(p) :] for p in prefixes if key.startswith(p))]
                for form in forms:
                    if not arch.could_know_key(form):
                        sink.fail(f"inventory {inv.id}: key {form!r} starts with none of key_prefixes")


# --------------------------------------------------------------------------------------------- blocks
def _blocks(arch: Architecture, sink: _Sink) -> None:
    notations = arch.block_notations()
    labels: set[str] = set()
    for name, seq in notations.items():
        seq = list(seq)
        if not seq:
            sink.fail(f"block notation {name!r} is empty")
        if len(set(seq)) != len(seq):
            sink.fail(f"block notation {name!r} repeats labels")
        labels.update(seq)
    labelled = 0
    bad: dict[str, str] = {}
    for inv in arch.inventories():
        if not inv.canonical:
            continue
        for key in inv.tensors:
            label = arch.block_of(key)
            if label is None:
                continue
            labelled += 1
            if label not in labels:
                bad.setdefault(label, key)
    for label, key in sorted(bad.items()):
        sink.fail(f"block_of({key!r}) = {label!r}, a label of no notation ({', '.join(notations) or 'none'})")
    if notations and not labelled:
        sink.fail("block_notations() is set but block_of() labels no canonical key")


# ------------------------------------------------------------------------------------------ detection
def _detect(
    arch: Architecture, view: KeyView, registry: Registry | None, sink: _Sink, what: str
) -> Detection | None:
    det: Detection | None = None
    if registry is not None:
        try:
            best = registry.detect(view, source=what)
        except LorasmithError as exc:
            sink.fail(f"{what}: the registry fails: {exc}")
        else:
            if best.arch == arch.id:
                det = best  # the same object arch.detect(view) returns; saves a second detection
            else:
                sink.fail(f"{what}: the registry detects {best.arch!r} ({best.reason})")
    if det is None:
        try:
            det = arch.detect(view)
        except Exception as exc:
            sink.fail(f"{what}: detect raised {type(exc).__name__}: {exc}")
            return None
    if det is None:
        sink.fail(f"{what}: not detected")
        return None
    if det.arch != arch.id:
        sink.fail(f"{what}: detect() says arch {det.arch!r}")
    if not det.score > 0.5:
        sink.fail(f"{what}: score {det.score:.3f} is not above 0.5 ({det.reason})")
    return det


def _checkpoint_detection(arch: Architecture, sink: _Sink, factor: int, registry: Registry | None) -> None:
    for inv in arch.inventories():
        what = f"checkpoint {inv.id} (shrunk /{factor})"
        det = _detect(arch, checkpoint_view(inv, factor), registry, sink, what)
        if det is None:
            continue
        if det.kind != "checkpoint":
            sink.fail(f"{what}: kind {det.kind!r}, expected 'checkpoint'")
        if det.variant != inv.variant:
            sink.fail(f"{what}: variant {det.variant!r}, expected {inv.variant!r} ({det.reason})")
        if det.layout != inv.layout:
            sink.fail(f"{what}: layout {det.layout!r}, expected {inv.layout!r} ({det.reason})")


def _names(arch: Architecture, variant: str, spelling: str | None) -> dict[str, frozenset[str]]:
    """Component -> names a fixture LoRA of (variant, spelling) has (aliases with a 2-D/4-D target).

    With ``spelling=None`` every spelling counts; the key ``""`` holds all names.
    """
    out: dict[str, set[str]] = {"": set()}
    for a in arch.aliases(variant, spelling):
        spec = target_spec(arch, variant, a.target)
        if spec is not None and len(spec.shape) in (2, 4):
            out[""].add(a.name)
            out.setdefault(a.component, set()).add(a.name)
    return {k: frozenset(v) for k, v in out.items()}


def _sharing(registry: Registry | None, arch: Architecture, names: frozenset[str]) -> list[str]:
    """Other families of ``registry`` that know every one of ``names`` in some variant."""
    if registry is None:
        return []
    out = []
    for other_id, other in registry.archs().items():
        if other_id == arch.id:
            continue
        if any(names <= other.alias_table(v).keys() for v in other.variants):
            out.append(other_id)
    return out


def _lora_detection(arch: Architecture, sink: _Sink, factor: int, registry: Registry | None) -> None:
    known = {v: _names(arch, v, None)[""] for v in arch.variants}
    for variant in arch.variants:
        for spelling in arch.spellings:
            by_component = _names(arch, variant, spelling)
            if not by_component[""]:
                continue
            # per-component files (UNet-only, text-encoder-only) with the default spelling only: the
            # variant told apart from a part of the names does not depend on the spelling
            split = len(by_component) > 2 and spelling == arch.spellings[0]
            scopes = sorted(by_component) if split else [""]
            for component in scopes:
                names = by_component[component]
                scope = f", {component} only" if component else ""
                what = f"LoRA {variant}/{spelling} ({len(names)} modules{scope}, shrunk /{factor})"
                check_with = registry
                if component:
                    # a text encoder's names are often the same in several families: such a file is
                    # ambiguous by nature, and the registry is right to say so
                    shared = _sharing(registry, arch, names)
                    if shared:
                        sink.note(f"{what}: names shared with {', '.join(shared)}; registry check skipped")
                        check_with = None
                view = lora_view(arch, variant, spelling, modules=sorted(names), factor=factor)
                det = _detect(arch, view, check_with, sink, what)
                if det is None:
                    continue
                if det.kind != "lora":
                    sink.fail(f"{what}: kind {det.kind!r}, expected 'lora'")
                if det.layout != spelling:
                    sink.fail(f"{what}: layout {det.layout!r}, expected {spelling!r}")
                if det.variant not in (None, variant):
                    # wrong only when the names could tell: a LoRA of the detected variant could not
                    # have exactly these modules
                    other = det.variant
                    if other in known and names <= known[other]:
                        sink.note(f"{what}: detected as variant {other!r}, which has all these names too")
                    else:
                        sink.fail(f"{what}: variant {other!r}, expected {variant!r} ({det.reason})")


# -------------------------------------------------------------------------------------------- describe
def _describe(arch: Architecture, sink: _Sink) -> None:
    desc = arch.describe()
    try:
        json.dumps(desc)
    except (TypeError, ValueError) as exc:
        sink.fail(f"describe() is not JSON-serialisable: {exc}")
    if not isinstance(desc, Mapping) or desc.get("id") != arch.id:
        sink.fail("describe() must be a mapping whose 'id' is the family id")


# ----------------------------------------------------------------------------------------------- runner
Check = Callable[[Architecture, _Sink, int, Registry | None], None]

#: The checks in order: name -> implementation (signature: arch, sink, factor, registry).
CHECKS: dict[str, Check] = {
    "identity": lambda a, s, f, r: _identity(a, s),
    "inventories": lambda a, s, f, r: _inventories(a, s),
    "aliases": lambda a, s, f, r: _aliases(a, s, f),
    "name-bounds": lambda a, s, f, r: _name_bounds(a, s),
    "blocks": lambda a, s, f, r: _blocks(a, s),
    "checkpoint-detection": _checkpoint_detection,
    "lora-detection": _lora_detection,
    "describe": lambda a, s, f, r: _describe(a, s),
}


def _run(
    arch: Architecture, names: Iterable[str], factor: int, registry: Registry | None
) -> tuple[list[str], list[str]]:
    failures: list[str] = []
    notes: list[str] = []
    for name in names:
        sink = _Sink()
        try:
            CHECKS[name](arch, sink, factor, registry)
        except Exception as exc:
            sink.fail(f"the check raised {type(exc).__name__}: {exc}")
        shown = sink.failures[:MAX_PER_CHECK]
        failures += [f"[{name}] {msg}" for msg in shown]
        if len(sink.failures) > len(shown):
            failures.append(f"[{name}] ... and {len(sink.failures) - len(shown)} more")
        notes += [f"[{name}] {msg}" for msg in sink.notes]
    return failures, notes


def conformance_report(
    arch: Architecture,
    *,
    registry: Registry | None = None,
    factor: int = DEFAULT_FACTOR,
    checks: Sequence[str] | None = None,
) -> ConformanceReport:
    """Run the conformance checks on ``arch`` and return failures and notes.

    :param arch: an instance of the family.
    :param registry: when given, every fixture view must also be detected as ``arch`` by
        ``registry.detect`` (no other loaded family may claim it or tie with it).
    :param factor: the shrinking factor of the fixture views.
    :param checks: names from :data:`CHECKS` (default: all).
    """
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks: {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    failures, notes = _run(arch, names, factor, registry)
    return ConformanceReport(arch=str(arch.id), failures=tuple(failures), notes=tuple(notes))


def check_architecture(
    arch: Architecture, *, registry: Registry | None = None, factor: int = DEFAULT_FACTOR
) -> list[str]:
    """Every conformance failure of ``arch`` as a readable line; an empty list means it passes.

    Checks: id, name, variants and spellings (known in ``SPELLINGS``); inventories (load, belong to the
    family, one canonical per variant, known dtypes); alias tables (build for every variant; targets exist
    with a 2-D/4-D shape; slices inside the weight and not overlapping; one name per target and spelling;
    every listed spelling used); the declared name prefixes cover every alias and inventory key; block
    labels (``block_of`` only returns labels of a notation); detection
    of a shrunk fixture checkpoint of every inventory (family, kind, variant, layout) and of a shrunk LoRA of
    every spelling and variant, whole and per component (family, kind ``lora``, layout = spelling, and the
    variant unless another variant has exactly the same names); ``describe()`` is JSON-serialisable.
    """
    return list(conformance_report(arch, registry=registry, factor=factor).failures)


def check_identity(arch: Architecture) -> list[str]:
    """Failures of the id, name, variants and spellings."""
    return list(conformance_report(arch, checks=["identity"]).failures)


def check_inventories(arch: Architecture) -> list[str]:
    """Failures of the inventories."""
    return list(conformance_report(arch, checks=["inventories"]).failures)


def check_aliases(arch: Architecture, *, factor: int = DEFAULT_FACTOR) -> list[str]:
    """Failures of the alias tables and their targets."""
    return list(conformance_report(arch, factor=factor, checks=["aliases"]).failures)


def check_name_bounds(arch: Architecture) -> list[str]:
    """Failures of the declared name prefixes (``lora_prefixes``, ``key_prefixes``) against the alias
    tables and inventories."""
    return list(conformance_report(arch, checks=["name-bounds"]).failures)


def check_blocks(arch: Architecture) -> list[str]:
    """Failures of the block notations and ``block_of``."""
    return list(conformance_report(arch, checks=["blocks"]).failures)


def check_checkpoint_detection(
    arch: Architecture, *, registry: Registry | None = None, factor: int = DEFAULT_FACTOR
) -> list[str]:
    """Failures of detecting a shrunk fixture checkpoint of every inventory."""
    return list(
        conformance_report(arch, registry=registry, factor=factor, checks=["checkpoint-detection"]).failures
    )


def check_lora_detection(
    arch: Architecture, *, registry: Registry | None = None, factor: int = DEFAULT_FACTOR
) -> list[str]:
    """Failures of detecting a shrunk fixture LoRA of every spelling and variant."""
    return list(
        conformance_report(arch, registry=registry, factor=factor, checks=["lora-detection"]).failures
    )


def check_describe(arch: Architecture) -> list[str]:
    """Failures of ``describe()``."""
    return list(conformance_report(arch, checks=["describe"]).failures)


# ----------------------------------------------------------------------------------------------- pytest
class ArchitectureConformance:
    """Subclass in a pytest module (name it ``Test...``) and set :attr:`arch_cls`; one test per check.

    Override :meth:`make_arch` to build the family differently, and :meth:`make_registry` to also check
    that detection through a registry (with the other families loaded) picks this family.
    This class needs no pytest import: failures are plain ``AssertionError``\\ s listing every problem.
    """

    #: The family under test.
    arch_cls: ClassVar[type[Architecture] | None] = None
    #: The shrinking factor of the fixture views.
    factor: ClassVar[int] = DEFAULT_FACTOR

    _arch_cache: ClassVar[dict[type, Architecture]] = {}
    _registry_cache: ClassVar[dict[type, Registry | None]] = {}

    def make_arch(self) -> Architecture:
        """The instance under test (default: ``arch_cls()``)."""
        if self.arch_cls is None:
            raise TypeError(f"{type(self).__name__} must set arch_cls to an Architecture subclass")
        return self.arch_cls()

    def make_registry(self) -> Registry | None:
        """A registry to check detection against (default: none)."""
        return None

    @property
    def arch(self) -> Architecture:
        """The family under test, built once per test class."""
        cache = ArchitectureConformance._arch_cache
        if type(self) not in cache:
            cache[type(self)] = self.make_arch()
        return cache[type(self)]

    @property
    def registry(self) -> Registry | None:
        """The registry of :meth:`make_registry`, built once per test class."""
        cache = ArchitectureConformance._registry_cache
        if type(self) not in cache:
            cache[type(self)] = self.make_registry()
        return cache[type(self)]

    def _check(self, name: str) -> None:
        report = conformance_report(self.arch, registry=self.registry, factor=self.factor, checks=[name])
        if report.failures:
            raise AssertionError(f"{self.arch.id} fails {name}:\n  " + "\n  ".join(report.failures))

    def test_identity(self) -> None:
        """id, name, variants, spellings."""
        self._check("identity")

    def test_inventories(self) -> None:
        """Inventories load and are consistent."""
        self._check("inventories")

    def test_aliases(self) -> None:
        """Alias tables build and point at real weights and slices."""
        self._check("aliases")

    def test_name_bounds(self) -> None:
        """The declared name prefixes cover every alias and inventory key."""
        self._check("name-bounds")

    def test_blocks(self) -> None:
        """Block labels belong to a notation."""
        self._check("blocks")

    def test_checkpoint_detection(self) -> None:
        """Every inventory is detected as this family, variant and layout."""
        self._check("checkpoint-detection")

    def test_lora_detection(self) -> None:
        """Every spelling is detected as this family's LoRA."""
        self._check("lora-detection")

    def test_describe(self) -> None:
        """``describe()`` is JSON-serialisable."""
        self._check("describe")
