"""The config files of a diffusers folder, written from the shapes of the converted weights.

Internal to :mod:`lorasmith.ops.layouts`. :func:`folder_configs` returns ``relative path -> JSON object`` for
one family: what a diffusers user finds in a folder saved by ``save_pretrained`` (``model_index.json``, each
model's ``config.json``, the scheduler config). Everything that shapes tell (widths, depths, layer counts,
which blocks have attention) is read from the weights; what they cannot tell (heads of SD1, activation
functions, scheduler settings, VAE scaling factors) is the released model's value. Shrunk test files get
configs with shrunk widths, which is all their shapes can say.

Tokenizers are not written (a single file carries none): ``model_index.json`` lists them as ``[null,
null]``, so ``from_pretrained`` loads the pipeline and the user passes ``tokenizer=`` (or copies the
tokenizer folders of the base model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

__all__ = ["DIFFUSERS_VERSION", "folder_configs"]

Shapes = Mapping[str, tuple[int, ...]]
Json = dict[str, object]

#: the ``_diffusers_version`` written into configs (the format the keys follow, not a requirement).
DIFFUSERS_VERSION = "0.30.0"
_NONE: list[None] = [None, None]


def _count(shapes: Shapes, pattern: str) -> int:
    """Distinct values of the one group of ``pattern`` over the keys (how many blocks / layers)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _heads(width: int, head_dim: int = 64) -> int:
    # released models use 64-wide heads; shrunk fixtures get at least one head
    return max(1, width // head_dim)


# ------------------------------------------------------------------------------------------------- FLUX
def flux_transformer(shapes: Shapes) -> Json:
    """``FluxTransformer2DModel`` config."""
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    hidden = shapes["x_embedder.weight"][0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": 1,
        "in_channels": shapes["x_embedder.weight"][1],
        "out_channels": None,
        "num_layers": _count(shapes, r"^transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"^single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": [16, 56, 56],
    }


# ---------------------------------------------------------------------------------------------- Z-Image
def zimage_transformer(shapes: Shapes) -> Json:
    """``ZImageTransformer2DModel`` config (patch 2, frame patch 1, as released)."""
    dim = shapes["layers.0.attention.to_q.weight"][1]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0]
    patch, f_patch = 2, 1
    return {
        "_class_name": "ZImageTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "all_patch_size": [patch],
        "all_f_patch_size": [f_patch],
        "in_channels": shapes["all_x_embedder.2-1.weight"][1] // (patch * patch * f_patch),
        "dim": dim,
        "n_layers": _count(shapes, r"^layers\.(\d+)\."),
        "n_refiner_layers": _count(shapes, r"^noise_refiner\.(\d+)\."),
        "n_heads": max(1, dim // head_dim),
        "n_kv_heads": max(1, dim // head_dim),
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": shapes["cap_embedder.1.weight"][1],
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    }


# ------------------------------------------------------------------------------------------- SD3 / 3.5
def sd3_transformer(shapes: Shapes) -> Json:
    """``SD3Transformer2DModel`` config (SD3 Medium, SD3.5 Medium with its dual-attention blocks, SD3.5
    Large); the head width is the q/k norm's where the model has one, else 64 as released."""
    hidden = shapes["context_embedder.weight"][0]
    proj = shapes["pos_embed.proj.weight"]  # [hidden, in_channels, patch, patch]
    patch = proj[2]
    norm_q = shapes.get("transformer_blocks.0.attn.norm_q.weight")
    heads = hidden // norm_q[0] if norm_q is not None else _heads(hidden)
    dual = sorted(
        int(m.group(1))
        for k in shapes
        if (m := re.match(r"^transformer_blocks\.(\d+)\.attn2\.to_q\.weight$", k))
    )
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": hidden // heads,
        "caption_projection_dim": hidden,
        "dual_attention_layers": dual,
        "in_channels": proj[1],
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "num_attention_heads": heads,
        "num_layers": _count(shapes, r"^transformer_blocks\.(\d+)\."),
        "out_channels": shapes["proj_out.weight"][0] // (patch * patch),
        "patch_size": patch,
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        # the positional table is max_size x max_size positions (192 for Medium/Large, 384 for 3.5 Medium)
        "pos_embed_max_size": math.isqrt(shapes["pos_embed.pos_embed"][1]),
        "qk_norm": "rms_norm" if norm_q is not None else None,
        "sample_size": 128,
    }


def t5_encoder(shapes: Shapes, dtype: str) -> Json:
    """``T5EncoderModel`` config of T5-XXL (v1.1: gated GELU, no tied embeddings) from its shapes."""
    bias = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    d_model = shapes["shared.weight"][1]
    heads = bias[1]
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "classifier_dropout": 0.0,
        "d_ff": shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        "d_kv": shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        "d_model": d_model,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "num_decoder_layers": _count(shapes, r"^encoder\.block\.(\d+)\."),
        "num_heads": heads,
        "num_layers": _count(shapes, r"^encoder\.block\.(\d+)\."),
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": bias[0],
        "tie_word_embeddings": False,
        "torch_dtype": {"F16": "float16", "BF16": "bfloat16"}.get(dtype, "float32"),
        "vocab_size": shapes["shared.weight"][0],
    }


def sd3_model_index(present: set[str]) -> Json:
    """``model_index.json`` of a ``StableDiffusion3Pipeline``; components not written are ``[null, null]``."""

    def comp(name: str, lib: str, cls: str) -> list[str] | list[None]:
        return [lib, cls] if name in present else list(_NONE)

    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": list(_NONE),
        "image_encoder": list(_NONE),
        "scheduler": comp("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": comp("text_encoder", "transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": comp("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": comp("text_encoder_3", "transformers", "T5EncoderModel"),
        "tokenizer": list(_NONE),
        "tokenizer_2": list(_NONE),
        "tokenizer_3": list(_NONE),
        "transformer": comp("transformer", "diffusers", "SD3Transformer2DModel"),
        "vae": comp("vae", "diffusers", "AutoencoderKL"),
    }


def sd3_configs(shapes: Mapping[str, Shapes], dtypes: Mapping[str, str]) -> dict[str, Json]:
    """Every config file of an SD3 / SD3.5 pipeline folder (the models present)."""
    out: dict[str, Json] = {}
    present = set(shapes)
    if "transformer" in shapes:
        out["transformer/config.json"] = sd3_transformer(shapes["transformer"])
        # rectified flow with the released pipelines' timestep shift
        out["scheduler/scheduler_config.json"] = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000,
            "shift": 3.0,
        }
        present.add("scheduler")
    if "vae" in shapes:
        out["vae/config.json"] = vae(shapes["vae"], "sd3", None)
    for sub, openclip in (("text_encoder", False), ("text_encoder_2", True)):
        if sub in shapes:
            out[f"{sub}/config.json"] = clip_text(
                shapes[sub], openclip=openclip, projection_dim=None, dtype=dtypes.get(sub, "F32")
            )
    if "text_encoder_3" in shapes:
        out["text_encoder_3/config.json"] = t5_encoder(
            shapes["text_encoder_3"], dtypes.get("text_encoder_3", "F32")
        )
    out["model_index.json"] = sd3_model_index(present)
    return out


# ------------------------------------------------------------------------------------------ SD1/2, SDXL
def unet(shapes: Shapes, family: str, variant: str | None) -> Json:
    """``UNet2DConditionModel`` config of SD1, SD2 or SDXL."""
    n_down = _count(shapes, r"^down_blocks\.(\d+)\.")
    n_up = _count(shapes, r"^up_blocks\.(\d+)\.")
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_down)]
    attn_down = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in range(n_down)]
    attn_up = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in shapes) for i in range(n_up)]
    cross = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(s for k, s in shapes.items() if k.endswith("attentions.0.proj_in.weight"))
    depth = [
        max(1, _count(shapes, rf"^down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\."))
        for i in range(n_down)
    ]
    cfg: Json = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": cross,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": shapes["conv_in.weight"][1],
        "layers_per_block": _count(shapes, r"^down_blocks\.0\.resnets\.(\d+)\."),
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "only_cross_attention": False,
        "out_channels": shapes["conv_out.weight"][0],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        "use_linear_projection": len(proj_in) == 2,
    }
    if family == "sdxl":
        cfg.update(
            {
                # diffusers' historical name: SDXL has 64-wide heads, this lists heads per block
                "attention_head_dim": [_heads(c) for c in channels],
                "transformer_layers_per_block": depth,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": shapes["add_embedding.linear_1.weight"][1],
                "sample_size": 128,
                "upcast_attention": False,
            }
        )
    elif variant == "sd2":
        cfg.update({"attention_head_dim": [_heads(c) for c in channels], "sample_size": 96})
        cfg["upcast_attention"] = True  # SD2.1 768-v overflows in fp16 attention without it
    else:
        cfg.update({"attention_head_dim": 8, "sample_size": 64})  # SD1: 8 heads in every block
    return cfg


