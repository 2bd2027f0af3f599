"""Shared machinery of the DiT families (FLUX.1, SD3/SD3.5, Z-Image).

- :class:`DiTArchitecture`: an :class:`~lorasmith.archs.base.Architecture` that builds each variant's alias
  list once, keeps a full name table per spelling (two spellings may write the same name for the same
  target, e.g. kohya and musubi for Z-Image's ``feed_forward`` layers) and reports the spelling that covers
  the most of a LoRA's modules.
- Text-encoder aliases over the ComfyUI key space of the SD3 Medium single file
  (``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.``,
  ``text_encoders.t5xxl.transformer.``), the canonical text-encoder targets of FLUX.1 and SD3.
- Row-slice helpers for fused weights (q/k/v, FLUX ``linear1``) and LoRA shape helpers for detection
  (ratios only: test fixtures shrink every dimension divisible by 64).

This module never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property
from typing import ClassVar

from lorasmith.archs.base import (
    STRIP_PREFIXES,
    Alias,
    Architecture,
    Detection,
    KeyView,
    Target,
    TensorLike,
    TensorSpec,
    kohya_name,
    load_packaged_inventory,
    lora_modules,
)
from lorasmith.archs.parts import PartSlot

#: Inventory that carries the canonical text-encoder keys of FLUX.1 and SD3 (ComfyUI's SD3 Medium file).
TE_INVENTORY = "sd3-medium-comfyui"
#: Key prefix of CLIP-L (HF ``CLIPTextModel`` names below it) in :data:`TE_INVENTORY`.
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
#: Key prefix of OpenCLIP bigG, stored in HF CLIP form with separate q/k/v projections.
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
#: Key prefix of T5-XXL (HF ``T5EncoderModel`` names below it).
T5XXL_PREFIX = "text_encoders.t5xxl.transformer."
#: The 16-channel VAE part of FLUX.1 and Z-Image single files: under ``vae.`` (ComfyUI's
#: ``vae_key_prefix`` for both), split as ``ae.safetensors`` as the separate distributions name it.
VAE16_SLOT = PartSlot("vae", "vae16", "vae.", "ae.safetensors", group="vae")

#: (up suffix, down suffix) pairs whose shapes give a LoRA module's (out, in): up is [out, ...], down [., in].
_PAIRS: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".hada_w1_a", ".hada_w1_b"),
    (".diff", ".diff"),
)


# ------------------------------------------------------------------------------------------ text encoders
@cache
def te_tensors() -> Mapping[str, TensorSpec]:
    """Every ``text_encoders.*`` tensor of :data:`TE_INVENTORY` (loaded once)."""
    inv = load_packaged_inventory("lorasmith.archs", TE_INVENTORY)
    return {k: v for k, v in inv.tensors.items() if k.startswith("text_encoders.")}


@dataclass(frozen=True)
class TextEncoder:
    """How one text encoder of a family is spelled in LoRA files.

    :ivar component: the alias component (``te1`` CLIP-L, ``te2`` CLIP-G, ``te3`` T5-XXL).
    :ivar key_prefix: prefix of its weights in the canonical key space (:data:`CLIP_L_PREFIX`...).
    :ivar underscored: ``(spelling, name prefix)`` pairs of kohya-style names (``("kohya", "lora_te1_")``):
        the HF module path follows with ``.`` replaced by ``_``.
    :ivar dotted: ``(spelling, name prefix)`` pairs of dotted names (``("peft", "text_encoder.")``).
        ComfyUI's generic form, the canonical key minus ``.weight``, is ``("comfy", key_prefix)``.
    """

    component: str
    key_prefix: str
    underscored: tuple[tuple[str, str], ...]
    dotted: tuple[tuple[str, str], ...]


@cache
def te_aliases(encoder: TextEncoder) -> tuple[Alias, ...]:
    """Aliases of every ``.weight`` tensor (ndim >= 1) of ``encoder`` in each of its spellings."""
    out: list[Alias] = []
    for key, spec in te_tensors().items():
        if not key.startswith(encoder.key_prefix) or not key.endswith(".weight") or not spec.shape:
            continue
        path = key[len(encoder.key_prefix) : -len(".weight")]
        target = Target(key)
        for spelling, prefix in encoder.underscored:
            out.append(Alias(kohya_name(prefix, path), spelling, target, encoder.component))
        for spelling, prefix in encoder.dotted:
            out.append(Alias(prefix + path, spelling, target, encoder.component))
    return tuple(out)


def te_lora_prefixes(encoders: Iterable[TextEncoder]) -> tuple[str, ...]:
    """Every name prefix of the ``encoders``' aliases (for :attr:`Architecture.lora_prefixes`)."""
    out: list[str] = []
    for te in encoders:
        out += [prefix for _spelling, prefix in (*te.underscored, *te.dotted)]
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------- slices
def equal_row_slices(rows: int, parts: int) -> list[tuple[int, int, int]]:
    """Row slices ``(0, start, length)`` cutting ``rows`` into ``parts`` equal blocks (fused q/k/v)."""
    if parts <= 0 or rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} equal parts")
    size = rows // parts
    return [(0, i * size, size) for i in range(parts)]


