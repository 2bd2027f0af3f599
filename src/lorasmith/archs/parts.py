"""Separate component files ("parts"): VAEs and text encoders shipped apart from the diffusion model.

Modern distributions ship a model as several files (FLUX: ``flux1-dev``, ``ae``, ``clip_l``, ``t5xxl``;
SD3: MMDiT, CLIP-L, CLIP-G, T5-XXL; Z-Image: transformer, ``ae``, ``qwen_3_4b``), and several families share
one part (the same CLIP-L file serves SD1, SDXL, FLUX and SD3). Three declarations describe them:

- :class:`PartKind`: one kind of part file (``clip_g``, ``vae16``...): its canonical tensors and the key
  layouts (:class:`PartForm`) a file of it may come in. SDXL's CLIP-G is stored in OpenCLIP form in the
  SDXL single file (fused ``attn.in_proj_weight``) and in the HF ``CLIPTextModelWithProjection`` form in
  ``clip_g.safetensors``; a VAE comes in the ldm layout or the diffusers layout. Forms convert into each
  other by moving values only (row slices, a transpose, a dropped 1x1), so conversions are bit-exact.
- :class:`PartSlot`: where one part lives in a family's single-file checkpoint (its key prefix and the form
  stored there) and its file name when split. A family declares its slots through
  :meth:`lorasmith.archs.base.Architecture.part_slots` (the class attribute ``component_parts``) and the
  kinds it introduces in ``Architecture.part_kinds``. The built-in families declare theirs the same way,
  each in its own module (``Flux.component_parts``...; SD1 overrides ``part_slots`` for SD2).
- :class:`PartCatalog`: the kinds known to a registry, with the families that use each.

:func:`detect_part` tells which part (and which form) a file is from names and tensor ranks alone (plus one
rank-free channel check that tells the 4-channel VAE of SD1/SDXL from the 16-channel VAE of FLUX/SD3/
Z-Image). A part used by several families is *not* ambiguous: the answer is the part, with every family
that uses it (``clip_l text encoder (used by sd1, sdxl, flux, sd3)``). This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from lorasmith.archs.base import (
    KeyView,
    LayoutEntry,
    TensorSpec,
    load_packaged_inventory,
    split_lora_key,
)
from lorasmith.archs.layout_shapes import layout_parts, layout_shape
from lorasmith.errors import PluginError

if TYPE_CHECKING:
    from lorasmith.archs.base import Architecture

__all__ = [
    "PART_KINDS",
    "SLOT_OPTIONS",
    "PartCatalog",
    "PartForm",
    "PartKind",
    "PartMatch",
    "PartSlot",
    "detect_part",
    "diffusion_model_slot",
    "form_inventory",
    "inventory_tensors",
    "part_catalog",
    "part_inventory",
    "text_encoder_slot",
]

TensorTable = Callable[[], Mapping[str, TensorSpec]]
LayoutTable = Callable[[], Mapping[str, LayoutEntry]]


# ------------------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class PartForm:
    """One key layout a part file may come in.

    :ivar id: ``hf``, ``openclip``, ``ldm``, ``diffusers``, ``native``...
    :ivar label: words for messages (``"OpenCLIP form"``, ``"diffusers layout"``).
    :ivar layout: ``None`` when a file in this form holds the kind's canonical tensors under their own
        names; otherwise a function returning canonical key -> :class:`~lorasmith.archs.base.LayoutEntry`
        over this form's keys (the same entries as :meth:`~lorasmith.archs.base.Architecture.layout_map`:
        a rename, a fused tensor split into row blocks, an exact transform). Canonical keys the mapping
        leaves out keep their name in this form.
    """

    id: str
    label: str
    layout: LayoutTable | None = None


#: The form of a kind that has only one: its canonical tensors as they are.
NATIVE = PartForm("native", "native form")


@dataclass(frozen=True)
class PartKind:
    """One kind of separate component file.

    :ivar id: ``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``, ``vae16``, ``vae4``, ``qwen3_4b``, or a
        plugin's own id (unique across all plugins).
    :ivar name: a readable name (``"clip_l text encoder"``).
    :ivar tensors: a function returning key -> :class:`~lorasmith.archs.base.TensorSpec` of the kind's
        canonical tensors at real size (:func:`inventory_tensors` takes them from a packaged inventory).
    :ivar forms: the key layouts a file of this kind may come in; the first is the form separate files are
        written in (``convert --split``), which the separate-file distributions use.
    :ivar channels: ``(key, axis, value)``: a dimension test-shrinking never changes (latent channels), which
        must hold when the key is present.
    :ivar component: the coarse component: ``vae`` or ``te``.
    :ivar accept_opaque: a file given for a slot of this kind that matches no known part (and no family)
        is still accepted, copied as it is with a warning: for encoders whose key set varies between
        distributions.
    :ivar heads: optional, for fast detection: every key of every form starts with one of these
        (``("encoder.", "decoder.")``). :func:`detect_part` then skips the kind, without building its
        tables, for a file too few of whose keys do. ``None``: the kind is always scored.
    """

    id: str
    name: str
    tensors: TensorTable
    forms: tuple[PartForm, ...] = (NATIVE,)
    channels: tuple[str, int, int] | None = None
    component: str = "te"
    accept_opaque: bool = False
    heads: tuple[str, ...] | None = None

    @property
    def file_form(self) -> PartForm:
        """The form separate files of this kind are written in (the first of :attr:`forms`)."""
        return self.forms[0]

    def form(self, form_id: str | None) -> PartForm:
        """The form ``form_id`` (``None``: :attr:`file_form`).

        :raises KeyError: a form this kind does not have.
        """
        if form_id is None:
            return self.file_form
        for f in self.forms:
            if f.id == form_id:
                return f
        raise KeyError(f"part kind {self.id!r} has no form {form_id!r}")


#: CLI option of each slot name the commands know; a plugin slot named otherwise is reachable from the
#: library only (``assemble(parts={name: file})``).
SLOT_OPTIONS: dict[str, str] = {
    "transformer": "--transformer/--unet",
    "vae": "--vae",
    "clip_l": "--clip-l",
    "clip_g": "--clip-g",
    "t5xxl": "--t5xxl",
    "text_encoder": "--text-encoder",
}


@dataclass(frozen=True)
class PartSlot:
    """One part of a family's single-file checkpoint.

    :ivar name: ``transformer`` (the diffusion model), ``vae``, ``clip_l``, ``clip_g``, ``t5xxl`` or
        ``text_encoder`` (the names the commands' options give), or a plugin's own name.
    :ivar kind: the :class:`PartKind` id of a separate file of this part; ``None`` for the diffusion model.
    :ivar prefix: prefix of the part's keys in the single file.
    :ivar filename: the part's file name when split; ``None``: the checkpoint's own name.
    :ivar required: an assembled file must have it.
    :ivar group: the dtype option that applies: ``unet``, ``te`` or ``vae``.
    :ivar form: the :class:`PartForm` id the single file stores the part in; ``None``: the kind's file form.
    :ivar outer: keys in :attr:`outer_keys` live under this prefix instead of :attr:`prefix` in the single
        file (ComfyUI's ``text_encoders.clip_l.logit_scale``); ``None`` when there is no such key.
    :ivar outer_keys: part keys that go under :attr:`outer`.
    """

    name: str
    kind: str | None
    prefix: str
    filename: str | None = None
    required: bool = True
    group: str = "te"
    form: str | None = None
    outer: str | None = None
    outer_keys: frozenset[str] = field(default_factory=lambda: frozenset({"logit_scale"}))

    @property
    def option(self) -> str:
        """The CLI option that gives this part (``--<name>`` for a slot the commands do not know)."""
        return SLOT_OPTIONS.get(self.name, "--" + self.name.replace("_", "-"))


def diffusion_model_slot(prefix: str = "model.diffusion_model.") -> PartSlot:
    """The slot of the diffusion model (``--transformer``/``--unet``), first of every family's slots."""
    return PartSlot("transformer", None, prefix, group="unet")


def text_encoder_slot(
    name: str, kind: str | None = None, *, required: bool = True, filename: str | None = None
) -> PartSlot:
    """A text encoder in ComfyUI's single-file layout: ``text_encoders.<name>.transformer.<key>``, and
    ``text_encoders.<name>.logit_scale`` (FLUX, SD3, Z-Image)."""
    return PartSlot(
        name,
        kind or name,
        f"text_encoders.{name}.transformer.",
        filename or f"{name}.safetensors",
        required,
        "te",
        outer=f"text_encoders.{name}.",
    )


def inventory_tensors(package: str, stem: str, prefix: str, outer: str | None = None) -> TensorTable:
    """A :attr:`PartKind.tensors` function: a packaged inventory's tensors under ``prefix``, prefix removed.

    :param package: the package whose ``data/`` folder holds ``<stem>.json.gz`` (a plugin's own package).
    :param outer: keys directly under this prefix but outside ``prefix`` keep their name relative to it
        (``text_encoders.clip_l.logit_scale`` -> ``logit_scale``).
    """

    @cache
    def tensors() -> Mapping[str, TensorSpec]:
        inv = load_packaged_inventory(package, stem)
        out: dict[str, TensorSpec] = {}
        for key, spec in inv.tensors.items():
            if key.startswith(prefix):
                out[key[len(prefix) :]] = spec
            elif outer and key.startswith(outer):
                out[key[len(outer) :]] = spec
        return out

    return tensors


# ------------------------------------------------------------------------------------- built-in forms
def _strip_entry(entry: LayoutEntry, folder: str) -> LayoutEntry:
    """A layout-map entry with the ``<folder>/`` of its diffusers keys removed."""
    return LayoutEntry(
        tuple((k.removeprefix(folder), rows) for k, rows in entry.parts), entry.dim, entry.transform
    )


def _openclip_hf(stem: str, prefix: str) -> LayoutTable:
    """OpenCLIP text tower -> HF ``CLIPTextModelWithProjection`` keys, from the convert layout code."""

    @cache
    def layout() -> Mapping[str, LayoutEntry]:
        from lorasmith.archs._unet import openclip_layout

        inv = load_packaged_inventory("lorasmith.archs", stem)
        # every resblock and the projection: the separate files keep all layers (ComfyUI tells CLIP-H from
        # CLIP-G by text_model.encoder.layers.22/30), unlike the diffusers folders of SD2
        raw = openclip_layout(inv, prefix, "hf", drop_last_layers=0, projection=True)
        return {k[len(prefix) :]: _strip_entry(e, "hf/") for k, e in raw.items()}

    return layout


@cache
def _vae_diffusers() -> Mapping[str, LayoutEntry]:
    """ldm VAE -> diffusers ``AutoencoderKL`` keys: the VAE part of SD1's diffusers layout map.

    The same names serve the 16-channel VAE (its diffusers config only drops ``quant_conv``).
    """
    from lorasmith.archs.sd1 import SD1

    raw = SD1().layout_map("sd1-diffusers-unet")
    prefix = "first_stage_model."
    return {k[len(prefix) :]: _strip_entry(e, "vae/") for k, e in raw.items() if k.startswith(prefix)}


_HF = "HF transformers form"
_OPENCLIP = PartForm("openclip", "OpenCLIP form")
_LDM = PartForm("ldm", "ldm layout")
_DIFFUSERS_VAE = PartForm("diffusers", "diffusers layout", _vae_diffusers)

#: Qwen3-4B (``Qwen/Qwen3-4B`` config.json): hidden 2560, 36 layers, MLP 9728, 32 query heads and 8 key/value
#: heads of 128, vocabulary 151936, tied embeddings (no ``lm_head``). ComfyUI's ``qwen_3_4b.safetensors``
#: holds the HF ``Qwen3Model`` under ``model.``.
_QWEN3_4B = {
    "hidden": 2560,
    "layers": 36,
    "mlp": 9728,
    "q": 32 * 128,
    "kv": 8 * 128,
    "head": 128,
    "vocab": 151936,
}


@cache
def _qwen3_4b() -> Mapping[str, TensorSpec]:
    c = _QWEN3_4B
    h = c["hidden"]
    out: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((c["vocab"], h), "BF16")}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj.weight", (c["q"], h)),
            ("self_attn.k_proj.weight", (c["kv"], h)),
            ("self_attn.v_proj.weight", (c["kv"], h)),
            ("self_attn.o_proj.weight", (h, c["q"])),
            ("self_attn.q_norm.weight", (c["head"],)),
            ("self_attn.k_norm.weight", (c["head"],)),
            ("mlp.gate_proj.weight", (c["mlp"], h)),
            ("mlp.up_proj.weight", (c["mlp"], h)),
            ("mlp.down_proj.weight", (h, c["mlp"])),
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
        ):
            out[p + name] = TensorSpec(shape, "BF16")
    out["model.norm.weight"] = TensorSpec((h,), "BF16")
    return out


