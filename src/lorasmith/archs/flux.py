"""FLUX.1 (dev, schnell): the built-in ``flux`` family.

Canonical key space: the BFL single file (``flux1-dev.safetensors``), bare keys
(``double_blocks.0.img_attn.qkv.weight``); the diffusers ``FluxTransformer2DModel`` layout is a second known
layout. Text-encoder targets are the ComfyUI keys of CLIP-L (``text_encoders.clip_l.transformer.``) and T5-XXL
(``text_encoders.t5xxl.transformer.``), as in the SD3 Medium single file.

LoRA spellings (the default first; ComfyUI loads every one of them):

- ``kohya`` (sd-scripts ``networks/lora_flux.py``): ``lora_unet_`` + BFL path with ``_``
  (``lora_unet_double_blocks_0_img_attn_qkv``), ``lora_te1_`` + HF CLIP path, ``lora_te3_`` + HF T5 path
  (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``).
- ``peft`` (diffusers, SimpleTuner, and ai-toolkit, which writes the same ``transformer.`` names):
  ``transformer.`` + diffusers path; q/k/v (and the single blocks' ``proj_mlp``) are row slices of the fused
  BFL weights. Text encoders: ``text_encoder.`` (CLIP-L), ``text_encoder_2.`` (T5).
- ``comfy``: ``diffusion_model.`` + BFL path; text encoders ``text_encoders.<ComfyUI key>``.
- ``onetrainer``: ``lora_transformer_`` + diffusers path with ``_``; text encoders ``lora_te1_`` and
  ``lora_te2_`` (T5).
- ``lycoris`` (LyCORIS wrapper, SimpleTuner): ``lycoris_`` + diffusers path with ``_``.

Not aliased in the diffusers spellings: ``norm_out.linear`` (its two halves are swapped against
``final_layer.adaLN_modulation.1``, so it is no row slice of it) and the q/k norms (``attn.norm_q`` etc.),
whose BFL counterparts are ``.scale`` tensors, not weights.

Block labels (LoRA Block Weight's 61-value FLUX form ``flux-61``): ``CLIP``, ``T5``, ``IN`` (``img_in``,
``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``), ``D00``-``D18`` (double blocks), ``S00``-``S37``
(single blocks), ``OUT`` (``final_layer``).

Variants: ``guidance_in.*`` (diffusers ``time_text_embed.guidance_embedder.*``) makes a checkpoint dev, its
absence schnell. LoRAs are reported as dev (they load on both; nearly all are trained on dev).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from lorasmith.archs._dit import (
    CLIP_L_PREFIX,
    T5XXL_PREFIX,
    VAE16_SLOT,
    DiTArchitecture,
    TextEncoder,
    dotted_and_underscored,
    equal_row_slices,
    row_slices,
    strip_prefix,
    te_lora_prefixes,
    weight_paths,
)
from lorasmith.archs.base import (
    Alias,
    Architecture,
    KeyView,
    Kind,
    LayoutEntry,
    Target,
    name_prefixes,
)
from lorasmith.archs.parts import PartSlot, diffusion_model_slot, text_encoder_slot
from lorasmith.errors import NotAvailableError
from lorasmith.hookspecs import hookimpl

#: Double-block BFL module -> diffusers module (below ``transformer_blocks.N.``), one to one.
_DOUBLE: dict[str, str] = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
#: Fused double-block q/k/v -> the diffusers q, k, v projections (equal row thirds).
_DOUBLE_QKV: dict[str, tuple[str, str, str]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
#: Single-block BFL module -> diffusers module (below ``single_transformer_blocks.N.``).
_SINGLE: dict[str, str] = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
#: ``linear1`` rows are q, k, v (hidden each) then the MLP input projection.
_LINEAR1: tuple[str, str, str, str] = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
#: Embedders and the output projection.
_GLOBAL: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_IN_MODULES = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")
#: First segments of the BFL and the diffusers module paths (the heads of the name bounds).
_BFL_HEADS: tuple[str, ...] = (
    "double_blocks.",
    "single_blocks.",
    "img_in",
    "txt_in",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
)
_DIFFUSERS_HEADS: tuple[str, ...] = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "x_embedder",
    "context_embedder",
    "time_text_embed.",
    "proj_out",
    "norm_out.",
)
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")

#: Counts of the released models (BFL ``configs["flux-dev"]``: depth 19, depth_single_blocks 38).
DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38


def diffusers_modules(path: str, shape: Sequence[int]) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The diffusers ``FluxTransformer2DModel`` modules that BFL module ``path`` (weight ``shape``) covers.

    Each entry is ``(diffusers module path, row slice of the BFL weight or None)``; an empty list means no
    diffusers module is a plain copy or row slice of it (``final_layer.adaLN_modulation.1``).
    """
    m = _BLOCK.match(path)
    if m is None:
        diff = _GLOBAL.get(path)
        return [] if diff is None else [(diff, None)]
    kind, idx, rest = m.group(1), m.group(2), m.group(3)
    if kind == "double_blocks":
        base = f"transformer_blocks.{idx}."
        if rest in _DOUBLE_QKV:
            parts = _DOUBLE_QKV[rest]
            return [(base + p, s) for p, s in zip(parts, equal_row_slices(shape[0], 3), strict=True)]
        diff = _DOUBLE.get(rest)
        return [] if diff is None else [(base + diff, None)]
    base = f"single_transformer_blocks.{idx}."
    if rest == "linear1":
        hidden = shape[1]
        sizes = (hidden, hidden, hidden, shape[0] - 3 * hidden)
        return [(base + p, s) for p, s in zip(_LINEAR1, row_slices(sizes), strict=True)]
    diff = _SINGLE.get(rest)
    return [] if diff is None else [(base + diff, None)]


