"""Helpers shared by the two UNet families, SD1/SD2 (:mod:`lorasmith.archs.sd1`) and SDXL (:mod:`.sdxl`).

What lives here:

- the ldm/sgm <-> diffusers UNet key tables (packaged ``keymaps.json.gz``);
- LoRA alias generation for the UNet (one :class:`UNetSpelling` per trainer convention) and for the text
  encoders: HF-CLIP towers (CLIP-L, whose checkpoint names already are HF names) and OpenCLIP towers
  (SD2's ViT-H, SDXL's bigG), whose fused ``attn.in_proj_weight`` is aliased as q/k/v row slices;
- UNet block labels (``IN00``, ``M00``, ``OUT11``, ``BASE``) and :func:`normalize_block_label`;
- scale-invariant shape checks (:func:`fit_shapes`): a file's dimensions must equal the canonical
  dimensions times one common factor (1 for real files, 1/64 for the shrunk test fixtures). This tells SD1
  from SD2 and keeps an SDXL file from passing as SD1 (and back) when module names happen to coincide;
- :class:`UNetFamily`, the :class:`~lorasmith.archs.base.Architecture` subclass both families derive from,
  with :meth:`UNetFamily.layout_map`: the single file -> diffusers folder map (UNet, VAE, text encoders).

Block labels follow the manifests and hako-mikan's LoRA Block Weight: the middle block is ``M00``
(``MID`` is accepted as a synonym by :func:`normalize_block_label`), ``BASE`` is the text encoder(s) plus
``time_embed``/``label_emb``, and ``out.*`` joins the last output block. VAE keys and schedule buffers
have no block (``None``).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import gcd
from types import MappingProxyType
from typing import ClassVar, Literal

from lorasmith.archs.base import (
    LORA_SUFFIXES,
    Alias,
    Architecture,
    Detection,
    Inventory,
    KeyView,
    Kind,
    LayoutEntry,
    Target,
    TensorLike,
    TensorSpec,
    lora_modules,
    name_prefixes,
    strip_weight,
)
from lorasmith.archs.parts import PartSlot

#: Key prefix of the UNet in ldm/sgm single files.
UNET_PREFIX = "model.diffusion_model."

#: The 4-channel VAE part of the ldm/sgm single files (SD1, SD2, SDXL): ``first_stage_model.``, split as
#: ``vae.safetensors`` (part kind ``vae4``).
VAE4_SLOT = PartSlot("vae", "vae4", "first_stage_model.", "vae.safetensors", group="vae")

#: Dimensions that are multiples of this are the ones model widths are built from (and the ones the test
#: fixtures shrink); only they take part in the scale check.
WIDTH_QUANTUM = 64

#: First segments of UNet module paths in the diffusers tree (SDXL's ``add_embedding`` included) ...
UNET_DIFFUSERS_HEADS: tuple[str, ...] = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.",
    "add_embedding.",
)
#: ... and in the ldm/sgm tree (SDXL's ``label_emb`` included): the heads of the UNet families' name bounds
#: (:attr:`~lorasmith.archs.base.Architecture.lora_prefixes`, ``key_prefixes``).
UNET_LDM_HEADS: tuple[str, ...] = (
    "input_blocks.",
    "middle_block.",
    "output_blocks.",
    "out.",
    "time_embed.",
    "label_emb.",
)
#: Top-level keys of an ldm VAE (``first_stage_model.`` removed).
VAE_HEADS: tuple[str, ...] = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
#: The diffusion schedule buffers of ldm single files (SD1, SD2), stored as top-level keys.
LDM_SCHEDULE_KEYS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def unet_lora_prefixes(text_encoders: tuple[str, ...]) -> tuple[str, ...]:
    """The :attr:`~lorasmith.archs.base.Architecture.lora_prefixes` of a UNet family: its UNet spellings
    over both trees (kohya, kohya-ldm/-diffusers, peft, comfy, lycoris) and the ``text_encoders`` prefixes."""
    return (
        name_prefixes(("lora_unet_", "lycoris_"), UNET_DIFFUSERS_HEADS, kohya=True)
        + name_prefixes(("unet.",), UNET_DIFFUSERS_HEADS)
        + name_prefixes(("lora_unet_",), UNET_LDM_HEADS, kohya=True)
        + name_prefixes(("diffusion_model.",), UNET_LDM_HEADS)
        + text_encoders
    )


#: Other spellings of block labels -> the label this project uses.
BLOCK_SYNONYMS: Mapping[str, str] = MappingProxyType({"MID": "M00", "M0": "M00", "MID00": "M00", "M": "M00"})


# ------------------------------------------------------------------------------------------------ key maps
@cache
def _maps() -> Mapping[str, Mapping[str, str]]:
    from lorasmith.archs.base import load_packaged_json

    raw = load_packaged_json("lorasmith.archs", "keymaps")["maps"]
    return MappingProxyType({name: MappingProxyType(dict(table)) for name, table in raw.items()})


def keymap(name: str) -> Mapping[str, str]:
    """A packaged ldm/sgm -> diffusers key table (``sd1_unet``, ``sd2_unet``, ``sdxl_unet``, ``sd_vae``...).

    Keys and values are full tensor keys: ``model.diffusion_model.input_blocks.1.1.proj_in.weight`` ->
    ``down_blocks.0.attentions.0.proj_in.weight``.
    """
    return _maps()[name]


@cache
def reverse_keymap(name: str) -> Mapping[str, str]:
    """The inverse of :func:`keymap`: diffusers key -> ldm/sgm key."""
    return MappingProxyType({v: k for k, v in keymap(name).items()})


# --------------------------------------------------------------------------------------------- spellings
@dataclass(frozen=True)
class UNetSpelling:
    """How one LoRA spelling names UNet modules.

    :ivar spelling: a :data:`~lorasmith.archs.base.SPELLINGS` id.
    :ivar prefix: what comes before the module path (``lora_unet_``, ``unet.``, ``diffusion_model.``).
    :ivar tree: which module tree the path is taken from: ``ldm`` (the checkpoint's own, ldm or sgm) or
        ``diffusers``.
    :ivar sep: ``"_"`` for the kohya rule (every ``.`` of the path becomes ``_``), ``"."`` to keep dots.
    """

    spelling: str
    prefix: str
    tree: Literal["ldm", "diffusers"]
    sep: Literal["_", "."]

    def name(self, ldm_path: str, diffusers_path: str) -> str:
        """The module name for a module at ``ldm_path`` (after ``model.diffusion_model.``)."""
        path = ldm_path if self.tree == "ldm" else diffusers_path
        return self.prefix + (path.replace(".", "_") if self.sep == "_" else path)


@dataclass(frozen=True)
class TextEncoderSpelling:
    """How one LoRA spelling names text-encoder modules (always over HF CLIP module paths).

    :ivar spelling: a :data:`~lorasmith.archs.base.SPELLINGS` id.
    :ivar prefix: ``lora_te_``, ``lora_te1_``, ``text_encoder.``, ``text_encoder_2.``...
    :ivar sep: ``"_"`` for the kohya rule, ``"."`` to keep dots.
    """

    spelling: str
    prefix: str
    sep: Literal["_", "."]

    def name(self, hf_path: str) -> str:
        """The module name for the HF CLIP module ``hf_path`` (``text_model.encoder.layers.0.mlp.fc1``)."""
        return self.prefix + (hf_path.replace(".", "_") if self.sep == "_" else hf_path)


@dataclass(frozen=True)
class HFModule:
    """A text-encoder module under its HF CLIP path, resolved onto the canonical key (and row slice)."""

    path: str
    target: Target


def unet_aliases(
    inventory: Inventory,
    to_diffusers: Mapping[str, str],
    spellings: Sequence[UNetSpelling],
    component: str = "unet",
) -> Iterator[Alias]:
    """Aliases of every UNet ``.weight`` tensor (ndim >= 1) of an ldm/sgm ``inventory`` in ``spellings``.

    :param to_diffusers: the ldm/sgm -> diffusers key table (:func:`keymap`); a key it lacks gets no
        diffusers-tree aliases.
    """
    for key, spec in inventory.tensors.items():
        if not (key.startswith(UNET_PREFIX) and key.endswith(".weight") and spec.shape):
            continue
        ldm_path = strip_weight(key[len(UNET_PREFIX) :])
        diffusers_key = to_diffusers.get(key)
        diffusers_path = strip_weight(diffusers_key) if diffusers_key else ""
        target = Target(key)
        for sp in spellings:
            if sp.tree == "diffusers" and not diffusers_path:
                continue
            yield Alias(sp.name(ldm_path, diffusers_path), sp.spelling, target, component)


def hf_clip_modules(inventory: Inventory, prefix: str) -> Iterator[HFModule]:
    """Modules of a tower stored under HF CLIP names (CLIP-L): each ``.weight`` (ndim >= 1) under ``prefix``.

    The HF path is the key after ``prefix``, less ``.weight``.
    """
    for key, spec in inventory.tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and spec.shape:
            yield HFModule(strip_weight(key[len(prefix) :]), Target(key))


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
# OpenCLIP resblock weight -> HF CLIP layer module (the fused in_proj_weight is handled apart)
_OPENCLIP_LAYER = {
    "ln_1.weight": "layer_norm1",
    "ln_2.weight": "layer_norm2",
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}
# OpenCLIP tower-level tensors -> HF CLIP module. ``text_projection`` is left out on purpose: the HF
# ``text_projection.weight`` is its transpose, so a delta would not land on it as written.
_OPENCLIP_TOP = {
    "ln_final.weight": "text_model.final_layer_norm",
    "token_embedding.weight": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding",
}


def openclip_hf_modules(inventory: Inventory, prefix: str, drop_last_layers: int = 0) -> Iterator[HFModule]:
    """Modules of an OpenCLIP text tower (below ``prefix``) under the names of its HF CLIP conversion.

    ``resblocks.N`` becomes ``text_model.encoder.layers.N``; the q/k/v projections are row slices
    ``(0, i * width, width)`` of the fused ``attn.in_proj_weight``, in that order.

    :param drop_last_layers: the conversion drops this many final resblocks (SD2 drops ``resblocks.23``:
        its HF text encoder has 23 layers), which then have no HF name.
    """
    layers = {
        int(m.group(1))
        for key in inventory.tensors
        if key.startswith(prefix) and (m := _RESBLOCK.match(key[len(prefix) :]))
    }
    n_layers = (max(layers) + 1 - drop_last_layers) if layers else 0
    for key, spec in inventory.tensors.items():
        if not (key.startswith(prefix) and spec.shape):
            continue
        rest = key[len(prefix) :]
        m = _RESBLOCK.match(rest)
        if m is None:
            if rest in _OPENCLIP_TOP:
                yield HFModule(_OPENCLIP_TOP[rest], Target(key))
            continue
        index, sub = int(m.group(1)), m.group(2)
        if index >= n_layers:
            continue
        layer = f"text_model.encoder.layers.{index}."
        if sub == "attn.in_proj_weight":
            width = spec.shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                yield HFModule(f"{layer}self_attn.{proj}", Target(key, (0, i * width, width)))
        elif sub in _OPENCLIP_LAYER:
            yield HFModule(layer + _OPENCLIP_LAYER[sub], Target(key))


#: OpenCLIP tower tensors -> HF ``CLIPTextModel`` tensors (checkpoint layouts; ``text_projection`` apart).
_OPENCLIP_TOP_TENSORS = {
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
}
#: OpenCLIP resblock tensor -> HF layer tensor (below ``text_model.encoder.layers.N.``).
_OPENCLIP_LAYER_TENSORS = {
    f"{src}.{leaf}": f"{dst}.{leaf}"
    for src, dst in (
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    )
    for leaf in ("weight", "bias")
}


def openclip_layout(
    inventory: Inventory,
    prefix: str,
    folder: str,
    *,
    drop_last_layers: int = 0,
    projection: bool = True,
) -> dict[str, LayoutEntry]:
    """Layout entries of an OpenCLIP text tower (below ``prefix``) in its HF ``CLIPTextModel`` conversion.

    Layout keys are ``<folder>/<HF key>``. ``attn.in_proj_weight``/``in_proj_bias`` split into equal q, k,
    v row thirds; ``text_projection`` becomes ``text_projection.weight`` transposed (OpenCLIP computes
    ``x @ P``, an HF ``Linear`` stores ``P.T``). Tensors left out have no place in the HF model: the
    dropped final resblocks, ``logit_scale``, and ``text_projection`` when ``projection`` is false.

    :param drop_last_layers: final resblocks the conversion drops (SD2: 1, as diffusers and sd-scripts do).
    """
    layers = {
        int(m.group(1))
        for key in inventory.tensors
        if key.startswith(prefix) and (m := _RESBLOCK.match(key[len(prefix) :]))
    }
    n_layers = (max(layers) + 1 - drop_last_layers) if layers else 0
    out: dict[str, LayoutEntry] = {}
    for key, spec in inventory.tensors.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        m = _RESBLOCK.match(rest)
        if m is None:
            if rest in _OPENCLIP_TOP_TENSORS:
                out[key] = LayoutEntry(((f"{folder}/{_OPENCLIP_TOP_TENSORS[rest]}", None),))
            elif rest == "text_projection" and projection:
                out[key] = LayoutEntry(((f"{folder}/text_projection.weight", None),), transform="transpose")
            continue
        index, sub = int(m.group(1)), m.group(2)
        if index >= n_layers:
            continue
        layer = f"{folder}/text_model.encoder.layers.{index}."
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = "weight" if sub.endswith("weight") else "bias"
            width = spec.shape[0] // 3
            out[key] = LayoutEntry(
                tuple((f"{layer}self_attn.{p}_proj.{leaf}", width) for p in ("q", "k", "v"))
            )
        elif sub in _OPENCLIP_LAYER_TENSORS:
            out[key] = LayoutEntry(((layer + _OPENCLIP_LAYER_TENSORS[sub], None),))
    return out


def prefixed_layout(inventory: Inventory, prefix: str, folder: str) -> dict[str, LayoutEntry]:
    """Layout entries of a tower stored under HF names below ``prefix`` (CLIP-L): ``<folder>/<rest>``."""
    return {
        key: LayoutEntry(((f"{folder}/{key[len(prefix) :]}", None),))
        for key in inventory.tensors
        if key.startswith(prefix)
    }


def text_encoder_aliases(
    modules: Iterable[HFModule], spellings: Sequence[TextEncoderSpelling], component: str
) -> Iterator[Alias]:
    """Aliases of HF-named text-encoder ``modules`` in every one of ``spellings``."""
    for module in modules:
        for sp in spellings:
            yield Alias(sp.name(module.path), sp.spelling, module.target, component)


# ------------------------------------------------------------------------------------------------ blocks
def normalize_block_label(label: str) -> str:
    """Upper-case ``label`` and map synonyms (``MID`` -> ``M00``); ``in4`` -> ``IN04``."""
    label = label.strip().upper()
    label = BLOCK_SYNONYMS.get(label, label)
    m = re.fullmatch(r"(IN|OUT|M)(\d+)", label)
    return f"{m.group(1)}{int(m.group(2)):02d}" if m else label


def ldm_block_label(path: str, last_output: int) -> str | None:
    """Block label of a UNet key in ldm/sgm naming, without the ``model.diffusion_model.`` prefix.

    ``input_blocks.N`` -> ``INnn``, ``middle_block`` -> ``M00``, ``output_blocks.N`` -> ``OUTnn``,
    ``time_embed``/``label_emb`` -> ``BASE``, ``out`` -> ``OUT<last_output>``; anything else ``None``.
    """
    head, _, rest = path.partition(".")
    if head in ("input_blocks", "output_blocks"):
        index = rest.partition(".")[0]
        if not index.isdigit():
            return None
        return f"{'IN' if head == 'input_blocks' else 'OUT'}{int(index):02d}"
    if head == "middle_block":
        return "M00"
    if head in ("time_embed", "label_emb"):
        return "BASE"
    if head == "out":
        return f"OUT{last_output:02d}"
    return None


# ------------------------------------------------------------------------------------------ shape checks
@dataclass(frozen=True)
class ShapeFit:
    """How well a file's shapes fit one variant's canonical shapes, up to one common scale factor.

    :ivar resolved: keys (checkpoint) or modules (LoRA) that resolve onto the variant by name.
    :ivar off_scale: of those, how many have a width (a multiple of :data:`WIDTH_QUANTUM` in the canonical
        shape) that is not the canonical width times :attr:`scale`.
    :ivar ndim_mismatch: of those, how many have another number of dimensions (checkpoints only).
    :ivar scale: file width / canonical width held by most widths (``None`` when nothing compares).
    """

    resolved: int = 0
    off_scale: int = 0
    ndim_mismatch: int = 0
    scale: Fraction | None = None

    @property
    def inconsistent(self) -> int:
        """Resolved keys or modules whose shapes do not fit: ``off_scale + ndim_mismatch``."""
        return self.off_scale + self.ndim_mismatch

    @property
    def power_of_two(self) -> bool:
        """True if :attr:`scale` is a power of two (1 for real files, 1/64 for shrunk fixtures)."""
        s = self.scale
        if s is None:
            return False
        n, d = s.numerator, s.denominator
        return n & (n - 1) == 0 and d & (d - 1) == 0

    def rank_key(self) -> tuple[int, int, int]:
        """Sort key, best first: fewest misfits, then most resolved, then a power-of-two scale."""
        return (self.inconsistent, -self.resolved, 0 if self.power_of_two else 1)


def fit_shapes(items: Iterable[Sequence[tuple[int, int]] | None]) -> ShapeFit:
    """Fit ``(file dim, canonical dim)`` pairs, one sequence per key or module (``None``: ndim differs).

    Only canonical dims that are multiples of :data:`WIDTH_QUANTUM` are compared: those are the widths a
    uniformly shrunk or grown file scales, while kernel sizes, channel counts like 4 or 9 and token counts
    like 77 stay as they are. The common scale is the ratio most widths agree on; a key or module with any
    width off that ratio is counted in :attr:`ShapeFit.off_scale`.
    """
    # ratios as reduced (numerator, denominator) pairs: equal exactly when the fractions are, and a
    # detection compares thousands of them (Fraction objects cost ten times more)
    groups: list[list[tuple[int, int]]] = []
    resolved = ndim_mismatch = 0
    for pairs in items:
        resolved += 1
        if pairs is None:
            ndim_mismatch += 1
            continue
        ratios = []
        for f, c in pairs:
            if c > 0 and f > 0 and c % WIDTH_QUANTUM == 0:
                g = gcd(f, c)
                ratios.append((f // g, c // g))
        groups.append(ratios)
    votes: Counter[tuple[int, int]] = Counter(r for g in groups for r in g)
    if not votes:
        return ShapeFit(resolved, 0, ndim_mismatch, None)

    def _vote(kv: tuple[tuple[int, int], int]) -> tuple[int, bool, Fraction]:
        (n, d), count = kv
        pow2 = n & (n - 1) == 0 and d & (d - 1) == 0
        return (count, pow2, -abs(Fraction(n, d) - 1))

    scale = max(votes.items(), key=_vote)[0]
    off = sum(1 for g in groups if any(r != scale for r in g))
    return ShapeFit(resolved, off, ndim_mismatch, Fraction(*scale))


# suffix -> which dim of that tensor is the module's input (in) or output (out) width
_IN_DIM: Mapping[str, int] = MappingProxyType(
    {
        ".lora_down.weight": 1, ".lora_A.weight": 1, ".lora_A.default.weight": 1, "_lora.down.weight": 1,
        ".lora.down.weight": 1, ".lora_linear_layer.down.weight": 1, ".hada_w1_b": 1, ".hada_w2_b": 1,
    }
)  # fmt: skip
_OUT_DIM: Mapping[str, int] = MappingProxyType(
    {
        ".lora_up.weight": 0, ".lora_B.weight": 0, ".lora_B.default.weight": 0, "_lora.up.weight": 0,
        ".lora.up.weight": 0, ".lora_linear_layer.up.weight": 0, ".hada_w1_a": 0, ".hada_w2_a": 0,
        ".w_norm": 0,
    }
)  # fmt: skip


def lora_module_dims(
    parts: Mapping[str, str], tensors: Mapping[str, TensorLike]
) -> tuple[int | None, int | None]:
    """``(out, in)`` widths of one LoRA module (``parts``: suffix -> tensor key); ``None`` where unknown.

    LoRA/LoCon/LoHa/PEFT factors, full ``diff`` and norm ``w_norm`` are read; LoKr and OFT are not.
    """
    out_dim: int | None = None
    in_dim: int | None = None
    # LyCORIS' Tucker LoHa stores hada_w1_a/hada_w2_a as [rank, out] next to hada_t1/hada_t2
    tucker_loha = ".hada_t1" in parts or ".hada_t2" in parts
    for suffix, key in parts.items():
        shape = tuple(tensors[key].shape)
        out_index = 1 if tucker_loha and suffix in (".hada_w1_a", ".hada_w2_a") else _OUT_DIM.get(suffix)
        if suffix in _IN_DIM and len(shape) > _IN_DIM[suffix]:
            in_dim = shape[_IN_DIM[suffix]]
        elif out_index is not None and len(shape) > out_index:
            out_dim = shape[out_index]
        elif suffix == ".diff" and shape:
            out_dim = shape[0]
            in_dim = shape[1] if len(shape) >= 2 else in_dim
    return out_dim, in_dim


def target_dims(target: Target, spec: TensorSpec) -> tuple[int | None, int | None]:
    """``(out, in)`` widths of a canonical target (the slice length as ``out`` for a row slice)."""
    shape = spec.shape
    if not shape:
        return None, None
    out_dim = target.slice[2] if target.slice is not None and target.slice[0] == 0 else shape[0]
    in_dim = shape[1] if len(shape) >= 2 else None
    return out_dim, in_dim


def metadata_variant(metadata: Mapping[str, str], by_prefix: Mapping[str, str]) -> str | None:
    """The variant that ``ss_base_model_version`` or ``modelspec.architecture`` names.

    :param by_prefix: value prefix -> variant (``{"sd_v2": "sd2"}``); the longest matching prefix wins.
    :return: the variant, or ``None`` if neither field matches.
    """
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field, "")
        for prefix in sorted(by_prefix, key=len, reverse=True):
            if value.startswith(prefix):
                return by_prefix[prefix]
    return None


# ---------------------------------------------------------------------------------------- family class
class UNetFamily(Architecture):
    """Common behaviour of the ldm/sgm UNet families (not registered itself; it has no ``id``).

    On top of the base class it

    - checks that the shapes of what matched by name fit the canonical shapes up to one common scale
      (:meth:`lora_fit`, :meth:`checkpoint_fit`); keys or modules that do not fit are not counted as
      matched, so a file of a sibling family with coinciding names scores lower;
    - labels blocks from ldm/sgm indices (:meth:`block_of`), also for bare UNet keys and diffusers keys.

    Subclasses set :attr:`unet_keymaps`, :attr:`text_encoder_prefixes` and :attr:`last_output_block`.
    """

    #: variant -> name of its ldm/sgm -> diffusers UNet key table (:func:`keymap`).
    unet_keymaps: ClassVar[Mapping[str, str]] = {}
    #: key prefixes of the text encoders in the canonical layout (their keys are block ``BASE``).
    text_encoder_prefixes: ClassVar[tuple[str, ...]] = ()
    #: index of the last output block (``out.*`` belongs to it).
    last_output_block: ClassVar[int] = 11
    #: metadata value prefix -> variant, see :func:`metadata_variant`.
    metadata_variants: ClassVar[Mapping[str, str]] = {}

    # ------------------------------------------------------------------------------------ shape fits
    # LoRA modules of the view being detected: one detect() asks for them up to four times. Only kept
    # for the duration of detect(), so a caller that mutates its tensor mapping later is never served stale.
    _lora_memo: tuple[Mapping[str, TensorLike], dict[str, dict[str, str]]] | None = None

    def _lora_modules(self, view: KeyView) -> dict[str, dict[str, str]]:
        memo = self._lora_memo
        if memo is not None and memo[0] is view.tensors:
            return memo[1]
        return lora_modules(view.tensors)

    def detect(self, view: KeyView) -> Detection | None:
        """As the base class (LoRA modules, other tensors, ``mixed`` when both are present)."""
        self._lora_memo = (view.tensors, lora_modules(view.tensors))
        try:
            return super().detect(view)
        finally:
            self._lora_memo = None

    def lora_fit(self, view: KeyView, variant: str) -> ShapeFit:
        """How the LoRA modules of ``view`` that resolve in ``variant``'s alias table fit its shapes."""
        table = self.alias_table(variant)
        tensors = self.canonical_inventory(variant).tensors
        items: list[list[tuple[int, int]]] = []
        for name, parts in self._lora_modules(view).items():
            alias = table.get(name)
            if alias is None:
                continue
            spec = tensors.get(alias.target.key)
            pairs: list[tuple[int, int]] = []
            if spec is not None:
                file_dims = lora_module_dims(parts, view.tensors)
                canon_dims = target_dims(alias.target, spec)
                pairs = [
                    (f, c)
                    for f, c in zip(file_dims, canon_dims, strict=True)
                    if f is not None and c is not None
                ]
            items.append(pairs)
        return fit_shapes(items)

    def checkpoint_fit(self, view: KeyView, variant: str, layout: str | None = None) -> ShapeFit:
        """How the non-LoRA tensors of ``view`` known to ``variant`` (in ``layout``, if any) fit."""
        items: list[list[tuple[int, int]] | None] = []
        for key, tensor in view.tensors.items():
            if key.endswith(LORA_SUFFIXES):  # one C call; same test as split_lora_key
                continue
            for inv, _full, spec in self._candidates(key):
                if inv.variant != variant or (layout is not None and inv.layout != layout):
                    continue
                shape = tuple(tensor.shape)
                items.append(
                    list(zip(shape, spec.shape, strict=True)) if len(shape) == len(spec.shape) else None
                )
                break
        return fit_shapes(items)

    def _pick_variant(self, view: KeyView, variant: str, kind: Kind) -> str:
        """The variant whose shapes fit ``view`` best; ties go to the metadata, then to ``variant``."""
        if len(self.variants) < 2 or kind not in ("lora", "checkpoint"):
            return variant
        fit = self.lora_fit if kind == "lora" else self.checkpoint_fit
        fits = {v: fit(view, v) for v in self.variants}
        ranked = sorted(self.variants, key=lambda v: fits[v].rank_key())
        if fits[ranked[0]].rank_key() != fits[ranked[1]].rank_key():
            return ranked[0]
        tied = [v for v in ranked if fits[v].rank_key() == fits[ranked[0]].rank_key()]
        named = self.variant_from_metadata(view.metadata)
        if named in tied:
            return named
        return variant if variant in tied else tied[0]

    def variant_from_metadata(self, metadata: Mapping[str, str]) -> str | None:
        """The variant the file's metadata names (a tie-breaker only: shapes come first)."""
        return metadata_variant(metadata, self.metadata_variants)

    @staticmethod
    def _discount(det: Detection, matched: int, fit: ShapeFit, what: str) -> Detection | None:
        """``det`` with ``matched`` replaced and the shape misfits named in the reason (``None`` if 0)."""
        if matched <= 0:
            return None
        reason = det.reason
        if fit.off_scale:
            reason += f"; {fit.off_scale} {what} have shapes that do not fit this family's"
        return dataclasses.replace(det, matched=matched, score=matched / max(det.total, 1), reason=reason)

    def detect_lora(self, view: KeyView) -> Detection | None:
        """As the base class, but modules whose widths do not fit the variant's shapes do not count."""
        det = super().detect_lora(view)
        if det is None or det.variant is None:
            return det
        fit = self.lora_fit(view, det.variant)
        return self._discount(det, fit.resolved - fit.off_scale, fit, "of them")

    def detect_checkpoint(self, view: KeyView) -> Detection | None:
        """As the base class, but tensors whose widths do not fit the variant's shapes do not count."""
        det = super().detect_checkpoint(view)
        if det is None or det.variant is None:
            return det
        fit = self.checkpoint_fit(view, det.variant, det.layout)
        if not fit.off_scale:
            return det
        return self._discount(det, det.matched - fit.off_scale, fit, "tensors")

    # --------------------------------------------------------------------------------------- layouts
    def layout_map(self, inventory_id: str) -> Mapping[str, LayoutEntry]:
        """Canonical single-file key -> diffusers folder key, for the family's ``*-diffusers-unet`` inventory.

        UNet keys map onto the inventory's bare keys (the packaged ldm/sgm -> diffusers table); the other
        components onto ``<subfolder>/<key>``: ``vae/`` (the packaged VAE table; the mid-block attention
        q/k/v/proj_out are 1x1 convs ``[C, C, 1, 1]`` in ldm and ``Linear`` ``[C, C]`` in diffusers:
        transform ``drop_1x1``) and the text encoders (:meth:`_text_encoder_layout`). Canonical keys left
        out (the ldm schedule buffers, SD2's last resblock...) have no place in a diffusers folder.
        """
        inv = next((i for i in self.inventories() if i.id == inventory_id), None)
        if inv is None or inv.layout != "diffusers-unet":
            return super().layout_map(inventory_id)
        canonical = self.canonical_inventory(inv.variant)
        out: dict[str, LayoutEntry] = {}
        for ldm, diff in keymap(self.unet_keymaps[inv.variant]).items():
            if ldm in canonical.tensors:
                out[ldm] = LayoutEntry(((diff, None),))
        for ldm, diff in keymap("sd_vae").items():
            # the table notes the reshape after the key: "<key>  [reshape (C,C,1,1)->(C,C)]"
            name, _, note = diff.partition(" ")
            if ldm in canonical.tensors:
                transform = "drop_1x1" if "reshape" in note else None
                out[ldm] = LayoutEntry(((f"vae/{name}", None),), transform=transform)
        out.update(self._text_encoder_layout(canonical))
        return out

    def _text_encoder_layout(self, canonical: Inventory) -> dict[str, LayoutEntry]:
        """Layout entries of the text encoder(s) of ``canonical`` (override; the default has none)."""
        return {}

    # ---------------------------------------------------------------------------------------- blocks
    def block_of(self, key: str) -> str | None:
        """Block label of a canonical key (``IN04``, ``M00``, ``OUT11``, ``BASE``); ``None`` for VAE/buffers.

        Also accepts UNet keys without ``model.diffusion_model.`` (or with ``diffusion_model.``) and
        diffusers UNet keys.
        """
        if any(key.startswith(p) for p in self.text_encoder_prefixes):
            return "BASE"
        for prefix in (UNET_PREFIX, "diffusion_model.", ""):
            if key.startswith(prefix):
                label = ldm_block_label(key[len(prefix) :], self.last_output_block)
                if label is not None:
                    return label
        for name in dict.fromkeys(self.unet_keymaps.values()):
            ldm_key = reverse_keymap(name).get(key) or reverse_keymap(name).get(key + ".weight")
            if ldm_key is not None:
                return ldm_block_label(ldm_key[len(UNET_PREFIX) :], self.last_output_block)
        return None
