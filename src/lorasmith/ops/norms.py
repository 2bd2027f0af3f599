"""Base-weight norms (spectral and Frobenius), cached on disk by the base file's content.

Base-aware resize recipes (``spn_ckpt``, ``fro_ckpt``) and the "error against the base layer" report need,
for each LoRA target, the spectral norm ``sigma_max(W)`` and the Frobenius norm ``||W||_F`` of the base
weight (of its row slice for fused targets such as q/k/v of a fused ``qkv``). Computing a spectral norm
costs a decomposition, so results are kept in a small JSON file per base checkpoint:

- **where**: ``$LORASMITH_CACHE_DIR/norms/`` when that variable is set, else
  ``$XDG_CACHE_HOME/lorasmith/norms/``, else ``~/.cache/lorasmith/norms/`` (:func:`default_cache_dir`);
- **keyed by content, not path** (:func:`content_identity`): the same checkpoint copied, renamed or
  downloaded twice hits the same entry, and a changed file misses;
- **entries**: one per ``(tensor key, row slice)``; a file grows as more targets are asked for;
- **writes** are atomic (temporary file + ``os.replace``) and merge with what another process may have
  written meanwhile; an unreadable cache file is ignored and rewritten.

The API (:func:`compute_norms`, :func:`load_norms`, :func:`cache_info`, :func:`clear_cache`) is what
``lorasmith resize --base`` uses and what a ``lorasmith cache norms`` command exposes.

Numerics: the Frobenius norm is summed in float64; the spectral norm is the square root of the largest
eigenvalue of the smaller Gram matrix (``W W^T`` or ``W^T W``, formed in float32 on the compute device,
eigenvalues in float64), exact to float32 rounding (about 1e-6 relative).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasmith.errors import InvalidFileError, LorasmithError
from lorasmith.io.header import read_header
from lorasmith.progress import ProgressCallback, ProgressEvent, noop

__all__ = [
    "FULL_HASH_LIMIT",
    "SAMPLE_COUNT",
    "SAMPLE_SIZE",
    "CacheFileInfo",
    "NormKey",
    "NormsReport",
    "WeightNorms",
    "cache_info",
    "clear_cache",
    "compute_norms",
    "content_identity",
    "default_cache_dir",
    "load_norms",
    "norm_key_text",
    "weight_norms",
]

#: Data sections up to this size are hashed completely by :func:`content_identity`.
FULL_HASH_LIMIT = 64 * 1024 * 1024
#: Above :data:`FULL_HASH_LIMIT`, this many evenly spaced chunks of the data section are hashed...
SAMPLE_COUNT = 64
#: ...of this size each (64 MiB read in all, whatever the checkpoint's size).
SAMPLE_SIZE = 1024 * 1024

_FORMAT = "lorasmith-norms"
_VERSION = 1

#: ``(tensor key in the base file, row slice (dim, start, length) or None)``.
NormKey = tuple[str, tuple[int, int, int] | None]


@dataclass(frozen=True)
class WeightNorms:
    """Norms of one base weight (or row slice), as a 2-D matrix ``[rows, everything else]``.

    :ivar spectral: the largest singular value.
    :ivar frobenius: the Frobenius norm.
    """

    spectral: float
    frobenius: float


@dataclass(frozen=True)
class NormsReport:
    """What :func:`compute_norms` found and did.

    :ivar identity: the base file's content identity.
    :ivar cache_file: the cache file used (``None`` when caching was off).
    :ivar norms: the norms of every requested key.
    :ivar hits: how many came from the cache.
    :ivar computed: how many were computed (and stored).
    """

    identity: str
    cache_file: Path | None
    norms: dict[NormKey, WeightNorms]
    hits: int
    computed: int


@dataclass(frozen=True)
class CacheFileInfo:
    """One cache file (one base checkpoint's content).

    :ivar identity: the content identity it is keyed by.
    :ivar path: the cache file.
    :ivar entries: number of cached weights.
    :ivar bytes: size of the cache file.
    :ivar source: the base file's path when the entry was last written (informational only).
    :ivar file_size: the base file's size.
    :ivar updated: seconds since the epoch of the last write.
    """

    identity: str
    path: Path
    entries: int
    bytes: int
    source: str | None
    file_size: int | None
    updated: float | None


def norm_key_text(key: NormKey) -> str:
    """The JSON key of a :data:`NormKey`: ``"name"`` or ``"name@dim:start:length"``."""
    name, sl = key
    return name if sl is None else f"{name}@{sl[0]}:{sl[1]}:{sl[2]}"


def default_cache_dir() -> Path:
    """The norms cache folder (see the module docstring for the order of precedence)."""
    env = os.environ.get("LORASMITH_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "norms"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "lorasmith" / "norms"


def content_identity(path: str | os.PathLike[str]) -> str:
    """A sha256 hex digest identifying a safetensors file by its content, not its path.

    Hashed, in order: a format tag, the 8-byte header length and the whole header (names, shapes, dtypes,
    offsets, metadata), the data section's size, and the data: all of it when it is at most
    :data:`FULL_HASH_LIMIT` (64 MiB), else :data:`SAMPLE_COUNT` chunks of :data:`SAMPLE_SIZE` at evenly
    spaced offsets from its first to its last byte (64 MiB read whatever the checkpoint's size; the
    offsets are a function of the size alone). A copy of a file has the same identity; any change to the
    header, to the size or to a hashed byte gives a new one. A change confined to bytes between samples of
    a large file is not seen; a fine-tune or a merge rewrites every tensor, so it always is.

    :raises InvalidFileError: not a valid safetensors file, or unreadable.
    """
    header = read_header(path)
    digest = hashlib.sha256(f"{_FORMAT}-v{_VERSION}\0".encode())
    size = header.data_size
    try:
        with open(header.path, "rb") as fh:
            digest.update(fh.read(header.data_offset))
            digest.update(struct.pack("<Q", size))
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(SAMPLE_SIZE), b""):
                    digest.update(chunk)
            else:
                step = (size - SAMPLE_SIZE) / (SAMPLE_COUNT - 1)
                for i in range(SAMPLE_COUNT):
                    fh.seek(header.data_offset + int(i * step))
                    digest.update(fh.read(SAMPLE_SIZE))
    except OSError as exc:
        raise InvalidFileError(
            f"{header.path}: cannot read ({exc.strerror or exc})", hint="check the file"
        ) from exc
    return digest.hexdigest()


def _cache_file(cache_dir: Path, identity: str) -> Path:
    return cache_dir / f"{identity}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
        return {}
    if not isinstance(data.get("norms"), dict):
        return {}
    return data


def _entries(data: dict[str, Any]) -> dict[str, WeightNorms]:
    out: dict[str, WeightNorms] = {}
    for key, value in data.get("norms", {}).items():
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        ):
            out[key] = WeightNorms(spectral=float(value[0]), frobenius=float(value[1]))
    return out


def _write_cache(
    path: Path, identity: str, source: Path, file_size: int, new: dict[str, WeightNorms]
) -> None:
    """Merge ``new`` into the cache file (re-reading it first) and replace it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = _entries(_read_cache(path))
    merged.update(new)
    data = {
        "format": _FORMAT,
        "version": _VERSION,
        "identity": identity,
        "source": str(source),
        "file_size": file_size,
        "updated": time.time(),
        "norms": {k: [v.spectral, v.frobenius] for k, v in sorted(merged.items())},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_norms(
    base_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[NormKey, WeightNorms]:
    """Every cached norm of the base file's content (empty when nothing is cached).

    :raises InvalidFileError: the base is not a readable safetensors file.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    identity = content_identity(base_path)
    raw = _entries(_read_cache(_cache_file(folder, identity)))
    return {_parse_key(k): v for k, v in raw.items()}


def _parse_key(text: str) -> NormKey:
    name, sep, rest = text.rpartition("@")
    if sep and name:
        parts = rest.split(":")
        if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
            return name, (int(parts[0]), int(parts[1]), int(parts[2]))
    return text, None


def weight_norms(weight: Any) -> WeightNorms:
    """Spectral and Frobenius norms of a weight seen as ``[rows, everything else]`` (see the module doc).

    :param weight: a torch tensor on the compute device (any float dtype).
    """
    import torch

    w = weight.reshape(weight.shape[0], -1) if weight.ndim != 2 else weight
    if w.ndim == 1 or w.numel() == 0:
        w = w.reshape(-1, 1)
    fro = float(torch.linalg.vector_norm(w.to(torch.float64)))
    w32 = w.to(torch.float32)
    gram = w32 @ w32.T if w32.shape[0] <= w32.shape[1] else w32.T @ w32
    top = float(torch.linalg.eigvalsh(gram.to(torch.float64))[-1]) if gram.numel() else 0.0
    return WeightNorms(spectral=math.sqrt(max(top, 0.0)), frobenius=fro)


def compute_norms(
    base_path: str | os.PathLike[str],
    keys: Iterable[NormKey],
    *,
    device: str = "auto",
    progress: ProgressCallback = noop,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> NormsReport:
    """The norms of the base weights ``keys``, from the cache where possible, computed (and cached) otherwise.

    :param base_path: the base checkpoint (safetensors).
    :param keys: ``(tensor key in the base file, row slice or None)``; a slice ``(dim, start, length)``
        selects part of a fused weight.
    :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`lorasmith.linalg.resolve_device`).
    :param progress: receives ``ProgressEvent("norms", done, total, key)`` while computing.
    :param cache_dir: the cache folder (default :func:`default_cache_dir`).
    :param use_cache: read and write the cache; false computes everything and stores nothing.
    :raises InvalidFileError: the base is not a readable safetensors file.
    :raises LorasmithError: a key the base does not have, or a slice outside the weight.
    """
    import torch

    from lorasmith.io.reader import open_tensors

    wanted: list[NormKey] = list(dict.fromkeys(keys))
    header = read_header(base_path)
    for name, sl in wanted:
        info = header.tensors.get(name)
        if info is None:
            raise LorasmithError(
                f"{header.path}: no tensor {name!r} in the base checkpoint",
                hint="give the base model the LoRA was trained on, as a single-file checkpoint",
            )
        if sl is not None:
            dim, start, length = sl
            if not 0 <= dim < len(info.shape) or start < 0 or length < 1 or start + length > info.shape[dim]:
                raise LorasmithError(
                    f"{header.path}: rows {start}..{start + length} of {name!r} are outside its shape "
                    f"{list(info.shape)}",
                    hint="the base checkpoint does not match the LoRA's model",
                )
    identity = content_identity(base_path)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = _cache_file(folder, identity) if use_cache else None
    cached = _entries(_read_cache(cache_path)) if cache_path is not None else {}
    result: dict[NormKey, WeightNorms] = {}
    missing: list[NormKey] = []
    for key in wanted:
        hit = cached.get(norm_key_text(key))
        if hit is not None:
            result[key] = hit
        else:
            missing.append(key)
    if missing:
        from lorasmith.ops._device import compute_device

        dev = compute_device(device)
        new: dict[str, WeightNorms] = {}
        with open_tensors(base_path, header) as tf, torch.no_grad():
            for i, key in enumerate(missing):
                name, sl = key
                w = tf.get(name)
                if sl is not None:
                    w = w.narrow(*sl)
                norms = weight_norms(w.to(dev))
                result[key] = norms
                new[norm_key_text(key)] = norms
                progress(ProgressEvent("norms", i + 1, len(missing), name))
        if cache_path is not None:
            # a read-only cache folder only costs recomputation next time
            with contextlib.suppress(OSError):
                _write_cache(cache_path, identity, header.path, header.file_size, new)
    return NormsReport(
        identity=identity,
        cache_file=cache_path,
        norms={k: result[k] for k in wanted},
        hits=len(wanted) - len(missing),
        computed=len(missing),
    )


def cache_info(cache_dir: str | os.PathLike[str] | None = None) -> list[CacheFileInfo]:
    """Every norms cache file, newest first."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    out: list[CacheFileInfo] = []
    for path in folder.glob("*.json"):
        data = _read_cache(path)
        if not data:
            continue
        size = data.get("file_size")
        updated = data.get("updated")
        source = data.get("source")
        out.append(
            CacheFileInfo(
                identity=path.stem,
                path=path,
                entries=len(_entries(data)),
                bytes=path.stat().st_size,
                source=source if isinstance(source, str) else None,
                file_size=size if isinstance(size, int) else None,
                updated=float(updated) if isinstance(updated, (int, float)) else None,
            )
        )
    out.sort(key=lambda c: c.updated or 0.0, reverse=True)
    return out


def clear_cache(
    cache_dir: str | os.PathLike[str] | None = None, identities: Sequence[str] | None = None
) -> int:
    """Remove cache files (all of them, or those of ``identities``); returns how many were removed."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return 0
    removed = 0
    targets = (
        [folder / f"{i}.json" for i in identities] if identities is not None else list(folder.glob("*.json"))
    )
    for path in targets:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed
