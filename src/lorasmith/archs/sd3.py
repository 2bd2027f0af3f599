"""Stable Diffusion 3 / 3.5 (MMDiT): the built-in ``sd3`` family.

Canonical key space: the ComfyUI/SAI single files (``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.
weight``; SD3 Medium's file also carries ``text_encoders.clip_l/clip_g/t5xxl.transformer.*``, which are the
text-encoder targets of every variant). Variants: ``sd3-medium`` (24 joint blocks), ``sd3.5-medium``
(24 blocks, MMDiT-X: ``x_block.attn2`` in blocks 0-12, q/k RMS norms), ``sd3.5-large`` (38 blocks).

LoRA spellings (the default first):

- ``kohya`` (sd-scripts ``networks/lora_sd3.py``): ``lora_unet_`` + path after ``model.diffusion_model.``
  with ``_`` (``lora_unet_joint_blocks_0_x_block_attn_qkv``); ``lora_te1_``/``lora_te2_``/``lora_te3_`` +
  HF path of CLIP-L / CLIP-G / T5-XXL.
- ``peft`` (diffusers ``SD3Transformer2DModel``): ``transformer.`` + diffusers path, q/k/v as row thirds of
  the fused ``qkv``; text encoders ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``.
- ``comfy``: ``diffusion_model.`` + path; text encoders ``text_encoders.<ComfyUI key>``.
- ``onetrainer``: ``lora_transformer_`` + diffusers path with ``_`` (text encoders as kohya).
- ``lycoris``: ``lycoris_`` + diffusers path with ``_``.

Not aliased in the diffusers spellings: the last (``pre_only``) context block's ``norm1_context.linear``
and ``norm_out.linear``, whose scale and shift halves are swapped against ``adaLN_modulation.1`` (no row
slice of the canonical weight).

Block labels (no community notation exists; this project's choice): ``TE1``/``TE2``/``TE3`` (CLIP-L, CLIP-G,
T5-XXL), ``IN`` (``x_embedder``, ``context_embedder``, ``t_embedder``, ``y_embedder``, ``pos_embed``),
``JB00``.. (joint blocks, context and x halves together), ``OUT`` (``final_layer``). Notations
``sd3-24`` (29 values: SD3 Medium and SD3.5 Medium) and ``sd3-38`` (43 values: SD3.5 Large), each
``TE1, TE2, TE3, IN, JB00.., OUT``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import ClassVar

from lorasmith.archs._dit import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    T5XXL_PREFIX,
    DiTArchitecture,
    TextEncoder,
    block_indices,
    dotted_and_underscored,
    equal_row_slices,
    lora_out_in,
    strip_prefix,
    te_lora_prefixes,
    weight_paths,
)
from lorasmith.archs.base import (
    Alias,
    Architecture,
    Detection,
    Inventory,
    KeyView,
    Kind,
    LayoutEntry,
    Target,
    name_prefixes,
)
from lorasmith.archs.parts import PartSlot, diffusion_model_slot, text_encoder_slot
from lorasmith.hookspecs import hookimpl

#: Prefix of the MMDiT in the canonical files.
MMDIT_PREFIX = "model.diffusion_model."

#: x_block module -> diffusers module below ``transformer_blocks.N.``.
_X: dict[str, str] = {
    "attn.proj": "attn.to_out.0",
    "attn.ln_q": "attn.norm_q",
    "attn.ln_k": "attn.norm_k",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
    "attn2.proj": "attn2.to_out.0",
    "attn2.ln_q": "attn2.norm_q",
    "attn2.ln_k": "attn2.norm_k",
}
#: context_block module -> diffusers module below ``transformer_blocks.N.``.
_CONTEXT: dict[str, str] = {
    "attn.proj": "attn.to_add_out",
    "attn.ln_q": "attn.norm_added_q",
    "attn.ln_k": "attn.norm_added_k",
    "mlp.fc1": "ff_context.net.0.proj",
    "mlp.fc2": "ff_context.net.2",
    "adaLN_modulation.1": "norm1_context.linear",
}
_QKV: dict[tuple[str, str], tuple[str, str, str]] = {
    ("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_GLOBAL: dict[str, str] = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$")
_ANY_BLOCK = re.compile(r"^(?:joint_blocks|transformer_blocks)\.(\d+)\.")
_DIFFUSERS_ATTN2 = re.compile(r"^transformer_blocks\.\d+\.attn2\.")
_IN_HEADS = ("x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed", "time_text_embed")
_OUT_HEADS = ("final_layer", "norm_out", "proj_out")

#: First segments of the MMDiT module paths (below ``model.diffusion_model.``) and of the diffusers ones:
#: the heads of the name bounds.
_MMDIT_HEADS: tuple[str, ...] = (
    "joint_blocks.",
    "x_embedder.",
    "context_embedder",
    "t_embedder.",
    "y_embedder.",
    "final_layer.",
    "pos_embed",
)
_DIFFUSERS_HEADS: tuple[str, ...] = (
    "transformer_blocks.",
    "pos_embed.",
    "context_embedder",
    "time_text_embed.",
    "proj_out",
    "norm_out.",
)

#: Joint-block count of each variant.
DEPTH: dict[str, int] = {"sd3-medium": 24, "sd3.5-medium": 24, "sd3.5-large": 38}


def diffusers_modules(
    path: str, shape: Sequence[int], pre_only: bool = False
) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The diffusers ``SD3Transformer2DModel`` modules that MMDiT module ``path`` (no prefix) covers.

    Each entry is ``(diffusers module path, row slice or None)``. ``pre_only`` marks ``path`` as part of
    the last, pre-only context block, whose ``adaLN_modulation.1`` maps to no diffusers row slice.
    """
    m = _BLOCK.match(path)
    if m is None:
        diff = _GLOBAL.get(path)
        return [] if diff is None else [(diff, None)]
    idx, half, rest = m.group(1), m.group(2), m.group(3)
    base = f"transformer_blocks.{idx}."
    parts = _QKV.get((half, rest))
    if parts is not None:
        return [(base + p, s) for p, s in zip(parts, equal_row_slices(shape[0], 3), strict=True)]
    if half == "context_block" and pre_only and rest == "adaLN_modulation.1":
        return []
    diff = (_X if half == "x_block" else _CONTEXT).get(rest)
    return [] if diff is None else [(base + diff, None)]


