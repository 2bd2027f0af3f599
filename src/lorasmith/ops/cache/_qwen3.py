"""Z-Image's text encoder for ``cache text``: find the Qwen3 weights, build the model, encode captions.

Z-Image conditions on Qwen3-4B (``Qwen3Model``; ComfyUI's ``qwen_3_4b.safetensors`` holds it under
``model.``, a diffusers ``text_encoder/`` folder in shards, with or without ``model.``). The weights are
found under any key prefix ``<p>`` by ``<p>embed_tokens.weight`` or a decoder-layer tensor
``<p>layers.N.{self_attn,mlp,input_layernorm,post_attention_layernorm}...`` (Qwen3's names, which the
Z-Image DiT does not use); several files (the shards of one model, cut anywhere) are read as one, and
``q_norm`` (what tells Qwen3 from Qwen2) must be among them. ``lm_head.weight`` is never needed: only
hidden states are used.

The configuration comes from the shapes: vocabulary and width (token table), layers, MLP width
(``gate_proj``), head width (``q_norm``), query and key/value heads (``q_proj`` / ``k_proj`` rows over the
head width), attention bias (``q_proj.bias``). Not visible in the weights and taken from Qwen3-4B's
published config: RMS-norm epsilon ``1e-6``, RoPE base ``1e6``, 40960 positions, SiLU.

How musubi-tuner (``zimage_utils.get_text_embeds``) and diffusers (``ZImagePipeline._encode_prompt``)
encode a caption, and so how this module does:

1. the caption becomes the single user turn of the tokenizer's chat template, with the generation prompt
   and ``enable_thinking=True`` (which, for Qwen3, adds no ``<think>`` block):
   ``<|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n``; a tokenizer without a chat
   template gets exactly this string (ComfyUI's Z-Image template);
2. tokens padded on the right to 512 and truncated there (``max_length``);
3. the model runs with the attention mask, and the *second-to-last* hidden state
   (``hidden_states[-2]``) is the embedding;
4. each caption keeps only its real tokens (the mask's count), so the result is ``(tokens, width)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasmith.errors import InvalidFileError
from lorasmith.ops.cache._te_models import assign_state

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_LENGTH",
    "Qwen3Source",
    "build_qwen3",
    "chat_prompt",
    "encode_captions",
    "find_qwen3",
    "load_qwen3_state",
    "token_counts",
]

#: Token length of musubi-tuner's and diffusers' Z-Image prompts (``DEFAULT_MAX_SEQUENCE_LENGTH``).
MAX_LENGTH = 512
#: The Qwen3 chat template's output for one user turn plus the generation prompt, with thinking enabled.
QWEN3_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

_PROBE = re.compile(
    r"^(.*?)(?:embed_tokens\.weight|layers\.\d+\.(?:self_attn\.(?:[qkvo]_proj|[qk]_norm)|"
    r"mlp\.(?:gate|up|down)_proj|input_layernorm|post_attention_layernorm)\.(?:weight|bias))$"
)
_OWN = re.compile(r"^(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# Qwen3-4B's config.json values that the weights do not show
_RMS_EPS = 1e-6
_ROPE_THETA = 1_000_000.0
_POSITIONS = 40960


@dataclass(frozen=True)
class Qwen3Source:
    """Where the Qwen3 text encoder's tensors are.

    :ivar keys: key relative to the model (``layers.0.mlp.up_proj.weight``) -> (file, key in that file).
    :ivar width: hidden size (``None`` until the token table is seen).
    """

    keys: Mapping[str, tuple[Path, str]]
    width: int | None

    def describe(self) -> str:
        """One line: files, tensor count, width."""
        files = sorted({f.name for f, _ in self.keys.values()})
        shown = ", ".join(files[:3]) + (f" (+{len(files) - 3})" if len(files) > 3 else "")
        return f"{shown}: qwen3, {len(self.keys)} tensors, width {self.width}"


def _prefix(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    for key in shapes:
        m = _PROBE.match(key)
        if m is not None:
            return m.group(1)
    return None


def find_qwen3(files: Sequence[tuple[Path, Mapping[str, tuple[int, ...]]]]) -> Qwen3Source | None:
    """The Qwen3 tensors of ``files`` (path, key -> shape), read as one model; ``None`` when none has any.

    :raises InvalidFileError: a given file that holds no Qwen3 tensors while another does, or a tensor
        found in two files.
    """
    keys: dict[str, tuple[Path, str]] = {}
    width: int | None = None
    empty: list[Path] = []
    for path, shapes in files:
        prefix = _prefix(shapes)
        if prefix is None:
            empty.append(path)
            continue
        for key, shape in shapes.items():
            if not key.startswith(prefix):
                continue
            rel = key[len(prefix) :]
            if not _OWN.match(rel):
                continue
            if rel in keys:
                raise InvalidFileError(
                    f"{path}: Qwen3 tensor {rel!r} is also in {keys[rel][0]}",
                    hint="pass each shard of the text encoder once",
                )
            keys[rel] = (path, key)
            if rel == "embed_tokens.weight":
                width = int(shape[1])
    if not keys:
        return None
    if not any(k.endswith("self_attn.q_norm.weight") for k in keys):
        first = next(iter(keys.values()))[0]
        raise InvalidFileError(
            f"{first}: a decoder without q_norm / k_norm, not Qwen3 (Qwen2 or another LLM?)",
            hint="pass Z-Image's Qwen3 text encoder (qwen_3_4b.safetensors or its shards)",
        )
    if empty:
        raise InvalidFileError(
            f"{empty[0]}: no Qwen3 text-encoder tensors (embed_tokens, layers.N.self_attn.q_norm)",
            hint="pass Z-Image's Qwen3 text encoder (qwen_3_4b.safetensors or its shards)",
        )
    return Qwen3Source(keys, width)


def load_qwen3_state(source: Qwen3Source) -> dict[str, torch.Tensor]:
    """The Qwen3 tensors, keys relative to the model (``Qwen3Model`` names)."""
    from lorasmith.io.reader import open_tensors

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for rel, (path, key) in source.keys.items():
        by_file.setdefault(path, []).append((rel, key))
    state: dict[str, torch.Tensor] = {}
    for path, pairs in by_file.items():
        with open_tensors(path) as f:
            for rel, key in pairs:
                state[rel] = f.get(key)
    return state


def _count_layers(state: Mapping[str, Any]) -> int:
    found = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    return max(found) + 1 if found else 0


def build_qwen3(state: dict[str, torch.Tensor], *, token_ids: Mapping[str, int | None], source: str) -> Any:
    """A transformers ``Qwen3Model`` holding ``state``, eval mode, on the CPU in the weights' dtype.

    :raises InvalidFileError: weights that do not make a Qwen3 model.
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from lorasmith.ops.cache._te_models import _quiet_transformers, _restore_transformers

    emb = state.get("embed_tokens.weight")
    q = state.get("layers.0.self_attn.q_proj.weight")
    k = state.get("layers.0.self_attn.k_proj.weight")
    qn = state.get("layers.0.self_attn.q_norm.weight")
    gate = state.get("layers.0.mlp.gate_proj.weight")
    if emb is None or q is None or k is None or qn is None or gate is None:
        raise InvalidFileError(
            f"{source}: incomplete Qwen3 text encoder (token table or layer 0 missing)",
            hint="pass every shard of the text encoder with --text-encoder",
        )
    head = int(qn.shape[0])
    settings: dict[str, Any] = {k_: v for k_, v in token_ids.items() if v is not None}
    # rope_theta is a keyword of transformers 4; transformers 5 folds it into rope_parameters
    settings.update(
        vocab_size=int(emb.shape[0]),
        hidden_size=int(emb.shape[1]),
        intermediate_size=int(gate.shape[0]),
        num_hidden_layers=_count_layers(state),
        num_attention_heads=int(q.shape[0]) // head,
        num_key_value_heads=int(k.shape[0]) // head,
        head_dim=head,
        attention_bias="layers.0.self_attn.q_proj.bias" in state,
        rms_norm_eps=_RMS_EPS,
        rope_theta=_ROPE_THETA,
        max_position_embeddings=_POSITIONS,
        hidden_act="silu",
        tie_word_embeddings=True,
        use_cache=False,
    )
    config = Qwen3Config(**settings)
    level = _quiet_transformers()
    try:
        with torch.device("meta"):
            model: Any = Qwen3Model(config)
        assign_state(model, state, source, "Qwen3", hint="pass the complete Qwen3 text encoder (every shard)")
        # the rotary table is a non-persistent buffer, left on the meta device: compute it for real
        model.rotary_emb = type(model.rotary_emb)(config=model.config)
    finally:
        _restore_transformers(level)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InvalidFileError(f"{source}: Qwen3 tensor {left[0]!r} has no value")
    return model.eval()


