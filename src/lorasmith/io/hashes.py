"""The hashes the diffusion tools key LoRAs and checkpoints by, computed by streaming (torch-free).

- ``sshs_model_hash`` (kohya sd-scripts, read by A1111 for the LoRA short hash): serialise the tensors the
  way ``safetensors.torch.save`` does with only the ``ss_*`` metadata kept, and take the sha256 of the data
  section (the bytes after the 8-byte length and the JSON header). The data section does not depend on the
  metadata, so this is the sha256 of the data section laid out in the canonical order.
- ``sshs_legacy_hash``: the first 8 hex digits of the sha256 of bytes ``[0x100000, 0x110000)`` of that same
  ``ss_*``-only serialisation (``e3b0c442``, the hash of no bytes, for one under 1 MiB).
- ``modelspec.hash_sha256``: ``"0x"`` + the sha256 of the data section.
- A1111 "AutoV2": the first 10 hex digits of the sha256 of the whole file.

Files are read in chunks; memory use stays small whatever the file size.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from lorasmith.errors import InvalidFileError
from lorasmith.io.header import Header, TensorInfo, read_header
from lorasmith.io.layout import plan_layout, serialize_prefix

__all__ = [
    "EMPTY_LEGACY_HASH",
    "LEGACY_LENGTH",
    "LEGACY_START",
    "ReadableFile",
    "autov2_hash",
    "data_sha256",
    "describe_hash",
    "file_sha256",
    "iter_file_range",
    "legacy_hash",
    "ss_metadata",
    "sshs_hashes_of_file",
]

#: Start of the byte window hashed by ``sshs_legacy_hash`` (1 MiB).
LEGACY_START = 0x100000
#: Length of that window (64 KiB).
LEGACY_LENGTH = 0x10000
#: ``sshs_legacy_hash`` of any serialisation shorter than 1 MiB.
EMPTY_LEGACY_HASH = hashlib.sha256(b"").hexdigest()[:8]

CHUNK_SIZE = 8 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def ss_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The training metadata (keys starting with ``ss_``) that the sshs hashes are computed with."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def legacy_hash(prefix: bytes, read_data: Callable[[int, int], bytes]) -> str:
    """``sshs_legacy_hash`` of the serialisation ``prefix`` + data section.

    :param prefix: the 8-byte length and the header of the ``ss_*``-only serialisation.
    :param read_data: ``read_data(offset, length)`` returns up to ``length`` bytes of the data section from
        ``offset`` (fewer at its end).
    """
    end = LEGACY_START + LEGACY_LENGTH
    window = prefix[LEGACY_START:end]
    lo = max(0, LEGACY_START - len(prefix))
    hi = max(0, end - len(prefix))
    if hi > lo:
        window += read_data(lo, hi - lo)
    return hashlib.sha256(window).hexdigest()[:8]


def _io_error(path: Path, exc: OSError) -> InvalidFileError:
    return InvalidFileError(
        f"{path}: cannot read ({exc.strerror or exc})", hint="check the file and the disk"
    )


class ReadableFile(Protocol):
    """What :func:`iter_file_range` needs of an open file."""

    def seek(self, offset: int, whence: int = 0, /) -> int:
        """Move to ``offset``."""
        ...

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Read into ``buffer``; the number of bytes read."""
        ...


def iter_file_range(fh: ReadableFile, offset: int, length: int, path: Path) -> Iterator[memoryview]:
    """Yield the bytes ``[offset, offset + length)`` of an open file in chunks (one reused buffer).

    :raises InvalidFileError: the file ends early.
    """
    buf = bytearray(min(CHUNK_SIZE, max(length, 1)))
    view = memoryview(buf)
    fh.seek(offset)
    left = length
    while left > 0:
        want = min(left, len(buf))
        got = fh.readinto(view[:want])
        if not got:
            raise InvalidFileError(
                f"{path}: file ends {left} bytes early (truncated while being read?)", hint="check the file"
            )
        yield view[:got]
        left -= got


def _segments(header: Header, layout: list[TensorInfo]) -> list[tuple[int, int]]:
    """Absolute file ranges, in canonical data order, with neighbouring ranges merged."""
    segs: list[tuple[int, int]] = []
    for t in layout:
        src = header.tensors[t.name]
        if src.nbytes == 0:
            continue
        start = header.data_offset + src.start
        if segs and segs[-1][0] + segs[-1][1] == start:
            segs[-1] = (segs[-1][0], segs[-1][1] + src.nbytes)
        else:
            segs.append((start, src.nbytes))
    return segs


def sshs_hashes_of_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a safetensors file, as kohya sd-scripts computes them.

    The file is re-serialised logically (canonical tensor order, only the ``ss_*`` metadata) and streamed;
    a file whose tensors are out of canonical order or have gaps gives the same hashes as its canonical
    rewrite.

    :raises InvalidFileError: the file is not a valid safetensors file or cannot be read.
    """
    header = read_header(path)
    p = header.path
    layout = plan_layout((t.name, t.dtype, t.shape) for t in header.tensors.values())
    prefix = serialize_prefix(layout, ss_metadata(header.metadata))
    segments = _segments(header, layout)
    try:
        with open(p, "rb", buffering=0) as fh:
            model = hashlib.sha256()
            for start, length in segments:
                for chunk in iter_file_range(fh, start, length, p):
                    model.update(chunk)

            def read_data(offset: int, length: int) -> bytes:
                out = bytearray()
                for t in layout:
                    lo, hi = max(offset, t.start), min(offset + length, t.end)
                    if lo >= hi:
                        continue
                    src = header.data_offset + header.tensors[t.name].start + (lo - t.start)
                    for chunk in iter_file_range(fh, src, hi - lo, p):
                        out += chunk
                return bytes(out)

            legacy = legacy_hash(prefix, read_data)
    except OSError as exc:
        raise _io_error(p, exc) from exc
    return model.hexdigest(), legacy


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of the data section of a safetensors file as it is on disk (after the header, to the end).

    :raises InvalidFileError: the file is not a valid safetensors file or cannot be read.
    """
    header = read_header(path)
    return _sha256_range(header.path, header.data_offset, header.data_size)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a whole file.

    :raises InvalidFileError: the file cannot be read.
    """
    p = Path(path)
    try:
        size = os.stat(p).st_size
    except OSError as exc:
        raise _io_error(p, exc) from exc
    return _sha256_range(p, 0, size)


def autov2_hash(path: str | os.PathLike[str]) -> str:
    """The A1111 "AutoV2" hash of a file: the first 10 hex digits of the sha256 of the whole file."""
    return file_sha256(path)[:10]


def _sha256_range(p: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    try:
        with open(p, "rb", buffering=0) as fh:
            for chunk in iter_file_range(fh, offset, length, p):
                digest.update(chunk)
    except OSError as exc:
        raise _io_error(p, exc) from exc
    return digest.hexdigest()


def describe_hash(value: str) -> str:
    """Say what kind of value an ``sshs_model_hash`` (or similar) metadata entry holds.

    LyCORIS writes an incompatible ``0x...`` value there; A1111 then shows a short hash that matches no
    other tool's.
    """
    v = value.strip()
    if not v:
        return "empty"
    if v.lower().startswith("0x"):
        return "lycoris-style 0x value (not the kohya/A1111 sshs hash; recompute it with lorasmith)"
    if _HEX64.fullmatch(v):
        return "sha256 of the data section (kohya/A1111 sshs hash)"
    return "unrecognised value (not a sha256 hex digest)"
