"""lorasmith plugin: the Qwen-Image family (``qwenimage``) and old diffusers SDXL LoRA names.

Two hooks, found through the entry point ``[project.entry-points.lorasmith] qwenimage =
"lorasmith_qwenimage"``:

- :func:`lorasmith_register_architectures` registers :class:`QwenImage`;
- :func:`lorasmith_extra_aliases` adds, to the built-in ``sdxl`` family, the LoRA module names that
  diffusers' old attention-processor format wrote (``unet.<block>.attn1.processor.to_q_lora.down.weight``).

Qwen-Image key space (canonical; see ``data/`` and ``scripts/build_inventory.py``): the diffusers
``QwenImageTransformer2DModel`` names, which ComfyUI's single file shares: ``img_in``, ``txt_norm``,
``txt_in``, ``time_text_embed.timestep_embedder.linear_1/2``, ``transformer_blocks.N.`` (``N`` < 60) with
``img_mod.1``, ``txt_mod.1``, ``attn.to_q/to_k/to_v``, ``attn.add_q_proj/add_k_proj/add_v_proj``,
``attn.to_out.0``, ``attn.to_add_out``, ``attn.norm_q/norm_k/norm_added_q/norm_added_k``,
``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mlp.net.0.proj``, ``txt_mlp.net.2``, then ``norm_out.linear``
and ``proj_out``.

LoRA spellings (the default first), all over that one tree, none fused:

- ``peft`` (diffusers / PEFT, SimpleTuner): ``transformer.`` + path, ``lora_A``/``lora_B``;
- ``aitk`` (ai-toolkit; ComfyUI reads the same names): ``diffusion_model.`` + path;
- ``musubi`` (musubi-tuner): ``lora_unet_`` + path with ``.`` replaced by ``_``, kohya suffixes;
- ``lycoris`` (LyCORIS wrapper): ``lycoris_`` + path with ``_``.

Detection is scale-invariant: names first, then the shapes of what matched must fit the canonical shapes up
to one common factor (1 for real files, 1/64 for shrunk test fixtures); keys that do not fit do not count.
This keeps the attention-only names Qwen-Image shares with the diffusers FLUX.1 and SD3 trees from making
a FLUX or SD3 file look like Qwen-Image.

Parts (``component_parts``): the transformer, under ``model.diffusion_model.`` in a single-file checkpoint
(ComfyUI's convention) and bare in its own file. Qwen-Image also ships a VAE (``qwen_image_vae``, a 3-D
causal VAE of the Wan 2.1 kind) and the Qwen2.5-VL-7B text encoder as separate files, but this plugin's data
holds neither key set, so neither has a slot: ``convert --split``/``--assemble`` handle the transformer
alone, and other keys of a single file stay with it under their full names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import ClassVar

from lorasmith.archs.base import (
    Alias,
    Architecture,
    Detection,
    KeyView,
    Target,
    TensorLike,
    kohya_name,
    lora_modules,
    name_prefixes,
)
from lorasmith.archs.parts import PartSlot, diffusion_model_slot
from lorasmith.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "QwenImage",
    "lorasmith_extra_aliases",
    "lorasmith_register_architectures",
    "sdxl_processor_aliases",
]

#: Blocks of the released model (``transformer/config.json``: ``num_layers``).
LAYERS = 60
#: Model widths are multiples of this; only such dimensions scale in shrunk fixtures (divided by 64).
WIDTH_QUANTUM = 64

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_IN_HEADS = ("img_in", "txt_in", "txt_norm", "time_text_embed")
_OUT_HEADS = ("norm_out", "proj_out")
#: First segments of every canonical key: the heads of the name bounds (``lora_prefixes``/``key_prefixes``).
HEADS = ("transformer_blocks.", *_IN_HEADS, *_OUT_HEADS)
#: Wrapper prefixes a checkpoint or a LoRA puts before a canonical key.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
#: Names of layers only Qwen-Image has among the built-in DiT trees (FLUX/SD3 say ``ff``/``norm1``).
QWEN_ONLY = re.compile(r"(img_mod|txt_mod|img_mlp|txt_mlp|txt_norm|img_in|txt_in)")
#: LoRA up/down suffix pairs whose shapes give a module's (out, in).
_PAIRS = (
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def scale_of(actual: Sequence[int], canonical: Sequence[int]) -> Fraction | None:
    """The factor ``canonical / actual`` shared by every width dimension, or ``None`` if they disagree.

    Width dimensions are the canonical ones divisible by :data:`WIDTH_QUANTUM`; every other dimension must
    be equal. A shape with no width dimension fits any scale (``Fraction(0)`` stands for "any").
    """
    if len(actual) != len(canonical):
        return None
    scale: Fraction | None = Fraction(0)
    for a, c in zip(actual, canonical, strict=True):
        if c % WIDTH_QUANTUM:
            if a != c:
                return None
            continue
        if a <= 0:
            return None
        ratio = Fraction(c, a)
        if scale and ratio != scale:
            return None
        scale = ratio
    return scale


def common_fit(scales: Iterable[Fraction | None]) -> tuple[int, int]:
    """``(fitting, total)``: how many shapes agree with the scale most of them share.

    Why a vote: a real file is at scale 1 and a shrunk fixture at 64, and a file of another family that
    happens to reuse names disagrees with itself, so its minority of misfits is discounted.
    """
    items = list(scales)
    votes = Counter(s for s in items if s)
    if not votes:
        return sum(1 for s in items if s is not None), len(items)
    best = votes.most_common(1)[0][0]
    return sum(1 for s in items if s is not None and (s == best or s == 0)), len(items)


class QwenImage(Architecture):
    """Qwen-Image (and the Edit models, which share its transformer): see the module docstring."""

    id: ClassVar[str] = "qwenimage"
    name: ClassVar[str] = "Qwen-Image"
    variants: ClassVar[tuple[str, ...]] = ("qwen-image",)
    inventory_files: ClassVar[tuple[str, ...]] = ("qwen-image",)
    data_package: ClassVar[str] = "lorasmith_qwenimage"
    spellings: ClassVar[tuple[str, ...]] = ("peft", "aitk", "musubi", "lycoris")
    #: musubi-tuner's ``ARCH_QWEN_IMAGE`` (``/lora`` is appended for adapters).
    modelspec: ClassVar[Mapping[str, str]] = {"qwen-image": "Qwen-Image"}
    base_model_version: ClassVar[Mapping[str, str]] = {"qwen-image": "qwen_image"}
    #: cheap name bounds: detection skips this family for files none of whose names could be Qwen-Image's
    lora_prefixes: ClassVar[tuple[str, ...] | None] = name_prefixes(
        ("transformer.", "diffusion_model."), HEADS
    ) + name_prefixes(("lora_unet_", "lycoris_"), HEADS, kohya=True)
    key_prefixes: ClassVar[tuple[str, ...] | None] = HEADS
    #: the transformer only: the data holds no VAE or text-encoder keys (see the module docstring)
    component_parts: ClassVar[tuple[PartSlot, ...]] = (diffusion_model_slot(),)

    def _build_aliases(self, variant: str) -> Iterator[Alias]:
        """Every ``.weight`` of ndim >= 2 in the four spellings; all target the whole weight."""
        for key, spec in self.modules(variant).items():
            if not key.endswith(".weight") or len(spec.shape) < 2:
                continue
            path = key[: -len(".weight")]
            target = Target(key)
            yield Alias("transformer." + path, "peft", target, "transformer")
            yield Alias("diffusion_model." + path, "aitk", target, "transformer")
            yield Alias(kohya_name("lora_unet_", path), "musubi", target, "transformer")
            yield Alias(kohya_name("lycoris_", path), "lycoris", target, "transformer")

    # ----------------------------------------------------------------------------------------- blocks
    def block_of(self, key: str) -> str | None:
        """``IN``, ``B00``-``B59`` or ``OUT`` for a canonical key (wrapper prefixes allowed)."""
        key = _strip(key)
        m = _BLOCK.match(key)
        if m:
            return f"B{int(m.group(1)):02d}"
        head = key.split(".", 1)[0]
        if head in _IN_HEADS:
            return "IN"
        if head in _OUT_HEADS:
            return "OUT"
        return None

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``qwen-image-62``: ``IN, B00..B59, OUT`` (this plugin's choice; no community notation exists)."""
        return {"qwen-image-62": ["IN", *(f"B{i:02d}" for i in range(LAYERS)), "OUT"]}

    # -------------------------------------------------------------------------------------- detection
    def _lora_scales(self, view: KeyView) -> list[Fraction | None]:
        tensors: Mapping[str, TensorLike] = view.tensors
        table = self.alias_table()
        canon = self.modules()
        scales: list[Fraction | None] = []
        for module in lora_modules(tensors):
            alias = table.get(module)
            if alias is None:
                continue
            shape = canon[alias.target.key].shape
            for up, down in _PAIRS:
                u, d = tensors.get(module + up), tensors.get(module + down)
                if u is not None and d is not None and len(u.shape) >= 2 and len(d.shape) >= 2:
                    scales.append(scale_of((u.shape[0], d.shape[1]), shape[:2]))
                    break
            else:
                scales.append(Fraction(0))  # other algorithms: names only
        return scales

    def _checkpoint_scales(self, view: KeyView) -> list[Fraction | None]:
        canon = self.modules()
        scales: list[Fraction | None] = []
        for key, spec in view.tensors.items():
            real = canon.get(_strip(key))
            if real is not None:
                scales.append(scale_of(tuple(spec.shape), real.shape))
        return scales

    @staticmethod
    def _discount(det: Detection, fit: tuple[int, int], what: str) -> Detection | None:
        fitting, total = fit
        misfits = total - fitting
        if not misfits:
            return det
        matched = max(det.matched - misfits, 0)
        if matched == 0:
            return None
        return replace(
            det,
            matched=matched,
            score=matched / det.total,
            reason=f"{det.reason}; {misfits} {what} have shapes that do not fit Qwen-Image's",
        )

    def detect_lora(self, view: KeyView) -> Detection | None:
        """The base detection, not counting modules whose shapes do not fit Qwen-Image's."""
        det = super().detect_lora(view)
        return None if det is None else self._discount(det, common_fit(self._lora_scales(view)), "modules")

    def detect_checkpoint(self, view: KeyView) -> Detection | None:
        """The base detection, not counting tensors whose shapes do not fit Qwen-Image's."""
        det = super().detect_checkpoint(view)
        if det is None:
            return None
        return self._discount(det, common_fit(self._checkpoint_scales(view)), "tensors")