def row_slices(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """Consecutive row slices ``(0, start, length)`` of the given lengths (FLUX ``linear1``: q, k, v, mlp)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for size in sizes:
        out.append((0, start, size))
        start += size
    return out


# ----------------------------------------------------------------------------------------- key helpers
def strip_prefix(key: str) -> str:
    """``key`` without the first wrapper prefix it starts with (:data:`~lorasmith.archs.base.STRIP_PREFIXES`:
    ``model.diffusion_model.``, ``diffusion_model.``, ``transformer.``...)."""
    for prefix in STRIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def block_indices(keys: Iterable[str], container: str) -> set[int]:
    """Every ``N`` of ``<container>.N.`` in ``keys`` (``block_indices(keys, "joint_blocks")``)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)")
    found: set[int] = set()
    for key in keys:
        m = pattern.search(key)
        if m:
            found.add(int(m.group(1)))
    return found


def lora_out_in(tensors: Mapping[str, TensorLike], module: str) -> tuple[int, int] | None:
    """``(out features, in features)`` of one LoRA module from its up/down factor shapes, if it has them."""
    for up, down in _PAIRS:
        u = tensors.get(module + up)
        d = tensors.get(module + down)
        if u is None or d is None or len(u.shape) < 2 or len(d.shape) < 2:
            continue
        return int(u.shape[0]), int(d.shape[1])
    return None