def vae(shapes: Shapes, family: str, variant: str | None) -> Json:
    """``AutoencoderKL`` config of the SD/SDXL VAE, or of SD3's 16-channel VAE (no quant convs)."""
    n = _count(shapes, r"^encoder\.down_blocks\.(\d+)\.")
    if family == "sd3":
        sd3: Json = {
            "sample_size": 1024,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "force_upcast": True,
            "use_quant_conv": "quant_conv.weight" in shapes,
            "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        }
    else:
        sd3 = {}
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [
            shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)
        ],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "layers_per_block": _count(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "norm_num_groups": 32,
        "sample_size": {"sdxl": 1024}.get(family, 768 if variant == "sd2" else 512),
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "force_upcast": family == "sdxl",  # the SDXL VAE overflows in fp16
    } | sd3


def clip_text(shapes: Shapes, *, openclip: bool, projection_dim: int | None, dtype: str) -> Json:
    """``CLIPTextConfig`` of CLIP-L (OpenAI, ``quick_gelu``) or an OpenCLIP tower (``gelu``)."""
    hidden = shapes["text_model.embeddings.token_embedding.weight"][1]
    proj = shapes.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModelWithProjection" if proj is not None else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "num_attention_heads": _heads(hidden),
        "num_hidden_layers": _count(shapes, r"^text_model\.encoder\.layers\.(\d+)\."),
        "projection_dim": proj[0] if proj is not None else (projection_dim or hidden),
        "torch_dtype": {"F16": "float16", "BF16": "bfloat16"}.get(dtype, "float32"),
        "vocab_size": shapes["text_model.embeddings.token_embedding.weight"][0],
    }


