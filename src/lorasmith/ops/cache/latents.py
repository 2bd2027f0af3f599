"""``cache latents``: VAE-encode training images into the caches the trainers read.

One call, :func:`cache_latents`: find the images (a folder or a dataset TOML), give each its bucket
(:mod:`~lorasmith.ops.cache.buckets`), skip those whose cache is already valid, VAE-encode the rest in
batches of one bucket, and write one cache file per image next to it (or in the TOML's
``cache_directory``), named and keyed per family (:mod:`~lorasmith.ops.cache.families`).

Image preparation follows sd-scripts: RGB (RGBA with ``alpha_mask``), scaled to cover the bucket
(Pillow box filter when shrinking, as OpenCV's area filter; Lanczos when enlarging), centre-cropped,
mapped to ``[-1, 1]``. ``latents_flipped`` is the latent of the horizontally flipped crop; ``alpha_mask``
is the crop's alpha channel in ``[0, 1]`` (``1`` where the image has none), float32 ``(H, W)``.

Latents are float32 ``(C, h, w)``. ``latent_dist="sample"`` (sd-scripts' choice, the default for its
families) draws ``mean + std * noise`` with noise from a generator seeded by ``seed`` and the image's file
name, so a result does not depend on batching or on which images were already cached; ``"mean"`` stores
the mean (musubi-tuner's choice, the default for Z-Image). musubi-tuner's Z-Image cache has no flipped
latents and no alpha mask, so ``flip`` / ``alpha_mask`` are refused for it.

A cache is *valid* when it loads and holds the keys this run would write with the expected latent shape
(and, for the multi-resolution families, under this resolution's key suffix). Valid caches are skipped
(``skip_existing``); an invalid or unwanted one is replaced only with ``overwrite``. A FLUX/SD3 cache of
another resolution gets this resolution's keys added, keeping the others (as sd-scripts does). Writes are
atomic. An image that cannot be read or a cache that cannot be written is reported in the result and
the run goes on.

``bucket_no_upscale`` buckets follow the images (:func:`~lorasmith.ops.cache.buckets.place_no_upscale`).
In a fine-tuning subset (``metadata_file``) an entry's ``train_resolution`` stands for the image's size,
as in sd-scripts: it chooses the bucket and the size the image is scaled to (the image itself is scaled to
that size whatever its own aspect ratio) and names the cache, while ``original_size`` and ``crop_ltrb``
come from the image. When every image of the dataset has one, the bucket is exactly the
``train_resolution`` (sd-scripts' buckets from the metadata).
``random_crop`` / ``color_aug``, with which sd-scripts refuses to cache latents, stop the run first. Old
sd-scripts caches ``<stem>.npz`` next to SD/SDXL images, which sd-scripts loads instead of the new names,
are listed in the result, and deleted only with ``remove_old_npz``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from lorasmith.errors import InvalidFileError, LorasmithError, NotAvailableError, UsageError
from lorasmith.ops.cache.buckets import BucketRules, Placement, crop_ltrb, place, place_no_upscale
from lorasmith.ops.cache.datasets import (
    ImageGroup,
    Settings,
    check_cacheable,
    folder_groups,
    load_dataset_config,
    parse_resolution,
    refuse_metadata,
)
from lorasmith.ops.cache.families import LatentFamily, latent_family
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "CacheItem",
    "LatentsCacheResult",
    "cache_latents",
    "cache_path",
    "latent_noise",
    "prepare_image",
    "require_extra",
]

LatentDist = Literal["sample", "mean"]
_DTYPES = ("float32", "float16", "bfloat16")


def require_extra(*modules: str) -> None:
    """Check that the ``cache`` extra is installed.

    :raises NotAvailableError: one of ``modules`` (default diffusers, transformers, PIL) is missing.
    """
    import importlib.util

    for name in modules or ("diffusers", "transformers", "PIL"):
        if importlib.util.find_spec(name) is None:
            raise NotAvailableError(
                f"lorasmith cache needs {'pillow' if name == 'PIL' else name}, which is not installed",
                hint="pip install 'lorasmith[cache]'",
            )


class CacheItem(BaseModel):
    """One image and its cache file.

    :ivar image: the image file.
    :ivar cache: the cache file (``None`` when the image could not be read).
    :ivar status: ``written``, ``skipped`` (a valid cache was there) or ``failed``.
    :ivar bucket: the bucket ``[W, H]`` encoded.
    :ivar error: why it failed.
    """

    image: str
    cache: str | None = None
    status: Literal["written", "skipped", "failed"]
    bucket: tuple[int, int] | None = None
    error: str | None = None


class LatentsCacheResult(BaseModel):
    """What :func:`cache_latents` did.

    :ivar arch: the family.
    :ivar cache_format: ``sd-scripts npz`` or ``musubi-tuner safetensors``.
    :ivar scaling_factor: the family's latent scale.
    :ivar shift_factor: the family's latent shift.
    :ivar stores_scaled: whether the cached latents are scaled (and shifted).
    :ivar latent_dist: ``sample`` or ``mean``.
    :ivar images: images found.
    :ivar written: caches written.
    :ivar skipped: valid caches left as they were.
    :ivar failed: images that failed.
    :ivar buckets: ``"WxH"`` -> number of images.
    :ivar old_npz: latent caches of the old sd-scripts name ``<stem>.npz`` next to the images (SD1/SD2/
        SDXL), which sd-scripts loads instead of the new ones; left in place.
    :ivar old_npz_removed: those removed on request (``remove_old_npz``).
    :ivar items: every image.
    """

    arch: str
    cache_format: str
    scaling_factor: float
    shift_factor: float
    stores_scaled: bool
    latent_dist: str
    images: int
    written: int
    skipped: int
    failed: int
    buckets: dict[str, int] = Field(default_factory=dict)
    old_npz: list[str] = Field(default_factory=list)
    old_npz_removed: list[str] = Field(default_factory=list)
    items: list[CacheItem] = Field(default_factory=list)


@dataclass
class _Job:
    image: Path
    cache: Path
    placement: Placement
    settings: Settings
    size: tuple[int, int]
    item: CacheItem


def cache_path(
    image: Path, size: tuple[int, int], family: LatentFamily, cache_dir: Path | None = None
) -> Path:
    """The trainer's cache file for ``image`` of original ``size`` ``(W, H)``."""
    folder = cache_dir if cache_dir is not None else image.parent
    return folder / f"{image.stem}_{size[0]:04d}x{size[1]:04d}{family.suffix}"