_ARCHS = "lorasmith.archs"
#: Top-level names of a CLIP text tower in HF form and in OpenCLIP form.
_CLIP_HEADS = ("text_model.", "text_projection", "logit_scale")
_OPENCLIP_HEADS = ("transformer.", "ln_final.", "positional_embedding", "token_embedding.")
#: Top-level names of an ldm or diffusers VAE.
_VAE_HEADS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

#: The built-in part kinds. Keys come from the packaged inventories (ComfyUI's SD3 Medium file holds CLIP-L
#: and T5-XXL in HF form and the 16-channel VAE; SD1 holds the 4-channel VAE; SDXL and SD2 their OpenCLIP
#: towers, whose HF forms are the separate files ``clip_g.safetensors``/``clip_h.safetensors``); Qwen3-4B's
#: from its public config. Families declare further kinds in ``Architecture.part_kinds``.
PART_KINDS: dict[str, PartKind] = {
    p.id: p
    for p in (
        PartKind(
            "clip_l",
            "clip_l text encoder",
            inventory_tensors(
                _ARCHS, "sd3-medium-comfyui", "text_encoders.clip_l.transformer.", "text_encoders.clip_l."
            ),
            (PartForm("hf", _HF),),
            heads=_CLIP_HEADS,
        ),
        PartKind(
            "clip_g",
            "clip_g text encoder",
            inventory_tensors(_ARCHS, "sdxl-sgm", "conditioner.embedders.1.model."),
            (PartForm("hf", _HF, _openclip_hf("sdxl-sgm", "conditioner.embedders.1.model.")), _OPENCLIP),
            heads=_CLIP_HEADS + _OPENCLIP_HEADS,
        ),
        PartKind(
            "clip_h",
            "clip_h text encoder",
            inventory_tensors(_ARCHS, "sd2-ldm", "cond_stage_model.model."),
            (PartForm("hf", _HF, _openclip_hf("sd2-ldm", "cond_stage_model.model.")), _OPENCLIP),
            heads=_CLIP_HEADS + _OPENCLIP_HEADS,
        ),
        PartKind(
            "t5xxl",
            "t5xxl text encoder",
            inventory_tensors(
                _ARCHS, "sd3-medium-comfyui", "text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."
            ),
            (PartForm("hf", _HF),),
            heads=("encoder.", "shared.", "logit_scale"),
        ),
        PartKind(
            "vae16",
            "16-channel VAE",
            inventory_tensors(_ARCHS, "sd3-medium-comfyui", "first_stage_model."),
            (_LDM, _DIFFUSERS_VAE),
            channels=("decoder.conv_in.weight", 1, 16),
            component="vae",
            heads=_VAE_HEADS,
        ),
        PartKind(
            "vae4",
            "4-channel VAE",
            inventory_tensors(_ARCHS, "sd1-ldm", "first_stage_model."),
            (_LDM, _DIFFUSERS_VAE),
            channels=("decoder.conv_in.weight", 1, 4),
            component="vae",
            heads=_VAE_HEADS,
        ),
        PartKind(
            "qwen3_4b",
            "qwen3_4b text encoder",
            _qwen3_4b,
            (PartForm("hf", _HF),),
            accept_opaque=True,
            heads=("model.embed_tokens.", "model.layers.", "model.norm."),
        ),
    )
}


