"""The base class every model family subclasses, built-in or third-party.

An :class:`Architecture` describes one family (SD1/SD2, SDXL, FLUX.1, ...) from key names and shapes alone:

- :meth:`Architecture.inventories`: the checkpoint layouts it knows (canonical single-file layout first),
  as data shipped with the plugin;
- :meth:`Architecture.aliases`: every LoRA module name any trainer writes for it, each resolved to a
  :class:`Target` (a canonical weight key, possibly a row slice of a fused weight);
- :meth:`Architecture.detect`: a score and a reason for a file's keys;
- :meth:`Architecture.block_of` and :meth:`Architecture.block_notations`: the block groupings of the field;
- :meth:`Architecture.base_weight`: where a LoRA module's delta lands in the base checkpoint.

This module never imports torch. Plugin authors override the ``_build_aliases`` and, where names alone do
not tell variants apart, ``_refine_variant``; the defaults do the rest from the inventories.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from lorasmith.errors import NotAvailableError, PluginError, UnknownArchError

if TYPE_CHECKING:
    from lorasmith.archs.parts import PartKind, PartSlot

Kind = Literal["checkpoint", "lora", "mixed", "unknown"]


class TensorLike(Protocol):
    """What detection needs of one tensor: its shape and its safetensors dtype string (``"F16"``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...


class KeyView(Protocol):
    """What detection sees of a file: tensor names with shapes and dtypes, and the metadata."""

    @property
    def tensors(self) -> Mapping[str, TensorLike]: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (safetensors spelling, ``"F16"``, ``"BF16"``...) of one tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SimpleKeyView:
    """A :class:`KeyView` built from plain data (a manifest, a test, a folder of several files)."""

    tensors: Mapping[str, TensorSpec]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Sequence[int]],
        dtype: str = "F16",
        metadata: Mapping[str, str] | None = None,
    ) -> SimpleKeyView:
        """Build a view from ``{key: shape}``, every tensor of dtype ``dtype``."""
        return cls({k: TensorSpec(tuple(v), dtype) for k, v in shapes.items()}, dict(metadata or {}))


