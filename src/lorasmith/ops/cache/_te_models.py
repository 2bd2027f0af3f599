"""Text encoders for ``cache text``: find their weights, read their configuration off the shapes, build them.

Three weight forms are recognised, under any key prefix:

- **HF CLIP** (``<p>text_model.embeddings.token_embedding.weight``, optional ``<p>text_projection.weight``):
  CLIP-L everywhere, SDXL's CLIP-L (``conditioner.embedders.0.transformer.``), SD3's CLIP-L and CLIP-G
  (``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.``), ``clip_l.safetensors``;
- **OpenCLIP** (``<p>transformer.resblocks.0.attn.in_proj_weight`` with ``<p>token_embedding.weight``):
  SDXL's bigG (``conditioner.embedders.1.model.``), converted to HF CLIP names by rule: the fused
  ``attn.in_proj_{weight,bias}`` split in three row blocks q, k, v; ``ln_1``/``ln_2`` -> ``layer_norm1``/
  ``layer_norm2``; ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``; ``ln_final`` ->
  ``final_layer_norm``; ``positional_embedding`` -> ``position_embedding.weight``; ``text_projection``
  (``width x dim``, applied as ``x @ P``) -> ``text_projection.weight`` = its transpose;
- **HF T5 encoder** (``<p>encoder.block.0.layer.0.SelfAttention.q.weight``): SD3's
  ``text_encoders.t5xxl.transformer.``, ``t5xxl_fp16.safetensors``.

The configuration comes from the weight shapes (vocabulary, width, layers, MLP width, positions,
projection; T5: heads from the relative-attention table, key/value width, gated MLP). Two facts are not
visible in the weights: CLIP heads are ``width // 64`` (head width 64 in every released CLIP), and the
activation, which depends on the model's lineage: ``quick_gelu`` for OpenAI's CLIP-L, ``gelu`` for the
LAION OpenCLIP towers (bigG); the caller says which. The special-token ids come from the tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorasmith.errors import InvalidFileError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EncoderSource",
    "build_clip",
    "build_t5",
    "find_sources",
    "load_state",
    "openclip_to_hf",
]

Form = Literal["hf_clip", "openclip", "t5"]

_HF_CLIP_PROBE = "text_model.embeddings.token_embedding.weight"
_OPENCLIP_PROBE = "transformer.resblocks.0.attn.in_proj_weight"
_T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_HEAD_DIM = 64
# tensors a checkpoint carries that no transformers module has (training-time scalars, index buffers)
_IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "attn_mask")


@dataclass(frozen=True)
class EncoderSource:
    """Where one text encoder's weights are, and the sizes read off their shapes.

    :ivar file: the safetensors file.
    :ivar prefix: the key prefix of the encoder in that file.
    :ivar form: ``hf_clip``, ``openclip`` or ``t5``.
    :ivar width: hidden size.
    :ivar projection: projection width (CLIP with a text projection), else ``None``.
    :ivar positions: CLIP's position-embedding count (its token length, 77), else ``None``.
    """

    file: Path
    prefix: str
    form: Form
    width: int
    projection: int | None
    positions: int | None

    def describe(self) -> str:
        """One line: file, prefix, form and width."""
        where = f"{self.file.name}" + (f" [{self.prefix}]" if self.prefix else "")
        proj = f", projection {self.projection}" if self.projection else ""
        return f"{where}: {self.form}, width {self.width}{proj}"


def find_sources(file: Path, shapes: Mapping[str, tuple[int, ...]]) -> list[EncoderSource]:
    """Every text encoder in a file, from its key names and shapes (in key order of their probes)."""
    found: list[EncoderSource] = []
    for key, shape in shapes.items():
        if key.endswith(_HF_CLIP_PROBE):
            p = key[: -len(_HF_CLIP_PROBE)]
            proj = shapes.get(p + "text_projection.weight")
            pos = shapes.get(p + "text_model.embeddings.position_embedding.weight")
            found.append(
                EncoderSource(
                    file, p, "hf_clip", shape[1], proj[0] if proj else None, pos[0] if pos else None
                )
            )
        elif key.endswith(_OPENCLIP_PROBE):
            p = key[: -len(_OPENCLIP_PROBE)]
            tok = shapes.get(p + "token_embedding.weight")
            if tok is None:
                continue
            proj = shapes.get(p + "text_projection")
            pos = shapes.get(p + "positional_embedding")
            found.append(
                EncoderSource(file, p, "openclip", tok[1], proj[1] if proj else None, pos[0] if pos else None)
            )
        elif key.endswith(_T5_PROBE):
            p = key[: -len(_T5_PROBE)]
            emb = shapes.get(p + "shared.weight") or shapes.get(p + "encoder.embed_tokens.weight")
            found.append(EncoderSource(file, p, "t5", emb[1] if emb else shape[1], None, None))
    return found


def load_state(source: EncoderSource) -> dict[str, torch.Tensor]:
    """The encoder's tensors, keys relative to its prefix (OpenCLIP converted to HF CLIP names)."""
    from lorasmith.io.header import read_header
    from lorasmith.io.reader import open_tensors

    header = read_header(source.file)
    names = [k for k in header.tensors if k.startswith(source.prefix)]
    with open_tensors(source.file) as f:
        state = {k[len(source.prefix) :]: f.get(k) for k in names}
    if source.form == "openclip":
        return openclip_to_hf(state, str(source.file))
    return state