# ------------------------------------------------------------------------------------- built-in slots
# --------------------------------------------------------------------------------------------- forms
@cache
def form_inventory(kind: PartKind, form: str | None = None) -> Mapping[str, TensorSpec]:
    """Key -> spec (real size) of every tensor of a file of ``kind`` in ``form`` (``None``: its file form).

    :raises KeyError: a form the kind does not have.
    """
    f = kind.form(form)
    canonical = kind.tensors()
    if f.layout is None:
        return canonical
    mapping = f.layout()
    out: dict[str, TensorSpec] = {}
    for key, spec in canonical.items():
        entry = mapping.get(key)
        if entry is None:
            out[key] = spec
            continue
        shape = layout_shape(spec.shape, entry.transform)
        if len(entry.parts) == 1:  # a rename (maybe of a 0-d tensor)
            out[entry.parts[0][0]] = TensorSpec(shape, spec.dtype)
            continue
        for part, rows in layout_parts(entry, shape[entry.dim]):
            out[part] = TensorSpec((*shape[: entry.dim], rows, *shape[entry.dim + 1 :]), spec.dtype)
    return out


def part_inventory(kind: str) -> Mapping[str, TensorSpec]:
    """Key -> spec of every tensor of a separate file of the built-in kind ``kind`` (its file form, as the
    separate distribution file names it).

    :raises KeyError: an unknown kind.
    """
    return form_inventory(PART_KINDS[kind])