class SD3(DiTArchitecture):
    """SD3 Medium, SD3.5 Medium and SD3.5 Large (ComfyUI single files); see the module docstring."""

    id: ClassVar[str] = "sd3"
    name: ClassVar[str] = "Stable Diffusion 3 / 3.5"
    variants: ClassVar[tuple[str, ...]] = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
    inventory_files: ClassVar[tuple[str, ...]] = (
        "sd3-medium-comfyui",
        "sd3.5-medium-comfyui",
        "sd3.5-large-comfyui",
    )
    spellings: ClassVar[tuple[str, ...]] = ("kohya", "peft", "comfy", "onetrainer", "lycoris")
    modelspec: ClassVar[Mapping[str, str]] = {
        "sd3-medium": "stable-diffusion-3-medium",
        "sd3.5-medium": "stable-diffusion-3.5-medium",
        "sd3.5-large": "stable-diffusion-3.5-large",
    }
    base_model_version: ClassVar[Mapping[str, str]] = {
        "sd3-medium": "sd3",
        "sd3.5-medium": "sd3",
        "sd3.5-large": "sd3",
    }
    #: the SD3 Medium single file (as sd-scripts' ``merge_sd3_safetensors`` writes it): the VAE under
    #: ``first_stage_model.``; the text encoders are optional (SD3.5 files often ship without them).
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(),
        PartSlot("vae", "vae16", "first_stage_model.", "vae.safetensors", group="vae"),
        text_encoder_slot("clip_l", required=False),
        text_encoder_slot("clip_g", required=False),
        text_encoder_slot("t5xxl", required=False, filename="t5xxl.safetensors"),
    )
    text_encoders: ClassVar[tuple[TextEncoder, ...]] = (
        TextEncoder(
            "te1",
            CLIP_L_PREFIX,
            (("kohya", "lora_te1_"), ("onetrainer", "lora_te1_")),
            (("peft", "text_encoder."), ("comfy", CLIP_L_PREFIX)),
        ),
        TextEncoder(
            "te2",
            CLIP_G_PREFIX,
            (("kohya", "lora_te2_"), ("onetrainer", "lora_te2_")),
            (("peft", "text_encoder_2."), ("comfy", CLIP_G_PREFIX)),
        ),
        TextEncoder(
            "te3",
            T5XXL_PREFIX,
            (("kohya", "lora_te3_"), ("onetrainer", "lora_te3_")),
            (("peft", "text_encoder_3."), ("comfy", T5XXL_PREFIX)),
        ),
    )

    lora_prefixes: ClassVar[tuple[str, ...] | None] = (
        name_prefixes(("lora_unet_",), _MMDIT_HEADS, kohya=True)
        + name_prefixes(("diffusion_model.",), _MMDIT_HEADS)
        + name_prefixes(("transformer.",), _DIFFUSERS_HEADS)
        + name_prefixes(("lora_transformer_", "lycoris_"), _DIFFUSERS_HEADS, kohya=True)
        + te_lora_prefixes(text_encoders)
    )
    #: the single files (MMDiT, VAE, text encoders, sampling buffers) and their components without their
    #: prefixes, then the diffusers transformer
    key_prefixes: ClassVar[tuple[str, ...] | None] = (
        *("model.diffusion_model.", "model.model_sampling.", "first_stage_model.", "text_encoders."),
        *_MMDIT_HEADS,
        *("encoder.", "decoder.", "transformer.", "logit_scale"),
        *_DIFFUSERS_HEADS,
    )

    def _generate_aliases(self, variant: str) -> Iterator[Alias]:
        tensors = self.modules(variant)
        for path, spec in weight_paths(tensors, MMDIT_PREFIX):
            key = MMDIT_PREFIX + path + ".weight"
            whole = Target(key)
            yield Alias(f"lora_unet_{path.replace('.', '_')}", "kohya", whole, "transformer")
            yield Alias(f"diffusion_model.{path}", "comfy", whole, "transformer")
            pre_only = False
            m = _BLOCK.match(path)
            if m is not None and m.group(2) == "context_block":
                # the last context block has no MLP (pre_only): its adaLN layout differs in diffusers
                fc1 = f"{MMDIT_PREFIX}joint_blocks.{m.group(1)}.context_block.mlp.fc1.weight"
                pre_only = fc1 not in tensors
            for diff, sl in diffusers_modules(path, spec.shape, pre_only):
                yield from dotted_and_underscored(
                    diff,
                    Target(key, sl),
                    "transformer",
                    dotted=(("peft", "transformer."),),
                    underscored=(("onetrainer", "lora_transformer_"), ("lycoris", "lycoris_")),
                )

    # ------------------------------------------------------------------------------------------ layouts
    @cached_property
    def _all_inventories(self) -> tuple[Inventory, ...]:
        from lorasmith.archs._sd3_layout import diffusers_inventory_of

        packaged = super().inventories()
        return packaged + tuple(diffusers_inventory_of(inv) for inv in packaged if inv.canonical)

    def inventories(self) -> tuple[Inventory, ...]:
        """The packaged single-file inventories, then each variant's diffusers ``SD3Transformer2DModel``
        inventory (``<variant>-diffusers``, layout ``diffusers-transformer``), derived from
        :meth:`layout_map` (no manifest of the diffusers SD3 models is packaged)."""
        return self._all_inventories

    def layout_map(self, inventory_id: str) -> Mapping[str, LayoutEntry]:
        """Canonical key -> diffusers folder key(s), for a ``<variant>-diffusers`` inventory.

        ``transformer/`` (the MMDiT, q/k/v split), ``vae/``, ``text_encoder/`` (CLIP-L),
        ``text_encoder_2/`` (CLIP-G), ``text_encoder_3/`` (T5-XXL); see :mod:`lorasmith.archs._sd3_layout`.
        """
        from lorasmith.archs._sd3_layout import DIFFUSERS_LAYOUT, sd3_layout_map

        inv = next((i for i in self.inventories() if i.id == inventory_id), None)
        if inv is None or inv.layout != DIFFUSERS_LAYOUT:
            return super().layout_map(inventory_id)
        return sd3_layout_map(self.canonical_inventory(inv.variant))

    def detect_checkpoint(self, view: KeyView) -> Detection | None:
        """As the base class; a file matched in the diffusers layout must have SD3's own ``pos_embed.*``.

        (A FLUX.1 diffusers transformer shares most of SD3's diffusers block names but has no
        ``pos_embed``; without this it would count as a partial SD3 file.)
        """
        from lorasmith.archs._sd3_layout import DIFFUSERS_LAYOUT

        det = super().detect_checkpoint(view)
        if (
            det is not None
            and det.layout == DIFFUSERS_LAYOUT
            and not any(strip_prefix(k).startswith("pos_embed.") for k in view.tensors)
        ):
            return None
        return det

    def block_of(self, key: str) -> str | None:
        """``TE1``/``TE2``/``TE3``, ``IN``, ``JB00``.., ``OUT``; ``None`` for the VAE and other keys.

        Accepts canonical keys with or without ``model.diffusion_model.``, and diffusers transformer keys.
        """
        if key.startswith("text_encoders.clip_l."):
            return "TE1"
        if key.startswith("text_encoders.clip_g."):
            return "TE2"
        if key.startswith("text_encoders.t5xxl."):
            return "TE3"
        key = strip_prefix(key)
        m = _ANY_BLOCK.match(key)
        if m:
            return f"JB{int(m.group(1)):02d}"
        head = key.split(".", 1)[0]
        if head in _IN_HEADS:
            return "IN"
        if head in _OUT_HEADS:
            return "OUT"
        return None

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``sd3-24`` and ``sd3-38``: ``TE1, TE2, TE3, IN, JB00..JB<depth-1>, OUT``."""
        out: dict[str, list[str]] = {}
        for depth in sorted(set(DEPTH.values())):
            out[f"sd3-{depth}"] = ["TE1", "TE2", "TE3", "IN", *(f"JB{i:02d}" for i in range(depth)), "OUT"]
        return out

    def _refine_variant(self, view: KeyView, variant: str, kind: Kind) -> str | None:
        """Tell the variants apart from names and shape ratios (never absolute sizes).

        Checkpoints: ``x_block.attn2`` -> 3.5 Medium; more than 24 joint blocks -> 3.5 Large; q/k norms
        (``ln_k``) at 24 blocks -> 3.5 Medium; otherwise SD3 Medium.

        LoRAs: ``attn2`` modules -> 3.5 Medium; a joint-block index >= 24 -> 3.5 Large; an x-block adaLN of
        9 x hidden outputs -> 3.5 Medium; the pre-only last context block (adaLN of 2 x hidden outputs)
        gives the depth; otherwise the best-covering variant.
        """
        if kind == "checkpoint":
            # single-file names, or diffusers ones (transformer_blocks.N, attn2, norm_k)
            keys = [strip_prefix(k) for k in view.tensors]
            if any(".x_block.attn2." in k or _DIFFUSERS_ATTN2.match(k) for k in keys):
                return "sd3.5-medium"
            idx = block_indices(keys, "joint_blocks") | block_indices(keys, "transformer_blocks")
            if not idx:
                return variant
            if max(idx) + 1 > DEPTH["sd3-medium"]:
                return "sd3.5-large"
            norms = (".attn.ln_k.", ".attn.ln_q.", ".attn.norm_k.", ".attn.norm_q.")
            if any(n in k for k in keys for n in norms):
                return "sd3.5-medium"
            return "sd3-medium"
        targets = self._lora_targets(view)
        keys = [a.target.key for a in targets.values()]
        if any(".x_block.attn2." in k for k in keys):
            return "sd3.5-medium"
        idx = block_indices(keys, "joint_blocks")
        if idx and max(idx) + 1 > DEPTH["sd3-medium"]:
            return "sd3.5-large"
        depth: int | None = None
        for module, alias in targets.items():
            key = alias.target.key
            if not key.endswith("adaLN_modulation.1.weight") or alias.target.slice is not None:
                continue
            out_in = lora_out_in(view.tensors, module)
            m = _BLOCK.match(strip_prefix(key)[: -len(".weight")])
            if out_in is None or m is None:
                continue
            out, inp = out_in
            if m.group(2) == "x_block" and out == 9 * inp:
                return "sd3.5-medium"
            if m.group(2) == "context_block" and out == 2 * inp:
                depth = int(m.group(1)) + 1
        if depth is not None:
            if depth > DEPTH["sd3-medium"]:
                return "sd3.5-large"
            has_norm = any(".ln_k." in k or ".ln_q." in k for k in keys)
            return "sd3.5-medium" if has_norm else "sd3-medium"
        return variant


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the SD3 / SD3.5 family."""
    return [SD3]