# ------------------------------------------------------------------------------------------ base class
class DiTArchitecture(Architecture):
    """Common behaviour of the DiT families; subclasses implement :meth:`_generate_aliases`.

    Beyond the base contract it offers :meth:`spelling_table` (the full name table of one spelling, also
    the names it shares with another spelling) and :meth:`text_encoder_modules` (the canonical text-encoder
    weights its TE aliases target), which :meth:`target_spec` also searches.
    """

    #: Text encoders whose aliases every variant of the family carries.
    text_encoders: ClassVar[tuple[TextEncoder, ...]] = ()

    def _generate_aliases(self, variant: str) -> Iterator[Alias]:
        """Yield every alias of ``variant`` (transformer and text encoders), in any spelling order."""
        yield from ()

    @cached_property
    def _alias_lists(self) -> dict[str, tuple[Alias, ...]]:
        return {}

    def _alias_list(self, variant: str) -> tuple[Alias, ...]:
        variant = self.check_variant(variant)
        lists = self._alias_lists
        if variant not in lists:
            items = list(self._generate_aliases(variant))
            for te in self.text_encoders:
                items.extend(te_aliases(te))
            order = {s: i for i, s in enumerate(self.spellings)}
            # the default spelling first, so that a name shared by two spellings is listed under the default
            items.sort(key=lambda a: order.get(a.spelling, len(order)))
            lists[variant] = tuple(items)
        return lists[variant]

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        return self._alias_list(variant)

    def built_alias_tables(self) -> tuple[str, ...]:
        """As the base class, also counting the alias lists :meth:`spelling_table` builds."""
        built = set(super().built_alias_tables()) | set(self._alias_lists)
        return tuple(v for v in self.variants if v in built)

    def spelling_table(self, variant: str | None = None, spelling: str | None = None) -> Mapping[str, Alias]:
        """Name -> alias of one spelling (default: the family's default), names shared with others included.

        :meth:`Architecture.aliases` lists a shared name under one spelling only; use this to write a LoRA
        in a given spelling.
        """
        spelling = spelling or self.spellings[0]
        return {a.name: a for a in self._alias_list(self.check_variant(variant)) if a.spelling == spelling}

    @cached_property
    def _spelling_names(self) -> dict[str, frozenset[str]]:
        names: dict[str, set[str]] = {}
        for variant in self.variants:
            for alias in self._alias_list(variant):
                names.setdefault(alias.spelling, set()).add(alias.name)
        for extra in self._extra_aliases.values():
            for alias, _source in extra:
                names.setdefault(alias.spelling, set()).add(alias.name)
        return {s: frozenset(n) for s, n in names.items()}

    def add_aliases(self, aliases: Iterable[Alias], source: str, variant: str | None = None) -> None:
        """Add another plugin's aliases (see the base class); they take part in :meth:`spelling_of` too."""
        super().add_aliases(aliases, source, variant)
        self.__dict__.pop("_spelling_names", None)

    def spelling_of(self, module_names: Iterable[str]) -> str | None:
        """The spelling that knows the most of ``module_names``.

        Ties go to the family's order of spellings, then to spellings other plugins added (by name).
        """
        names = list(module_names)
        known_by = self._spelling_names
        order = [*self.spellings, *sorted(s for s in known_by if s not in self.spellings)]
        best: tuple[int, int, str] | None = None
        for rank, spelling in enumerate(order):
            known = known_by.get(spelling, frozenset())
            count = sum(1 for n in names if n in known)
            if count and (best is None or (count, -rank) > best[:2]):
                best = (count, -rank, spelling)
        return None if best is None else best[2]

    def detect_lora(self, view: KeyView) -> Detection | None:
        """The base detection, with the layout set to the spelling that covers most of the modules."""
        det = super().detect_lora(view)
        if det is None:
            return None
        spelling = self.spelling_of(lora_modules(view.tensors))
        if spelling is None or spelling == det.layout:
            return det
        return replace(
            det,
            layout=spelling,
            reason=f"{det.matched} of {det.total} LoRA modules are {self.name} module names "
            f"({spelling} spelling)",
        )

    @cached_property
    def _te_modules(self) -> Mapping[str, TensorSpec]:
        prefixes = tuple(te.key_prefix for te in self.text_encoders)
        if not prefixes:
            return {}
        return {k: v for k, v in te_tensors().items() if k.startswith(prefixes)}

    def text_encoder_modules(self) -> Mapping[str, TensorSpec]:
        """The canonical text-encoder tensors this family's TE aliases target (key -> spec)."""
        return self._te_modules

    def target_spec(self, key: str, variant: str | None = None) -> TensorSpec | None:
        """Shape and dtype of the real weight a canonical key names: the variant's canonical inventory,
        then the text-encoder tables (:meth:`text_encoder_modules`), then as the base class (the other
        inventories and the parts)."""
        spec = self.modules(variant).get(key)
        if spec is None:
            spec = self.text_encoder_modules().get(key)
        if spec is None:
            spec = super().target_spec(key, variant)
        return spec

    def _lora_targets(self, view: KeyView) -> dict[str, Alias]:
        """LoRA module name -> alias, looked up in every variant's table (default variant first)."""
        found: dict[str, Alias] = {}
        tables = [self.alias_table(v) for v in self.variants]
        for module in lora_modules(view.tensors):
            for table in tables:
                alias = table.get(module)
                if alias is not None:
                    found[module] = alias
                    break
        return found


def weight_paths(tensors: Mapping[str, TensorSpec], prefix: str = "") -> Iterator[tuple[str, TensorSpec]]:
    """``(module path, spec)`` of every ``.weight`` (ndim >= 1) under ``prefix``, the prefix removed."""
    for key, spec in tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and spec.shape:
            yield key[len(prefix) : -len(".weight")], spec


def dotted_and_underscored(
    path: str,
    target: Target,
    component: str,
    dotted: Sequence[tuple[str, str]],
    underscored: Sequence[tuple[str, str]],
) -> Iterator[Alias]:
    """Aliases of one module path: ``prefix + path`` per dotted spelling, kohya names per underscored one."""
    for spelling, prefix in dotted:
        yield Alias(prefix + path, spelling, target, component)
    for spelling, prefix in underscored:
        yield Alias(kohya_name(prefix, path), spelling, target, component)
