"""Separate component files ("parts"): VAEs and text encoders shipped apart from the diffusion model.

Modern distributions ship a model as several files (FLUX: ``flux1-dev``, ``ae``, ``clip_l``, ``t5xxl``;
SD3: MMDiT, CLIP-L, CLIP-G, T5-XXL; Z-Image: transformer, ``ae``, ``qwen_3_4b``), and several families share
one part (the same CLIP-L file serves SD1, SDXL, FLUX and SD3). A :class:`PartKind` describes one such file:
its keys and shapes, derived at runtime from a family's canonical single-file inventory by stripping the
component prefix (no extra data files), and the families that use it.

:func:`detect_part` tells which part a file is from names and tensor ranks alone (plus one rank-free channel
check that tells the 4-channel VAE of SD1/SDXL from the 16-channel VAE of FLUX/SD3/Z-Image). A part used by
several families is *not* ambiguous: the answer is the part, with every family that uses it
(``clip_l text encoder (used by sd1, sdxl, flux, sd3)``).

Part kinds are a built-in table (:data:`PART_KINDS`); a plugin family cannot add kinds yet.
This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from lorasmith.archs.base import KeyView, TensorSpec, load_packaged_inventory, split_lora_key

__all__ = ["PART_KINDS", "PartKind", "PartMatch", "detect_part", "part_inventory"]


@dataclass(frozen=True)
class PartKind:
    """One kind of separate component file.

    :ivar id: ``clip_l``, ``clip_g``, ``t5xxl``, ``vae16``, ``vae4``, ``qwen3_4b``, ``openclip_h``,
        ``openclip_g``.
    :ivar name: a readable name (``"clip_l text encoder"``).
    :ivar users: ids of the families that use it.
    :ivar source: ``(inventory stem, prefix)``: the part's keys are that inventory's keys under the prefix,
        with the prefix removed; ``None`` for a part whose keys are built by :func:`_qwen3_4b`.
    :ivar outer: keys directly under this prefix but outside ``source``'s prefix keep their name relative to
        it (ComfyUI's ``text_encoders.clip_l.logit_scale`` -> ``logit_scale``).
    :ivar channels: ``(key, axis, value)``: a dimension test-shrinking never changes (latent channels), which
        must hold when the key is present.
    :ivar component: the coarse component: ``vae`` or ``te``.
    """

    id: str
    name: str
    users: tuple[str, ...]
    source: tuple[str, str] | None
    outer: str | None = None
    channels: tuple[str, int, int] | None = None
    component: str = "te"


#: Every part kind lorasmith recognises. Keys come from the packaged inventories (ComfyUI's SD3 Medium file
#: holds CLIP-L, CLIP-G and T5-XXL in HF form and the 16-channel VAE; SD1/SD2/SDXL hold the 4-channel VAE
#: and their OpenCLIP encoders); Qwen3-4B's from its public config.
PART_KINDS: dict[str, PartKind] = {
    p.id: p
    for p in (
        PartKind(
            "clip_l",
            "clip_l text encoder",
            ("sd1", "sdxl", "flux", "sd3"),
            ("sd3-medium-comfyui", "text_encoders.clip_l.transformer."),
            outer="text_encoders.clip_l.",
        ),
        PartKind(
            "clip_g",
            "clip_g text encoder",
            ("sdxl", "sd3"),
            ("sd3-medium-comfyui", "text_encoders.clip_g.transformer."),
            outer="text_encoders.clip_g.",
        ),
        PartKind(
            "t5xxl",
            "t5xxl text encoder",
            ("flux", "sd3"),
            ("sd3-medium-comfyui", "text_encoders.t5xxl.transformer."),
            outer="text_encoders.t5xxl.",
        ),
        PartKind(
            "vae16",
            "16-channel VAE",
            ("flux", "sd3", "zimage"),
            ("sd3-medium-comfyui", "first_stage_model."),
            channels=("decoder.conv_in.weight", 1, 16),
            component="vae",
        ),
        PartKind(
            "vae4",
            "4-channel VAE",
            ("sd1", "sdxl"),
            ("sd1-ldm", "first_stage_model."),
            channels=("decoder.conv_in.weight", 1, 4),
            component="vae",
        ),
        PartKind("qwen3_4b", "qwen3_4b text encoder", ("zimage",), None),
        PartKind(
            "openclip_h",
            "openclip_h text encoder of SD2, in OpenCLIP form",
            ("sd1",),
            ("sd2-ldm", "cond_stage_model.model."),
        ),
        PartKind(
            "openclip_g",
            "openclip_g text encoder of SDXL, in OpenCLIP form",
            ("sdxl",),
            ("sdxl-sgm", "conditioner.embedders.1.model."),
        ),
    )
}

#: Qwen3-4B (``Qwen/Qwen3-4B`` config.json): hidden 2560, 36 layers, MLP 9728, 32 query heads and 8 key/value
#: heads of 128, vocabulary 151936, tied embeddings (no ``lm_head``). ComfyUI's ``qwen_3_4b.safetensors``
#: holds the HF ``Qwen3Model`` under ``model.``.
_QWEN3_4B = {
    "hidden": 2560,
    "layers": 36,
    "mlp": 9728,
    "q": 32 * 128,
    "kv": 8 * 128,
    "head": 128,
    "vocab": 151936,
}


def _qwen3_4b() -> dict[str, TensorSpec]:
    c = _QWEN3_4B
    h = c["hidden"]
    out: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((c["vocab"], h), "BF16")}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj.weight", (c["q"], h)),
            ("self_attn.k_proj.weight", (c["kv"], h)),
            ("self_attn.v_proj.weight", (c["kv"], h)),
            ("self_attn.o_proj.weight", (h, c["q"])),
            ("self_attn.q_norm.weight", (c["head"],)),
            ("self_attn.k_norm.weight", (c["head"],)),
            ("mlp.gate_proj.weight", (c["mlp"], h)),
            ("mlp.up_proj.weight", (c["mlp"], h)),
            ("mlp.down_proj.weight", (h, c["mlp"])),
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
        ):
            out[p + name] = TensorSpec(shape, "BF16")
    out["model.norm.weight"] = TensorSpec((h,), "BF16")
    return out


@cache
def part_inventory(kind: str) -> Mapping[str, TensorSpec]:
    """Key -> spec of every tensor of a part file of ``kind`` (as the separate distribution file names it).

    :raises KeyError: an unknown kind.
    """
    part = PART_KINDS[kind]
    if part.source is None:
        return _qwen3_4b()
    stem, prefix = part.source
    inv = load_packaged_inventory("lorasmith.archs", stem)
    out: dict[str, TensorSpec] = {}
    for key, spec in inv.tensors.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = spec
        elif part.outer and key.startswith(part.outer):
            out[key[len(part.outer) :]] = spec
    return out


@dataclass(frozen=True)
class PartMatch:
    """What :func:`detect_part` found.

    :ivar kind: the :class:`PartKind` id.
    :ivar users: the families that use it (registered or not).
    :ivar score: fraction of the file's tensors that belong to the part.
    :ivar coverage: fraction of the part's tensors the file has.
    :ivar reason: one readable sentence (``"clip_l text encoder (used by sd1, sdxl, flux, sd3)"``).
    """

    kind: str
    users: tuple[str, ...]
    score: float
    coverage: float
    reason: str


#: A file is a part when at least this fraction of its tensors belongs to the part ...
MIN_SCORE = 0.95
#: ... and it has at least this fraction of the part's tensors (real files drop optional buffers).
MIN_COVERAGE = 0.85


def detect_part(view: KeyView) -> PartMatch | None:
    """The part kind of a file from its key names and tensor ranks, or ``None`` when it is no part.

    Best by (score, coverage); a kind whose channel test fails is skipped. LoRA files are never parts.
    """
    keys = [k for k in view.tensors if split_lora_key(k) is None]
    if not keys or len(keys) != len(view.tensors):
        return None
    best: tuple[float, float, str] | None = None
    for kind, part in PART_KINDS.items():
        inv = part_inventory(kind)
        if part.channels is not None:
            key, axis, value = part.channels
            spec = view.tensors.get(key)
            if spec is not None and (len(spec.shape) <= axis or spec.shape[axis] != value):
                continue
        hits = sum(1 for k in keys if k in inv and len(inv[k].shape) == len(view.tensors[k].shape))
        if not hits:
            continue
        cand = (hits / len(keys), hits / len(inv), kind)
        if best is None or cand[:2] > best[:2]:
            best = cand
    if best is None or best[0] < MIN_SCORE or best[1] < MIN_COVERAGE:
        return None
    score, coverage, kind = best
    part = PART_KINDS[kind]
    return PartMatch(kind, part.users, score, coverage, f"{part.name} (used by {', '.join(part.users)})")