@dataclass(frozen=True)
class Inventory:
    """One checkpoint layout of a family: every tensor name with its shape and dtype.

    :ivar id: the data file's stem (``"sdxl-sgm"``).
    :ivar family: the owning :attr:`Architecture.id`.
    :ivar variant: which variant of the family (``"sd2"``, ``"dev"``, ``"sd3.5-large"``).
    :ivar layout: the key layout (``"ldm"``, ``"sgm"``, ``"bfl"``, ``"comfyui"``, ``"diffusers-unet"``).
    :ivar canonical: True for the family's canonical key space (the original single-file names).
    :ivar components: component name -> key prefix (``{"unet": "model.diffusion_model."}``).
    :ivar optional: keys that real files may lack.
    :ivar tensors: key -> :class:`TensorSpec`.
    """

    id: str
    family: str
    variant: str
    layout: str
    canonical: bool
    components: Mapping[str, str]
    optional: frozenset[str]
    tensors: Mapping[str, TensorSpec]
    description: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Inventory:
        """Build from the JSON written by ``scripts/build_arch_data.py``."""
        return cls(
            id=data["id"],
            family=data["family"],
            variant=data["variant"],
            layout=data["layout"],
            canonical=bool(data.get("canonical", False)),
            components=dict(data.get("components") or {}),
            optional=frozenset(data.get("optional") or ()),
            tensors={k: TensorSpec(tuple(s), d) for k, (s, d) in data["tensors"].items()},
            description=data.get("description", ""),
        )

    def component_of(self, key: str) -> str | None:
        """The component whose prefix is the longest match of ``key`` (``None`` if none matches)."""
        best: tuple[int, str | None] = (-1, None)
        for name, prefix in self.components.items():
            if key.startswith(prefix) and len(prefix) > best[0]:
                best = (len(prefix), name)
        return best[1]


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's delta lands: a canonical weight key and optionally a row slice of it.

    ``slice = (dim, start, length)`` is set when the LoRA covers part of a fused weight (FLUX ``qkv``,
    OpenCLIP ``in_proj_weight``, Z-Image ``attention.qkv``).
    """

    key: str
    slice: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class LayoutEntry:
    """Where one canonical tensor lives in another checkpoint layout (see :meth:`Architecture.layout_map`).

    The canonical tensor is made of ``parts``, in order along ``dim``: each part is a key of the layout
    (``(key, None)`` for the whole tensor, or ``(key, rows)`` where ``rows`` is how many rows along ``dim``
    that key holds). One part with no rows is a rename. ``transform`` names an exact, invertible rewrite of
    the values: ``None``, or ``"swap_halves"`` (the two halves along ``dim`` exchanged: FLUX ``norm_out``
    stores ``scale, shift`` where BFL stores ``shift, scale``).

    :ivar parts: ``((layout key, rows or None), ...)``.
    :ivar dim: the axis the parts are concatenated along.
    :ivar transform: ``None`` or ``"swap_halves"``.
    """

    parts: tuple[tuple[str, int | None], ...]
    dim: int = 0
    transform: str | None = None


@dataclass(frozen=True)
class Spelling:
    """A LoRA key spelling (a trainer's naming convention).

    :ivar id: ``kohya``, ``peft``, ``comfy``, ``aitk``, ``musubi``, ``onetrainer``, ``lycoris``...
    :ivar suffixes: ``"kohya"`` (``.lora_down.weight``/``.lora_up.weight``/``.alpha``) or ``"peft"``
        (``.lora_A.weight``/``.lora_B.weight``, no alpha).
    :ivar description: who writes it.
    """

    id: str
    suffixes: Literal["kohya", "peft"]
    description: str


#: Spellings every family may use; a family lists the ones it supports in :attr:`Architecture.spellings`.
SPELLINGS: dict[str, Spelling] = {
    s.id: s
    for s in (
        Spelling("kohya", "kohya", "sd-scripts / kohya: lora_unet_<path with _>, lora_te*_"),
        Spelling("kohya-ldm", "kohya", "kohya names over the ldm/sgm module tree (ComfyUI accepts them)"),
        Spelling("kohya-diffusers", "kohya", "kohya names over the diffusers module tree"),
        Spelling("comfy", "kohya", "ComfyUI: diffusion_model.<checkpoint key>, kohya suffixes"),
        Spelling("peft", "peft", "diffusers / PEFT: unet.|transformer.<diffusers path>.lora_A/lora_B"),
        Spelling("aitk", "peft", "ai-toolkit: diffusion_model.<diffusers path>.lora_A/lora_B"),
        Spelling("musubi", "kohya", "musubi-tuner: lora_unet_<diffusers path with _>, split q/k/v"),
        Spelling("onetrainer", "kohya", "OneTrainer: lora_transformer_<diffusers path with _>"),
        Spelling("lycoris", "kohya", "LyCORIS wrapper (SimpleTuner): lycoris_<diffusers path with _>"),
    )
}


@dataclass(frozen=True)
class Alias:
    """One LoRA module name as a trainer writes it, resolved onto the canonical key space.

    :ivar name: the module name without the tensor suffix (``lora_unet_input_blocks_4_1_..._to_q``).
    :ivar spelling: a :data:`SPELLINGS` id.
    :ivar target: the canonical weight (and slice) the module changes.
    :ivar component: ``unet``/``transformer``/``te1``/``te2``/``te3``/...
    """

    name: str
    spelling: str
    target: Target
    component: str


@dataclass(frozen=True)
class NameBound:
    """How much of a file a family could recognise, from names alone (:meth:`Architecture.name_bound`).

    An upper bound, cheap to compute: the family's detection never counts more. The registry uses it to
    skip families that cannot match a file, or cannot reach the score of a family already scored, without
    building their tables.

    :ivar lora: LoRA modules of the file whose names the family could know.
    :ivar lora_total: LoRA modules of the file.
    :ivar checkpoint: other tensors of the file whose keys the family could know.
    :ivar checkpoint_total: other tensors of the file.
    """

    lora: int
    lora_total: int
    checkpoint: int
    checkpoint_total: int

    @property
    def matched(self) -> int:
        """The most modules and tensors a detection could match."""
        return self.lora + self.checkpoint

    @property
    def score(self) -> float:
        """The highest score a detection could have (a LoRA, checkpoint or ``mixed`` detection's score is
        never above the larger of the two fractions)."""
        lora = self.lora / self.lora_total if self.lora_total else 0.0
        ckpt = self.checkpoint / self.checkpoint_total if self.checkpoint_total else 0.0
        return max(lora, ckpt)


@dataclass(frozen=True)
class Detection:
    """The result of :meth:`Architecture.detect`.

    :ivar arch: family id.
    :ivar score: fraction in ``[0, 1]`` of the file's keys (or LoRA modules) the family recognises.
    :ivar kind: ``checkpoint``, ``lora``, ``mixed`` or ``unknown``.
    :ivar variant: the variant told apart, ``None`` if names and shapes cannot tell.
    :ivar layout: the checkpoint layout (inventory layout) or the LoRA spelling.
    :ivar components: components present (``unet``, ``vae``, ``te1``...).
    :ivar reason: one readable sentence saying why.
    :ivar matched: how many keys or modules matched.
    :ivar total: how many keys or modules the file has.
    """

    arch: str
    score: float
    kind: Kind
    variant: str | None
    layout: str | None
    components: tuple[str, ...]
    reason: str
    matched: int = 0
    total: int = 0


# Prefixes that wrappers put in front of a bare component's keys.
STRIP_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "unet.",
    "model.",
)

#: LoRA-style tensor suffixes, longest first so that ``.hada_w1_a`` wins over ``.weight``.
LORA_SUFFIXES: tuple[str, ...] = tuple(
    sorted(
        {
            ".lora_down.weight",
            ".lora_up.weight",
            ".lora_mid.weight",
            ".alpha",
            ".dora_scale",
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_A.default.weight",
            ".lora_B.default.weight",
            ".lora_magnitude_vector",
            ".lora_magnitude_vector.default",
            "_lora.down.weight",
            "_lora.up.weight",
            ".lora.down.weight",
            ".lora.up.weight",
            ".lora_linear_layer.down.weight",
            ".lora_linear_layer.up.weight",
            ".hada_w1_a",
            ".hada_w1_b",
            ".hada_w2_a",
            ".hada_w2_b",
            ".hada_t1",
            ".hada_t2",
            ".lokr_w1",
            ".lokr_w1_a",
            ".lokr_w1_b",
            ".lokr_w2",
            ".lokr_w2_a",
            ".lokr_w2_b",
            ".lokr_t2",
            ".diff",
            ".diff_b",
            ".w_norm",
            ".b_norm",
            ".oft_blocks",
            ".oft_diag",
            ".rescale",
            ".a1.weight",
            ".a2.weight",
            ".b1.weight",
            ".b2.weight",
            ".bm.weight",
        },
        key=len,
        reverse=True,
    )
)


def _suffix_index() -> dict[str, tuple[str, ...]]:
    # bucket the suffixes by their last 5 characters (every suffix has at least 5), longest first
    index: dict[str, list[str]] = {}
    for suffix in LORA_SUFFIXES:
        index.setdefault(suffix[-5:], []).append(suffix)
    return {k: tuple(v) for k, v in index.items()}


_SUFFIX_INDEX = _suffix_index()


@lru_cache(maxsize=1 << 16)
def split_lora_key(key: str) -> tuple[str, str] | None:
    """Split a LoRA tensor key into ``(module name, suffix)``; ``None`` if it has no LoRA suffix."""
    for suffix in _SUFFIX_INDEX.get(key[-5:], ()):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def lora_modules(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Group LoRA tensor keys by module: ``{module name: {suffix: key}}`` (non-LoRA keys are skipped)."""
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        parts = split_lora_key(key)
        if parts is not None:
            out.setdefault(parts[0], {})[parts[1]] = key
    return out


_INVENTORIES: dict[tuple[str, str], Inventory] = {}


def load_packaged_inventory(package: str, stem: str) -> Inventory:
    """Load ``<stem>.json.gz`` from the ``data`` folder of ``package`` (a plugin's own package).

    Loaded once per process and shared (treat the result as read-only): one file serves several users,
    e.g. the SD3 Medium file holds SD3's canonical keys, the FLUX.1/SD3 text-encoder targets and three
    part kinds, and parsing it costs milliseconds each time.
    """
    found = _INVENTORIES.get((package, stem))
    if found is None:
        ref = resources.files(package).joinpath("data").joinpath(f"{stem}.json.gz")
        with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            found = _INVENTORIES[(package, stem)] = Inventory.from_json(json.load(fh))
    return found


def loaded_inventories() -> list[tuple[str, str]]:
    """``(package, stem)`` of every packaged inventory loaded so far in this process, in load order.

    For tests and benchmarks that check what a command needed (detecting an SDXL file must not load the
    FLUX.1 inventories).
    """
    return list(_INVENTORIES)


def load_packaged_json(package: str, stem: str) -> dict[str, Any]:
    """Load any ``<stem>.json.gz`` data file of ``package`` (key maps and the like)."""
    ref = resources.files(package).joinpath("data").joinpath(f"{stem}.json.gz")
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def kohya_name(prefix: str, path: str) -> str:
    """The kohya rule: ``prefix`` + module path with ``.`` replaced by ``_``."""
    return prefix + path.replace(".", "_")


def name_prefixes(prefixes: Iterable[str], heads: Iterable[str], *, kohya: bool = False) -> tuple[str, ...]:
    """Every ``prefix + head`` (with ``.`` -> ``_`` in the head when ``kohya``): the
    :attr:`Architecture.lora_prefixes` of names built by one rule over module paths starting with ``heads``.

    ``name_prefixes(("lora_unet_",), ("double_blocks.", "img_in"), kohya=True)`` ->
    ``("lora_unet_double_blocks_", "lora_unet_img_in")``.
    """
    heads = tuple(heads)
    return tuple(p + (h.replace(".", "_") if kohya else h) for p in prefixes for h in heads)


def strip_weight(key: str) -> str:
    """Module path of a weight key (``a.b.weight`` -> ``a.b``; other keys unchanged)."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


class Architecture:
    """Base class of a model family. Subclass it, set the class attributes, override the hooks.

    Class attributes a subclass sets:

    :cvar id: the family id (``"sdxl"``), unique across all plugins.
    :cvar name: a readable name (``"Stable Diffusion XL"``).
    :cvar variants: variant ids, the default first.
    :cvar inventory_files: stems of the packaged inventories (canonical layouts first).
    :cvar data_package: the package whose ``data/`` folder holds those files.
    :cvar spellings: the LoRA spellings this family supports, its default first.
    :cvar modelspec: variant -> ``modelspec.architecture`` value.
    :cvar base_model_version: variant -> ``ss_base_model_version`` value.
    :cvar component_parts: the parts of the single-file checkpoint (:class:`~lorasmith.archs.parts.PartSlot`,
        the diffusion model first) for ``convert --assemble``/``--split`` and baking into separate files;
        see :meth:`part_slots`.
    :cvar part_kinds: kinds of separate part files this family introduces
        (:class:`~lorasmith.archs.parts.PartKind`: its own text encoder or VAE); ids are unique across
        plugins, and the built-in kinds (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``, ``vae4``,
        ``vae16``, ``qwen3_4b``) may be used without declaring them.

    :cvar lora_prefixes: optional, for fast detection: every LoRA module name of every variant starts with
        one of these (``"lora_unet_double_blocks_"``, ``"transformer.transformer_blocks."``...); ``None``
        (the default) makes the family scored in full on every file. See :meth:`name_bound`.
    :cvar key_prefixes: optional, likewise for checkpoints: every key of every inventory, and every such key
        with its component prefix removed, starts with one of these.

    Overridable behaviour: :meth:`_build_aliases` (required for LoRA support), :meth:`_refine_variant`,
    :meth:`block_of`, :meth:`block_notations`, :meth:`detect`, :meth:`part_slots`, :meth:`target_spec`.
    """

    id: ClassVar[str] = ""
    name: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    inventory_files: ClassVar[tuple[str, ...]] = ()
    data_package: ClassVar[str] = "lorasmith.archs"
    spellings: ClassVar[tuple[str, ...]] = ("kohya",)
    modelspec: ClassVar[Mapping[str, str]] = {}
    base_model_version: ClassVar[Mapping[str, str]] = {}
    #: spellings whose keys ComfyUI does not load for this family ("lora key not loaded").
    comfyui_rejects: ClassVar[frozenset[str]] = frozenset()
    component_parts: ClassVar[tuple[PartSlot, ...]] = ()
    part_kinds: ClassVar[tuple[PartKind, ...]] = ()
    lora_prefixes: ClassVar[tuple[str, ...] | None] = None
    key_prefixes: ClassVar[tuple[str, ...] | None] = None

    # ----------------------------------------------------------------------------------------- inventories
    @cached_property
    def _inventories(self) -> tuple[Inventory, ...]:
        return tuple(load_packaged_inventory(self.data_package, stem) for stem in self.inventory_files)

    def inventories(self) -> tuple[Inventory, ...]:
        """Every checkpoint layout this family knows, canonical layouts first."""
        return self._inventories

    @property
    def default_variant(self) -> str:
        """The first of :attr:`variants`."""
        return self.variants[0]

    def check_variant(self, variant: str | None) -> str:
        """Return ``variant`` (or the default) after checking that this family has it."""
        if variant is None:
            return self.default_variant
        if variant not in self.variants:
            raise UnknownArchError(
                f"family {self.id!r} has no variant {variant!r}", hint=f"variants: {', '.join(self.variants)}"
            )
        return variant

    def canonical_inventory(self, variant: str | None = None) -> Inventory:
        """The canonical single-file layout of ``variant``."""
        variant = self.check_variant(variant)
        for inv in self.inventories():
            if inv.canonical and inv.variant == variant:
                return inv
        raise UnknownArchError(f"family {self.id!r} ships no canonical inventory for variant {variant!r}")

    def modules(self, variant: str | None = None) -> Mapping[str, TensorSpec]:
        """The canonical inventory of ``variant``: every tensor name with its shape and dtype."""
        return self.canonical_inventory(variant).tensors

    def component_of(self, key: str, variant: str | None = None) -> str | None:
        """The component (``unet``, ``vae``, ``te1``...) of a canonical key."""
        return self.canonical_inventory(variant).component_of(key)

    def target_spec(self, key: str, variant: str | None = None) -> TensorSpec | None:
        """Shape and dtype of the real weight a canonical key names: the variant's canonical inventory
        first, then the family's other inventories (every variant and part).

        This is the one lookup of "how large is the weight a LoRA target (:class:`Target`) lands on", at
        real size: fitting a fused weight's row slice to a shrunk or partial file, checking a LoRA module's
        shape, sizing a merged module. "Parts" are the family's separate component files
        (:meth:`part_slots`): a key below a slot's prefix in the single file is looked up among that part
        kind's tensors (a text encoder the family's inventories do not ship).

        :param key: a canonical key (``double_blocks.0.img_attn.qkv.weight``).
        :param variant: the variant whose canonical inventory is tried first (default: the default one).
        :return: the spec, or ``None`` when no inventory or part of the family has the key.
        """
        spec = self.canonical_inventory(variant).tensors.get(key)
        if spec is not None:
            return spec
        for inv in self.inventories():
            spec = inv.tensors.get(key)
            if spec is not None:
                return spec
        return self._part_spec(key, self.check_variant(variant))

    def _part_spec(self, key: str, variant: str) -> TensorSpec | None:
        """The spec of ``key`` below one of the family's part slots (``variant``'s first, then the other
        variants'), from the part kind's tensors in the form the single file stores."""
        from lorasmith.archs.parts import PART_KINDS, form_inventory

        kinds = {**PART_KINDS, **{k.id: k for k in self.part_kinds}}
        for v in dict.fromkeys((variant, *self.variants)):
            for slot in self.part_slots(v):
                kind = kinds.get(slot.kind) if slot.kind is not None else None
                if kind is None:
                    continue
                if key.startswith(slot.prefix):
                    rest = key[len(slot.prefix) :]
                elif slot.outer is not None and key.startswith(slot.outer):
                    rest = key[len(slot.outer) :]
                    if rest not in slot.outer_keys:
                        continue
                else:
                    continue
                spec = form_inventory(kind, slot.form).get(rest)
                if spec is not None:
                    return spec
        return None

    # --------------------------------------------------------------------------------------------- aliases
    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        """Yield every LoRA alias of ``variant``. Override in a subclass; the default knows none."""
        return ()

    @cached_property
    def _alias_cache(self) -> dict[str, dict[str, Alias]]:
        return {}

    def alias_table(self, variant: str | None = None) -> Mapping[str, Alias]:
        """LoRA module name -> :class:`Alias` for ``variant``, built once.

        Two aliases that claim one name with different targets are a :class:`~lorasmith.errors.PluginError`.
        Extra aliases contributed by other plugins through the ``lorasmith_extra_aliases`` hook are merged
        in by the registry (:meth:`add_aliases`).
        """
        variant = self.check_variant(variant)
        cache = self._alias_cache
        if variant not in cache:
            table: dict[str, Alias] = {}
            shared: list[Alias] = []
            for alias in self._build_aliases(variant):
                self._add(table, alias, source=type(self).__name__, shared=shared)
            for alias, source in self._extra_aliases.get(variant, ()):
                self._add(table, alias, source=source, shared=shared)
            self._shared_aliases[variant] = shared
            cache[variant] = table
        return cache[variant]

    @cached_property
    def _shared_aliases(self) -> dict[str, list[Alias]]:
        """Per variant: aliases whose name another spelling already claimed for the same target (Z-Image's
        ``lora_unet_layers_0_feed_forward_w1`` is a kohya and a musubi name): the table keeps the first, and
        :meth:`aliases` still lists them under their own spelling."""
        return {}

    @cached_property
    def _extra_aliases(self) -> dict[str, list[tuple[Alias, str]]]:
        return {}

    def add_aliases(self, aliases: Iterable[Alias], source: str, variant: str | None = None) -> None:
        """Add aliases for ``variant`` (default: the default variant) contributed by the plugin ``source``
        (used by the registry for the second hook)."""
        variant = self.check_variant(variant)
        self._extra_aliases.setdefault(variant, []).extend((a, source) for a in aliases)
        self._alias_cache.clear()
        self._shared_aliases.clear()
        self.__dict__.pop("_extra_names", None)

    def _add(
        self, table: dict[str, Alias], alias: Alias, source: str, shared: list[Alias] | None = None
    ) -> None:
        old = table.get(alias.name)
        if old is not None and old.target != alias.target:
            first = self._alias_sources.get(alias.name, type(self).__name__)
            # name the plugin(s) that added aliases: blocking them is the way out (the family's own class
            # is no plugin name)
            plugins = [n for n in dict.fromkeys((first, source)) if n != type(self).__name__]
            raise PluginError(
                f"alias conflict in family {self.id!r}: {alias.name!r} maps to {old.target} (from {first}) "
                f"and to {alias.target} (from {source})",
                hint=f"block it with LORASMITH_BLOCK_PLUGINS={','.join(plugins)}"
                if plugins
                else "two plugins claim the same LoRA key; block one with LORASMITH_BLOCK_PLUGINS",
            )
        if old is None:
            table[alias.name] = alias
            if source != type(self).__name__:
                self._alias_sources[alias.name] = source
        elif shared is not None and old.spelling != alias.spelling:
            shared.append(alias)

    @cached_property
    def _alias_sources(self) -> dict[str, str]:
        return {}

    def built_alias_tables(self) -> tuple[str, ...]:
        """The variants whose alias table this instance has built so far (tables are built on first use,
        per variant; detection builds none for a family that cannot match a file)."""
        return tuple(v for v in self.variants if v in self._alias_cache)

    def aliases(self, variant: str | None = None, spelling: str | None = None) -> list[Alias]:
        """Every alias of ``variant``, optionally only those of one spelling."""
        # with a spelling, the names it shares with another spelling for the same target are listed too
        # (under its own spelling): every module it can name, as a conversion into it needs
        table = self.alias_table(variant)
        if spelling is None:
            return list(table.values())
        own = [a for a in table.values() if a.spelling == spelling]
        shared = self._shared_aliases.get(self.check_variant(variant), [])
        return own + [a for a in shared if a.spelling == spelling]

    def resolve(self, module_name: str, variant: str | None = None) -> Alias | None:
        """The alias of a LoRA module name, or ``None`` if this family does not know it."""
        return self.alias_table(variant).get(module_name)

    def base_weight(self, module_name: str, variant: str | None = None) -> Target | None:
        """Which canonical weight (and row slice) a LoRA module's delta lands on."""
        alias = self.resolve(module_name, variant)
        return None if alias is None else alias.target

    # ------------------------------------------------------------------------------------------- layouts
    def layout_map(self, inventory_id: str) -> Mapping[str, LayoutEntry]:
        """How the canonical keys map onto another checkpoint layout of this family.

        :param inventory_id: the id of one of :meth:`inventories` (``"flux-dev-diffusers"``).
        :return: canonical key -> :class:`LayoutEntry` (the layout key(s) holding it, with row counts for
            fused tensors split in the layout, and an optional exact transform). Reading a checkpoint of
            that layout in canonical names, or writing one, is then a loop over this mapping.
        :raises NotAvailableError: the family does not provide this map (the default).
        """
        raise NotAvailableError(
            f"family {self.id!r} has no key map for layout {inventory_id!r}",
            hint="convert the checkpoint to the family's single-file layout first",
        )

    # -------------------------------------------------------------------------------------------- parts
    def part_slots(self, variant: str | None = None) -> tuple[PartSlot, ...]:
        """The parts of the single-file checkpoint of ``variant``, the diffusion model first.

        Each :class:`~lorasmith.archs.parts.PartSlot` says where a part's keys live in the single file (key
        prefix, and the :class:`~lorasmith.archs.parts.PartForm` stored there), which part kind a separate
        file of it is, and its file name when split. ``convert --assemble`` and ``--split``, ``inspect`` on
        a part file and ``merge --base ... --clip-l F --clip-l-out O`` read them from here. ``()`` means
        the family has no separate parts (assemble and split refuse it).

        The default returns :attr:`component_parts`; override this method when variants differ (SD1's
        family does, for SD2). The built-in families declare theirs the same way, in their own modules.
        """
        return tuple(self.component_parts)

    # ------------------------------------------------------------------------------------------- blocks
    def block_of(self, key: str) -> str | None:
        """The block label (``IN04``, ``D05``, ``BASE``...) of a canonical key, ``None`` if none."""
        return None

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """Block-weight notations: name -> ordered labels (``{"sdxl-12": ["BASE", "IN04", ...]}``)."""
        return {}

    def module_type(self, key: str, spec: TensorSpec | None = None) -> str:
        """Coarse module type of a canonical key for summaries: ``attention``, ``feed-forward``,
        ``projection``, ``modulation``, ``conv``, ``norm``, ``embedding`` or ``other``."""
        return classify_module(key, spec)

    # -------------------------------------------------------------------------------------- name bounds
    @cached_property
    def _extra_names(self) -> frozenset[str]:
        return frozenset(a.name for extra in self._extra_aliases.values() for a, _source in extra)

    @cached_property
    def _key_prefix_forms(self) -> tuple[str, ...] | None:
        if self.key_prefixes is None:
            return None
        # detection looks a key up as it is and less one wrapper prefix (STRIP_PREFIXES): "K less s starts
        # with p" is "K starts with s + p", so one C-level startswith over these forms answers both
        own = tuple(self.key_prefixes)
        return own + tuple(s + p for s in STRIP_PREFIXES for p in own)

    def could_know_module(self, name: str) -> bool:
        """False only if no alias table of this family (any variant) can hold the LoRA module ``name``.

        Cheap (no table is built): :attr:`lora_prefixes` plus the names other plugins added. Always True
        for a family that declares no :attr:`lora_prefixes`.
        """
        prefixes = self.lora_prefixes
        return prefixes is None or name.startswith(prefixes) or name in self._extra_names

    def could_know_key(self, key: str) -> bool:
        """False only if checkpoint detection cannot match the tensor key ``key`` to any inventory of this
        family. Cheap (no inventory is loaded): :attr:`key_prefixes`; always True without them."""
        forms = self._key_prefix_forms
        return forms is None or key.startswith(forms)

    def name_bound(self, modules: Collection[str], keys: Collection[str]) -> NameBound:
        """An upper bound of what :meth:`detect` can match in a file, without building any table.

        :param modules: the file's LoRA module names (:func:`lora_modules`).
        :param keys: the file's other tensor keys.
        :return: the counts :meth:`could_know_module` and :meth:`could_know_key` allow.

        A family that overrides :meth:`detect` must keep its score within this bound (the default does:
        it counts only names found in its alias tables and inventories). The conformance suite checks that
        the declared prefixes cover every alias and inventory key.
        """
        if self.lora_prefixes is None:
            lora = len(modules)
        else:
            lora = sum(1 for m in modules if self.could_know_module(m))
        if self.key_prefixes is None:
            ckpt = len(keys)
        else:
            ckpt = sum(1 for k in keys if self.could_know_key(k))
        return NameBound(lora, len(modules), ckpt, len(keys))

    # ---------------------------------------------------------------------------------------- detection
    @cached_property
    def _name_index(self) -> dict[str, list[tuple[Inventory, str, TensorSpec]]]:
        """Every known key, also with each component prefix stripped, -> (inventory, full key, spec)."""
        index: dict[str, list[tuple[Inventory, str, TensorSpec]]] = {}
        for inv in self.inventories():
            for key, spec in inv.tensors.items():
                index.setdefault(key, []).append((inv, key, spec))
                for prefix in inv.components.values():
                    if prefix and key.startswith(prefix):
                        index.setdefault(key[len(prefix) :], []).append((inv, key, spec))
        return index

    def _candidates(self, key: str) -> list[tuple[Inventory, str, TensorSpec]]:
        found = self._name_index.get(key)
        if found:
            return found
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                found = self._name_index.get(key[len(prefix) :])
                if found:
                    return found
        return []

    def detect_checkpoint(self, view: KeyView) -> Detection | None:
        """Score a file as a checkpoint of this family from its key names and tensor ranks."""
        keys = [k for k in view.tensors if split_lora_key(k) is None]
        if not keys:
            return None
        per_inv: dict[str, tuple[Inventory, int, int, set[str]]] = {}
        for key in keys:
            ndim = len(view.tensors[key].shape)
            shape = tuple(view.tensors[key].shape)
            for inv, full, spec in self._candidates(key):
                if len(spec.shape) != ndim:
                    continue
                inv_, n, exact, seen = per_inv.get(inv.id, (inv, 0, 0, set()))
                if full in seen:
                    continue
                seen.add(full)
                per_inv[inv.id] = (inv_, n + 1, exact + (spec.shape == shape), seen)
        if not per_inv:
            return None
        # most keys matched, then most exact shapes, then the layout whose inventory is most covered
        inv, n, _exact, seen = max(
            per_inv.values(), key=lambda t: (t[1], t[2], t[1] / max(len(t[0].tensors), 1), t[0].canonical)
        )
        components = tuple(sorted({c for k in seen if (c := inv.component_of(k)) is not None}))
        variant = self._refine_variant(view, inv.variant, "checkpoint")
        return Detection(
            arch=self.id,
            score=n / len(keys),
            kind="checkpoint",
            variant=variant,
            layout=inv.layout,
            components=components,
            reason=f"{n} of {len(keys)} tensor names match the {inv.id} layout",
            matched=n,
            total=len(keys),
        )

    def detect_lora(self, view: KeyView) -> Detection | None:
        """Score a file as a LoRA of this family from its module names."""
        modules = lora_modules(view.tensors)
        if not modules:
            return None
        best: tuple[int, float, str, dict[str, int], set[str]] | None = None
        for variant in self.variants:
            table = self.alias_table(variant)
            if not table:
                continue
            hits = [table[m] for m in modules if m in table]
            if not hits:
                continue
            spellings: dict[str, int] = {}
            for a in hits:
                spellings[a.spelling] = spellings.get(a.spelling, 0) + 1
            # coverage: how much of the variant's own alias set the file covers (a tie-breaker only)
            coverage = len(hits) / len(table)
            cand = (len(hits), coverage, variant, spellings, {a.component for a in hits})
            if best is None or cand[:2] > best[:2]:
                best = cand
        if best is None:
            return None
        n, _cov, variant, spellings, components = best
        spelling = max(spellings.items(), key=lambda kv: kv[1])[0]
        refined = self._refine_variant(view, variant, "lora")
        return Detection(
            arch=self.id,
            score=n / len(modules),
            kind="lora",
            variant=refined,
            layout=spelling,
            components=tuple(sorted(components)),
            reason=f"{n} of {len(modules)} LoRA modules are {self.name} module names ({spelling} spelling)",
            matched=n,
            total=len(modules),
        )

    def _refine_variant(self, view: KeyView, variant: str, kind: Kind) -> str | None:
        """Tell variants apart where names alone do not (override; default keeps ``variant``)."""
        return variant

    def detect(self, view: KeyView) -> Detection | None:
        """Score ``view`` as a file of this family; ``None`` if nothing matches.

        The default scores LoRA modules against :meth:`alias_table` and other tensors against
        :meth:`inventories`, and reports a ``mixed`` kind when both are present.
        """
        lora = self.detect_lora(view)
        ckpt = self.detect_checkpoint(view)
        if lora and ckpt:
            total = lora.total + ckpt.total
            return Detection(
                arch=self.id,
                score=(lora.matched + ckpt.matched) / total,
                kind="mixed",
                variant=lora.variant or ckpt.variant,
                layout=f"{ckpt.layout}+{lora.layout}",
                components=tuple(sorted(set(lora.components) | set(ckpt.components))),
                reason=f"{ckpt.reason}; {lora.reason}",
                matched=lora.matched + ckpt.matched,
                total=total,
            )
        return lora or ckpt

    # ------------------------------------------------------------------------------------------ helpers
    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (id, name, variants, spellings, layouts, notations)."""
        return {
            "id": self.id,
            "name": self.name,
            "variants": list(self.variants),
            "spellings": list(self.spellings),
            "layouts": sorted({inv.layout for inv in self.inventories()}),
            "block_notations": sorted(self.block_notations()),
        }


def iter_weight_modules(
    tensors: Mapping[str, TensorSpec], min_ndim: int = 1
) -> Iterator[tuple[str, TensorSpec]]:
    """Yield ``(module path, spec)`` for every ``*.weight`` key of at least ``min_ndim`` dimensions."""
    for key, spec in tensors.items():
        if key.endswith(".weight") and len(spec.shape) >= min_ndim:
            yield key[: -len(".weight")], spec


_TYPE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "modulation",
        re.compile(r"(adaLN|_mod\.|\.mod\.|modulation|norm1\.linear|norm1_context\.linear|norm\.linear)"),
    ),
    ("norm", re.compile(r"(norm|ln_\d|ln_final|layer_norm|\.ln_)")),
    (
        "attention",
        re.compile(
            r"(attn|attention|self_attn|SelfAttention|EncDecAttention|to_q|to_k|to_v|qkv|in_proj|out_proj)"
        ),
    ),
    (
        "feed-forward",
        re.compile(
            r"(\.ff\.|ff_context|\.mlp|feed_forward|DenseReluDense|linear1|linear2|fc1|fc2|c_fc|c_proj)"
        ),
    ),
    ("projection", re.compile(r"(proj_in|proj_out|final_layer|conv_in|conv_out|\.out\.)")),
    (
        "embedding",
        re.compile(r"(embed|_in\.|time_in|vector_in|guidance_in|img_in|txt_in|token_embedding|position)"),
    ),
)


def classify_module(key: str, spec: TensorSpec | None = None) -> str:
    """Coarse module type of a key from its name (and, for kxk convolutions, its shape)."""
    if spec is not None and len(spec.shape) == 4 and spec.shape[2] * spec.shape[3] > 1:
        return "conv"
    for name, rx in _TYPE_RULES:
        if rx.search(key):
            return name
    if spec is not None and len(spec.shape) == 4:
        return "conv"
    return "other"


_NUM = re.compile(r"\.(\d+)\.")


def first_index(path: str, after: str) -> int | None:
    """The integer after ``after`` in a dotted path (``first_index("a.b.3.c", "b")`` -> 3)."""
    m = re.search(rf"(?:^|\.){re.escape(after)}\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def data_path(package: str) -> Path:
    """Filesystem path of a package's ``data/`` folder (for scripts and tests)."""
    return Path(str(resources.files(package).joinpath("data")))
