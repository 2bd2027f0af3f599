"""``cache norms``, ``cache info``, ``cache clear``: the base-norm cache of :mod:`lorasmith.ops.norms`.

``cache norms --base CKPT`` fills the cache ahead of time with the norms that base-aware resize recipes
ask for: every LoRA target of the base's family (each alias's canonical weight and row slice) that the
file holds; when none of them is in the file (a layout the family does not use as canonical), every
weight of two or more dimensions. The cache is keyed by the file's content, so a copy or a renamed file
hits the same entry.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from lorasmith.io.header import read_header
from lorasmith.ops import norms as _norms
from lorasmith.progress import ProgressCallback, noop

__all__ = [
    "NormsCacheEntry",
    "NormsCacheInfo",
    "NormsCacheResult",
    "NormsClearResult",
    "cache_base_norms",
    "clear_norms_cache",
    "norms_cache_info",
]


class NormsCacheResult(BaseModel):
    """What ``cache norms`` did.

    :ivar base: the base checkpoint.
    :ivar arch: its family (``None`` when it could not be told and every weight was taken).
    :ivar identity: its content identity.
    :ivar cache_file: the cache file.
    :ivar weights: weights (or row slices) covered.
    :ivar hits: already cached.
    :ivar computed: computed now.
    """

    base: str
    arch: str | None
    identity: str
    cache_file: str | None
    weights: int
    hits: int
    computed: int


class NormsCacheEntry(BaseModel):
    """One cache file (one base checkpoint content).

    :ivar identity: the content identity.
    :ivar path: the cache file.
    :ivar entries: cached weights.
    :ivar bytes: size of the cache file.
    :ivar source: the base file's path when last written.
    :ivar updated: seconds since the epoch of the last write.
    """

    identity: str
    path: str
    entries: int
    bytes: int
    source: str | None
    updated: float | None


class NormsCacheInfo(BaseModel):
    """``cache info``: the cache folder and its files.

    :ivar folder: the cache folder.
    :ivar files: the cache files, newest first.
    :ivar bytes: their total size.
    """

    folder: str
    files: list[NormsCacheEntry]
    bytes: int


class NormsClearResult(BaseModel):
    """``cache clear``: what was removed.

    :ivar folder: the cache folder.
    :ivar removed: files removed.
    """

    folder: str
    removed: int


def _targets(base: Path, arch: str | None) -> tuple[str | None, list[_norms.NormKey]]:
    from lorasmith.archs.base import lora_modules
    from lorasmith.errors import DetectionError, InvalidFileError
    from lorasmith.registry import get_registry

    header = read_header(base)
    reg = get_registry()
    family: str | None
    try:
        det = reg.detect(header, arch=arch, source=str(base))
        family, variant = det.arch, det.variant
    except DetectionError:
        if arch is not None:
            raise
        det, family, variant = None, None, None
    # base-aware recipes look norms up by a *base* checkpoint's content: a LoRA's own factor norms would
    # fill the cache with entries no resize ever asks for (and hide a wrong --base)
    lora = (
        det.kind == "lora"
        if det is not None and det.kind != "unknown"
        else bool(lora_modules(header.tensors))
    )
    if lora:
        what = f"a {det.arch} LoRA" if det is not None and det.kind == "lora" else "a LoRA"
        raise InvalidFileError(
            f"{base}: is {what}, not a checkpoint",
            hint="cache norms takes the base checkpoint that LoRAs are resized against",
        )
    keys: list[_norms.NormKey] = []
    if family is not None:
        fam = reg.get(family)
        for alias in fam.aliases(variant):
            if alias.target.key in header.tensors:
                keys.append((alias.target.key, alias.target.slice))
    if not keys:
        keys = [(k, None) for k, t in header.tensors.items() if len(t.shape) >= 2 and k.endswith(".weight")]
    return family, list(dict.fromkeys(keys))


def cache_base_norms(
    base: str | os.PathLike[str],
    *,
    arch: str | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback = noop,
) -> NormsCacheResult:
    """Compute and cache the norms of every LoRA target weight of ``base``.

    :raises InvalidFileError: the base is not a readable safetensors file, or it is a LoRA.
    """
    p = Path(base)
    family, keys = _targets(p, arch)
    rep = _norms.compute_norms(p, keys, device=device, progress=progress, cache_dir=cache_dir)
    return NormsCacheResult(
        base=str(p),
        arch=family,
        identity=rep.identity,
        cache_file=None if rep.cache_file is None else str(rep.cache_file),
        weights=len(keys),
        hits=rep.hits,
        computed=rep.computed,
    )


def _folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else _norms.default_cache_dir()


def norms_cache_info(cache_dir: str | os.PathLike[str] | None = None) -> NormsCacheInfo:
    """The norms cache files."""
    files = [
        NormsCacheEntry(
            identity=c.identity,
            path=str(c.path),
            entries=c.entries,
            bytes=c.bytes,
            source=c.source,
            updated=c.updated,
        )
        for c in _norms.cache_info(cache_dir)
    ]
    return NormsCacheInfo(folder=str(_folder(cache_dir)), files=files, bytes=sum(f.bytes for f in files))


def clear_norms_cache(
    cache_dir: str | os.PathLike[str] | None = None,
    bases: list[str | os.PathLike[str]] | None = None,
) -> NormsClearResult:
    """Remove the norms cache of ``bases`` (by content identity), or all of it."""
    identities = None if not bases else [_norms.content_identity(b) for b in bases]
    removed = _norms.clear_cache(cache_dir, identities)
    return NormsClearResult(folder=str(_folder(cache_dir)), removed=removed)