def chat_prompt(tokenizer: Any, caption: str) -> str:
    """``caption`` as the single user turn of the chat template, generation prompt added, thinking on."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        return str(text)
    return QWEN3_PROMPT.format(caption)


def _tokenize(tokenizer: Any, captions: Sequence[str], max_length: int) -> tuple[Any, Any]:
    # right padding: the trainers keep the first ``mask.sum()`` positions of each row
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        # the padded positions are masked and then dropped, so any id serves
        tokenizer.pad_token = tokenizer.eos_token
    out = tokenizer(
        [chat_prompt(tokenizer, c) for c in captions],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    return out["input_ids"], out["attention_mask"]


def token_counts(tokenizer: Any, captions: Sequence[str], max_length: int = MAX_LENGTH) -> list[int]:
    """How many tokens each caption's prompt has (at most ``max_length``): its cached embedding length."""
    if not captions:
        return []
    _, mask = _tokenize(tokenizer, captions, max_length)
    return [int(n) for n in mask.sum(dim=1).tolist()]


def encode_captions(
    model: Any, tokenizer: Any, captions: Sequence[str], max_length: int = MAX_LENGTH
) -> list[torch.Tensor]:
    """Per caption, the second-to-last hidden state of its real tokens: ``(tokens, width)``, on the CPU."""
    import torch

    ids, mask = _tokenize(tokenizer, captions, max_length)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev).bool(), output_hidden_states=True)
    hidden = out.hidden_states[-2].detach().cpu()
    return [hidden[i, : int(mask[i].sum())].contiguous() for i in range(len(captions))]
