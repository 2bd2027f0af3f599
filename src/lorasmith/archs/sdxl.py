"""Stable Diffusion XL base 1.0 (family ``sdxl``, variant ``base``).

Canonical key space: the sgm single file (``model.diffusion_model.*`` UNet, ``first_stage_model.*`` VAE,
``conditioner.embedders.0.transformer.*`` CLIP-L under HF names, ``conditioner.embedders.1.model.*``
OpenCLIP bigG). diffusers UNet files are a second known layout.

LoRA spellings (default first), for every UNet and text-encoder ``.weight`` of ndim >= 1:

- ``kohya``: ``lora_unet_`` + **sgm** UNet path with ``_`` (sd-scripts keeps the sgm tree for SDXL);
  ``lora_te1_`` + HF CLIP-L path; ``lora_te2_`` + HF path of the bigG conversion (32 layers), whose q/k/v
  land on row thirds of ``attn.in_proj_weight``.
- ``kohya-diffusers``: ``lora_unet_`` + diffusers UNet path with ``_``. UNet only.
- ``peft``: ``unet.`` + diffusers path, ``text_encoder.``/``text_encoder_2.`` + HF path.
- ``comfy``: ``diffusion_model.`` + sgm path. UNet only.
- ``lycoris``: ``lycoris_`` + diffusers path with ``_``. UNet only.

Blocks: ``IN00..IN08``, ``M00``, ``OUT00..OUT08`` (sgm indices), ``BASE`` for both text encoders and the
time/label embeddings; ``out.*`` belongs to ``OUT08``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from lorasmith.archs._unet import (
    UNET_DIFFUSERS_HEADS,
    UNET_LDM_HEADS,
    VAE4_SLOT,
    VAE_HEADS,
    TextEncoderSpelling,
    UNetFamily,
    UNetSpelling,
    hf_clip_modules,
    keymap,
    openclip_hf_modules,
    openclip_layout,
    prefixed_layout,
    text_encoder_aliases,
    unet_aliases,
    unet_lora_prefixes,
)
from lorasmith.archs.base import Alias, Architecture, Inventory, LayoutEntry
from lorasmith.archs.parts import PartSlot, diffusion_model_slot
from lorasmith.hookspecs import hookimpl

_UNET_SPELLINGS: tuple[UNetSpelling, ...] = (
    UNetSpelling("kohya", "lora_unet_", "ldm", "_"),
    UNetSpelling("kohya-diffusers", "lora_unet_", "diffusers", "_"),
    UNetSpelling("peft", "unet.", "diffusers", "."),
    UNetSpelling("comfy", "diffusion_model.", "ldm", "."),
    UNetSpelling("lycoris", "lycoris_", "diffusers", "_"),
)
_TE1_SPELLINGS: tuple[TextEncoderSpelling, ...] = (
    TextEncoderSpelling("kohya", "lora_te1_", "_"),
    TextEncoderSpelling("peft", "text_encoder.", "."),
)
_TE2_SPELLINGS: tuple[TextEncoderSpelling, ...] = (
    TextEncoderSpelling("kohya", "lora_te2_", "_"),
    TextEncoderSpelling("peft", "text_encoder_2.", "."),
)

_NOTATIONS: Mapping[str, Sequence[str]] = {
    # hako-mikan LoRA Block Weight; M00 is what FORMATS.md calls MID
    "sdxl-12": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    "sdxl-20": ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}


class SDXL(UNetFamily):
    """Stable Diffusion XL base: sgm single files, diffusers UNets and their LoRAs."""

    id = "sdxl"
    name = "Stable Diffusion XL"
    variants = ("base",)
    inventory_files = ("sdxl-sgm", "sdxl-diffusers-unet")
    spellings = ("kohya", "kohya-diffusers", "peft", "comfy", "lycoris")
    modelspec: ClassVar[Mapping[str, str]] = {"base": "stable-diffusion-xl-v1-base"}
    base_model_version: ClassVar[Mapping[str, str]] = {"base": "sdxl_base_v1-0"}
    #: the sgm single file's parts: CLIP-L under HF names, bigG in OpenCLIP form (HF form when split).
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(),
        VAE4_SLOT,
        PartSlot("clip_l", "clip_l", "conditioner.embedders.0.transformer.", "clip_l.safetensors"),
        PartSlot("clip_g", "clip_g", "conditioner.embedders.1.model.", "clip_g.safetensors", form="openclip"),
    )

    lora_prefixes: ClassVar[tuple[str, ...] | None] = unet_lora_prefixes(
        ("lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
    )
    #: the sgm single file and its components without their prefixes (UNet, VAE, CLIP-L's HF names,
    #: bigG's OpenCLIP names), then the diffusers UNet
    key_prefixes: ClassVar[tuple[str, ...] | None] = (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.",
        *UNET_LDM_HEADS,
        *VAE_HEADS,
        *("text_model.", "transformer.", "ln_final.", "positional_embedding", "token_embedding."),
        *("text_projection", "logit_scale"),
        *UNET_DIFFUSERS_HEADS,
    )

    unet_keymaps: ClassVar[Mapping[str, str]] = {"base": "sdxl_unet"}
    text_encoder_prefixes = ("conditioner.",)
    last_output_block = 8
    metadata_variants: ClassVar[Mapping[str, str]] = {
        "sdxl_base": "base",
        "stable-diffusion-xl-v1-base": "base",
    }

    def _build_aliases(self, variant: str) -> Iterator[Alias]:
        """UNet aliases in all five spellings, CLIP-L and bigG aliases in ``kohya`` and ``peft``."""
        inv = self.canonical_inventory(variant)
        yield from unet_aliases(inv, keymap(self.unet_keymaps[variant]), _UNET_SPELLINGS)
        te1 = hf_clip_modules(inv, "conditioner.embedders.0.transformer.")
        yield from text_encoder_aliases(te1, _TE1_SPELLINGS, "te1")
        te2 = openclip_hf_modules(inv, "conditioner.embedders.1.model.")
        yield from text_encoder_aliases(te2, _TE2_SPELLINGS, "te2")

    def _text_encoder_layout(self, canonical: Inventory) -> dict[str, LayoutEntry]:
        """``text_encoder/``: CLIP-L (prefix stripped); ``text_encoder_2/``: bigG by rule, with projection."""
        out = prefixed_layout(canonical, "conditioner.embedders.0.transformer.", "text_encoder")
        out.update(openclip_layout(canonical, "conditioner.embedders.1.model.", "text_encoder_2"))
        return out

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``sdxl-12`` (LoRA Block Weight, blocks with attention) and ``sdxl-20`` (every block)."""
        return _NOTATIONS


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the SDXL family."""
    return [SDXL]