# ------------------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class PartCatalog:
    """The part kinds a set of families knows, and which families use each.

    :ivar kinds: kind id -> :class:`PartKind` (the built-in ones and those the families declare).
    :ivar users: kind id -> ids of the families with a slot of that kind, in registration order.
    """

    kinds: Mapping[str, PartKind]
    users: Mapping[str, tuple[str, ...]]

    def reason(self, kind: str, form: str | None = None) -> str:
        """``"4-channel VAE (diffusers layout) (used by sd1, sdxl)"``: the kind, its form unless it is the
        file form, and its users."""
        k = self.kinds[kind]
        f = k.form(form)
        text = k.name + ("" if f == k.file_form else f" ({f.label})")
        users = self.users.get(kind, ())
        return text + (f" (used by {', '.join(users)})" if users else "")


def part_catalog(families: Iterable[Architecture]) -> PartCatalog:
    """The catalog of :data:`PART_KINDS` plus every kind the ``families`` declare.

    :raises PluginError: two declarations of one kind id that differ, or a slot of an undeclared kind.
    """
    fams = list(families)
    kinds: dict[str, PartKind] = dict(PART_KINDS)
    owner = dict.fromkeys(kinds, "the built-in kinds")
    for fam in fams:
        for kind in fam.part_kinds:
            old = kinds.get(kind.id)
            if old is not None and old != kind:
                raise PluginError(
                    f"part kind {kind.id!r} is declared twice: by {owner[kind.id]} and by family {fam.id!r}",
                    hint="give the plugin's part kind an id of its own",
                )
            kinds[kind.id] = kind
            owner.setdefault(kind.id, f"family {fam.id!r}")
    users: dict[str, list[str]] = {}
    for fam in fams:
        for variant in fam.variants:
            for slot in fam.part_slots(variant):
                if slot.kind is None:
                    continue
                if slot.kind not in kinds:
                    raise PluginError(
                        f"family {fam.id!r} declares a {slot.name} part of unknown kind {slot.kind!r}",
                        hint="declare the kind in the family's part_kinds",
                    )
                names = users.setdefault(slot.kind, [])
                if fam.id not in names:
                    names.append(fam.id)
    return PartCatalog(kinds, {k: tuple(v) for k, v in users.items()})


