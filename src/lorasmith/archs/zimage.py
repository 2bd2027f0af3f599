"""Z-Image / Z-Image-Turbo (6B single-stream DiT): the built-in ``zimage`` family.

Canonical key space: the ComfyUI single file, bare keys (``layers.0.attention.qkv.weight``); the diffusers
``ZImageTransformer2DModel`` layout (also the official repository's and musubi-tuner's names) is a second
known layout. The two differ only in (ComfyUI <- diffusers): ``attention.qkv`` <- ``attention.to_q/to_k/to_v``
(row thirds), ``attention.out`` <- ``attention.to_out.0``, ``attention.q_norm/k_norm`` <-
``attention.norm_q/norm_k``, ``x_embedder`` <- ``all_x_embedder.2-1``, ``final_layer`` <-
``all_final_layer.2-1``.

LoRA spellings (the default first):

- ``kohya``: ``lora_unet_`` + ComfyUI path with ``_`` (``lora_unet_layers_0_attention_qkv``,
  ``..._attention_out``, ``..._feed_forward_w1``, ``..._adaLN_modulation_0``; likewise under
  ``noise_refiner_N_`` and ``context_refiner_N_``): the fused names ComfyUI loads directly.
- ``musubi`` (musubi-tuner): ``lora_unet_`` + diffusers path with ``_`` (``..._attention_to_q`` as a row
  third of ``attention.qkv``, ``..._attention_to_out_0``).
- ``aitk`` (ai-toolkit): ``diffusion_model.`` + diffusers path.
- ``peft`` (diffusers): ``transformer.`` + diffusers path.
- ``comfy``: ``diffusion_model.`` + ComfyUI path.
- ``onetrainer``: ``lora_transformer_`` + diffusers path with ``_``.
- ``lycoris``: ``lycoris_`` + diffusers path with ``_``.

kohya and musubi (and aitk and comfy) share the names of layers that both trees call alike
(``feed_forward.w1``...), with the same targets.

Block labels (no community notation; this project's choice, as in the manifests): ``IN`` (``x_embedder``,
``cap_embedder``, ``t_embedder``, the pad tokens), ``NR0``/``NR1`` (noise refiner), ``CR0``/``CR1`` (context
refiner), ``L00``-``L29`` (main layers), ``OUT`` (``final_layer``). Notation ``zimage-37``:
``TE, IN, NR0, NR1, CR0, CR1, L00..L29, OUT``, with ``TE`` first like the other families' text-encoder
slot; it is reserved for the Qwen3 text encoder, whose keys this family does not alias yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from lorasmith.archs._dit import (
    VAE16_SLOT,
    DiTArchitecture,
    dotted_and_underscored,
    equal_row_slices,
    strip_prefix,
    weight_paths,
)
from lorasmith.archs.base import Alias, Architecture, LayoutEntry, Target, name_prefixes
from lorasmith.archs.parts import PartSlot, diffusion_model_slot
from lorasmith.hookspecs import hookimpl

_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
#: ComfyUI module suffix -> diffusers module suffix inside a layer or refiner.
_RENAMES: dict[str, str] = {
    "attention.out": "attention.to_out.0",
    "attention.q_norm": "attention.norm_q",
    "attention.k_norm": "attention.norm_k",
}
_TOP_RENAMES: dict[str, str] = {"x_embedder": "all_x_embedder.2-1", "final_layer": "all_final_layer.2-1"}
_LAYER = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
_IN_HEADS = ("x_embedder", "cap_embedder", "t_embedder", "x_pad_token", "cap_pad_token", "all_x_embedder")
_OUT_HEADS = ("final_layer", "all_final_layer")

#: First segments of the ComfyUI and the diffusers module paths (the heads of the name bounds).
_HEADS: tuple[str, ...] = (
    "layers.",
    "noise_refiner.",
    "context_refiner.",
    "x_embedder",
    "cap_embedder.",
    "t_embedder.",
    "final_layer.",
    "x_pad_token",
    "cap_pad_token",
    "all_x_embedder.",
    "all_final_layer.",
)

#: Counts of the released model (diffusers ``ZImageTransformer2DModel`` defaults).
LAYERS = 30
REFINERS = 2


def diffusers_modules(path: str, shape: Sequence[int]) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The diffusers ``ZImageTransformer2DModel`` modules that ComfyUI module ``path`` covers.

    Each entry is ``(diffusers module path, row slice or None)``; the mapping is the inverse of ComfyUI's
    ``z_image_to_diffusers``.
    """
    m = _LAYER.match(path)
    if m is None:
        head, _, rest = path.partition(".")
        if head in _TOP_RENAMES:
            return [(_TOP_RENAMES[head] + ("." + rest if rest else ""), None)]
        return [(path, None)]
    base = f"{m.group(1)}.{m.group(2)}."
    rest = m.group(3)
    if rest == "attention.qkv":
        return [(base + p, s) for p, s in zip(_QKV, equal_row_slices(shape[0], 3), strict=True)]
    return [(base + _RENAMES.get(rest, rest), None)]


