"""``cache text`` for Z-Image: musubi-tuner's text-encoder cache, one safetensors file per image.

The format is musubi-tuner's (``zimage_cache_text_encoder_outputs.py`` and
``save_text_encoder_output_cache_z_image``):

- file ``<stem>_zi_te.safetensors`` in the dataset's ``cache_directory``, else next to the image;
- one tensor ``varlen_llm_embed_<dtype>``: the Qwen3 embedding of the caption's real tokens,
  ``(tokens, 2560)`` for Qwen3-4B (see :mod:`~lorasmith.ops.cache._qwen3`), in the compute dtype, whose
  name (``float32``, ``float16``, ``bfloat16``) ends the key; musubi-tuner itself computes in bfloat16;
- metadata ``architecture=z_image``, ``caption1=<caption>``, ``format_version=1.0.1``.

musubi-tuner reads the whole caption file, stripped (not only its first line as sd-scripts does).

A cache is *valid* when it loads, says ``architecture=z_image`` and the same caption, and holds exactly one
``varlen_llm_embed_*`` tensor of shape ``(tokens of this caption, width)``; any float dtype counts. Valid
caches are skipped; any other existing cache is replaced only with ``overwrite``. Writes are atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasmith.errors import InvalidFileError, LorasmithError, UsageError
from lorasmith.ops.cache._qwen3 import MAX_LENGTH, Qwen3Source, find_qwen3
from lorasmith.ops.cache.datasets import ImageGroup
from lorasmith.ops.cache.text import (
    TextCacheItem,
    TextCacheResult,
    TextFamily,
    TextJob,
    _write_atomic,
    load_tokenizer,
    plan_text_jobs,
    run_text_jobs,
)
from lorasmith.progress import ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    import torch

__all__ = ["EMBED_KEY", "cache_zimage_text", "zimage_sources"]

#: Key of the embedding, ``<dtype>`` appended (``varlen_llm_embed_bfloat16``).
EMBED_KEY = "varlen_llm_embed_"
_ARCHITECTURE = "z_image"
_FORMAT_VERSION = "1.0.1"
_FLOAT_NAMES = ("float32", "float16", "bfloat16")
_DEFAULT_CAPTION_EXTENSIONS = (".caption", ".txt")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from lorasmith.io.header import read_header

    return {k: tuple(t.shape) for k, t in read_header(path).tensors.items()}


def zimage_sources(model: Path | None, text_encoders: Sequence[Path]) -> Qwen3Source:
    """The Qwen3 weights: the ``--text-encoder`` files (shards read as one), else those inside ``model``.

    :raises UsageError: no Qwen3 weights given.
    :raises InvalidFileError: a ``--text-encoder`` file without Qwen3 tensors.
    """
    if text_encoders:
        found = find_qwen3([(p, _shapes(p)) for p in text_encoders])
        if found is None:
            raise InvalidFileError(
                f"{text_encoders[0]}: no Qwen3 text-encoder tensors "
                "(embed_tokens, layers.N.self_attn.q_norm)",
                hint="pass Z-Image's Qwen3 text encoder (qwen_3_4b.safetensors or its shards)",
            )
        return found
    if model is not None:
        found = find_qwen3([(model, _shapes(model))])
        if found is not None:
            return found
    where = f"{model} holds no Qwen3 text encoder" if model is not None else "no Qwen3 text encoder given"
    raise UsageError(
        f"zimage: {where}",
        hint="pass --text-encoder qwen_3_4b.safetensors (or every shard of a diffusers text_encoder/ folder)",
    )


def _valid(path: Path, caption: str, tokens: int, width: int | None) -> bool:
    from lorasmith.io.header import read_header

    try:
        header = read_header(path)
    except LorasmithError:
        return False
    meta = header.metadata
    if meta.get("architecture") != _ARCHITECTURE or meta.get("caption1") != caption:
        return False
    embeds = [t for name, t in header.tensors.items() if name.startswith(EMBED_KEY)]
    if len(embeds) != 1 or embeds[0].name[len(EMBED_KEY) :] not in _FLOAT_NAMES:
        return False
    return tuple(embeds[0].shape) == (tokens, width if width is not None else embeds[0].shape[-1])


def _plan(
    groups: Sequence[ImageGroup],
    family: TextFamily,
    tokenizer: Any,
    width: int | None,
    skip_existing: bool,
    overwrite: bool,
) -> tuple[list[TextCacheItem], list[TextJob]]:
    from lorasmith.ops.cache._qwen3 import token_counts

    def valid(existing: list[TextJob]) -> list[bool]:
        lengths = token_counts(tokenizer, [j.caption for j in existing])  # one tokenizer call for all
        return [_valid(j.cache, j.caption, n, width) for j, n in zip(existing, lengths, strict=True)]

    # musubi-tuner reads the whole caption file
    return plan_text_jobs(
        groups,
        family,
        valid,
        skip_existing,
        overwrite,
        first_line=False,
        dreambooth=False,
        mismatch="caption",
    )


def _dtype_name(t: torch.Tensor) -> str:
    # musubi-tuner names the tensor after its dtype: str(torch.bfloat16) -> "torch.bfloat16" -> "bfloat16"
    return str(t.dtype).rsplit(".", 1)[-1]


def _save(path: Path, embed: torch.Tensor, caption: str) -> None:
    from safetensors.torch import save_file

    tensors = {EMBED_KEY + _dtype_name(embed): embed.contiguous()}
    meta = {"architecture": _ARCHITECTURE, "caption1": caption, "format_version": _FORMAT_VERSION}
    _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def cache_zimage_text(
    family: TextFamily,
    model: Path | None,
    text_encoders: Sequence[Path],
    tokenizer_dir: Path,
    groups: Sequence[ImageGroup],
    *,
    batch_size: int,
    skip_existing: bool,
    overwrite: bool,
    device: str,
    dtype: str,
    progress: ProgressCallback,
) -> TextCacheResult:
    """Encode the captions of ``groups`` with Z-Image's Qwen3 into musubi-tuner's caches.

    :raises UsageError: no Qwen3 weights given.
    :raises InvalidFileError: unreadable weights or tokenizer.
    """
    source = zimage_sources(model, text_encoders)
    tokenizer = load_tokenizer(tokenizer_dir, family.slots[0], "--tokenizer")
    items, jobs = _plan(groups, family, tokenizer, source.width, skip_existing, overwrite)
    total = len(items)
    done = total - len(jobs)
    progress(ProgressEvent("encoding", done, total))
    if jobs:
        model_ = _build(source, tokenizer, device, dtype)
        from lorasmith.ops.cache._qwen3 import encode_captions

        run_text_jobs(
            jobs,
            batch_size,
            lambda captions: encode_captions(model_, tokenizer, captions, MAX_LENGTH),
            lambda job, embed: _save(job.cache, embed, job.caption),
            progress,
            done,
            total,
        )
    return TextCacheResult(
        arch=family.arch,
        cache_format=family.cache_format,
        encoders={"qwen3": source.describe()},
        images=total,
        written=sum(it.status == "written" for it in items),
        skipped=sum(it.status == "skipped" for it in items),
        failed=sum(it.status == "failed" for it in items),
        items=items,
    )


def _build(source: Qwen3Source, tokenizer: Any, device: str, dtype: str) -> Any:
    import torch

    from lorasmith.ops._device import compute_device
    from lorasmith.ops.cache._qwen3 import build_qwen3, load_qwen3_state

    dev = compute_device(device, error=UsageError)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    files = sorted({str(f) for f, _ in source.keys.values()})
    label = files[0] + (f" (+{len(files) - 1} shards)" if len(files) > 1 else "")
    model = build_qwen3(load_qwen3_state(source), token_ids=ids, source=label)
    return model.to(device=dev, dtype=tdt)
