"""Training images to cache: a folder, or an sd-scripts / musubi-tuner dataset TOML.

A folder (``--dataset DIR``) contributes the images directly in it and in its immediate subfolders, not
deeper. A subfolder named in the kohya DreamBooth way, ``<repeats>_<class tokens>`` (``10_sks dog``),
gives its images those class tokens as caption when they have no caption file, as sd-scripts'
``--train_data_dir`` does (``config_util.generate_dreambooth_subsets_config_by_subdirs``).

The TOML is read the way sd-scripts reads it: ``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``,
the innermost value winning, and the command-line options filling in what the file leaves out. Keys used:
``resolution`` (``512`` or ``[W, H]``), ``enable_bucket``, ``min_bucket_reso``, ``max_bucket_reso``,
``bucket_reso_steps``, ``bucket_no_upscale``, ``batch_size``, ``flip_aug``, ``alpha_mask``,
``caption_extension``, ``max_token_length``, the DreamBooth subset keys ``class_tokens``, ``num_repeats``
(a subset below 1 is left out, as sd-scripts leaves it out), ``is_reg`` and ``enable_wildcard``, and the
image folder ``image_dir`` (sd-scripts) or ``image_directory`` (musubi-tuner, with ``cache_directory``). A
subset whose ``image_dir`` repeats an earlier one of the same dataset is left out (sd-scripts keeps the
first). The augmentation keys that forbid a cache in sd-scripts (``random_crop``, ``color_aug`` for
latents; ``shuffle_caption``, ``caption_dropout_rate``, ``caption_tag_dropout_rate``,
``token_warmup_step`` for text) are read so that :func:`check_cacheable` can refuse them by name.

A fine-tuning subset (``metadata_file``, sd-scripts' ``FineTuningDataset``) takes its images, captions
and sizes from the JSON that sd-scripts' ``finetune/`` scripts write (image key -> ``caption``, ``tags``,
``train_resolution``): :func:`load_metadata` resolves each key to its image as sd-scripts does, joins
caption and tags with ``caption_separator`` (:func:`metadata_caption`), and keeps ``train_resolution``,
which stands for the image's size when sd-scripts buckets it (:class:`MetadataEntry`). When every image of
a fine-tuning dataset has one, its bucket *is* that size (``ImageGroup.metadata_buckets``), as in
sd-scripts, which then refuses ``bucket_no_upscale``.

Every setting remembers where it was set (:meth:`Settings.origin`), so that a refusal can name the file
and the table of the key.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorasmith.errors import InvalidFileError, NotAvailableError, UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_TOKEN_LENGTHS",
    "ImageGroup",
    "MetadataEntry",
    "Settings",
    "check_cacheable",
    "check_max_token_length",
    "dreambooth_folder",
    "find_images",
    "folder_group",
    "folder_groups",
    "load_dataset_config",
    "load_metadata",
    "metadata_caption",
    "metadata_image",
    "refuse_metadata",
]

#: File extensions taken as images (case-insensitive), as the trainers glob them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")


@dataclass(frozen=True)
class Settings:
    """Options that decide how a group of images is cached.

    :ivar resolution: ``(W, H)``.
    :ivar enable_bucket: bucket by aspect ratio.
    :ivar min_bucket_reso: smallest bucket side.
    :ivar max_bucket_reso: largest bucket side.
    :ivar bucket_reso_steps: bucket step.
    :ivar bucket_no_upscale: buckets follow the image sizes, never enlarging an image.
    :ivar batch_size: images per VAE call.
    :ivar flip: also cache the horizontally flipped image.
    :ivar alpha_mask: also store the alpha channel as a mask.
    :ivar caption_extension: caption file extension (text caching).
    :ivar max_token_length: CLIP tokens of a caption without BOS/EOS (``None``, 75, 150 or 225; SDXL text
        caching), sd-scripts' ``max_token_length``.
    :ivar class_tokens: the caption of an image without caption file (DreamBooth ``class_tokens``).
    :ivar num_repeats: repeats of the subset (no effect on a cache; below 1 the subset is left out).
    :ivar is_reg: regularisation images (no effect on a cache).
    :ivar enable_wildcard: a caption is every non-empty line of its file, joined by newlines (sd-scripts);
        in a fine-tuning subset, the tags follow every line of the caption.
    :ivar caption_separator: what joins a fine-tuning entry's caption and tags (sd-scripts' default ``,``).
    :ivar random_crop: ``random_crop`` (latents cannot be cached with it).
    :ivar color_aug: ``color_aug`` (latents cannot be cached with it).
    :ivar shuffle_caption: ``shuffle_caption`` (text-encoder outputs cannot be cached with it).
    :ivar caption_dropout_rate: ``caption_dropout_rate`` (no text-encoder cache above 0).
    :ivar caption_tag_dropout_rate: ``caption_tag_dropout_rate`` (no text-encoder cache above 0).
    :ivar token_warmup_step: ``token_warmup_step`` (no text-encoder cache above 0).
    :ivar weighted_captions: ``weighted_captions``: SDXL captions read with the attention syntax and
        weighted (sd-scripts' ``--weighted_captions``; one value per run).
    :ivar origins: ``(key, where)`` for every key a dataset config set (the TOML file and table).
    """

    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    batch_size: int = 1
    bucket_no_upscale: bool = False
    flip: bool = False
    alpha_mask: bool = False
    caption_extension: str = ".txt"
    max_token_length: int | None = None
    class_tokens: str | None = None
    num_repeats: int = 1
    is_reg: bool = False
    enable_wildcard: bool = False
    caption_separator: str = ","
    random_crop: bool = False
    color_aug: bool = False
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_step: float = 0.0
    weighted_captions: bool = False
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, key: str) -> str | None:
        """Where a dataset config set ``key`` (``"<file> [general]"``), ``None`` when none did."""
        found = [where for k, where in self.origins if k == key]
        return found[-1] if found else None


@dataclass(frozen=True)
class MetadataEntry:
    """One image of a fine-tuning subset: an entry of its ``metadata_file``.

    :ivar key: the entry's image key (a file stem, or a path with its extension).
    :ivar image: the image file the key resolves to (:func:`metadata_image`).
    :ivar caption: the caption sd-scripts builds from the entry (:func:`metadata_caption`); may be empty.
    :ivar train_resolution: the entry's ``train_resolution`` ``(W, H)``, ``None`` when it has none.
        sd-scripts takes it for the image's size when it buckets the image and names the latent cache.
    """

    key: str
    image: Path
    caption: str
    train_resolution: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageGroup:
    """Images sharing one :class:`Settings`.

    :ivar images: the image files, sorted (a fine-tuning subset: in its metadata file's order).
    :ivar settings: how they are cached.
    :ivar cache_dir: where caches go (``None``: next to each image).
    :ivar source: where the group comes from (``dataset.toml datasets[0].subsets[1]``, a folder), for
        messages.
    :ivar entries: a fine-tuning subset's entries, one per image of ``images`` (empty otherwise).
    :ivar metadata_file: the fine-tuning subset's ``metadata_file`` (``None`` otherwise).
    :ivar metadata_buckets: every image of the fine-tuning dataset has a ``train_resolution``, so each
        image's bucket is its ``train_resolution`` (sd-scripts' "bucket info in metadata").
    """

    images: tuple[Path, ...]
    settings: Settings
    cache_dir: Path | None = None
    source: str = ""
    entries: tuple[MetadataEntry, ...] = ()
    metadata_file: Path | None = None
    metadata_buckets: bool = False


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: Path, subfolders: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its immediate subfolders when ``subfolders``), sorted."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InvalidFileError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc
    found = [p for p in entries if _is_image(p)]
    if subfolders:
        for sub in entries:
            if sub.is_dir() and not sub.name.startswith("."):
                found.extend(find_images(sub))
    return sorted(found)


def folder_group(folder: str | os.PathLike[str], settings: Settings) -> ImageGroup:
    """The :class:`ImageGroup` of a dataset folder (its images and its immediate subfolders' in one group).

    :raises InvalidFileError: the folder is missing or holds no image.
    """
    groups = folder_groups(folder, settings)
    images = sorted(im for g in groups for im in g.images)
    return ImageGroup(tuple(images), settings, source=str(folder))


def dreambooth_folder(name: str) -> tuple[int, str] | None:
    """``(repeats, class tokens)`` of a kohya DreamBooth folder name ``<repeats>_<class tokens>``.

    As sd-scripts reads it: the name split at ``_``, the first part an integer, the class tokens the rest
    joined by ``_`` again (``"10_sks_dog"`` -> ``(10, "sks_dog")``). ``None`` when the first part is not an
    integer.
    """
    first, *rest = name.split("_")
    try:
        repeats = int(first)
    except ValueError:
        return None
    return repeats, "_".join(rest)


def folder_groups(folder: str | os.PathLike[str], settings: Settings) -> list[ImageGroup]:
    """The groups of a dataset folder: its own images, then one group per immediate subfolder.

    A subfolder named ``<repeats>_<class tokens>`` with repeats of at least 1 gives its images those
    class tokens (the caption of an image without caption file) and repeats.

    :raises InvalidFileError: the folder is missing or holds no image.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InvalidFileError(f"{p}: dataset folder not found", hint="pass a folder of training images")
    groups: list[ImageGroup] = []
    top = find_images(p)
    if top:
        groups.append(ImageGroup(tuple(top), settings, source=str(p)))
    try:
        subs = sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith("."))
    except OSError as exc:
        raise InvalidFileError(f"{p}: cannot list the folder ({exc.strerror or exc})") from exc
    for sub in subs:
        images = find_images(sub)
        if not images:
            continue
        sub_settings = settings
        parsed = dreambooth_folder(sub.name)
        if parsed is not None and parsed[0] >= 1:
            sub_settings = replace(settings, num_repeats=parsed[0], class_tokens=parsed[1])
        groups.append(ImageGroup(tuple(images), sub_settings, source=str(sub)))
    if not groups:
        raise InvalidFileError(
            f"{p}: no images found ({', '.join(IMAGE_EXTENSIONS)})",
            hint="pass the folder that holds the training images",
        )
    return groups


def _resolution(value: Any, source: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise UsageError(f"{source}: resolution must be a number or [W, H], got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        parts = [s.strip() for s in value.replace("x", ",").split(",") if s.strip()]
        try:
            nums = [int(s) for s in parts]
        except ValueError:
            nums = []
        if len(nums) == 1:
            return (nums[0], nums[0])
        if len(nums) == 2:
            return (nums[0], nums[1])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise UsageError(f"{source}: resolution must be a number or [W, H], got {value!r}")


def parse_resolution(value: str | int | tuple[int, int], source: str = "--resolution") -> tuple[int, int]:
    """``512``, ``"512"``, ``"768,512"``, ``"768x512"`` or ``(W, H)`` -> ``(W, H)``.

    :raises UsageError: anything else, or a non-positive size.
    """
    w, h = _resolution(value, source)
    if w <= 0 or h <= 0:
        raise UsageError(f"{source}: resolution must be positive, got {w}x{h}")
    return (w, h)


def _apply(settings: Settings, table: Mapping[str, Any], source: str) -> Settings:
    changes: dict[str, Any] = {}
    if "resolution" in table:
        changes["resolution"] = parse_resolution(table["resolution"], f"{source}: resolution")
    simple = {
        "enable_bucket": ("enable_bucket", bool),
        "min_bucket_reso": ("min_bucket_reso", int),
        "max_bucket_reso": ("max_bucket_reso", int),
        "bucket_reso_steps": ("bucket_reso_steps", int),
        "bucket_no_upscale": ("bucket_no_upscale", bool),
        "batch_size": ("batch_size", int),
        "flip_aug": ("flip", bool),
        "alpha_mask": ("alpha_mask", bool),
        "caption_extension": ("caption_extension", str),
        "max_token_length": ("max_token_length", int),
        "class_tokens": ("class_tokens", str),
        "num_repeats": ("num_repeats", int),
        "is_reg": ("is_reg", bool),
        "enable_wildcard": ("enable_wildcard", bool),
        "caption_separator": ("caption_separator", str),
        "random_crop": ("random_crop", bool),
        "color_aug": ("color_aug", bool),
        "shuffle_caption": ("shuffle_caption", bool),
        "caption_dropout_rate": ("caption_dropout_rate", float),
        "caption_tag_dropout_rate": ("caption_tag_dropout_rate", float),
        "token_warmup_step": ("token_warmup_step", float),
        "weighted_captions": ("weighted_captions", bool),
    }
    set_here: list[tuple[str, str]] = []
    for key, (field, kind) in simple.items():
        if key in table:
            value = table[key]
            # a float key takes an integer too (``token_warmup_step = 0``)
            ok = isinstance(value, (int, float) if kind is float else kind)
            if not ok or (kind in (int, float) and isinstance(value, bool)):
                raise UsageError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
            changes[field] = value
            set_here.append((key, source))
    if "resolution" in table:
        set_here.append(("resolution", source))
    ext = changes.get("caption_extension")
    if ext and not ext.startswith("."):
        # sd-scripts accepts "txt" for ".txt"
        changes["caption_extension"] = "." + ext
    if "max_token_length" in changes:
        changes["max_token_length"] = check_max_token_length(
            changes["max_token_length"], f"{source}: max_token_length"
        )
    return replace(settings, origins=settings.origins + tuple(set_here), **changes)


def check_cacheable(groups: Sequence[ImageGroup], what: str) -> None:
    """Refuse dataset settings under which the trainer would not use (or not build) such a cache.

    ``what`` is ``latents`` or ``text``. sd-scripts refuses to cache latents with ``random_crop`` or
    ``color_aug`` (``is_latent_cacheable``: both change the pixels every step), and text-encoder outputs
    with ``shuffle_caption``, ``caption_dropout_rate``, ``caption_tag_dropout_rate`` or
    ``token_warmup_step`` (``is_text_encoder_output_cacheable``: each changes the caption every step).
    (``weighted_captions`` is not refused: sd-scripts caches weighted SDXL captions, and ``cache text``
    weights them; it refuses them for the other families itself.)

    :raises UsageError: a setting the trainer refuses to cache with, naming the TOML file and table.
    """
    for group in groups:
        s = group.settings
        if what == "latents":
            refused = [k for k in ("random_crop", "color_aug") if getattr(s, k)]
            why = "it changes the image every step, so sd-scripts refuses to cache latents with it"
            hint = "set it to false (or leave it out) for a run with cached latents, or do not cache latents"
        else:
            flags = {
                "shuffle_caption": s.shuffle_caption,
                "caption_dropout_rate": s.caption_dropout_rate > 0,
                "caption_tag_dropout_rate": s.caption_tag_dropout_rate > 0,
                "token_warmup_step": s.token_warmup_step > 0,
            }
            refused = [k for k, on in flags.items() if on]
            why = "it changes the caption every step, so sd-scripts refuses to cache text outputs with it"
            hint = "drop it for a run with cached text-encoder outputs, or do not cache them"
        if refused:
            key = refused[0]
            value = getattr(s, key)
            shown = str(value).lower() if isinstance(value, bool) else value  # as the TOML spells it
            raise UsageError(f"{s.origin(key) or group.source}: {key} = {shown}: {why}", hint=hint)


#: The caption lengths sd-scripts accepts (``--max_token_length``); ``None`` and 75 are the same.
MAX_TOKEN_LENGTHS = (75, 150, 225)


def check_max_token_length(value: int | None, source: str = "--max-token-length") -> int | None:
    """``None`` (also for 75), 150 or 225.

    :raises UsageError: any other value.
    """
    if value is None or value == 75:
        return None
    if value not in MAX_TOKEN_LENGTHS:
        raise UsageError(
            f"{source} {value} is not 75, 150 or 225",
            hint="sd-scripts encodes captions in 75-token chunks: use 150 or 225, or leave it out (75)",
        )
    return value


# ----------------------------------------------------------------------------- fine-tuning (metadata_file)
def metadata_caption(
    caption: str | None, tags: str | None, separator: str = ",", wildcard: bool = False
) -> str:
    """The caption sd-scripts' ``FineTuningDataset`` makes of an entry's ``caption`` and ``tags``.

    Only tags: they are the caption. Both: ``caption + separator + tags`` (empty tags add nothing). With
    ``wildcard`` (``enable_wildcard``) the tags' newlines become separators and the tags follow every
    non-empty line of the caption, the lines joined by newlines again. Neither: ``""``. The result is
    what sd-scripts stores and caches: multi-line captions stay multi-line.
    """
    if caption is None:
        # sd-scripts: "caption = tags; tags = None" (the tags may be several lines)
        caption, tags = tags, None
    if wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)
        if caption is not None and tags is not None:
            # lines are filtered by their stripped text but kept as written
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    elif caption is not None and tags:
        caption = caption + separator + tags
    return caption if caption is not None else ""


def _image_extensions() -> list[str]:
    # sd-scripts globs each extension in lower and in upper case (``IMAGE_EXTENSIONS``), not mixed case
    return [*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)]


def metadata_image(key: str, image_dir: Path | None) -> Path | None:
    """The image of a metadata key, found as sd-scripts' ``FineTuningDataset`` finds it.

    First the key itself as a file path (absolute, or relative to the current folder: the
    ``--full_path`` keys of the finetune scripts); then ``image_dir / (key + ext)`` for the image
    extensions in lower and upper case, the first in sorted order (the stem keys). A key that already
    ends in an extension is therefore found only as a path. ``None`` when neither exists.
    """
    as_path = Path(key)
    if as_path.is_file():
        return as_path
    if image_dir is None:
        return None
    found = sorted(
        str(image_dir / (key + ext)) for ext in _image_extensions() if (image_dir / (key + ext)).is_file()
    )
    return Path(found[0]) if found else None


def _text_field(value: Any, name: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidFileError(
        f"{where}: {name} must be a string, got {type(value).__name__}", hint="fix the metadata file"
    )


def _train_resolution(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise InvalidFileError(
            f"{where}: train_resolution must be [W, H], got {value!r}", hint="fix the metadata file"
        )
    w, h = int(value[0]), int(value[1])
    if w % 8 or h % 8:
        # prepare_buckets_latents.py rounds it down to 8: the latent is an eighth of it
        raise InvalidFileError(
            f"{where}: train_resolution {w}x{h} is not a multiple of 8",
            hint="re-run sd-scripts' prepare_buckets_latents.py, which writes multiples of 8",
        )
    return (w, h)


def load_metadata(
    path: Path, image_dir: Path | None, settings: Settings, source: str = ""
) -> tuple[MetadataEntry, ...]:
    """The entries of a fine-tuning ``metadata_file``, in its order.

    Every key is resolved to its image (:func:`metadata_image`), its caption built from ``caption`` and
    ``tags`` with the subset's ``caption_separator`` and ``enable_wildcard`` (:func:`metadata_caption`),
    and its ``train_resolution`` kept. Other fields are ignored.

    :raises InvalidFileError: the file cannot be read or is not a JSON object of objects, a field has the
        wrong type, or a key resolves to no image (sd-scripts stops on it too).
    """
    label = f"{source}: metadata_file {path}" if source else str(path)
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise InvalidFileError(
            f"{label} not found", hint="name the JSON of sd-scripts' finetune scripts"
        ) from exc
    except OSError as exc:
        raise InvalidFileError(f"{label}: cannot read it ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidFileError(f"{label}: not valid JSON ({exc})", hint="fix the metadata file") from exc
    if not isinstance(data, dict):
        raise InvalidFileError(
            f"{label}: not a JSON object of image keys", hint='expected {"<image key>": {"caption": ...}}'
        )
    entries: list[MetadataEntry] = []
    for key, md in data.items():
        where = f"{path} [{key!r}]"
        if not isinstance(md, dict):
            raise InvalidFileError(f"{where}: not a JSON object", hint="fix the metadata file")
        image = metadata_image(key, image_dir)
        if image is None:
            places = (
                f"{image_dir / key}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
                if image_dir
                else "image_dir"
            )
            npz = next((q for q in _npz_candidates(key, image_dir) if q.is_file()), None)
            hint = (
                f"only {npz} is there (latents of prepare_buckets_latents.py): lorasmith caches from images"
                if npz is not None
                else "fix the key or the subset's image_dir: sd-scripts stops on it too"
            )
            raise InvalidFileError(f"{where}: no image (neither the path {key!r} nor {places})", hint=hint)
        caption = _text_field(md.get("caption"), "caption", where)
        tags = _text_field(md.get("tags"), "tags", where)
        entries.append(
            MetadataEntry(
                key,
                image,
                metadata_caption(caption, tags, settings.caption_separator, settings.enable_wildcard),
                _train_resolution(md.get("train_resolution"), where),
            )
        )
    return tuple(entries)


def _npz_candidates(key: str, image_dir: Path | None) -> list[Path]:
    # where sd-scripts looks for a key that has no image: the prepared latents, used instead of it
    found = [Path(os.path.splitext(key)[0] + ".npz")]
    if image_dir is not None:
        found.append(image_dir / (key + ".npz"))
    return found


def refuse_metadata(groups: Sequence[ImageGroup], family: str, trainer: str) -> None:
    """Refuse fine-tuning subsets for a family whose trainer has none (musubi-tuner's Z-Image).

    :raises UsageError: a group from a ``metadata_file``.
    """
    for g in groups:
        if g.metadata_file is not None:
            raise UsageError(
                f"{g.source}: metadata_file: {trainer} has no fine-tuning datasets for {family}",
                hint="give the images a folder with caption files (image_directory)",
            )


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        toml: Any = importlib.import_module("tomllib")
    except ImportError:  # Python 3.10
        try:
            toml = importlib.import_module("tomli")
        except ImportError as exc:
            raise NotAvailableError(
                f"{path}: reading TOML on Python 3.10 needs the tomli package", hint="pip install tomli"
            ) from exc
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = toml.load(fh)
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read the dataset config ({exc.strerror or exc})") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise InvalidFileError(f"{path}: not valid TOML ({exc})", hint="fix the dataset config") from exc
    return data


def load_dataset_config(path: str | os.PathLike[str], defaults: Settings) -> list[ImageGroup]:
    """The image groups of an sd-scripts / musubi-tuner dataset TOML.

    Relative folders and metadata files are taken relative to the TOML file's folder when they exist
    there, else to the current folder. A dataset whose subsets have ``metadata_file`` is a fine-tuning
    dataset (:func:`load_metadata`); as in sd-scripts, one dataset may not mix the two kinds, a subset
    repeating an earlier ``metadata_file`` (``image_dir`` for DreamBooth) is left out, and so is one with
    no entries.

    :raises InvalidFileError: unreadable file, a missing image folder or metadata file, a metadata key
        without image, or no dataset in it.
    :raises UsageError: a key with a value of the wrong type, DreamBooth and fine-tuning subsets in one
        dataset, or ``bucket_no_upscale`` for a fine-tuning dataset whose metadata holds every bucket.
    """
    p = Path(path)
    data = _toml_load(p)
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise UsageError(f"{p}: [general] must be a table")
    base = _apply(defaults, general, f"{p} [general]")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise InvalidFileError(f"{p}: no [[datasets]] in the dataset config", hint="add a [[datasets]] table")
    groups: list[ImageGroup] = []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict):
            raise UsageError(f"{p}: datasets[{i}] must be a table")
        ds_settings = _apply(base, ds, f"{p} datasets[{i}]")
        subsets = ds.get("subsets")
        tables = subsets if isinstance(subsets, list) and subsets else [ds]
        kinds = {isinstance(t, dict) and "metadata_file" in t for t in tables}
        if len(kinds) > 1:
            raise UsageError(
                f"{p} datasets[{i}]: DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) "
                "in one dataset",
                hint="sd-scripts refuses to mix them: give each kind its own [[datasets]]",
            )
        ds_groups: list[ImageGroup] = []
        seen: set[str] = set()
        for j, sub in enumerate(tables):
            src = f"{p} datasets[{i}].subsets[{j}]" if tables is subsets else f"{p} datasets[{i}]"
            if not isinstance(sub, dict):
                raise UsageError(f"{src} must be a table")
            settings = _apply(ds_settings, sub, src) if tables is subsets else ds_settings
            cache = sub.get("cache_directory") or ds.get("cache_directory")
            cache_dir = _relative(p, cache) if isinstance(cache, str) else None
            folder = sub.get("image_dir") or sub.get("image_directory")
            if "metadata_file" in sub:
                group = _fine_tuning_group(p, sub, settings, cache_dir, src, seen)
                if group is not None:
                    ds_groups.append(group)
                continue
            if not isinstance(folder, str):
                raise InvalidFileError(f"{src}: no image_dir / image_directory", hint="name the image folder")
            if settings.num_repeats < 1 or folder in seen:
                # sd-scripts leaves out a subset without repeats, and a second subset of the same folder
                continue
            seen.add(folder)
            image_dir = _relative(p, folder)
            if not image_dir.is_dir():
                raise InvalidFileError(f"{src}: image folder {image_dir} not found")
            ds_groups.append(ImageGroup(tuple(find_images(image_dir)), settings, cache_dir, src))
        groups.extend(_metadata_buckets(ds_groups))
    return groups


def _fine_tuning_group(
    config: Path, sub: Mapping[str, Any], settings: Settings, cache_dir: Path | None, src: str, seen: set[str]
) -> ImageGroup | None:
    """The group of a fine-tuning subset; ``None`` for one sd-scripts leaves out (no repeats, a repeated
    ``metadata_file``, no entries)."""
    meta = sub["metadata_file"]
    if not isinstance(meta, str):
        raise UsageError(f"{src}: metadata_file must be str, got {meta!r}")
    if settings.num_repeats < 1 or meta in seen:
        # sd-scripts: a subset without repeats, or a second one of the same metadata file, is left out
        return None
    seen.add(meta)
    folder = sub.get("image_dir")
    if folder is not None and not isinstance(folder, str):
        raise UsageError(f"{src}: image_dir must be str, got {folder!r}")
    image_dir = _relative(config, folder) if folder else None
    if image_dir is not None and not image_dir.is_dir():
        raise InvalidFileError(f"{src}: image folder {image_dir} not found")
    meta_path = _relative(config, meta)
    entries = load_metadata(meta_path, image_dir, settings, src)
    if not entries:
        return None
    images = tuple(e.image for e in entries)
    return ImageGroup(images, settings, cache_dir, src, entries, meta_path)


def _metadata_buckets(groups: list[ImageGroup]) -> list[ImageGroup]:
    """A fine-tuning dataset's groups, marked ``metadata_buckets`` when every image has a
    ``train_resolution`` (sd-scripts then buckets by them alone, whatever ``enable_bucket`` says).

    :raises UsageError: ``bucket_no_upscale`` in that case, which sd-scripts refuses.
    """
    entries = [e for g in groups for e in g.entries]
    if not entries or any(g.metadata_file is None for g in groups):
        return groups
    if any(e.train_resolution is None for e in entries):
        return groups
    for g in groups:
        if g.settings.bucket_no_upscale:
            where = g.settings.origin("bucket_no_upscale") or "--bucket-no-upscale"
            raise UsageError(
                f"{where}: bucket_no_upscale = true with {g.metadata_file}, whose train_resolution values "
                "are the buckets already",
                hint="drop bucket_no_upscale: sd-scripts refuses it for such a fine-tuning dataset",
            )
    return [replace(g, metadata_buckets=True) for g in groups]


def _relative(config: Path, folder: str) -> Path:
    q = Path(folder).expanduser()
    if q.is_absolute():
        return q
    near = config.parent / q
    return near if near.exists() else q
