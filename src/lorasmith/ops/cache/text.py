"""``cache text``: text-encoder outputs of the training captions, in the files the trainers read.

One call, :func:`cache_text`: find the images (a folder or a dataset TOML), read each caption, skip the
images whose cache is already valid, encode the rest in batches, and write one ``.npz`` per image next
to it (or in the TOML's ``cache_directory``). The formats are sd-scripts' (``library/strategy_*.py``):

- SDXL, ``<stem>_te_outputs.npz``: ``hidden_state1`` (77, 768), CLIP-L's penultimate layer;
  ``hidden_state2`` (77, 1280), bigG's penultimate layer; ``pool2`` (1280,), bigG's text projection of
  its final-norm state at the first EOS token;
- FLUX, ``<stem>_flux_te.npz``: ``l_pooled`` (768,), CLIP-L's pooler output (final-norm state at the
  EOS, no projection); ``t5_out`` (T, 4096), T5's last state; ``txt_ids`` (T, 3) float32 zeros;
  ``t5_attn_mask`` (T,) int64; ``apply_t5_attn_mask`` (bool);
- SD3, ``<stem>_sd3_te.npz``: ``lg_out`` (77, 2048), CLIP-L's and CLIP-G's penultimate layers side by
  side; ``lg_pooled`` (2048,), both projected poolings side by side; ``t5_out`` (T, 4096);
  ``clip_l_attn_mask``, ``clip_g_attn_mask`` (77,) and ``t5_attn_mask`` (T,) int64;
  ``apply_lg_attn_mask``, ``apply_t5_attn_mask`` (bool);
- Z-Image, musubi-tuner's ``<stem>_zi_te.safetensors``: ``varlen_llm_embed_<dtype>`` (tokens, 2560), the
  Qwen3 embedding of the chat-templated caption (:mod:`~lorasmith.ops.cache._text_zimage`).

``T`` is the T5 token length: 512 for FLUX dev, 256 for FLUX schnell and SD3 (``t5_max_length``). SDXL
captions may be 150 or 225 tokens long (``max_token_length``): split into 77-token windows, encoded one by
one and joined into ``(152 or 227, width)`` states as sd-scripts does (:func:`chunk_token_ids`).
With ``weighted_captions`` SDXL captions are read with sd-scripts' attention syntax (``(word:1.3)``,
:mod:`~lorasmith.ops.cache.weighting`) and each state is multiplied by its token's weight, as sd-scripts'
weighted caching does (:func:`_encode_sdxl`).
Tokens are padded to the full length (``padding="max_length"``, truncated); SDXL's and SD3's CLIP-G
tokenizer pads with id 0, as sd-scripts sets it. The attention masks are only *applied* in the encoders
when ``apply_t5_attn_mask`` / ``apply_lg_attn_mask`` ask for it (the trainers' flags of the same names;
a cache is valid for a run only with the same flags). Float outputs are float32, or float16 when the
encoders run in float16 (sd-scripts converts only bfloat16).

Captions are those sd-scripts' DreamBooth dataset encodes (:func:`read_caption`): ``<stem><ext>`` next to
the image, its first line stripped (every non-empty line with ``enable_wildcard``; the face-crop name
``<name>_x_y_w_h`` also looks for ``<name><ext>``), else the subset's ``class_tokens`` (or those of a
``<repeats>_<class tokens>`` folder). For Z-Image the whole file, as musubi-tuner reads it, and no class
tokens. A fine-tuning subset's captions are its metadata file's ``caption`` and ``tags``, joined as
sd-scripts joins them (:func:`~lorasmith.ops.cache.datasets.metadata_caption`); musubi-tuner has no such
subsets. Without an extension set, ``.caption`` then ``.txt`` are tried. A missing, empty or undecodable
caption is reported for that image and the run goes on. Dataset settings under which sd-scripts refuses to
cache text-encoder outputs (``shuffle_caption``, caption dropout, token warm-up) stop the run first
(:func:`~lorasmith.ops.cache.datasets.check_cacheable`).

A cache is *valid* when it loads, holds every key with the expected shape, and records the same mask
flags. Valid caches are skipped (``skip_existing``); any other existing cache is replaced only with
``overwrite``. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from lorasmith.errors import InvalidFileError, LorasmithError, UsageError
from lorasmith.ops.cache._te_models import EncoderSource, find_sources
from lorasmith.ops.cache.datasets import (
    ImageGroup,
    Settings,
    check_cacheable,
    check_max_token_length,
    folder_groups,
    load_dataset_config,
    refuse_metadata,
)
from lorasmith.ops.cache.weighting import parse_attention, weighted_token_ids
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "TEXT_FAMILIES",
    "Slot",
    "TextCacheItem",
    "TextCacheResult",
    "TextFamily",
    "cache_text",
    "chunk_token_ids",
    "load_tokenizer",
    "read_caption",
    "text_cache_path",
]

_DTYPES = ("float32", "float16", "bfloat16")
_DEFAULT_CAPTION_EXTENSIONS = (".caption", ".txt")
_DIFFUSERS_TOKENIZER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass(frozen=True)
class Slot:
    """One text encoder of a family.

    :ivar name: ``clip_l``, ``clip_g``, ``t5xxl`` or ``qwen3``.
    :ivar kind: ``clip``, ``t5`` or ``qwen3``.
    :ivar activation: CLIP activation (``quick_gelu`` for OpenAI CLIP-L, ``gelu`` for LAION bigG).
    :ivar projection: the family uses the CLIP text projection.
    :ivar pad_zero: pad with token id 0 (sd-scripts' CLIP-G tokenizer), not the tokenizer's pad token.
    :ivar tokenizer_hint: which tokenizer this slot takes, for error hints.
    """

    name: str
    kind: Literal["clip", "t5", "qwen3"]
    activation: str = "quick_gelu"
    projection: bool = False
    pad_zero: bool = False
    tokenizer_hint: str = ""


@dataclass(frozen=True)
class TextFamily:
    """How one family's text-encoder cache is named and which encoders fill it.

    :ivar arch: the family id.
    :ivar suffix: what replaces the image extension in the cache file name.
    :ivar slots: the encoders, in ``--tokenizer``, ``--tokenizer2``, ``--tokenizer3`` order.
    :ivar bundled: slot -> key prefix of that encoder inside the family's single-file checkpoint.
    :ivar t5_length: default T5 token length (``None``: no T5).
    :ivar cache_format: ``sd-scripts npz`` or ``musubi-tuner safetensors``.
    """

    arch: str
    suffix: str
    slots: tuple[Slot, ...]
    bundled: dict[str, str]
    t5_length: int | None = None
    cache_format: str = "sd-scripts npz"


_CLIP_L_HINT = "the CLIP-L tokenizer (openai/clip-vit-large-patch14: vocab.json + merges.txt)"
_CLIP_G_HINT = "the CLIP-G tokenizer (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k; CLIP-L's works the same)"
_T5_HINT = "the T5-XXL tokenizer (google/t5-v1_1-xxl: tokenizer.json or spiece.model)"
_QWEN3_HINT = (
    "Z-Image's Qwen3 tokenizer (the tokenizer/ folder of Tongyi-MAI/Z-Image: tokenizer.json + "
    "tokenizer_config.json)"
)

TEXT_FAMILIES: dict[str, TextFamily] = {
    "sdxl": TextFamily(
        "sdxl",
        "_te_outputs.npz",
        (
            Slot("clip_l", "clip", tokenizer_hint=_CLIP_L_HINT),
            Slot("clip_g", "clip", "gelu", projection=True, pad_zero=True, tokenizer_hint=_CLIP_G_HINT),
        ),
        {"clip_l": "conditioner.embedders.0.transformer.", "clip_g": "conditioner.embedders.1.model."},
    ),
    "flux": TextFamily(
        "flux",
        "_flux_te.npz",
        (Slot("clip_l", "clip", tokenizer_hint=_CLIP_L_HINT), Slot("t5xxl", "t5", tokenizer_hint=_T5_HINT)),
        {},
        t5_length=512,
    ),
    "sd3": TextFamily(
        "sd3",
        "_sd3_te.npz",
        (
            Slot("clip_l", "clip", projection=True, tokenizer_hint=_CLIP_L_HINT),
            Slot("clip_g", "clip", "gelu", projection=True, pad_zero=True, tokenizer_hint=_CLIP_G_HINT),
            Slot("t5xxl", "t5", tokenizer_hint=_T5_HINT),
        ),
        {
            "clip_l": "text_encoders.clip_l.transformer.",
            "clip_g": "text_encoders.clip_g.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer.",
        },
        t5_length=256,
    ),
    "zimage": TextFamily(
        "zimage",
        "_zi_te.safetensors",
        (Slot("qwen3", "qwen3", tokenizer_hint=_QWEN3_HINT),),
        {},
        cache_format="musubi-tuner safetensors",
    ),
}


class TextCacheItem(BaseModel):
    """One image, its caption and its cache file.

    :ivar image: the image file.
    :ivar caption_file: the caption file read, or a fine-tuning subset's metadata file (``None`` when none
        was found, or the class tokens were used).
    :ivar caption: the caption encoded.
    :ivar from_class_tokens: the caption is the class tokens (no caption file; DreamBooth).
    :ivar cache: the cache file.
    :ivar status: ``written``, ``skipped`` (a valid cache was there) or ``failed``.
    :ivar error: why it failed.
    """

    image: str
    caption_file: str | None = None
    caption: str | None = None
    from_class_tokens: bool = False
    cache: str | None = None
    status: Literal["written", "skipped", "failed"]
    error: str | None = None


class TextCacheResult(BaseModel):
    """What :func:`cache_text` did.

    :ivar arch: the family.
    :ivar cache_format: ``sd-scripts npz`` or ``musubi-tuner safetensors`` (Z-Image).
    :ivar encoders: slot -> where its weights came from.
    :ivar t5_max_length: the T5 token length (``None`` without T5).
    :ivar max_token_length: SDXL's caption length without BOS/EOS, 150 or 225 (``None``: 75).
    :ivar weighted_captions: SDXL captions were read with the attention syntax and their token states
        weighted (sd-scripts' ``--weighted_captions``).
    :ivar apply_t5_attn_mask: the T5 attention mask was applied.
    :ivar apply_lg_attn_mask: the CLIP attention masks were applied (SD3).
    :ivar images: images found.
    :ivar written: caches written.
    :ivar skipped: valid caches left as they were.
    :ivar failed: images that failed.
    :ivar items: every image.
    """

    arch: str
    cache_format: str
    encoders: dict[str, str] = Field(default_factory=dict)
    t5_max_length: int | None = None
    max_token_length: int | None = None
    weighted_captions: bool = False
    apply_t5_attn_mask: bool = False
    apply_lg_attn_mask: bool = False
    images: int
    written: int
    skipped: int
    failed: int
    items: list[TextCacheItem] = Field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    t5_length: int | None
    apply_t5: bool
    apply_lg: bool
    max_token_length: int | None = None
    weighted: bool = False


@dataclass
class TextJob:
    """One image whose text-encoder outputs are to be written."""

    image: Path
    cache: Path
    caption: str
    item: TextCacheItem


# --------------------------------------------------------------------------------------------- helpers
def text_cache_path(image: Path, family: TextFamily, cache_dir: Path | None = None) -> Path:
    """The trainer's text-encoder cache file of ``image``: its path less the extension, plus the suffix."""
    folder = cache_dir if cache_dir is not None else image.parent
    return folder / f"{image.stem}{family.suffix}"


def _caption_files(image: Path, extensions: Sequence[str], face_crop_names: bool) -> list[Path]:
    """Where a caption may be: ``<stem><ext>`` for each extension, and (sd-scripts) the name without the
    four ``_``-separated face-crop numbers of ``<name>_<x>_<y>_<w>_<h>.png``."""
    base = str(image.with_suffix(""))
    tokens = base.split("_")
    found: list[Path] = []
    for ext in extensions:
        found.append(Path(base + ext))
        # sd-scripts splits the whole path, so any five "_"-separated parts count, as there
        if face_crop_names and len(tokens) >= 5:
            found.append(Path("_".join(tokens[:-4]) + ext))
    return found


def read_caption(
    image: Path,
    extensions: Sequence[str],
    first_line: bool = True,
    *,
    class_tokens: str | None = None,
    face_crop_names: bool = False,
    wildcard: bool = False,
) -> tuple[Path | None, str]:
    """The caption of ``image`` and the file it came from (``None``: the class tokens).

    The first caption file that exists (:func:`_caption_files`) gives the caption: its first line,
    stripped (sd-scripts); with ``wildcard`` every non-empty line, stripped and joined by newlines
    (sd-scripts' ``enable_wildcard``); with ``first_line=False`` the whole file, stripped (musubi-tuner).
    Without a caption file, ``class_tokens`` (sd-scripts' DreamBooth rule), when given.

    :raises InvalidFileError: no caption file and no class tokens, an empty caption, or a file that is
        not UTF-8. (The trainer encodes an image it finds no cache for itself, so an image refused here
        still trains on what the trainer reads.)
    """
    for path in _caption_files(image, extensions, face_crop_names):
        if not path.is_file():
            continue
        try:
            # universal newlines and readlines(), as sd-scripts reads the file
            with path.open("r", encoding="utf-8") as fh:
                lines = fh.readlines()
        except UnicodeDecodeError as exc:
            raise InvalidFileError(f"{path}: caption is not UTF-8 text", hint="save it as UTF-8") from exc
        except OSError as exc:
            raise InvalidFileError(f"{path}: cannot read the caption ({exc.strerror or exc})") from exc
        if wildcard:
            caption = "\n".join(line.strip() for line in lines if line.strip())
        elif first_line:
            caption = lines[0].strip() if lines else ""
        else:
            caption = "".join(lines).strip()
        if not caption:
            raise InvalidFileError(
                f"{path}: the caption file is empty", hint="write the caption on its first line"
            )
        return path, caption
    if class_tokens:
        return None, class_tokens
    tried = " or ".join(image.stem + e for e in extensions)
    if class_tokens is not None:
        raise InvalidFileError(
            f"{image}: no caption file ({tried}) and the class tokens are empty",
            hint="write a caption file next to the image, or set class_tokens",
        )
    raise InvalidFileError(
        f"{image}: no caption file ({tried})",
        hint="write a caption file next to the image, set class_tokens, or pass --caption-extension",
    )


def load_tokenizer(path: Path, slot: Slot, option: str) -> Any:
    """A tokenizer from a local folder (never downloaded).

    A CLIP folder may hold ``vocab.json`` + ``merges.txt`` or a ``tokenizer.json``; a T5 folder
    ``tokenizer.json`` or ``spiece.model`` (with its ``tokenizer_config.json``).

    :raises InvalidFileError: the folder is missing or does not hold a loadable tokenizer.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    if not path.is_dir():
        raise InvalidFileError(
            f"{path}: tokenizer folder not found",
            hint=f"pass {option} DIR: a local folder with {slot.tokenizer_hint}",
        )
    try:
        if slot.kind == "clip" and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; all mean "not a tokenizer folder"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InvalidFileError(
            f"{path}: cannot load the {slot.name} tokenizer ({first})",
            hint=f"pass {option} DIR: a local folder with {slot.tokenizer_hint}",
        ) from exc
    return tokenizer


def _tokenizer_dirs(tokenizers: Sequence[Path | None], family: TextFamily) -> list[Path | None]:
    """Per-slot tokenizer folders; a diffusers model folder given once fills every slot."""
    dirs = list(tokenizers) + [None] * (len(family.slots) - len(tokenizers))
    first = dirs[0]
    if first is not None and (first / _DIFFUSERS_TOKENIZER_DIRS[0]).is_dir():
        for i in range(len(family.slots)):
            sub = first / _DIFFUSERS_TOKENIZER_DIRS[i]
            if i == 0 or (dirs[i] is None and sub.is_dir()):
                dirs[i] = sub
    for i, slot in enumerate(family.slots):
        # sd-scripts' CLIP-G tokenizer is CLIP-L's vocabulary padded with id 0
        if dirs[i] is None and slot.name == "clip_g" and dirs[0] is not None:
            dirs[i] = dirs[0]
    return dirs[: len(family.slots)]


def _option(i: int) -> str:
    return "--tokenizer" if i == 0 else f"--tokenizer{i + 1}"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a hidden temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------ family & sources
def _resolve_arch(model: Path | None, arch: str | None) -> tuple[str, str | None]:
    from lorasmith.io.header import read_header
    from lorasmith.registry import get_registry

    if model is None:
        if arch is None:
            raise UsageError(
                "give --model, or --arch with the text encoders as --text-encoder files",
                hint="--model CKPT names the family (and holds SDXL's and SD3's text encoders)",
            )
        return arch, None
    det = get_registry().detect(read_header(model), arch=arch, source=str(model))
    return det.arch, det.variant


def _text_family(arch: str) -> TextFamily:
    fam = TEXT_FAMILIES.get(arch)
    if fam is None:
        raise UsageError(
            f"family {arch!r} has no text-encoder cache format",
            hint=f"the trainers cache text-encoder outputs for: {', '.join(TEXT_FAMILIES)}",
        )
    return fam


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from lorasmith.io.header import read_header

    return {k: tuple(t.shape) for k, t in read_header(path).tensors.items()}


def _assign_sources(
    family: TextFamily, model: Path | None, text_encoders: Sequence[Path]
) -> dict[str, EncoderSource]:
    """Slot -> weights: the checkpoint's encoders, replaced or completed by ``--text-encoder`` files."""
    slots = {s.name: s for s in family.slots}
    found: dict[str, EncoderSource] = {}
    if model is not None and family.bundled:
        by_prefix = {src.prefix: src for src in find_sources(model, _shapes(model))}
        for name, prefix in family.bundled.items():
            if prefix in by_prefix:
                found[name] = by_prefix[prefix]
    given: set[str] = set()
    clip_slots = [s.name for s in family.slots if s.kind == "clip"]
    for path in text_encoders:
        sources = find_sources(path, _shapes(path))
        if not sources:
            raise InvalidFileError(
                f"{path}: no text encoder found (no CLIP text_model.*, OpenCLIP transformer.resblocks.* or "
                "T5 encoder.block.* keys)",
                hint="pass clip_l / clip_g / t5xxl .safetensors files",
            )
        for src in sources:
            if src.form == "t5":
                name = "t5xxl"
            elif len(clip_slots) == 1:
                name = clip_slots[0]
            else:
                # released widths tell CLIP-L (768) from CLIP-G (1280); otherwise the order given
                by_width = {768: "clip_l", 1280: "clip_g"}.get(src.width)
                free = [n for n in clip_slots if n not in given]
                name = by_width if by_width in clip_slots else (free[0] if free else clip_slots[-1])
            if name not in slots:
                raise UsageError(
                    f"{path}: a {src.form} text encoder, which {family.arch} does not use",
                    hint=f"{family.arch} uses: {', '.join(slots)}",
                )
            found[name] = src
            given.add(name)
    for slot in family.slots:
        if slot.name not in found:
            where = f"{model} holds no {slot.name}" if model is not None else f"no {slot.name} given"
            raise UsageError(
                f"{family.arch}: {where}",
                hint=f"pass its weights with --text-encoder FILE ({slot.name}.safetensors)",
            )
    return found


# ------------------------------------------------------------------------------------- expected arrays
def _expected(
    family: TextFamily, src: dict[str, EncoderSource], opts: _Options
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one caption's cache."""
    clip_len = src["clip_l"].positions or 77
    t5_len = opts.t5_length or 0
    if family.arch == "sdxl":
        g = src["clip_g"]
        # n chunks of 75 tokens between one BOS and one EOS
        states = opts.max_token_length + 2 if opts.max_token_length else clip_len
        return {
            "hidden_state1": (states, src["clip_l"].width),
            "hidden_state2": (states, g.width),
            "pool2": (g.projection or g.width,),
        }
    if family.arch == "flux":
        return {
            "l_pooled": (src["clip_l"].width,),
            "t5_out": (t5_len, src["t5xxl"].width),
            "txt_ids": (t5_len, 3),
            "t5_attn_mask": (t5_len,),
            "apply_t5_attn_mask": (),
        }
    lw, gw = src["clip_l"], src["clip_g"]
    return {
        "lg_out": (clip_len, lw.width + gw.width),
        "lg_pooled": ((lw.projection or lw.width) + (gw.projection or gw.width),),
        "t5_out": (t5_len, src["t5xxl"].width),
        "clip_l_attn_mask": (clip_len,),
        "clip_g_attn_mask": (clip_len,),
        "t5_attn_mask": (t5_len,),
        "apply_lg_attn_mask": (),
        "apply_t5_attn_mask": (),
    }


def _flags(family: TextFamily, opts: _Options) -> dict[str, bool]:
    if family.arch == "flux":
        return {"apply_t5_attn_mask": opts.apply_t5}
    if family.arch == "sd3":
        return {"apply_lg_attn_mask": opts.apply_lg, "apply_t5_attn_mask": opts.apply_t5}
    return {}


def _valid(path: Path, expected: dict[str, tuple[int, ...]], flags: dict[str, bool]) -> bool | None:
    """``True``/``False`` for a cache that loads, ``None`` for one that does not."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception:  # any unreadable cache is simply invalid
        return None
    for key, shape in expected.items():
        if key not in arrays or tuple(arrays[key].shape) != shape:
            return False
    return all(bool(arrays[k]) == v for k, v in flags.items())


# ----------------------------------------------------------------------------------------------- plan
def _groups(dataset: Path | None, dataset_config: Path | None, defaults: Settings) -> list[ImageGroup]:
    if (dataset is None) == (dataset_config is None):
        raise UsageError(
            "give exactly one of --dataset and --dataset-config",
            hint="--dataset DIR for a folder of images, --dataset-config for an sd-scripts TOML",
        )
    if dataset is not None:
        return folder_groups(dataset, defaults)
    assert dataset_config is not None
    return load_dataset_config(dataset_config, defaults)


def plan_text_jobs(
    groups: Sequence[ImageGroup],
    family: TextFamily,
    valid: Callable[[list[TextJob]], list[bool]],
    skip_existing: bool,
    overwrite: bool,
    *,
    first_line: bool = True,
    dreambooth: bool = True,
    mismatch: str = "settings",
    check: Callable[[str], None] | None = None,
) -> tuple[list[TextCacheItem], list[TextJob]]:
    """Every image's report item, and the jobs to run: captions read (a missing one fails that image),
    existing caches checked with ``valid`` (given all of them at once, so a check may batch its work) and
    skipped or refused as ``skip_existing`` / ``overwrite`` say.

    :param first_line: read only a caption file's first line (sd-scripts) or all of it (musubi-tuner).
    :param dreambooth: sd-scripts' DreamBooth caption rules: class tokens for an image without caption
        file, face-crop caption names, ``enable_wildcard``.
    :param mismatch: what an invalid cache does not match, for its message.
    :param check: raises a :class:`~lorasmith.errors.LorasmithError` for a caption that cannot be encoded
        (that image fails, named with its caption file).
    """
    items: list[TextCacheItem] = []
    ready: list[TextJob] = []
    for group in groups:
        ext = group.settings.caption_extension
        extensions = (ext,) if ext else _DEFAULT_CAPTION_EXTENSIONS
        for index, image in enumerate(group.images):
            target = text_cache_path(image, family, group.cache_dir)
            item = TextCacheItem(image=str(image), cache=str(target), status="written")
            items.append(item)
            s = group.settings
            entry = group.entries[index] if group.entries else None
            if entry is not None:
                # a fine-tuning subset: the caption sd-scripts built from the metadata file
                caption_file, caption = group.metadata_file, entry.caption
                where = f"{group.metadata_file} [{entry.key!r}]"
                if not caption:
                    item.status = "failed"
                    item.error = f"{where}: no caption and no tags (sd-scripts would encode an empty caption)"
                    continue
            else:
                try:
                    caption_file, caption = read_caption(
                        image,
                        extensions,
                        first_line=first_line,
                        class_tokens=s.class_tokens if dreambooth else None,
                        face_crop_names=dreambooth,
                        wildcard=dreambooth and s.enable_wildcard,
                    )
                except LorasmithError as exc:
                    item.status, item.error = "failed", exc.message
                    continue
                where = str(caption_file or image)
            if check is not None:
                try:
                    check(caption)
                except LorasmithError as exc:
                    item.status, item.error = "failed", f"{where}: {exc.message}"
                    continue
            item.caption_file = None if caption_file is None else str(caption_file)
            item.caption, item.from_class_tokens = caption, caption_file is None
            ready.append(TextJob(image, target, caption, item))
    existing = [j for j in ready if j.cache.exists()]
    verdicts = dict(zip(map(id, existing), valid(existing), strict=True))
    jobs: list[TextJob] = []
    for job in ready:
        if id(job) in verdicts:
            ok = verdicts[id(job)]
            if ok and skip_existing:
                job.item.status = "skipped"
                continue
            if not overwrite:
                why = "is valid" if ok else f"does not match this run's {mismatch} or does not load"
                job.item.status = "failed"
                job.item.error = f"{job.cache}: cache exists and {why}; pass --overwrite to re-create it"
                continue
        jobs.append(job)
    return items, jobs


def run_text_jobs(
    jobs: Sequence[TextJob],
    batch_size: int,
    encode: Callable[[list[str]], Sequence[Any]],
    save: Callable[[TextJob, Any], None],
    progress: ProgressCallback,
    done: int,
    total: int,
) -> None:
    """Encode the captions of ``jobs`` ``batch_size`` at a time and ``save`` each job's outputs; a cache
    that cannot be written fails that image only. Progress counts on from ``done`` of ``total``."""
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        for job, out in zip(batch, encode([j.caption for j in batch]), strict=True):
            try:
                save(job, out)
            except OSError as exc:
                job.item.status = "failed"
                job.item.error = f"{job.cache}: cannot write the cache ({exc.strerror or exc})"
            done += 1
            progress(ProgressEvent("encoding", done, total, str(job.image)))


# --------------------------------------------------------------------------------------------- encode
@dataclass
class _Encoders:
    models: dict[str, Any]
    tokenizers: dict[str, Any]
    pad_ids: dict[str, int]


def _tokens(enc: _Encoders, slot: str, captions: list[str], length: int) -> tuple[Any, Any]:
    """Input ids and attention mask (int64, ``(B, length)``), padded to ``length``."""
    tok = enc.tokenizers[slot]
    out = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    pad = enc.pad_ids.get(slot)
    if pad is not None:
        # sd-scripts pads CLIP-G with id 0; the mask is unchanged by the id used for padding
        ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def chunk_token_ids(ids: Sequence[int], window: int, eos: int, pad: int) -> list[list[int]]:
    """sd-scripts' split of one long caption's token ids into encoder windows (``_get_input_ids``).

    ``ids`` is the caption tokenized to ``n * (window - 2) + 2`` ids (BOS, the tokens, EOS, padding). Window
    ``k`` is BOS, the ``window - 2`` ids from position ``1 + k * (window - 2)``, and the sequence's *last*
    id (EOS, or the padding). When the tokenizer pads with an id other than EOS (SDXL's CLIP-G pads with
    0), a window whose text runs on past it gets EOS as its last id, and a window with no text starts
    ``BOS EOS``; a tokenizer that pads with EOS (CLIP-L) needs neither fix.
    """
    body = window - 2
    n = (len(ids) - 2) // body
    windows: list[list[int]] = []
    for k in range(n):
        w = [int(ids[0]), *(int(i) for i in ids[1 + k * body : 1 + (k + 1) * body]), int(ids[-1])]
        if pad != eos:
            if w[-2] not in (eos, pad):
                w[-1] = eos
            if w[1] == pad:
                w[1] = eos
        windows.append(w)
    return windows


def _windows(enc: _Encoders, slot: str, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Token windows ``(B * n, window)`` of ids ``(B, n * (window - 2) + 2)`` (n per caption)."""
    import torch

    tok = enc.tokenizers[slot]
    pad = enc.pad_ids.get(slot, tok.pad_token_id)
    rows = [w for row in ids.tolist() for w in chunk_token_ids(row, window, tok.eos_token_id, pad)]
    return torch.tensor(rows, dtype=ids.dtype)


def _weighted_tokens(
    enc: _Encoders, slot: str, captions: list[str], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``(B, length)`` and float32 weights ``(B, length)`` of weighted captions (sd-scripts'
    ``_get_weighted_input_ids``: every piece of the attention syntax tokenized on its own)."""
    import torch

    tok = enc.tokenizers[slot]
    pad = enc.pad_ids.get(slot, tok.pad_token_id)

    def tokenize(pieces: list[str]) -> Any:
        # verbose=False: a long piece is cut afterwards, not warned about by transformers
        return tok(pieces, add_special_tokens=False, verbose=False)["input_ids"]

    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [weighted_token_ids(c, tokenize, length, bos, eos, pad) for c in captions]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    # float32, as sd-scripts builds its weight tensor from Python floats
    return ids, torch.tensor([r[1] for r in rows], dtype=torch.float32)


def _encode_sdxl(
    enc: _Encoders, captions: list[str], opts: _Options, clip_len: int, host: Callable[[Any], np.ndarray]
) -> dict[str, np.ndarray]:
    """SDXL's ``hidden_state1``, ``hidden_state2`` and ``pool2`` of a batch, as sd-scripts computes them.

    Long captions (``max_token_length``) are split into windows, encoded one by one and joined; ``pool2``
    is the first window's. Weighted captions (sd-scripts' ``encode_tokens_with_weights``) multiply each
    joined state by its token's weight (1 on BOS, EOS and padding); ``pool2`` is not weighted, and no
    mean is restored (the SD1 weighting of ``custom_train_functions`` does that, SDXL's does not).
    """
    batch = len(captions)
    long = opts.max_token_length is not None
    length = opts.max_token_length + 2 if opts.max_token_length else clip_len
    out: dict[str, np.ndarray] = {}
    for slot, key in (("clip_l", "hidden_state1"), ("clip_g", "hidden_state2")):
        if opts.weighted:
            ids, weights = _weighted_tokens(enc, slot, captions, length)
        else:
            ids, _ = _tokens(enc, slot, captions, length)
        states, _, pooled = _clip(enc, slot, _windows(enc, slot, ids, clip_len) if long else ids, None)
        if long:
            states = _join_windows(states, batch, clip_len)
        if opts.weighted:
            # joined state p belongs to token p of the caption, so one product covers both layouts. The
            # float32 weights promote a half-precision product to float32; sd-scripts keeps that for 77
            # tokens and writes it back into the half-precision states for 150 / 225.
            weighted = states * weights.to(states.device)[:, :, None]
            states = weighted.to(states.dtype) if long else weighted
        out[key] = host(states)
        if slot == "clip_g":
            out["pool2"] = host(pooled.reshape(batch, -1, pooled.shape[-1])[:, 0])
    return out


def _join_windows(states: torch.Tensor, batch: int, window: int) -> torch.Tensor:
    """``(B * n, window, C)`` encoder states -> ``(B, n * (window - 2) + 2, C)``, as sd-scripts joins them.

    The first window's BOS state, the ``window - 2`` inner states of every window in order, and the
    last window's final state (its EOS or padding): BOS/EOS states of the inner windows are dropped.
    """
    import torch

    flat = states.reshape(batch, -1, states.shape[-1])
    parts = [flat[:, :1]]
    parts += [flat[:, i : i + window - 2] for i in range(1, flat.shape[1], window)]
    parts.append(flat[:, -1:])
    return torch.cat(parts, dim=1)


def _clip(
    enc: _Encoders, slot: str, ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penultimate hidden states, final-norm state at the first EOS, and its projection (or itself)."""
    import torch

    model = enc.models[slot]
    dev = model.device
    out = model(ids.to(dev), attention_mask=None if mask is None else mask.to(dev), output_hidden_states=True)
    penultimate = out.hidden_states[-2]
    eos = enc.tokenizers[slot].eos_token_id
    # the first EOS of each row (argmax of a 0/1 mask), as sd-scripts' pooling workaround finds it
    index = (ids == eos).int().argmax(dim=1).to(dev)
    pooled = out.last_hidden_state[torch.arange(ids.shape[0], device=dev), index]
    projected = model.text_projection(pooled) if hasattr(model, "text_projection") else pooled
    return penultimate, pooled, projected


def _t5(enc: _Encoders, ids: torch.Tensor, mask: torch.Tensor, apply: bool) -> torch.Tensor:
    model = enc.models["t5xxl"]
    dev = model.device
    out = model(ids.to(dev), attention_mask=mask.to(dev) if apply else None)
    return out.last_hidden_state  # type: ignore[no-any-return]


def _encode(
    family: TextFamily, enc: _Encoders, captions: list[str], opts: _Options, clip_len: int
) -> list[dict[str, np.ndarray]]:
    """Per-caption arrays of a batch, as the family's trainer stores them."""
    import numpy as np
    import torch

    def host(t: torch.Tensor) -> np.ndarray:
        # sd-scripts stores bfloat16 outputs as float32 and keeps float16 / float32 as they are
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    out: dict[str, Any] = {}
    with torch.no_grad():
        if family.arch == "sdxl":
            out = _encode_sdxl(enc, captions, opts, clip_len, host)
        elif family.arch == "flux":
            assert opts.t5_length is not None
            ids_l, _ = _tokens(enc, "clip_l", captions, clip_len)
            _, l_pooled, _ = _clip(enc, "clip_l", ids_l, None)
            ids_t, mask_t = _tokens(enc, "t5xxl", captions, opts.t5_length)
            t5_out = _t5(enc, ids_t, mask_t, opts.apply_t5)
            out = {
                "l_pooled": host(l_pooled),
                "t5_out": host(t5_out),
                # FLUX text tokens all sit at position (0, 0, 0)
                "txt_ids": np.zeros((len(captions), opts.t5_length, 3), dtype=np.float32),
                "t5_attn_mask": mask_t.numpy(),
            }
        else:
            assert opts.t5_length is not None
            ids_l, mask_l = _tokens(enc, "clip_l", captions, clip_len)
            ids_g, mask_g = _tokens(enc, "clip_g", captions, clip_len)
            hl, _, pl = _clip(enc, "clip_l", ids_l, mask_l if opts.apply_lg else None)
            hg, _, pg = _clip(enc, "clip_g", ids_g, mask_g if opts.apply_lg else None)
            ids_t, mask_t = _tokens(enc, "t5xxl", captions, opts.t5_length)
            t5_out = _t5(enc, ids_t, mask_t, opts.apply_t5)
            out = {
                "lg_out": host(torch.cat([hl, hg], dim=-1)),
                "lg_pooled": host(torch.cat([pl, pg], dim=-1)),
                "t5_out": host(t5_out),
                "clip_l_attn_mask": mask_l.numpy(),
                "clip_g_attn_mask": mask_g.numpy(),
                "t5_attn_mask": mask_t.numpy(),
            }
    flags = _flags(family, opts)
    rows: list[dict[str, np.ndarray]] = []
    for i in range(len(captions)):
        row = {k: np.ascontiguousarray(v[i]) for k, v in out.items()}
        row.update({k: np.array(v) for k, v in flags.items()})
        rows.append(row)
    return rows


def _build(
    family: TextFamily,
    sources: dict[str, EncoderSource],
    tokenizer_dirs: list[Path | None],
    device: str,
    dtype: str,
) -> _Encoders:
    import torch

    from lorasmith.ops._device import compute_device
    from lorasmith.ops.cache._te_models import build_clip, build_t5, load_state

    dev = compute_device(device, error=UsageError)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    enc = _Encoders({}, {}, {})
    for i, slot in enumerate(family.slots):
        path = tokenizer_dirs[i]
        assert path is not None
        tokenizer = load_tokenizer(path, slot, _option(i))
        enc.tokenizers[slot.name] = tokenizer
        if slot.pad_zero:
            enc.pad_ids[slot.name] = 0
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": enc.pad_ids.get(slot.name, tokenizer.pad_token_id),
        }
        src = sources[slot.name]
        state = load_state(src)
        label = f"{src.file} ({slot.name})"
        if slot.kind == "clip":
            model = build_clip(
                state, activation=slot.activation, projection=slot.projection, token_ids=ids, source=label
            )
        else:
            ids.pop("bos_token_id")
            model = build_t5(state, token_ids=ids, source=label)
        enc.models[slot.name] = model.to(device=dev, dtype=tdt)
    return enc


def cache_text(
    model: str | os.PathLike[str] | None,
    *,
    text_encoders: Sequence[str | os.PathLike[str]] = (),
    tokenizers: Sequence[str | os.PathLike[str] | None] = (),
    dataset: str | os.PathLike[str] | None = None,
    dataset_config: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    caption_extension: str | None = None,
    batch_size: int = 8,
    t5_max_length: int | None = None,
    max_token_length: int | None = None,
    weighted_captions: bool = False,
    apply_t5_attn_mask: bool = False,
    apply_lg_attn_mask: bool = False,
    skip_existing: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    progress: ProgressCallback = noop,
) -> TextCacheResult:
    """Encode the captions of ``dataset`` (a folder) or ``dataset_config`` (a TOML) into trainer caches.

    :param model: the checkpoint that names the family (and holds SDXL's / SD3's text encoders).
    :param text_encoders: separate encoder files (``clip_l``, ``clip_g``, ``t5xxl`` in HF form, or
        Z-Image's Qwen3 ``qwen_3_4b.safetensors`` / its shards), which replace or complete the checkpoint's.
    :param tokenizers: local tokenizer folders in the family's slot order (SDXL: CLIP-L, CLIP-G;
        FLUX: CLIP-L, T5; SD3: CLIP-L, CLIP-G, T5; Z-Image: Qwen3); a diffusers model folder fills every
        slot.
    :param arch: force the family (needed without ``model``).
    :param caption_extension: caption file extension (a dataset TOML's ``caption_extension`` wins);
        ``.caption`` then ``.txt`` when neither sets one.
    :param t5_max_length: T5 token length (default 512 for FLUX dev, 256 for FLUX schnell and SD3).
    :param max_token_length: SDXL caption tokens without BOS/EOS: ``None`` or 75 (one 77-token window),
        150 or 225 (two or three windows, encoded and joined as sd-scripts does); a dataset TOML's
        ``max_token_length`` may set it too (one value per run).
    :param weighted_captions: read SDXL captions with sd-scripts' attention syntax (``(word)``,
        ``(word:1.3)``, ``[word]``) and weight their token states as its ``--weighted_captions`` does; a
        dataset TOML's ``weighted_captions`` may set it too (one value per run). Refused for the other
        families, whose trainers do not weight captions.
    :param dtype: encoder compute dtype; bfloat16 outputs are saved as float32 in the sd-scripts
        formats, as they are (``varlen_llm_embed_bfloat16``) in Z-Image's.
    :raises UsageError: bad option values, a missing encoder or tokenizer, weighted captions for a family
        other than SDXL.
    :raises NotAvailableError: the ``cache`` extra is not installed.
    :raises InvalidFileError: unreadable model, encoder, tokenizer, dataset folder or config.
    """
    from lorasmith.ops.cache.latents import require_extra

    require_extra("transformers")
    if dtype not in _DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if t5_max_length is not None and t5_max_length < 1:
        raise UsageError(f"--t5-max-length must be at least 1, got {t5_max_length}")
    model_path = Path(model) if model is not None else None
    arch_id, variant = _resolve_arch(model_path, arch)
    family = _text_family(arch_id)
    if family.t5_length is None:
        if t5_max_length is not None or apply_t5_attn_mask:
            raise UsageError(f"{family.arch} has no T5 encoder: drop --t5-max-length / --apply-t5-attn-mask")
        t5_len = None
    else:
        # sd-scripts: 256 tokens for schnell, 512 for dev, unless set
        t5_len = t5_max_length or (256 if variant == "schnell" else family.t5_length)
    if apply_lg_attn_mask and family.arch != "sd3":
        raise UsageError("--apply-lg-attn-mask is an SD3 option")
    option_mtl = check_max_token_length(max_token_length)
    _run_max_token_length(family, [], option_mtl, max_token_length is not None)  # fail early
    _run_weighted(family, [], weighted_captions)
    # the dataset settings first: a setting the trainer refuses stops the run before any file is read
    ext = caption_extension or ""
    # sd-scripts accepts "txt" for ".txt"
    ext = ext if not ext or ext.startswith(".") else "." + ext
    defaults = Settings(
        (1024, 1024), caption_extension=ext, max_token_length=option_mtl, weighted_captions=weighted_captions
    )
    groups = _groups(
        Path(dataset) if dataset is not None else None,
        Path(dataset_config) if dataset_config is not None else None,
        defaults,
    )
    check_cacheable(groups, "text")
    if family.arch == "zimage":
        refuse_metadata(groups, family.arch, "musubi-tuner")
    mtl = _run_max_token_length(family, groups, option_mtl, max_token_length is not None)
    weighted = _run_weighted(family, groups, weighted_captions)
    opts = _Options(t5_len, apply_t5_attn_mask, apply_lg_attn_mask, mtl, weighted)
    te_paths = [Path(p) for p in text_encoders]
    # Z-Image's single Qwen3 is found (and its absence reported) by its own module, after the tokenizer
    sources = {} if family.arch == "zimage" else _assign_sources(family, model_path, te_paths)
    tok_dirs = _tokenizer_dirs([Path(p) if p is not None else None for p in tokenizers], family)
    if family.arch == "zimage" and any(p is not None for p in tokenizers[1:]):
        raise UsageError("zimage has one tokenizer: drop --tokenizer2 / --tokenizer3")
    for i, slot in enumerate(family.slots):
        if tok_dirs[i] is None:
            raise UsageError(
                f"{family.arch}: no tokenizer for {slot.name}",
                hint=f"pass {_option(i)} DIR: a local folder with {slot.tokenizer_hint} (never downloaded)",
            )
    if family.arch == "zimage":
        from lorasmith.ops.cache._text_zimage import cache_zimage_text

        tok = tok_dirs[0]
        assert tok is not None
        return cache_zimage_text(
            family,
            model_path,
            te_paths,
            tok,
            groups,
            batch_size=batch_size,
            skip_existing=skip_existing,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    expected = _expected(family, sources, opts)
    flags = _flags(family, opts)
    items, jobs = plan_text_jobs(
        groups,
        family,
        lambda existing: [bool(_valid(j.cache, expected, flags)) for j in existing],
        skip_existing,
        overwrite,
        check=_check_weighted if weighted else None,
    )
    total = len(items)
    done = total - len(jobs)
    progress(ProgressEvent("encoding", done, total))
    if jobs:
        enc = _build(family, sources, tok_dirs, device, dtype)
        clip_len = sources["clip_l"].positions or 77
        run_text_jobs(
            jobs,
            batch_size,
            lambda captions: _encode(family, enc, captions, opts, clip_len),
            lambda job, arrays: _save(job.cache, arrays),
            progress,
            done,
            total,
        )
    return TextCacheResult(
        arch=family.arch,
        cache_format=family.cache_format,
        encoders={name: src.describe() for name, src in sources.items()},
        t5_max_length=t5_len,
        max_token_length=mtl,
        weighted_captions=weighted,
        apply_t5_attn_mask=apply_t5_attn_mask,
        apply_lg_attn_mask=apply_lg_attn_mask,
        images=total,
        written=sum(it.status == "written" for it in items),
        skipped=sum(it.status == "skipped" for it in items),
        failed=sum(it.status == "failed" for it in items),
        items=items,
    )


def _origin(groups: Sequence[ImageGroup], key: str) -> str | None:
    """Where the dataset config set ``key`` (the first group that did), ``None`` when it did not."""
    return next((o for g in groups if (o := g.settings.origin(key)) is not None), None)


def _run_max_token_length(
    family: TextFamily, groups: Sequence[ImageGroup], option: int | None, option_given: bool
) -> int | None:
    """The run's ``max_token_length``: the option's, or the dataset TOML's (one value for every dataset,
    as sd-scripts takes it from the command line).

    :raises UsageError: datasets that disagree, a TOML value that contradicts the option, or a long
        caption length for a family other than SDXL.
    """
    values = {g.settings.max_token_length for g in groups}
    if len(values) > 1:
        places = sorted({o for g in groups if (o := g.settings.origin("max_token_length")) is not None})
        raise UsageError(
            f"max_token_length differs between datasets ({', '.join(places)})",
            hint="sd-scripts takes one max_token_length per run: set it once, in [general]",
        )
    value = values.pop() if values else option
    if option_given and value != option:
        raise UsageError(
            f"{_origin(groups, 'max_token_length')}: max_token_length {value or 75} contradicts "
            f"--max-token-length {option or 75}",
            hint="drop one of them",
        )
    if value is not None and family.arch != "sdxl":
        where = _origin(groups, "max_token_length") or "--max-token-length"
        raise UsageError(
            f"{where}: max_token_length {value} applies to SDXL captions only, not {family.arch}",
            hint=f"drop it: sd-scripts encodes {family.arch}'s CLIP captions in 77 tokens whatever it says",
        )
    return value


def _run_weighted(family: TextFamily, groups: Sequence[ImageGroup], option: bool) -> bool:
    """The run's ``weighted_captions``: the option's, or the dataset TOML's (one value for every dataset,
    as sd-scripts takes ``--weighted_captions`` from the command line).

    :raises UsageError: datasets that disagree, a TOML ``false`` against the option, or weighted captions
        for a family whose trainer does not weight them.
    """
    values = {g.settings.weighted_captions for g in groups}
    if len(values) > 1:
        places = sorted({o for g in groups if (o := g.settings.origin("weighted_captions")) is not None})
        raise UsageError(
            f"weighted_captions differs between datasets ({', '.join(places)})",
            hint="sd-scripts weights the captions of a whole run or of none: set it once, in [general]",
        )
    value = values.pop() if values else option
    if option and not value:
        raise UsageError(
            f"{_origin(groups, 'weighted_captions')}: weighted_captions = false contradicts "
            "--weighted-captions",
            hint="drop one of them",
        )
    if value and family.arch != "sdxl":
        where = _origin(groups, "weighted_captions") or "--weighted-captions"
        trainer = "musubi-tuner" if family.arch == "zimage" else "sd-scripts"
        raise UsageError(
            f"{where}: weighted captions apply to SDXL only; {trainer} does not weight "
            f"{family.arch} captions",
            hint="drop it: without it lorasmith caches the caption as written, brackets included, which is "
            f"what {trainer} encodes",
        )
    return value


def _check_weighted(caption: str) -> None:
    """Refuse a weighted caption that sd-scripts cannot parse (a weight that is not a number)."""
    try:
        parse_attention(caption)
    except ValueError as exc:
        raise InvalidFileError(
            f"weighted caption: {exc}", hint="write the weight as a number, e.g. (word:1.2)"
        ) from None


def _save(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    _write_atomic(path, write)