# ------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class PartMatch:
    """What :func:`detect_part` found.

    :ivar kind: the :class:`PartKind` id.
    :ivar users: the families that use it.
    :ivar score: fraction of the file's tensors that belong to the part (in that form).
    :ivar coverage: fraction of the part's tensors the file has.
    :ivar reason: one readable sentence (``"clip_l text encoder (used by sd1, sdxl, flux, sd3)"``).
    :ivar form: the :class:`PartForm` id the file is in.
    """

    kind: str
    users: tuple[str, ...]
    score: float
    coverage: float
    reason: str
    form: str = "native"


#: A file is a part when at least this fraction of its tensors belongs to the part ...
MIN_SCORE = 0.95
#: ... and it has at least this fraction of the part's tensors (real files drop optional buffers).
MIN_COVERAGE = 0.85


def detect_part(view: KeyView, catalog: PartCatalog) -> PartMatch | None:
    """The part kind and form of a file from its key names and tensor ranks, or ``None`` when it is no part.

    Every form of every kind of ``catalog`` is scored (:func:`lorasmith.registry.detect_part` passes the
    process-wide registry's); best by (score, coverage). A kind whose channel test fails is skipped. LoRA
    files are never parts.
    """
    keys = [k for k in view.tensors if split_lora_key(k) is None]
    if not keys or len(keys) != len(view.tensors):
        return None
    cat = catalog
    best: tuple[float, float, str, str] | None = None
    for kind_id, kind in cat.kinds.items():
        # a kind scoring under MIN_SCORE can never be the answer (a better kind wins, or none passes), and
        # its heads bound its score: skip it before its tables are built
        if kind.heads is not None and sum(1 for k in keys if k.startswith(kind.heads)) < MIN_SCORE * len(
            keys
        ):
            continue
        if kind.channels is not None:
            key, axis, value = kind.channels
            spec = view.tensors.get(key)
            if spec is not None and (len(spec.shape) <= axis or spec.shape[axis] != value):
                continue
        for form in kind.forms:
            inv = form_inventory(kind, form.id)
            hits = sum(1 for k in keys if k in inv and len(inv[k].shape) == len(view.tensors[k].shape))
            if not hits:
                continue
            cand = (hits / len(keys), hits / len(inv), kind_id, form.id)
            if best is None or cand[:2] > best[:2]:
                best = cand
    if best is None or best[0] < MIN_SCORE or best[1] < MIN_COVERAGE:
        return None
    score, coverage, kind_id, form_id = best
    return PartMatch(
        kind_id, cat.users.get(kind_id, ()), score, coverage, cat.reason(kind_id, form_id), form_id
    )