def scheduler(family: str, variant: str | None) -> Json:
    """The released pipeline's scheduler config (not in a single file; these are the defaults)."""
    common: Json = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
    }
    if family == "sdxl":
        return {
            **common,
            "_class_name": "EulerDiscreteScheduler",
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        }
    if variant == "sd2":
        # the sd2 inventory is the 768-v model; a 512-base file has the same keys: set epsilon by hand
        return {
            **common,
            "_class_name": "DDIMScheduler",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "prediction_type": "v_prediction",
        }
    return {
        **common,
        "_class_name": "PNDMScheduler",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "prediction_type": "epsilon",
    }


def model_index(family: str, present: set[str]) -> Json:
    """``model_index.json`` of an SD1/SD2 or SDXL pipeline; components not written are ``[null, null]``."""

    def comp(name: str, lib: str, cls: str) -> list[str] | list[None]:
        return [lib, cls] if name in present else list(_NONE)

    out: Json = {
        "_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": list(_NONE),
        "image_encoder": list(_NONE),
        "scheduler": comp(
            "scheduler", "diffusers", "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler"
        ),
        "text_encoder": comp("text_encoder", "transformers", "CLIPTextModel"),
        "tokenizer": list(_NONE),
        "unet": comp("unet", "diffusers", "UNet2DConditionModel"),
        "vae": comp("vae", "diffusers", "AutoencoderKL"),
    }
    if family == "sdxl":
        out["text_encoder_2"] = comp("text_encoder_2", "transformers", "CLIPTextModelWithProjection")
        out["tokenizer_2"] = list(_NONE)
        out["force_zeros_for_empty_prompt"] = True
    else:
        out["safety_checker"] = list(_NONE)
        out["requires_safety_checker"] = False
    return out


def folder_configs(
    family: str,
    variant: str | None,
    shapes: Mapping[str, Shapes],
    dtypes: Mapping[str, str],
) -> dict[str, Json]:
    """Config files for a diffusers folder: ``relative path -> JSON object``.

    :param family: the family id; families without configs here (plugins) get none.
    :param shapes: subfolder -> (key -> shape) of the weights written there.
    :param dtypes: subfolder -> safetensors dtype of its first floating tensor.
    """
    out: dict[str, Json] = {}
    if family == "flux" and "transformer" in shapes:
        out["transformer/config.json"] = flux_transformer(shapes["transformer"])
    elif family == "zimage" and "transformer" in shapes:
        out["transformer/config.json"] = zimage_transformer(shapes["transformer"])
    elif family == "sd3":
        out.update(sd3_configs(shapes, dtypes))
    elif family in ("sd1", "sdxl"):
        present = set(shapes)
        if "unet" in shapes:
            out["unet/config.json"] = unet(shapes["unet"], family, variant)
            out["scheduler/scheduler_config.json"] = scheduler(family, variant)
            present.add("scheduler")
        if "vae" in shapes:
            out["vae/config.json"] = vae(shapes["vae"], family, variant)
        if "text_encoder" in shapes:
            out["text_encoder/config.json"] = clip_text(
                shapes["text_encoder"],
                openclip=variant == "sd2",
                projection_dim=512 if variant == "sd2" else 768,
                dtype=dtypes.get("text_encoder", "F32"),
            )
        if "text_encoder_2" in shapes:
            out["text_encoder_2/config.json"] = clip_text(
                shapes["text_encoder_2"],
                openclip=True,
                projection_dim=None,
                dtype=dtypes.get("text_encoder_2", "F32"),
            )
        out["model_index.json"] = model_index(family, present)
    return out
