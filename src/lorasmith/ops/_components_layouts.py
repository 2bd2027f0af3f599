"""Single-file layouts of the built-in families: which part goes under which key prefix.

A single-file checkpoint is the concatenation of its parts, each under a prefix its loaders expect:

========  ==========================  ==============================================================
family    slot                        single-file prefix (separate file name when split)
========  ==========================  ==============================================================
sd1       unet                        ``model.diffusion_model.`` (``<checkpoint>.safetensors``)
          vae (4-channel)             ``first_stage_model.`` (``vae.safetensors``)
          clip_l (SD1)                ``cond_stage_model.transformer.`` (``clip_l.safetensors``)
          text_encoder (SD2 OpenCLIP) ``cond_stage_model.model.`` (``open_clip_h.safetensors``)
sdxl      unet, vae                   as SD1
          clip_l                      ``conditioner.embedders.0.transformer.``
          clip_g (OpenCLIP form)      ``conditioner.embedders.1.model.`` (``clip_g_openclip.safetensors``)
flux      transformer                 ``model.diffusion_model.``
          vae (16-channel)            ``vae.`` (``ae.safetensors``; ComfyUI's FLUX ``vae_key_prefix``)
          clip_l, t5xxl               ``text_encoders.<name>.transformer.``
sd3       transformer (MMDiT)         ``model.diffusion_model.``
          vae (16-channel)            ``first_stage_model.``
          clip_l, clip_g, t5xxl       ``text_encoders.<name>.transformer.`` (sd-scripts' SD3 layout)
zimage    transformer                 ``model.diffusion_model.``
          vae (16-channel)            ``vae.`` (``ae.safetensors``)
          text_encoder (Qwen3-4B)     ``text_encoders.qwen3_4b.transformer.`` (``qwen_3_4b.safetensors``)
========  ==========================  ==============================================================

ComfyUI's separate loaders read bare keys (the diffusion model without ``model.diffusion_model.``, the VAE's
``encoder.*``/``decoder.*``, HF ``text_model.*`` for CLIP, HF ``encoder.*``/``shared.weight`` for T5), which
is what a split writes. ``logit_scale`` tensors that ComfyUI keeps next to a text encoder
(``text_encoders.clip_l.logit_scale``) travel in that encoder's file as ``logit_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasmith.errors import NotAvailableError

__all__ = ["MAIN", "SLOT_OPTIONS", "Slot", "layout_for"]

#: The slot of the diffusion model (``--transformer``; ``--unet`` is the same slot).
MAIN = "transformer"
#: CLI option of each slot.
SLOT_OPTIONS: dict[str, str] = {
    "transformer": "--transformer/--unet",
    "vae": "--vae",
    "clip_l": "--clip-l",
    "clip_g": "--clip-g",
    "t5xxl": "--t5xxl",
    "text_encoder": "--text-encoder",
}


@dataclass(frozen=True)
class Slot:
    """One part of a family's single file.

    :ivar name: ``transformer``, ``vae``, ``clip_l``, ``clip_g``, ``t5xxl`` or ``text_encoder``.
    :ivar kind: the :data:`~lorasmith.archs.parts.PART_KINDS` id; ``None`` for the diffusion model.
    :ivar prefix: prefix of the part's keys in the single file.
    :ivar outer: keys under this prefix but outside ``prefix`` (``logit_scale``) keep their name relative to
        it in the part file; ``None`` when there is no such key.
    :ivar filename: the part's file name when split; ``None``: the checkpoint's own name.
    :ivar required: an assembled file must have it.
    :ivar group: the dtype option that applies: ``unet``, ``te`` or ``vae``.
    """

    name: str
    kind: str | None
    prefix: str
    outer: str | None
    filename: str | None
    required: bool
    group: str

    @property
    def option(self) -> str:
        """The CLI option that gives this part."""
        return SLOT_OPTIONS[self.name]


def _main() -> Slot:
    return Slot(MAIN, None, "model.diffusion_model.", None, None, True, "unet")


def _te(name: str, required: bool, filename: str | None = None) -> Slot:
    return Slot(
        name,
        name,
        f"text_encoders.{name}.transformer.",
        f"text_encoders.{name}.",
        filename or f"{name}.safetensors",
        required,
        "te",
    )


_VAE4 = Slot("vae", "vae4", "first_stage_model.", None, "vae.safetensors", True, "vae")

#: ``(family, variant or None)`` -> slots, the diffusion model first.
LAYOUTS: dict[tuple[str, str | None], tuple[Slot, ...]] = {
    ("sd1", "sd1"): (
        _main(),
        _VAE4,
        Slot("clip_l", "clip_l", "cond_stage_model.transformer.", None, "clip_l.safetensors", True, "te"),
    ),
    ("sd1", "sd2"): (
        _main(),
        _VAE4,
        Slot(
            "text_encoder",
            "openclip_h",
            "cond_stage_model.model.",
            None,
            "open_clip_h.safetensors",
            True,
            "te",
        ),
    ),
    ("sdxl", None): (
        _main(),
        _VAE4,
        Slot(
            "clip_l", "clip_l", "conditioner.embedders.0.transformer.", None, "clip_l.safetensors", True, "te"
        ),
        Slot(
            "clip_g",
            "openclip_g",
            "conditioner.embedders.1.model.",
            None,
            "clip_g_openclip.safetensors",
            True,
            "te",
        ),
    ),
    ("flux", None): (
        _main(),
        Slot("vae", "vae16", "vae.", None, "ae.safetensors", True, "vae"),
        _te("clip_l", True),
        _te("t5xxl", True, "t5xxl.safetensors"),
    ),
    ("sd3", None): (
        _main(),
        Slot("vae", "vae16", "first_stage_model.", None, "vae.safetensors", True, "vae"),
        _te("clip_l", False),
        _te("clip_g", False),
        _te("t5xxl", False, "t5xxl.safetensors"),
    ),
    ("zimage", None): (
        _main(),
        Slot("vae", "vae16", "vae.", None, "ae.safetensors", True, "vae"),
        Slot(
            "text_encoder",
            "qwen3_4b",
            "text_encoders.qwen3_4b.transformer.",
            "text_encoders.qwen3_4b.",
            "qwen_3_4b.safetensors",
            True,
            "te",
        ),
    ),
}


def layout_for(family: str, variant: str | None) -> tuple[Slot, ...]:
    """The slots of ``family`` (``variant`` picks SD1 vs SD2).

    :raises NotAvailableError: a family without a single-file layout here (plugin families).
    """
    found = LAYOUTS.get((family, variant)) or LAYOUTS.get((family, None))
    if found is None and family == "sd1":
        found = LAYOUTS[("sd1", "sd1")]
    if found is None:
        raise NotAvailableError(
            f"family {family!r} has no known single-file layout of parts",
            hint="assemble and split know sd1, sdxl, flux, sd3 and zimage",
        )
    return found