class ZImage(DiTArchitecture):
    """Z-Image and Z-Image-Turbo (ComfyUI and diffusers layouts); see the module docstring."""

    id: ClassVar[str] = "zimage"
    name: ClassVar[str] = "Z-Image"
    variants: ClassVar[tuple[str, ...]] = ("z-image",)
    inventory_files: ClassVar[tuple[str, ...]] = ("z-image-comfyui", "z-image-diffusers")
    spellings: ClassVar[tuple[str, ...]] = (
        "kohya",
        "musubi",
        "aitk",
        "peft",
        "comfy",
        "onetrainer",
        "lycoris",
    )
    #: the value musubi-tuner writes (``ARCH_Z_IMAGE``; ``/lora`` is appended for adapters)
    modelspec: ClassVar[Mapping[str, str]] = {"z-image": "Z-Image"}
    base_model_version: ClassVar[Mapping[str, str]] = {"z-image": "zimage"}
    #: ComfyUI loads only fused q/k/v for Z-Image: musubi's split ``attention_to_q`` names are skipped.
    comfyui_rejects: ClassVar[frozenset[str]] = frozenset({"musubi"})
    #: ComfyUI's all-in-one file: the VAE under ``vae.``, Qwen3-4B under ``text_encoders.qwen3_4b.``; split
    #: as the transformer, ``ae`` and ``qwen_3_4b`` files.
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(),
        VAE16_SLOT,
        PartSlot(
            "text_encoder",
            "qwen3_4b",
            "text_encoders.qwen3_4b.transformer.",
            "qwen_3_4b.safetensors",
            outer="text_encoders.qwen3_4b.",
        ),
    )

    lora_prefixes: ClassVar[tuple[str, ...] | None] = name_prefixes(
        ("lora_unet_", "lora_transformer_", "lycoris_"), _HEADS, kohya=True
    ) + name_prefixes(("diffusion_model.", "transformer."), _HEADS)
    key_prefixes: ClassVar[tuple[str, ...] | None] = _HEADS

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
                    dotted=(("aitk", "diffusion_model."), ("peft", "transformer.")),
                    underscored=(
                        ("musubi", "lora_unet_"),
                        ("onetrainer", "lora_transformer_"),
                        ("lycoris", "lycoris_"),
                    ),
                )

    def layout_map(self, inventory_id: str) -> Mapping[str, LayoutEntry]:
        """Canonical (ComfyUI) key -> diffusers ``ZImageTransformer2DModel`` key(s) (``z-image-diffusers``).

        The renames of the module docstring; ``attention.qkv`` splits into equal ``to_q/to_k/to_v`` row
        thirds. No transform: every other tensor is a plain rename.
        """
        inv = next((i for i in self.inventories() if i.id == inventory_id), None)
        if inv is None or inv.layout != "diffusers-transformer":
            return super().layout_map(inventory_id)
        canonical = self.canonical_inventory(inv.variant)
        out: dict[str, LayoutEntry] = {}
        for key in canonical.tensors:
            path, dot, leaf = key.rpartition(".")
            if not dot:  # a bare parameter (x_pad_token): same name
                out[key] = LayoutEntry(((key, None),))
                continue
            weight = canonical.tensors.get(path + ".weight")
            mods = diffusers_modules(path, weight.shape if weight is not None else ())
            if len(mods) == 1 and mods[0][1] is None:
                out[key] = LayoutEntry(((f"{mods[0][0]}.{leaf}", None),))
            else:
                out[key] = LayoutEntry(tuple((f"{d}.{leaf}", sl[2] if sl else None) for d, sl in mods))
        return out

    def block_of(self, key: str) -> str | None:
        """``IN``, ``NR0``/``NR1``, ``CR0``/``CR1``, ``L00``-``L29`` or ``OUT``; ``None`` for other keys.

        Accepts ComfyUI and diffusers keys, with or without ``model.diffusion_model.``.
        """
        key = strip_prefix(key)
        m = _LAYER.match(key)
        if m:
            kind, idx = m.group(1), int(m.group(2))
            if kind == "layers":
                return f"L{idx:02d}"
            return f"{'NR' if kind == 'noise_refiner' else 'CR'}{idx}"
        head = key.split(".", 1)[0]
        if head in _IN_HEADS:
            return "IN"
        if head in _OUT_HEADS:
            return "OUT"
        return None

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """``zimage-37``: ``TE, IN, NR0, NR1, CR0, CR1, L00..L29, OUT`` (``TE`` reserved, see the module)."""
        labels = ["TE", "IN"]
        labels += [f"NR{i}" for i in range(REFINERS)]
        labels += [f"CR{i}" for i in range(REFINERS)]
        labels += [f"L{i:02d}" for i in range(LAYERS)]
        labels.append("OUT")
        return {"zimage-37": labels}


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register the Z-Image family."""
    return [ZImage]
