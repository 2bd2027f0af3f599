"""SD3 / SD3.5 single file <-> diffusers folder: the key map and the diffusers transformer inventories.

The diffusers layout of an SD3 pipeline (``stabilityai/stable-diffusion-3*-diffusers``):

- ``transformer/`` ``SD3Transformer2DModel``: the MMDiT (``model.diffusion_model.*``) with the fused
  ``attn.qkv`` / ``attn2.qkv`` weights and biases split into equal ``to_q/to_k/to_v`` thirds (the text
  stream's ``add_q_proj/add_k_proj/add_v_proj``), ``attn.ln_q/ln_k`` -> ``attn.norm_q/norm_k`` (the text
  stream's ``norm_added_q/norm_added_k``), ``attn.proj`` -> ``attn.to_out.0`` (text: ``attn.to_add_out``),
  ``mlp.fc1/fc2`` -> ``ff.net.0.proj``/``ff.net.2`` (text: ``ff_context.*``), ``adaLN_modulation.1`` ->
  ``norm1.linear`` (text: ``norm1_context.linear``), ``x_embedder.proj`` -> ``pos_embed.proj``,
  ``pos_embed`` -> ``pos_embed.pos_embed``, ``t_embedder.mlp.0/2`` and ``y_embedder.mlp.0/2`` ->
  ``time_text_embed.timestep_embedder/text_embedder.linear_1/2``, ``final_layer.linear`` -> ``proj_out``.
  Two modulations are ``AdaLayerNormContinuous`` in diffusers, which stores ``scale, shift`` where MMDiT
  stores ``shift, scale``: ``final_layer.adaLN_modulation.1`` (-> ``norm_out.linear``) and the last, pre-only
  context block's ``adaLN_modulation.1`` (-> ``norm1_context.linear``); both get their halves swapped.
- ``vae/`` ``AutoencoderKL`` (16 latent channels, no quant convs): ``first_stage_model.*`` through the
  packaged ldm -> diffusers VAE table (the same key structure as the SD VAE).
- ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (CLIP-G), both ``CLIPTextModelWithProjection``, and
  ``text_encoder_3/`` (T5-XXL, ``T5EncoderModel``): the ``text_encoders.clip_l/clip_g/t5xxl.transformer.*``
  keys are already transformers names; the prefix is dropped.
- Without a diffusers home (kept in ``lorasmith_extras.safetensors``): ComfyUI's ``model.model_sampling.
  sigmas`` and the text encoders' ``logit_scale``.

This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from lorasmith.archs._dit import CLIP_G_PREFIX, CLIP_L_PREFIX, T5XXL_PREFIX, te_tensors
from lorasmith.archs._unet import keymap
from lorasmith.archs.base import Inventory, LayoutEntry, TensorSpec
from lorasmith.archs.sd3 import _BLOCK, MMDIT_PREFIX, diffusers_modules
from lorasmith.errors import NotAvailableError

__all__ = ["DIFFUSERS_LAYOUT", "diffusers_inventory_of", "sd3_layout_map"]

#: layout name of the derived diffusers inventories (the transformer's own keys, no subfolder).
DIFFUSERS_LAYOUT = "diffusers-transformer"
#: canonical text-encoder prefix -> diffusers subfolder.
TEXT_ENCODER_FOLDERS = {
    CLIP_L_PREFIX: "text_encoder",
    CLIP_G_PREFIX: "text_encoder_2",
    T5XXL_PREFIX: "text_encoder_3",
}
_VAE_PREFIX = "first_stage_model."
#: global MMDiT tensors that are not ``<module>.weight/.bias`` of a :func:`diffusers_modules` module.
_SPECIAL = {"pos_embed": "pos_embed.pos_embed"}


def _mmdit_entries(tensors: Mapping[str, TensorSpec]) -> dict[str, LayoutEntry]:
    out: dict[str, LayoutEntry] = {}
    for key in tensors:
        if not key.startswith(MMDIT_PREFIX):
            continue
        rest = key[len(MMDIT_PREFIX) :]
        if rest in _SPECIAL:
            out[key] = LayoutEntry(((_SPECIAL[rest], None),))
            continue
        path, _, leaf = rest.rpartition(".")
        if path == "final_layer.adaLN_modulation.1":
            out[key] = LayoutEntry(((f"norm_out.linear.{leaf}", None),), transform="swap_halves")
            continue
        m = _BLOCK.match(path)
        pre_only = False
        if m is not None and m.group(2) == "context_block":
            # the last context block has no MLP (pre_only): its modulation is an AdaLayerNormContinuous
            pre_only = f"{MMDIT_PREFIX}joint_blocks.{m.group(1)}.context_block.mlp.fc1.weight" not in tensors
            if pre_only and m.group(3) == "adaLN_modulation.1":
                diff = f"transformer_blocks.{m.group(1)}.norm1_context.linear.{leaf}"
                out[key] = LayoutEntry(((diff, None),), transform="swap_halves")
                continue
        weight = tensors.get(f"{MMDIT_PREFIX}{path}.weight")
        mods = diffusers_modules(path, weight.shape if weight is not None else (), pre_only)
        if not mods:
            raise NotAvailableError(f"sd3: no diffusers name for {key!r}")
        if len(mods) == 1 and mods[0][1] is None:
            out[key] = LayoutEntry(((f"{mods[0][0]}.{leaf}", None),))
        else:
            out[key] = LayoutEntry(tuple((f"{d}.{leaf}", sl[2] if sl else None) for d, sl in mods))
    return out


def _vae_entries(tensors: Mapping[str, TensorSpec]) -> dict[str, LayoutEntry]:
    out: dict[str, LayoutEntry] = {}
    for ldm, diff in keymap("sd_vae").items():
        if ldm not in tensors:
            continue  # the SD3 VAE has no quant_conv / post_quant_conv
        # the table notes the reshape after the key: "<key>  [reshape (C,C,1,1)->(C,C)]"
        name, _, note = diff.partition(" ")
        out[ldm] = LayoutEntry(((f"vae/{name}", None),), transform="drop_1x1" if "reshape" in note else None)
    return out


def _text_encoder_entries() -> dict[str, LayoutEntry]:
    out: dict[str, LayoutEntry] = {}
    for key in te_tensors():
        for prefix, folder in TEXT_ENCODER_FOLDERS.items():
            if key.startswith(prefix):
                out[key] = LayoutEntry(((f"{folder}/{key[len(prefix) :]}", None),))
    return out


def sd3_layout_map(canonical: Inventory) -> dict[str, LayoutEntry]:
    """Canonical key -> diffusers folder key(s) for the variant of ``canonical`` (see the module docstring).

    Text encoders are mapped for every variant: the SD3.5 files ship without them, but a file that has them
    (SD3 Medium's ``*_incl_clips_t5xxl*``, or one assembled with ``convert --assemble``) converts whole.
    """
    out = _mmdit_entries(canonical.tensors)
    out.update(_vae_entries(canonical.tensors))
    out.update(_text_encoder_entries())
    return out


def diffusers_inventory_of(canonical: Inventory) -> Inventory:
    """The diffusers ``transformer/`` inventory of the variant of ``canonical``, derived from the key map.

    Shapes are the canonical ones split into the map's parts (q/k/v thirds); dtypes are kept.
    """
    tensors: dict[str, TensorSpec] = {}
    for key, entry in _mmdit_entries(canonical.tensors).items():
        spec = canonical.tensors[key]
        shape = spec.shape
        for part, rows in entry.parts:
            part_shape = shape if rows is None else (rows, *shape[1:])
            tensors[part] = TensorSpec(tuple(part_shape), spec.dtype)
    return Inventory(
        id=f"{canonical.variant}-diffusers",
        family=canonical.family,
        variant=canonical.variant,
        layout=DIFFUSERS_LAYOUT,
        canonical=False,
        components={"transformer": ""},
        optional=frozenset(),
        tensors=tensors,
        description=f"{canonical.variant} diffusers SD3Transformer2DModel (derived from {canonical.id})",
    )