# ------------------------------------------------------------------------------------------------- SDXL
#: SDXL diffusers attention containers -> their sgm ``input_blocks``/``middle_block``/``output_blocks`` slot,
#: and transformer depth (SDXL base ``transformer_layers_per_block``: 1 level has 2, deeper ones 10).
_SDXL_ATTN: tuple[tuple[str, str, int], ...] = (
    ("down_blocks.1.attentions.0", "input_blocks.4.1", 2),
    ("down_blocks.1.attentions.1", "input_blocks.5.1", 2),
    ("down_blocks.2.attentions.0", "input_blocks.7.1", 10),
    ("down_blocks.2.attentions.1", "input_blocks.8.1", 10),
    ("mid_block.attentions.0", "middle_block.1", 10),
    ("up_blocks.0.attentions.0", "output_blocks.0.1", 10),
    ("up_blocks.0.attentions.1", "output_blocks.1.1", 10),
    ("up_blocks.0.attentions.2", "output_blocks.2.1", 10),
    ("up_blocks.1.attentions.0", "output_blocks.3.1", 2),
    ("up_blocks.1.attentions.1", "output_blocks.4.1", 2),
    ("up_blocks.1.attentions.2", "output_blocks.5.1", 2),
)
#: Old attention-processor LoRA layer -> the attention's own projection (``to_out`` is ``to_out.0``).
_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def sdxl_processor_aliases() -> Iterator[Alias]:
    """SDXL UNet LoRA names of diffusers' old ``LoRAAttnProcessor`` format, onto sgm keys.

    The files hold ``unet.<diffusers attention>.processor.to_q_lora.down.weight`` (``_lora.down.weight`` is a
    LoRA suffix lorasmith parses, leaving the module name ``...processor.to_q``); no alpha, so alpha = rank.
    """
    for diff, sgm, depth in _SDXL_ATTN:
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                for layer, proj in _PROCESSOR.items():
                    name = f"unet.{diff}.transformer_blocks.{t}.{attn}.processor.{layer}"
                    key = f"model.diffusion_model.{sgm}.transformer_blocks.{t}.{attn}.{proj}.weight"
                    yield Alias(name, "peft", Target(key), "unet")


# ------------------------------------------------------------------------------------------------ hooks
@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the Qwen-Image family."""
    return [QwenImage]


@hookimpl
def lorasmith_extra_aliases(arch_id: str, variant: str) -> list[Alias] | None:
    """Old diffusers attention-processor LoRA names for the built-in ``sdxl`` family; nothing for others."""
    if arch_id != "sdxl":
        return None
    return list(sdxl_processor_aliases())