class Flux(DiTArchitecture):
    """FLUX.1 dev and schnell (BFL and diffusers layouts); spellings and blocks: see the module docstring."""

    id: ClassVar[str] = "flux"
    name: ClassVar[str] = "FLUX.1"
    variants: ClassVar[tuple[str, ...]] = ("dev", "schnell")
    inventory_files: ClassVar[tuple[str, ...]] = (
        "flux-dev-bfl",
        "flux-schnell-bfl",
        "flux-dev-diffusers",
        "flux-schnell-diffusers",
    )
    spellings: ClassVar[tuple[str, ...]] = ("kohya", "peft", "comfy", "onetrainer", "lycoris")
    modelspec: ClassVar[Mapping[str, str]] = {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}
    base_model_version: ClassVar[Mapping[str, str]] = {"dev": "flux1", "schnell": "flux1"}
    #: ComfyUI's all-in-one file: the VAE under ``vae.`` and both text encoders under ``text_encoders.``;
    #: split as ``flux1-dev``, ``ae``, ``clip_l`` and ``t5xxl`` files.
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(),
        VAE16_SLOT,
        text_encoder_slot("clip_l"),
        text_encoder_slot("t5xxl", filename="t5xxl.safetensors"),
    )
    text_encoders: ClassVar[tuple[TextEncoder, ...]] = (
        TextEncoder(
            "te1",
            CLIP_L_PREFIX,
            (("kohya", "lora_te1_"), ("onetrainer", "lora_te1_")),
            (("peft", "text_encoder."), ("comfy", CLIP_L_PREFIX)),
        ),
        TextEncoder(
            "te3",
            T5XXL_PREFIX,
            (("kohya", "lora_te3_"), ("onetrainer", "lora_te2_")),
            (("peft", "text_encoder_2."), ("comfy", T5XXL_PREFIX)),
        ),
    )

    lora_prefixes: ClassVar[tuple[str, ...] | None] = (
        name_prefixes(("lora_unet_",), _BFL_HEADS, kohya=True)
        + name_prefixes(("diffusion_model.",), _BFL_HEADS)
        + name_prefixes(("transformer.",), _DIFFUSERS_HEADS)
        + name_prefixes(("lora_transformer_", "lycoris_"), _DIFFUSERS_HEADS, kohya=True)
        + te_lora_prefixes(text_encoders)
    )
    key_prefixes: ClassVar[tuple[str, ...] | None] = _BFL_HEADS + _DIFFUSERS_HEADS

    def _generate_aliases(self, variant: str) -> Iterator[Alias]:
        for path, spec in weight_paths(self.modules(variant)):
            key = path + ".weight"
            whole = Target(key)
            yield Alias(f"lora_unet_{path.replace('.', '_')}", "kohya", whole, "transformer")
            yield Alias(f"diffusion_model.{path}", "comfy", whole, "transformer")
            for diff, sl in diffusers_modules(path, spec.shape):
                yield from dotted_and_underscored(
                    diff,
                    Target(key, sl),
                    "transformer",
                    dotted=(("peft", "transformer."),),
                    underscored=(("onetrainer", "lora_transformer_"), ("lycoris", "lycoris_")),
                )

    def layout_map(self, inventory_id: str) -> Mapping[str, LayoutEntry]:
        """Canonical (BFL) key -> diffusers ``FluxTransformer2DModel`` key(s), for ``flux-*-diffusers``.

        Fused q/k/v (double blocks) and q/k/v/mlp (single-block ``linear1``) weights and biases are split
        along rows; the q/k RMS-norm ``scale`` tensors become ``attn.norm_q/norm_k.weight`` (the txt stream's
        ``norm_added_q/k``); ``final_layer.adaLN_modulation.1`` is diffusers ``norm_out.linear`` with its two
        halves swapped (BFL: shift, scale; diffusers: scale, shift). Row counts are the real model's.
        """
        inv = next((i for i in self.inventories() if i.id == inventory_id), None)
        if inv is None or inv.layout != "diffusers-transformer":
            return super().layout_map(inventory_id)
        canonical = self.canonical_inventory(inv.variant)
        out: dict[str, LayoutEntry] = {}
        for key in canonical.tensors:
            path, _, leaf = key.rpartition(".")
            if leaf == "scale":
                m = _BLOCK.match(path)
                if m is None:
                    raise NotAvailableError(f"flux: no diffusers name for {key!r}")
                kind, idx, rest = m.groups()
                added = "added_" if rest.startswith("txt_") else ""
                which = "q" if rest.endswith("query_norm") else "k"
                block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
                out[key] = LayoutEntry(((f"{block}.{idx}.attn.norm_{added}{which}.weight", None),))
                continue
            if path == "final_layer.adaLN_modulation.1":
                out[key] = LayoutEntry(((f"norm_out.linear.{leaf}", None),), transform="swap_halves")
                continue
            weight_shape = canonical.tensors[path + ".weight"].shape
            mods = diffusers_modules(path, weight_shape)
            if not mods:
                raise NotAvailableError(f"flux: no diffusers name for {key!r}")
            if len(mods) == 1 and mods[0][1] is None:
                out[key] = LayoutEntry(((f"{mods[0][0]}.{leaf}", None),))
            else:
                out[key] = LayoutEntry(tuple((f"{d}.{leaf}", sl[2] if sl else None) for d, sl in mods))
        return out

    def block_of(self, key: str) -> str | None:
        """``CLIP``, ``T5``, ``IN``, ``D00``-``D18``, ``S00``-``S37`` or ``OUT``; ``None`` for other keys.

        Accepts canonical keys (with or without ``model.diffusion_model.``), diffusers transformer keys, and
        the bare keys of separate CLIP-L (``text_model.``) and T5 (``encoder.``, ``shared.``) files.
        """
        if key.startswith(("text_encoders.clip_l.", "text_model.")):
            return "CLIP"
        if key.startswith(("text_encoders.t5xxl.", "encoder.", "shared.")):
            return "T5"
        key = strip_prefix(key)
        m = _BLOCK.match(key)
        if m:
            return f"{'D' if m.group(1) == 'double_blocks' else 'S'}{int(m.group(2)):02d}"
        m = _DIFFUSERS_BLOCK.match(key)
        if m:
            return f"{'D' if m.group(1) == 'transformer_blocks' else 'S'}{int(m.group(2)):02d}"
        head = key.split(".", 1)[0]
        if head in _IN_MODULES or head in ("x_embedder", "context_embedder", "time_text_embed"):
            return "IN"
        if head in ("final_layer", "norm_out", "proj_out"):
            return "OUT"
        return None

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``flux-61``: ``CLIP, T5, IN, D00..D18, S00..S37, OUT`` (LoRA Block Weight's FLUX form)."""
        labels = ["CLIP", "T5", "IN"]
        labels += [f"D{i:02d}" for i in range(DOUBLE_BLOCKS)]
        labels += [f"S{i:02d}" for i in range(SINGLE_BLOCKS)]
        labels.append("OUT")
        return {"flux-61": labels}

    def _refine_variant(self, view: KeyView, variant: str, kind: Kind) -> str | None:
        """dev when guidance-embedder keys are present, else schnell; LoRAs are dev."""
        if kind != "checkpoint":
            return "dev"
        guidance = ("guidance_in.", "time_text_embed.guidance_embedder.")
        return "dev" if any(strip_prefix(k).startswith(guidance) for k in view.tensors) else "schnell"


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the FLUX.1 family."""
    return [Flux]
