"""Write ``src/lorasmith_qwenimage/data/qwen-image.json.gz`` from the public Qwen-Image config.

Source of the numbers: ``Qwen/Qwen-Image`` ``transformer/config.json`` (diffusers
``QwenImageTransformer2DModel``): ``num_layers=60``, ``num_attention_heads=24``, ``attention_head_dim=128``,
``joint_attention_dim=3584``, ``in_channels=64``, ``out_channels=16``, ``patch_size=2``. The module tree
(names and which layers carry a bias) is the diffusers model's; ComfyUI's repackaged single file
(``qwen_image_bf16.safetensors``) uses the very same names. Weights are released in bfloat16.

Run it from the plugin folder: ``python scripts/build_inventory.py``. The output is deterministic.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

#: ``transformer/config.json`` of Qwen/Qwen-Image (the values the shapes derive from).
CONFIG: dict[str, Any] = {
    "num_layers": 60,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "joint_attention_dim": 3584,
    "in_channels": 64,
    "out_channels": 16,
    "patch_size": 2,
}
#: diffusers ``Timesteps(num_channels=256)`` feeds the timestep embedder.
TIME_PROJ_DIM = 256
DTYPE = "BF16"
#: The joint attention's projections (image stream, text stream ``add_*``, both outputs).
_ATTN = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
OUT = Path(__file__).resolve().parent.parent / "src" / "lorasmith_qwenimage" / "data"


def tensors(cfg: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """Every tensor of the transformer: key -> (shape, dtype)."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]  # inner_dim, 3072
    head = cfg["attention_head_dim"]
    txt = cfg["joint_attention_dim"]
    out: dict[str, tuple[list[int], str]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        # every Linear of this model has a bias
        out[f"{name}.weight"] = ([n_out, n_in], DTYPE)
        out[f"{name}.bias"] = ([n_out], DTYPE)

    linear("img_in", dim, cfg["in_channels"])
    out["txt_norm.weight"] = ([txt], DTYPE)  # RMSNorm over the Qwen2.5-VL hidden states
    linear("txt_in", dim, txt)
    linear("time_text_embed.timestep_embedder.linear_1", dim, TIME_PROJ_DIM)
    linear("time_text_embed.timestep_embedder.linear_2", dim, dim)
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        for stream in ("img", "txt"):
            # nn.Sequential(SiLU, Linear(dim, 6*dim)): shift/scale/gate for both norms
            linear(f"{b}{stream}_mod.1", 6 * dim, dim)
            # FeedForward(gelu-approximate, mult 4): net.0.proj then net.2
            linear(f"{b}{stream}_mlp.net.0.proj", 4 * dim, dim)
            linear(f"{b}{stream}_mlp.net.2", dim, 4 * dim)
        for proj in _ATTN:
            linear(f"{b}attn.{proj}", dim, dim)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            out[f"{b}attn.{norm}.weight"] = ([head], DTYPE)  # per-head RMSNorm
    # AdaLayerNormContinuous(dim, dim): scale and shift
    linear("norm_out.linear", 2 * dim, dim)
    linear("proj_out", cfg["patch_size"] ** 2 * cfg["out_channels"], dim)
    return out


def inventory() -> dict[str, Any]:
    """The inventory JSON (the format of ``lorasmith.archs.base.Inventory.from_json``)."""
    return {
        "id": "qwen-image",
        "family": "qwenimage",
        "variant": "qwen-image",
        "layout": "diffusers",
        "canonical": True,
        "components": {"transformer": ""},
        "optional": [],
        "description": "Qwen-Image (20B MMDiT) transformer: diffusers transformer/ shards and ComfyUI's "
        "qwen_image_bf16.safetensors (same key names)",
        "tensors": dict(sorted(tensors(CONFIG).items())),
    }


def main() -> None:
    """Write the data file."""
    OUT.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(inventory(), sort_keys=True, separators=(",", ":")).encode()
    with open(OUT / "qwen-image.json.gz", "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(raw)


if __name__ == "__main__":
    main()
