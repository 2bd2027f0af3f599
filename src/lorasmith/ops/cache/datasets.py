"""Training images to cache: a folder, or an sd-scripts / musubi-tuner dataset TOML.

A folder (``--dataset DIR``) contributes the images directly in it and in its immediate subfolders (the
kohya ``<repeats>_<name>`` layout), not deeper.

The TOML is read the way sd-scripts reads it: ``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``,
the innermost value winning, and the command-line options filling in what the file leaves out. Keys used:
``resolution`` (``512`` or ``[W, H]``), ``enable_bucket``, ``min_bucket_reso``, ``max_bucket_reso``,
``bucket_reso_steps``, ``batch_size``, ``flip_aug``, ``alpha_mask``, ``caption_extension``, and the image
folder ``image_dir`` (sd-scripts) or ``image_directory`` (musubi-tuner, with ``cache_directory``).
Keys that change what a trainer would cache but are not supported (``bucket_no_upscale``,
``random_crop``) are an error naming the key, rather than a silently different cache.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorasmith.errors import InvalidFileError, NotAvailableError, UsageError

__all__ = ["IMAGE_EXTENSIONS", "ImageGroup", "Settings", "find_images", "folder_group", "load_dataset_config"]

#: File extensions taken as images (case-insensitive), as the trainers glob them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")

_UNSUPPORTED = ("bucket_no_upscale", "random_crop")


@dataclass(frozen=True)
class Settings:
    """Options that decide how a group of images is cached.

    :ivar resolution: ``(W, H)``.
    :ivar enable_bucket: bucket by aspect ratio.
    :ivar min_bucket_reso: smallest bucket side.
    :ivar max_bucket_reso: largest bucket side.
    :ivar bucket_reso_steps: bucket step.
    :ivar batch_size: images per VAE call.
    :ivar flip: also cache the horizontally flipped image.
    :ivar alpha_mask: also store the alpha channel as a mask.
    :ivar caption_extension: caption file extension (text caching).
    """

    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    batch_size: int = 1
    flip: bool = False
    alpha_mask: bool = False
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class ImageGroup:
    """Images sharing one :class:`Settings`.

    :ivar images: the image files, sorted.
    :ivar settings: how they are cached.
    :ivar cache_dir: where caches go (``None``: next to each image).
    """

    images: tuple[Path, ...]
    settings: Settings
    cache_dir: Path | None = None


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
    """The :class:`ImageGroup` of a dataset folder.

    :raises InvalidFileError: the folder is missing or holds no image.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InvalidFileError(f"{p}: dataset folder not found", hint="pass a folder of training images")
    images = find_images(p, subfolders=True)
    if not images:
        raise InvalidFileError(
            f"{p}: no images found ({', '.join(IMAGE_EXTENSIONS)})",
            hint="pass the folder that holds the training images",
        )
    return ImageGroup(tuple(images), settings)


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
    for key in _UNSUPPORTED:
        if table.get(key):
            raise NotAvailableError(
                f"{source}: {key} = true is not supported by lorasmith cache",
                hint=f"remove {key} or cache with the trainer's own script",
            )
    changes: dict[str, Any] = {}
    if "resolution" in table:
        changes["resolution"] = parse_resolution(table["resolution"], f"{source}: resolution")
    simple = {
        "enable_bucket": ("enable_bucket", bool),
        "min_bucket_reso": ("min_bucket_reso", int),
        "max_bucket_reso": ("max_bucket_reso", int),
        "bucket_reso_steps": ("bucket_reso_steps", int),
        "batch_size": ("batch_size", int),
        "flip_aug": ("flip", bool),
        "alpha_mask": ("alpha_mask", bool),
        "caption_extension": ("caption_extension", str),
    }
    for key, (field, kind) in simple.items():
        if key in table:
            value = table[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UsageError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
            changes[field] = value
    return replace(settings, **changes)


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

    Relative folders are taken relative to the TOML file's folder when they exist there, else to the
    current folder.

    :raises InvalidFileError: unreadable file, a missing image folder, or no dataset in it.
    :raises UsageError: a key with a value of the wrong type.
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
        for j, sub in enumerate(tables):
            src = f"{p} datasets[{i}].subsets[{j}]" if tables is subsets else f"{p} datasets[{i}]"
            settings = _apply(ds_settings, sub, src) if tables is subsets else ds_settings
            folder = sub.get("image_dir") or sub.get("image_directory")
            if not isinstance(folder, str):
                raise InvalidFileError(f"{src}: no image_dir / image_directory", hint="name the image folder")
            image_dir = _relative(p, folder)
            cache = sub.get("cache_directory") or ds.get("cache_directory")
            cache_dir = _relative(p, cache) if isinstance(cache, str) else None
            if not image_dir.is_dir():
                raise InvalidFileError(f"{src}: image folder {image_dir} not found")
            groups.append(ImageGroup(tuple(find_images(image_dir)), settings, cache_dir))
    return groups


def _relative(config: Path, folder: str) -> Path:
    q = Path(folder).expanduser()
    if q.is_absolute():
        return q
    near = config.parent / q
    return near if near.exists() else q
