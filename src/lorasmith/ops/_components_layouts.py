"""Single-file layouts of parts: which part goes under which key prefix, as a family declares them.

A single-file checkpoint is the concatenation of its parts, each under a prefix its loaders expect. Every
family, built-in or plugin, declares them through :meth:`~lorasmith.archs.base.Architecture.part_slots`
(:class:`~lorasmith.archs.parts.PartSlot`); the built-in tables (declared in each family's module):

========  ==========================  ==============================================================
family    slot (kind, stored form)    single-file prefix (separate file name when split)
========  ==========================  ==============================================================
sd1       transformer (the UNet)      ``model.diffusion_model.`` (``<checkpoint>.safetensors``)
          vae (vae4, ldm)             ``first_stage_model.`` (``vae.safetensors``)
          clip_l (SD1)                ``cond_stage_model.transformer.`` (``clip_l.safetensors``)
          text_encoder (SD2: clip_h,  ``cond_stage_model.model.`` (``clip_h.safetensors``, HF form)
          OpenCLIP form)
sdxl      transformer, vae            as SD1
          clip_l                      ``conditioner.embedders.0.transformer.``
          clip_g (OpenCLIP form)      ``conditioner.embedders.1.model.`` (``clip_g.safetensors``, HF form)
flux      transformer                 ``model.diffusion_model.``
          vae (vae16)                 ``vae.`` (``ae.safetensors``; ComfyUI's FLUX ``vae_key_prefix``)
          clip_l, t5xxl               ``text_encoders.<name>.transformer.``
sd3       transformer (MMDiT)         ``model.diffusion_model.``
          vae (vae16)                 ``first_stage_model.`` (``vae.safetensors``)
          clip_l, clip_g, t5xxl       ``text_encoders.<name>.transformer.`` (sd-scripts' SD3 layout)
zimage    transformer                 ``model.diffusion_model.``
          vae (vae16)                 ``vae.`` (``ae.safetensors``)
          text_encoder (qwen3_4b)     ``text_encoders.qwen3_4b.transformer.`` (``qwen_3_4b.safetensors``)
========  ==========================  ==============================================================

ComfyUI's separate loaders read bare keys (the diffusion model without ``model.diffusion_model.``, the VAE's
``encoder.*``/``decoder.*``, HF ``text_model.*`` for CLIP, HF ``encoder.*``/``shared.weight`` for T5), which
is what a split writes. ``logit_scale`` tensors that ComfyUI keeps next to a text encoder
(``text_encoders.clip_l.logit_scale``) travel in that encoder's file as ``logit_scale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorasmith.archs.parts import SLOT_OPTIONS, PartSlot
from lorasmith.errors import NotAvailableError, PluginError

if TYPE_CHECKING:
    from lorasmith.archs.base import Architecture

__all__ = ["MAIN", "SLOT_OPTIONS", "Slot", "layout_for"]

#: The slot of the diffusion model (``--transformer``; ``--unet`` is the same slot).
MAIN = "transformer"
#: One part of a family's single file (the plugin-facing :class:`~lorasmith.archs.parts.PartSlot`).
Slot = PartSlot


def layout_for(family: Architecture, variant: str | None) -> tuple[PartSlot, ...]:
    """The slots of ``family`` for ``variant`` (its :meth:`~lorasmith.archs.base.Architecture.part_slots`).

    :raises NotAvailableError: a family that declares no parts.
    :raises PluginError: a family whose first slot is not the diffusion model.
    """
    slots = family.part_slots(variant)
    if not slots:
        raise NotAvailableError(
            f"family {family.id!r} declares no separate parts",
            hint="assemble and split work for families whose part_slots() lists their parts "
            "(sd1, sdxl, flux, sd3, zimage, and plugins that declare them)",
        )
    if slots[0].name != MAIN or slots[0].kind is not None:
        raise PluginError(
            f"family {family.id!r}: its first part slot must be the diffusion model ({MAIN!r}, no kind)",
            hint="fix the family's part_slots(): diffusion_model_slot() first",
        )
    return slots
