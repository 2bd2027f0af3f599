"""Build a diffusers ``AutoencoderKL`` from the VAE weights inside a single-file checkpoint.

The ldm/sgm VAE layout (SD1/2, SDXL, and the 16-channel FLUX / SD3 / Z-Image autoencoders, which use the
same module tree without ``quant_conv``/``post_quant_conv``) maps onto diffusers names through the
packaged ``sd_vae`` key table; the mid-block attention ``q``/``k``/``v``/``proj_out`` are 1x1 convolutions
in ldm and linear layers in diffusers, so their ``(C, C, 1, 1)`` weights become ``(C, C)``.

The VAE tensors are found under the first of these prefixes that the file uses: ``first_stage_model.``
(SD, SDXL, SD3 checkpoints), ``vae.`` (ComfyUI bundles), ``ae.``, or none (a bare ``ae.safetensors`` or
VAE file). A file already in diffusers naming (``encoder.down_blocks.*``) loads as it is.

The configuration is read off the weight shapes: input channels, per-level widths, blocks per level,
latent channels. Group-norm groups are not visible in the weights: 32, as in every released VAE (or the
narrowest level's width when that is below 32, for test-sized VAEs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorasmith.errors import InvalidFileError
from lorasmith.io.header import read_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "VAE_PREFIXES",
    "build_vae",
    "diffusers_to_ldm_vae",
    "find_vae_prefix",
    "ldm_to_diffusers_vae",
    "vae_config_from_shapes",
]

VAE_PREFIXES = ("first_stage_model.", "vae.", "ae.", "")
_PROBE = "encoder.conv_in.weight"
_RESHAPE_MARK = "[reshape"


def _table() -> dict[str, tuple[str, bool]]:
    """ldm key relative to the VAE root -> (diffusers key, squeeze 1x1 conv to linear)."""
    from lorasmith.archs._unet import keymap

    out: dict[str, tuple[str, bool]] = {}
    for src, dst in keymap("sd_vae").items():
        rel = src.removeprefix("first_stage_model.")
        name = dst.split(_RESHAPE_MARK)[0].strip()
        out[rel] = (name, _RESHAPE_MARK in dst)
    return out


def find_vae_prefix(keys: Mapping[str, Any] | list[str], source: str = "checkpoint") -> str:
    """The prefix under which ``keys`` hold a VAE.

    :raises InvalidFileError: no VAE weights in the file.
    """
    names = set(keys)
    for prefix in VAE_PREFIXES:
        if prefix + _PROBE in names:
            return prefix
    raise InvalidFileError(
        f"{source}: no VAE weights found (looked for {', '.join(p + _PROBE for p in VAE_PREFIXES if p)})",
        hint="pass a checkpoint that includes its VAE, or the VAE file itself with --vae",
    )


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], diffusers_names: bool) -> dict[str, Any]:
    """An ``AutoencoderKL`` config from VAE-relative key -> shape."""
    if diffusers_names:
        level_re = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv2\.weight$")
    else:
        level_re = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.conv2\.weight$")
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    for key, shape in shapes.items():
        m = level_re.match(key)
        if m:
            lvl, blk = int(m.group(1)), int(m.group(2))
            blocks[lvl] = max(blocks.get(lvl, 0), blk + 1)
            if blk == 0:
                widths[lvl] = shape[0]
    levels = sorted(widths)
    if not levels or levels != list(range(len(levels))):
        raise InvalidFileError("VAE weights: cannot tell the encoder levels from the key names")
    has_quant = "quant_conv.weight" in shapes
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [widths[i] for i in levels],
        "layers_per_block": blocks[0],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        # every released VAE uses 32 groups; narrower (test-sized) VAEs use one group per channel
        "norm_num_groups": min(32, min(widths.values())),
        "use_quant_conv": has_quant,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


def ldm_to_diffusers_vae(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename VAE-relative ldm keys to diffusers keys (and squeeze the mid-attention 1x1 convs).

    :raises InvalidFileError: a key the table does not know (a VAE of another shape).
    """
    table = _table()
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        hit = table.get(key)
        if hit is None:
            unknown.append(key)
            continue
        name, squeeze = hit
        out[name] = value.reshape(value.shape[0], value.shape[1]) if squeeze and value.ndim == 4 else value
    if unknown:
        raise InvalidFileError(
            f"VAE weights: {len(unknown)} keys not in the ldm VAE layout (first: {sorted(unknown)[0]})",
            hint="the VAE must have the SD/SDXL/FLUX/SD3 autoencoder structure",
        )
    return out


def diffusers_to_ldm_vae(
    state: Mapping[str, torch.Tensor], prefix: str = "first_stage_model."
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ldm_to_diffusers_vae`, keys under ``prefix`` (fixtures, conversions).

    :raises InvalidFileError: a diffusers key the table does not know.
    """
    inverse = {name: (rel, squeeze) for rel, (name, squeeze) in _table().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        hit = inverse.get(key)
        if hit is None:
            raise InvalidFileError(f"diffusers VAE key {key!r} has no ldm name")
        rel, squeeze = hit
        out[prefix + rel] = value.reshape(*value.shape, 1, 1) if squeeze and value.ndim == 2 else value
    return out


def build_vae(
    path: str | os.PathLike[str],
    *,
    scaling_factor: float,
    shift_factor: float,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """An ``AutoencoderKL`` (eval mode) with the VAE weights of ``path``.

    :raises InvalidFileError: no VAE in the file, or weights that do not fit.
    """
    import torch
    from diffusers import AutoencoderKL

    from lorasmith.io.reader import open_tensors

    header = read_header(path)
    prefix = find_vae_prefix(list(header.tensors), str(path))
    rel = {k[len(prefix) :]: k for k in header.tensors if k.startswith(prefix)}
    rel = {
        k: v
        for k, v in rel.items()
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    }
    diffusers_names = any(k.startswith("encoder.down_blocks.") for k in rel)
    with open_tensors(path) as f:
        raw = {k: f.get(full) for k, full in rel.items()}
    state = raw if diffusers_names else ldm_to_diffusers_vae(raw)
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    config = vae_config_from_shapes(shapes, diffusers_names)
    config.update(scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae: Any = AutoencoderKL(**config)  # type: ignore[no-untyped-call]
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InvalidFileError(
            f"{path}: the VAE weights do not fit an AutoencoderKL ({first})",
            hint="check that the file holds a complete SD/SDXL/FLUX/SD3 VAE",
        ) from exc
    vae = vae.to(device=torch.device(device))
    if dtype is not None and dtype != torch.float32:
        from diffusers.utils import logging as dlogging

        # diffusers logs a generic note on any dtype cast; the cast is what --dtype asks for
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            vae = vae.to(dtype=dtype)
        finally:
            dlogging.set_verbosity(level)
    return vae.eval()