_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")


def openclip_to_hf(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (keys relative to the tower) under HF CLIP names (with projection).

    :raises InvalidFileError: a tensor that has no HF counterpart.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        m = _RESBLOCK.match(key)
        if m is not None:
            layer = f"text_model.encoder.layers.{m.group(1)}."
            module, kind = m.group(2), m.group(3)
            if module == "attn.in_proj":
                # the fused projection stacks the q, k and v rows in that order
                width = value.shape[0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{layer}self_attn.{proj}.{kind}"] = value[i * width : (i + 1) * width]
                continue
            if module in _OPENCLIP_LAYER:
                out[f"{layer}{_OPENCLIP_LAYER[module]}.{kind}"] = value
                continue
        elif key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
            continue
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
            continue
        elif key in ("ln_final.weight", "ln_final.bias"):
            out["text_model.final_layer_norm." + key.split(".")[-1]] = value
            continue
        elif key == "text_projection":
            # OpenCLIP applies x @ P; a Linear applies x @ W.T, so W = P.T
            out["text_projection.weight"] = value.t().contiguous()
            continue
        raise InvalidFileError(
            f"{source}: OpenCLIP text tensor {key!r} has no HF CLIP counterpart",
            hint="the text tower must have the OpenCLIP ViT structure (SDXL's bigG)",
        )
    return out


def _quiet_transformers() -> Any:
    """Silence transformers' informational warnings while a model is built (restored by the caller)."""
    import logging

    from transformers.utils import logging as tlogging

    level = tlogging.get_verbosity()
    tlogging.set_verbosity(logging.ERROR)
    return level


def _restore_transformers(level: Any) -> None:
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity(level)


def _count(state: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def assign_state(model: Any, state: dict[str, torch.Tensor], source: str, what: str, hint: str) -> None:
    """Give a model built on the meta device the tensors of ``state`` (no random init, no copy).

    :raises InvalidFileError: keys missing or unexpected (counted, the first one named, with ``hint``), or
        a shape that does not fit.
    """
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise InvalidFileError(
            f"{source}: the {what} weights do not fit ({len(missing)} missing, {len(unexpected)} unexpected; "
            f"first: {first})",
            hint=hint,
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        line = str(exc).strip().splitlines()[0][:200]
        raise InvalidFileError(f"{source}: the {what} weights do not fit ({line})") from exc


def _materialize(model: Any, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state`` into a model built on the meta device (no random init, no copy of the weights)."""
    import torch

    expected = set(model.state_dict())
    if "text_model.embeddings.token_embedding.weight" not in expected:
        # transformers 5's CLIPTextModel has no ``text_model.`` level; the files have it
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or k.split(".")[-1] not in ("position_ids",)}
    assign_state(model, state, source, what, hint=f"pass a complete {what} (HF/ComfyUI layout)")
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise InvalidFileError(f"{source}: {what} buffer {name!r} has no value")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            # the only non-persistent buffer of CLIP: the token positions 0..P-1
            owner.register_buffer(
                "position_ids", torch.arange(buf.shape[-1]).expand((1, -1)), persistent=False
            )


def build_clip(
    state: dict[str, torch.Tensor],
    *,
    activation: str,
    projection: bool,
    token_ids: Mapping[str, int | None],
    source: str,
) -> Any:
    """A ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) holding ``state`` (HF CLIP names), eval mode.

    :param activation: ``quick_gelu`` (OpenAI CLIP-L) or ``gelu`` (LAION OpenCLIP).
    :param projection: build the model with its text projection (needs ``text_projection.weight``).
    :param token_ids: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the tokenizer.
    :raises InvalidFileError: weights that do not make a CLIP text model.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = {k: v for k, v in state.items() if k not in _IGNORED}
    tok = state.get("text_model.embeddings.token_embedding.weight")
    pos = state.get("text_model.embeddings.position_embedding.weight")
    fc1 = state.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if tok is None or pos is None or fc1 is None:
        raise InvalidFileError(f"{source}: incomplete CLIP text encoder (embeddings or layer 0 missing)")
    width = int(tok.shape[1])
    proj = state.get("text_projection.weight")
    if projection and proj is None:
        raise InvalidFileError(
            f"{source}: this CLIP text encoder has no text_projection.weight, which this family needs",
            hint="pass the encoder file that includes its projection",
        )
    if not projection:
        state.pop("text_projection.weight", None)
    ids: dict[str, Any] = {k: v for k, v in token_ids.items() if v is not None}
    config = CLIPTextConfig(
        vocab_size=int(tok.shape[0]),
        hidden_size=width,
        intermediate_size=int(fc1.shape[0]),
        projection_dim=int(proj.shape[0]) if proj is not None else width,
        num_hidden_layers=_count(state, r"^text_model\.encoder\.layers\.(\d+)\."),
        # every released CLIP uses 64-wide heads
        num_attention_heads=max(1, width // _CLIP_HEAD_DIM),
        max_position_embeddings=int(pos.shape[0]),
        hidden_act=activation,
        layer_norm_eps=1e-5,
        **ids,
    )
    cls: Any = CLIPTextModelWithProjection if projection else CLIPTextModel
    level = _quiet_transformers()
    try:
        with torch.device("meta"):
            model = cls(config)
        _materialize(model, state, source, "CLIP text encoder")
    finally:
        _restore_transformers(level)
    return model.eval()


def build_t5(state: dict[str, torch.Tensor], *, token_ids: Mapping[str, int | None], source: str) -> Any:
    """A ``T5EncoderModel`` holding ``state`` (HF T5 names), eval mode.

    :raises InvalidFileError: weights that do not make a T5 encoder.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    state = {k: v for k, v in state.items() if k not in _IGNORED}
    # the token table is shared between ``shared`` and the encoder; files keep one or both
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    emb = state.get("shared.weight")
    rel = state.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = state.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wo = state.get("encoder.block.0.layer.1.DenseReluDense.wo.weight")
    if emb is None or rel is None or q is None or wo is None:
        raise InvalidFileError(f"{source}: incomplete T5 encoder (embeddings or block 0 missing)")
    heads = int(rel.shape[1])
    ids: dict[str, Any] = {k: v for k, v in token_ids.items() if v is not None}
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    config = T5Config(
        vocab_size=int(emb.shape[0]),
        d_model=int(emb.shape[1]),
        d_kv=int(q.shape[0]) // heads,
        d_ff=int(wo.shape[1]),
        num_layers=_count(state, r"^encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=int(rel.shape[0]),
        # T5 v1.1 (the diffusion models' T5-XXL) uses a gated GELU MLP; the original T5 a plain ReLU one
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        **ids,
    )
    level = _quiet_transformers()
    try:
        with torch.device("meta"):
            model: Any = T5EncoderModel(config)
        _materialize(model, state, source, "T5 encoder")
    finally:
        _restore_transformers(level)
    return model.eval()
