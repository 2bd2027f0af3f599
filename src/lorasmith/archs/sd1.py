"""Stable Diffusion 1.x and 2.x (family ``sd1``, variants ``sd1`` and ``sd2``).

Canonical key space: the ldm single file (``model.diffusion_model.*`` UNet, ``first_stage_model.*`` VAE,
``cond_stage_model.transformer.*`` CLIP-L for SD1, ``cond_stage_model.model.*`` OpenCLIP ViT-H for SD2).
diffusers UNet files are a second known layout.

LoRA spellings (default first), for every UNet and text-encoder ``.weight`` of ndim >= 1:

- ``kohya``: ``lora_unet_`` + **diffusers** UNet path with ``_`` (sd-scripts converts SD1/SD2 to diffusers
  names); ``lora_te_`` + HF CLIP path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). For SD2
  the HF names exist for layers 0..22 and land on the OpenCLIP keys; q/k/v are row slices of
  ``attn.in_proj_weight`` (``resblocks.23`` is never a target).
- ``kohya-ldm``: ``lora_unet_`` + ldm path with ``_`` (ComfyUI accepts it). UNet only.
- ``peft``: ``unet.`` + diffusers path, ``text_encoder.`` + HF path.
- ``comfy``: ``diffusion_model.`` + ldm path. UNet only.
- ``lycoris``: ``lycoris_`` + diffusers path with ``_``. UNet only.

SD2 ``proj_in``/``proj_out`` are Linear in the checkpoint while sd-scripts trains them as 1x1 convs; the
alias targets the 2-D weight and the adapter layer reshapes at apply time.

Variants are told apart by shapes up to a common scale (see :class:`~lorasmith.archs._unet.UNetFamily`):
the cross-attention ``attn2.to_k``/``to_v`` input width against the rest of the UNet (768 vs 1024 for 320
channels), ``proj_in`` rank (4-D SD1, 2-D SD2), the text encoder's names (CLIP-L vs OpenCLIP, 12 vs 23 HF
layers) and widths; metadata (``ss_base_model_version``, ``modelspec.architecture``, ``ss_v2``) breaks
ties.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from lorasmith.archs._unet import (
    LDM_SCHEDULE_KEYS,
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
    text_encoder_aliases,
    unet_aliases,
    unet_lora_prefixes,
)
from lorasmith.archs.base import Alias, Architecture, Inventory, KeyView, Kind, LayoutEntry
from lorasmith.archs.parts import PartSlot, diffusion_model_slot
from lorasmith.hookspecs import hookimpl

_UNET_SPELLINGS: tuple[UNetSpelling, ...] = (
    UNetSpelling("kohya", "lora_unet_", "diffusers", "_"),
    UNetSpelling("kohya-ldm", "lora_unet_", "ldm", "_"),
    UNetSpelling("peft", "unet.", "diffusers", "."),
    UNetSpelling("comfy", "diffusion_model.", "ldm", "."),
    UNetSpelling("lycoris", "lycoris_", "diffusers", "_"),
)
_TE_SPELLINGS: tuple[TextEncoderSpelling, ...] = (
    TextEncoderSpelling("kohya", "lora_te_", "_"),
    TextEncoderSpelling("peft", "text_encoder.", "."),
)

_IN_26 = tuple(f"IN{i:02d}" for i in range(12))
_OUT_26 = tuple(f"OUT{i:02d}" for i in range(12))
_NOTATIONS: Mapping[str, Sequence[str]] = {
    # hako-mikan LoRA Block Weight; M00 is what FORMATS.md calls MID
    "sd1-17": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT_26[3:]),
    "sd1-26": ("BASE", *_IN_26, "M00", *_OUT_26),
}

#: The ldm single file's parts, the diffusion model first: SD1 holds CLIP-L under HF names ...
_SD1_PARTS: tuple[PartSlot, ...] = (
    diffusion_model_slot(),
    VAE4_SLOT,
    PartSlot("clip_l", "clip_l", "cond_stage_model.transformer.", "clip_l.safetensors"),
)
#: ... SD2 its OpenCLIP ViT-H tower, written as the HF form in ``clip_h.safetensors`` when split.
_SD2_PARTS: tuple[PartSlot, ...] = (
    diffusion_model_slot(),
    VAE4_SLOT,
    PartSlot("text_encoder", "clip_h", "cond_stage_model.model.", "clip_h.safetensors", form="openclip"),
)


class SD1(UNetFamily):
    """Stable Diffusion 1.x / 2.x: ldm single files, diffusers UNets and their LoRAs."""

    id = "sd1"
    name = "Stable Diffusion 1.x / 2.x"
    variants = ("sd1", "sd2")
    inventory_files = ("sd1-ldm", "sd2-ldm", "sd1-diffusers-unet", "sd2-diffusers-unet")
    spellings = ("kohya", "kohya-ldm", "peft", "comfy", "lycoris")
    modelspec: ClassVar[Mapping[str, str]] = {
        "sd1": "stable-diffusion-v1",
        "sd2": "stable-diffusion-v2-768-v",
    }
    base_model_version: ClassVar[Mapping[str, str]] = {"sd1": "sd_v1", "sd2": "sd_v2"}
    #: the default variant's parts; :meth:`part_slots` gives SD2's for ``sd2``.
    component_parts: ClassVar[tuple[PartSlot, ...]] = _SD1_PARTS

    lora_prefixes: ClassVar[tuple[str, ...] | None] = unet_lora_prefixes(("lora_te_", "text_encoder."))
    #: the ldm single file and its components without their prefixes (UNet, VAE, CLIP-L's HF names,
    #: OpenCLIP's), then the diffusers UNet
    key_prefixes: ClassVar[tuple[str, ...] | None] = (
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.",
        *LDM_SCHEDULE_KEYS,
        *UNET_LDM_HEADS,
        *VAE_HEADS,
        *("text_model.", "transformer.", "ln_final.", "positional_embedding", "token_embedding."),
        *("text_projection", "logit_scale"),
        *UNET_DIFFUSERS_HEADS,
    )

    unet_keymaps: ClassVar[Mapping[str, str]] = {"sd1": "sd1_unet", "sd2": "sd2_unet"}
    text_encoder_prefixes = ("cond_stage_model.",)
    last_output_block = 11
    metadata_variants: ClassVar[Mapping[str, str]] = {
        "sd_v1": "sd1",
        "sd_v2": "sd2",
        "stable-diffusion-v1": "sd1",
        "stable-diffusion-v2": "sd2",
    }

    def _build_aliases(self, variant: str) -> Iterator[Alias]:
        """UNet aliases in all five spellings, text-encoder aliases in ``kohya`` and ``peft``."""
        inv = self.canonical_inventory(variant)
        yield from unet_aliases(inv, keymap(self.unet_keymaps[variant]), _UNET_SPELLINGS)
        if variant == "sd1":
            modules = hf_clip_modules(inv, "cond_stage_model.transformer.")
        else:
            modules = openclip_hf_modules(inv, "cond_stage_model.model.", drop_last_layers=1)
        yield from text_encoder_aliases(modules, _TE_SPELLINGS, "te")

    def _text_encoder_layout(self, canonical: Inventory) -> dict[str, LayoutEntry]:
        """``text_encoder/``: SD1's CLIP-L by the packaged table; SD2's OpenCLIP ViT-H by rule, 23 layers.

        SD2 drops ``resblocks.23``, ``text_projection`` and ``logit_scale`` as diffusers does (SD2 conditions
        on the penultimate layer, so they are unused).
        """
        if canonical.variant == "sd1":
            return {
                k: LayoutEntry(((f"text_encoder/{v}", None),))
                for k, v in keymap("sd1_text_encoder").items()
                if k in canonical.tensors
            }
        return openclip_layout(
            canonical, "cond_stage_model.model.", "text_encoder", drop_last_layers=1, projection=False
        )

    def _refine_variant(self, view: KeyView, variant: str, kind: Kind) -> str | None:
        """SD1 or SD2 from shapes up to scale, then metadata (see the module docstring)."""
        return self._pick_variant(view, variant, kind)

    def variant_from_metadata(self, metadata: Mapping[str, str]) -> str | None:
        """``ss_base_model_version``/``modelspec.architecture``, else sd-scripts' ``ss_v2`` flag."""
        named = super().variant_from_metadata(metadata)
        if named is not None:
            return named
        flag = metadata.get("ss_v2", "").strip().lower()
        return {"true": "sd2", "false": "sd1"}.get(flag)

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``sd1-17`` (LoRA Block Weight, blocks with attention) and ``sd1-26`` (every block)."""
        return _NOTATIONS

    def part_slots(self, variant: str | None = None) -> tuple[PartSlot, ...]:
        """SD2's parts (OpenCLIP ViT-H text encoder) for ``sd2``; SD1's (CLIP-L) for any other variant."""
        return _SD2_PARTS if variant == "sd2" else _SD1_PARTS


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the SD1/SD2 family."""
    return [SD1]