def _key_suffix(family: LatentFamily, latent_hw: tuple[int, int]) -> str:
    return f"_{latent_hw[0]}x{latent_hw[1]}" if family.multi_resolution else ""


def _expected_keys(
    family: LatentFamily, settings: Settings, latent_hw: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape (``()`` when only presence counts) for one image."""
    h, w = latent_hw
    if family.musubi:
        return {f"latents_1x{h}x{w}_float32": (family.latent_channels, h, w)}
    sfx = _key_suffix(family, latent_hw)
    keys: dict[str, tuple[int, ...]] = {
        "latents" + sfx: (family.latent_channels, h, w),
        "original_size" + sfx: (2,),
        "crop_ltrb" + sfx: (4,),
    }
    if settings.flip:
        keys["latents_flipped" + sfx] = (family.latent_channels, h, w)
    if settings.alpha_mask:
        keys["alpha_mask" + sfx] = (h * 8, w * 8)
    return keys


def _read_cache(path: Path, musubi: bool) -> dict[str, Any] | None:
    """Arrays of an existing cache file (numpy), ``None`` when it does not load."""
    import numpy as np

    try:
        if musubi:
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception:  # any unreadable cache is simply invalid
        return None


def _valid(arrays: dict[str, Any] | None, expected: dict[str, tuple[int, ...]]) -> bool:
    if arrays is None:
        return False
    return all(k in arrays and tuple(arrays[k].shape) == shape for k, shape in expected.items())


def latent_noise(image: Path | str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The standard-normal noise used to sample the latent of ``image`` (float32, CPU).

    Seeded by ``seed`` and the CRC-32 of the file name, so it is the same whatever the batch.
    """
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(Path(image).name.encode("utf-8"))) % (2**63))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def prepare_image(image: Path, placement: Placement, alpha: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The bucket-sized crop of ``image`` as float32 ``(3, H, W)`` in ``[-1, 1]``, and its alpha mask.

    :raises InvalidFileError: the image cannot be read.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            im.load()
            pic = im.convert("RGBA" if alpha else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InvalidFileError(f"{image}: cannot read the image ({exc})") from exc
    rw, rh = placement.resized
    if (rw, rh) != pic.size:
        shrinking = rw < pic.size[0]
        # box filter when shrinking matches OpenCV's INTER_AREA (sd-scripts); Lanczos when enlarging
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        pic = pic.resize((rw, rh), resample=resample)
    bw, bh = placement.bucket
    # centre crop, rounding the offset down as the trainers do
    left, top = (rw - bw) // 2, (rh - bh) // 2
    pic = pic.crop((left, top, left + bw, top + bh))
    arr = np.asarray(pic, dtype=np.uint8)
    mask = arr[:, :, 3].astype(np.float32) / 255.0 if alpha else None
    rgb = arr[:, :, :3].astype(np.float32) / 255.0
    # ToTensor + Normalize(0.5, 0.5): [0, 1] -> [-1, 1]
    return ((rgb - 0.5) / 0.5).transpose(2, 0, 1).copy(), mask


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (int(im.size[0]), int(im.size[1]))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InvalidFileError(f"{path}: cannot read the image ({exc})") from exc


def _write_atomic(path: Path, write: Any) -> None:
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


def _save(job: _Job, family: LatentFamily, arrays: dict[str, Any]) -> None:
    import numpy as np

    if family.musubi:
        from safetensors.numpy import save_file

        meta = {
            "architecture": "z_image",
            "width": str(job.size[0]),
            "height": str(job.size[1]),
            "format_version": "1.0.1",
        }
        _write_atomic(job.cache, lambda tmp: save_file(arrays, tmp, metadata=meta))
        return
    if family.multi_resolution and job.cache.exists():
        old = _read_cache(job.cache, False) or {}
        arrays = {**old, **arrays}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    _write_atomic(job.cache, write)


def _resolve_family(model: Path, arch: str | None) -> LatentFamily:
    from lorasmith.io.header import read_header
    from lorasmith.registry import get_registry

    if arch in ("sd2",):
        return latent_family("sd1", "sd2")
    header = read_header(model)
    if arch is not None:
        det = get_registry().detect(header, arch=arch, source=str(model))
        return latent_family(arch, det.variant)
    det = get_registry().detect(header, source=str(model))
    return latent_family(det.arch, det.variant)


def _groups(
    dataset: str | os.PathLike[str] | None,
    dataset_config: str | os.PathLike[str] | None,
    defaults: Settings,
) -> list[ImageGroup]:
    if (dataset is None) == (dataset_config is None):
        raise UsageError(
            "give exactly one of --dataset and --dataset-config",
            hint="--dataset DIR for a folder of images, --dataset-config for an sd-scripts TOML",
        )
    if dataset is not None:
        return folder_groups(dataset, defaults)
    assert dataset_config is not None
    return load_dataset_config(dataset_config, defaults)


def _old_npz(groups: Iterable[ImageGroup], family: LatentFamily) -> list[Path]:
    """The ``<stem>.npz`` files next to the images, which sd-scripts' SD/SDXL latent strategy loads instead
    of ``<stem>_WxH_sd(xl).npz`` when they exist (``SdSdxlLatentsCachingStrategy.get_latents_npz_path``).
    FLUX and SD3 (and musubi-tuner) do not look for them."""
    if family.arch not in ("sd1", "sd2", "sdxl"):
        return []
    # dict, not set: keep the images' order, and two images a.png / a.jpg share one a.npz
    found = {p: None for g in groups for im in g.images if (p := im.with_suffix(".npz")).is_file()}
    return list(found)


def _plan(
    groups: Iterable[ImageGroup], family: LatentFamily, skip_existing: bool, overwrite: bool
) -> tuple[list[CacheItem], list[_Job]]:
    items: list[CacheItem] = []
    jobs: list[_Job] = []
    groups = list(groups)
    if family.musubi:
        refuse_metadata(groups, family.arch, "musubi-tuner")
    for group in groups:
        s = group.settings
        if family.musubi and (s.flip or s.alpha_mask):
            what = "--flip (flip_aug)" if s.flip else "--alpha-mask (alpha_mask)"
            raise UsageError(
                f"{family.arch}: {what} has no place in musubi-tuner's latent cache",
                hint="drop it: musubi-tuner caches neither flipped latents nor alpha masks",
            )
        rules = BucketRules(
            s.resolution,
            s.enable_bucket,
            s.min_bucket_reso,
            s.max_bucket_reso,
            s.bucket_reso_steps,
            "musubi" if family.musubi else "sd-scripts",
            # the trainers ignore bucket_no_upscale without bucketing
            s.bucket_no_upscale and s.enable_bucket,
        )
        resos = rules.resolutions()
        for index, image in enumerate(group.images):
            try:
                size = _image_size(image)
            except LorasmithError as exc:
                items.append(CacheItem(image=str(image), status="failed", error=exc.message))
                continue
            entry = group.entries[index] if group.entries else None
            # sd-scripts' image_size: a fine-tuning entry's train_resolution, else the image's own size
            nominal = entry.train_resolution if entry is not None and entry.train_resolution else size
            if group.metadata_buckets:
                # the metadata's buckets: an image whose size is a bucket keeps it, and each is its own
                placement = place(nominal, [nominal])
            elif rules.no_upscale:
                placement = place_no_upscale(nominal, rules, resos)
                if min(placement.bucket) == 0:
                    items.append(
                        CacheItem(
                            image=str(image),
                            status="failed",
                            error=f"{image}: {nominal[0]}x{nominal[1]} is smaller than bucket_reso_steps "
                            f"{rules.bucket_reso_steps} on one side: no bucket_no_upscale bucket fits",
                        )
                    )
                    continue
            else:
                placement = place(nominal, resos, keep_exact=not family.musubi)
            if nominal != size:
                # sd-scripts computes crop_ltrb from the bucket and the size of the image as loaded
                placement = replace(placement, crop_ltrb=crop_ltrb(placement.bucket, size))
            target = cache_path(image, nominal, family, group.cache_dir)
            item = CacheItem(image=str(image), cache=str(target), status="written", bucket=placement.bucket)
            items.append(item)
            latent_hw = (placement.bucket[1] // 8, placement.bucket[0] // 8)
            if target.exists():
                arrays = _read_cache(target, family.musubi)
                valid = _valid(arrays, _expected_keys(family, s, latent_hw))
                if valid and skip_existing:
                    item.status = "skipped"
                    continue
                # a FLUX/SD3 file of other resolutions only gains keys; anything else is a replacement
                adds_only = (
                    family.multi_resolution
                    and arrays is not None
                    and not any(k in arrays for k in _expected_keys(family, s, latent_hw))
                )
                if not overwrite and not adds_only:
                    item.status = "failed"
                    why = "is valid" if valid else "does not match this run's settings or does not load"
                    item.error = f"{target}: cache exists and {why}"
                    item.error += "; pass --overwrite to re-create it" if not valid else ""
                    continue
            jobs.append(_Job(image, target, placement, s, size, item))
    return items, jobs


def _batches(jobs: list[_Job]) -> list[list[_Job]]:
    by_key: dict[tuple[Any, ...], list[_Job]] = {}
    for job in jobs:
        key = (job.placement.bucket, job.settings.flip, job.settings.alpha_mask, job.settings.batch_size)
        by_key.setdefault(key, []).append(job)
    out: list[list[_Job]] = []
    for key, group in by_key.items():
        size = max(1, int(key[3]))
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out


def _encode(
    vae: Any, pixels: torch.Tensor, jobs: Sequence[_Job], family: LatentFamily, dist: str, seed: int
) -> torch.Tensor:
    """Latents (float32, CPU) of a batch, as the family's trainer stores them."""
    import torch

    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mean = posterior.mean.float().cpu()
        if dist == "mean":
            z = mean
        else:
            std = posterior.std.float().cpu()
            noise = torch.stack([latent_noise(j.image, mean.shape[1:], seed) for j in jobs])
            z = mean + std * noise
    z = torch.as_tensor(z)
    if family.stores_scaled:
        # BFL's FLUX autoencoder returns scale * (z - shift) from encode and sd-scripts caches that value;
        # the other families' trainers scale (and shift) when they load the cache, so theirs stay raw
        z = family.scaling_factor * (z - family.shift_factor)
    return z


def cache_latents(
    model: str | os.PathLike[str],
    *,
    dataset: str | os.PathLike[str] | None = None,
    dataset_config: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    resolution: str | int | tuple[int, int] | None = None,
    enable_bucket: bool = False,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int | None = None,
    bucket_no_upscale: bool = False,
    batch_size: int = 1,
    flip: bool = False,
    alpha_mask: bool = False,
    skip_existing: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    latent_dist: LatentDist | None = None,
    seed: int = 0,
    remove_old_npz: bool = False,
    progress: ProgressCallback = noop,
) -> LatentsCacheResult:
    """VAE-encode the images of ``dataset`` (a folder) or ``dataset_config`` (a TOML) into trainer caches.

    :param model: the checkpoint whose VAE encodes (and whose family names the caches).
    :param arch: force the family (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, ``zimage``).
    :param vae: take the VAE from this file instead of ``model`` (e.g. FLUX's ``ae.safetensors``).
    :param resolution: ``W`` or ``(W, H)``; the family's training resolution when omitted.
    :param bucket_reso_steps: bucket step; 64 (sd-scripts) or 16 (musubi-tuner) when omitted.
    :param bucket_no_upscale: with ``enable_bucket``, buckets follow the image sizes and never enlarge an
        image (the trainers' ``bucket_no_upscale`` rule; ``min_bucket_reso`` / ``max_bucket_reso`` unused).
    :param dtype: the VAE's compute dtype; latents are saved as float32 whatever it is.
    :param latent_dist: ``sample`` or ``mean``; what the family's trainer stores when omitted (``sample``
        for sd-scripts, ``mean`` for musubi-tuner's Z-Image).
    :param remove_old_npz: delete the ``<stem>.npz`` files next to the images (SD1/SD2/SDXL), which
        sd-scripts would load instead of the new caches; without it they are only listed
        (``old_npz``). Nothing else is ever deleted.
    :raises UsageError: bad option values (also ``flip`` / ``alpha_mask`` for Z-Image), or a dataset
        setting under which sd-scripts refuses to cache latents (``random_crop``, ``color_aug``).
    :raises NotAvailableError: the ``cache`` extra is not installed.
    :raises InvalidFileError: unreadable model, dataset folder or config.
    """
    require_extra("diffusers", "PIL")
    if dtype not in _DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if latent_dist not in (None, "sample", "mean"):
        raise UsageError(f"--latent-dist {latent_dist!r} is not sample or mean")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    model_path = Path(model)
    family = _resolve_family(model_path, arch)
    dist = latent_dist or family.default_dist
    steps = bucket_reso_steps or family.default_steps
    if steps < 8 or steps % 8:
        raise UsageError(f"--bucket-reso-steps must be a multiple of 8, got {steps}")
    reso = parse_resolution(resolution if resolution is not None else family.default_resolution)
    if reso[0] % 8 or reso[1] % 8:
        raise UsageError(f"--resolution {reso[0]}x{reso[1]} must be a multiple of 8 on both sides")
    if min_bucket_reso > max_bucket_reso:
        raise UsageError(
            f"--min-bucket-reso {min_bucket_reso} is larger than --max-bucket-reso {max_bucket_reso}"
        )
    defaults = Settings(
        reso,
        enable_bucket,
        min_bucket_reso,
        max_bucket_reso,
        steps,
        batch_size,
        flip=flip,
        alpha_mask=alpha_mask,
        bucket_no_upscale=bucket_no_upscale,
    )
    groups = _groups(dataset, dataset_config, defaults)
    check_cacheable(groups, "latents")
    old_npz = _old_npz(groups, family)
    removed: list[str] = []
    if remove_old_npz:
        for path in old_npz:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InvalidFileError(
                    f"{path}: cannot remove the old latent cache ({exc.strerror or exc})",
                    hint="remove it by hand: sd-scripts would load it instead of the new cache",
                ) from exc
            removed.append(str(path))
        old_npz = []
    items, jobs = _plan(groups, family, skip_existing, overwrite)
    total = len(items)
    done = total - len(jobs)
    progress(ProgressEvent("encoding", done, total))
    if jobs:
        _run_jobs(jobs, family, vae or model_path, device, dtype, dist, seed, progress, done, total)
    buckets: dict[str, int] = {}
    for it in items:
        if it.bucket is not None:
            label = f"{it.bucket[0]}x{it.bucket[1]}"
            buckets[label] = buckets.get(label, 0) + 1
    return LatentsCacheResult(
        arch=family.arch,
        cache_format="musubi-tuner safetensors" if family.musubi else "sd-scripts npz",
        scaling_factor=family.scaling_factor,
        shift_factor=family.shift_factor,
        stores_scaled=family.stores_scaled,
        latent_dist=dist,
        images=total,
        written=sum(it.status == "written" for it in items),
        skipped=sum(it.status == "skipped" for it in items),
        failed=sum(it.status == "failed" for it in items),
        buckets=dict(sorted(buckets.items())),
        old_npz=[str(p) for p in old_npz],
        old_npz_removed=removed,
        items=items,
    )


def _run_jobs(
    jobs: list[_Job],
    family: LatentFamily,
    vae_file: str | os.PathLike[str],
    device: str,
    dtype: str,
    dist: str,
    seed: int,
    progress: ProgressCallback,
    done: int,
    total: int,
) -> None:
    import numpy as np
    import torch

    from lorasmith.io.dtypes import torch_dtype
    from lorasmith.ops._device import compute_device
    from lorasmith.ops.cache.vae import build_vae

    dev = compute_device(device, error=UsageError)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        dtype
    ) or torch_dtype(dtype)
    model = build_vae(
        vae_file,
        scaling_factor=family.scaling_factor,
        shift_factor=family.shift_factor,
        device=str(dev),
        dtype=tdt,
    )
    for batch in _batches(jobs):
        ready: list[tuple[_Job, np.ndarray, np.ndarray | None]] = []
        for job in batch:
            try:
                pixels, mask = prepare_image(job.image, job.placement, job.settings.alpha_mask)
            except LorasmithError as exc:
                job.item.status, job.item.error = "failed", exc.message
                done += 1
                progress(ProgressEvent("encoding", done, total, str(job.image)))
                continue
            ready.append((job, pixels, mask))
        if not ready:
            continue
        x = torch.from_numpy(np.stack([r[1] for r in ready])).to(device=dev, dtype=tdt)
        live = [r[0] for r in ready]
        z = _encode(model, x, live, family, dist, seed)
        zf = (
            _encode(model, torch.flip(x, dims=[3]), live, family, dist, seed + 1)
            if ready[0][0].settings.flip
            else None
        )
        for i, (job, _pixels, mask) in enumerate(ready):
            arrays = _arrays(job, family, z[i], None if zf is None else zf[i], mask)
            try:
                _save(job, family, arrays)
            except OSError as exc:
                job.item.status = "failed"
                job.item.error = f"{job.cache}: cannot write the cache ({exc.strerror or exc})"
            done += 1
            progress(ProgressEvent("encoding", done, total, str(job.image)))


def _arrays(
    job: _Job, family: LatentFamily, z: torch.Tensor, zf: torch.Tensor | None, mask: np.ndarray | None
) -> dict[str, Any]:
    import numpy as np

    lat = z.numpy().astype(np.float32)
    h, w = lat.shape[1:]
    if family.musubi:
        return {f"latents_1x{h}x{w}_float32": np.ascontiguousarray(lat)}
    sfx = _key_suffix(family, (h, w))
    out: dict[str, Any] = {
        "latents" + sfx: lat,
        "original_size" + sfx: np.array(job.size),
        "crop_ltrb" + sfx: np.array(job.placement.crop_ltrb),
    }
    if zf is not None:
        out["latents_flipped" + sfx] = zf.numpy().astype(np.float32)
    if mask is not None:
        out["alpha_mask" + sfx] = mask.astype(np.float32)
    return out
