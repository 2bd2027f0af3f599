"""Torch-free reading and validation of safetensors headers.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON (padded with
spaces), then the data section. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the data section) and may hold a ``"__metadata__"`` object of strings.

:func:`read_header` reads only the first ``8 + n`` bytes, so it answers in milliseconds whatever the file
size, and checks everything a reader relies on. This module never imports torch or numpy.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasmith.errors import InvalidFileError

__all__ = [
    "DTYPE_BITS",
    "DTYPE_ORDER",
    "DTYPE_SIZES",
    "MAX_HEADER_SIZE",
    "Header",
    "TensorInfo",
    "dtype_nbytes",
    "read_header",
]

#: Element size in bytes of every byte-sized safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

#: Element size in bits of every safetensors dtype, including the sub-byte ones (``F4``, ``F6_*``).
DTYPE_BITS: dict[str, int] = {
    **{name: 8 * size for name, size in DTYPE_SIZES.items()},
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

#: The declaration order of the ``Dtype`` enum of the safetensors reference implementation. Its writer lays
#: tensors out by this order descending (then by name ascending), so the widest dtypes come first.
DTYPE_ORDER: tuple[str, ...] = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)

#: Largest header the reference implementation accepts (100 MB); anything larger is not a safetensors file.
MAX_HEADER_SIZE = 100_000_000

_NOT_SAFETENSORS_HINT = "lorasmith reads .safetensors files; convert other formats first"
_CORRUPT_HINT = "the file is damaged or was written by a broken tool; download or export it again"


def dtype_nbytes(dtype: str, numel: int) -> int | None:
    """Bytes taken by ``numel`` elements of ``dtype``; ``None`` if sub-byte elements do not fill whole bytes.

    :raises KeyError: ``dtype`` is not a safetensors dtype.
    """
    bits = DTYPE_BITS[dtype] * numel
    if bits % 8:
        return None
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header.

    :ivar name: the tensor name.
    :ivar dtype: the safetensors dtype string (``"F16"``, ``"BF16"``, ``"F8_E4M3"``...).
    :ivar shape: the logical shape (element counts, also for packed sub-byte dtypes).
    :ivar start: first byte, relative to the data section.
    :ivar end: one past the last byte, relative to the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (``end - start``)."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor, 0 when any dimension is 0)."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class Header:
    """The validated header of a safetensors file.

    Satisfies :class:`lorasmith.archs.base.KeyView`: ``tensors`` maps names to objects with ``shape`` and
    ``dtype``, and ``metadata`` is the ``__metadata__`` object (empty when the file has none).

    :ivar path: the file.
    :ivar header_len: length ``n`` of the JSON header in bytes (the 8-byte length prefix excluded).
    :ivar file_size: size of the whole file in bytes.
    :ivar metadata: ``__metadata__`` (string to string).
    :ivar tensors: name -> :class:`TensorInfo`, in file-offset order.
    """

    path: Path
    header_len: int
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the data section (``8 + header_len``)."""
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        """Size of the data section in bytes (everything after the header)."""
        return self.file_size - self.data_offset

    @property
    def data_end(self) -> int:
        """End of the last tensor, relative to the data section (``data_size`` unless the file has a tail)."""
        return max((t.end for t in self.tensors.values()), default=0)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # dict() builds the object at C speed; a key given twice shows as a shorter dict (this hook runs for
    # every JSON object of the header, thousands of them: a Python loop here cost a third of the parse)
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _sniff(head: bytes) -> str | None:
    """Name a well-known non-safetensors format from the first bytes of a file."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .ckpt/.pt checkpoint?)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file (a legacy PyTorch checkpoint?)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF")):
        return "an image"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the real file was not downloaded)"
    if head.lstrip()[:1] in (b"<", b"{", b"["):
        return "a text file"
    return None


def _not_safetensors(path: Path, head: bytes, why: str) -> InvalidFileError:
    kind = _sniff(head)
    detail = f"it looks like {kind}" if kind else why
    return InvalidFileError(f"{path}: not a safetensors file ({detail})", hint=_NOT_SAFETENSORS_HINT)


def _open_error(path: Path, exc: OSError) -> InvalidFileError:
    if isinstance(exc, FileNotFoundError):
        if path.is_symlink():
            return InvalidFileError(
                f"{path}: broken symbolic link", hint="point the link at an existing file"
            )
        return InvalidFileError(f"{path}: no such file", hint="check the path")
    if isinstance(exc, IsADirectoryError):
        return InvalidFileError(
            f"{path}: is a directory, not a file", hint="give the path of a .safetensors file"
        )
    if isinstance(exc, PermissionError):
        return InvalidFileError(f"{path}: permission denied", hint="check the file's read permissions")
    if exc.errno == errno.ELOOP:
        return InvalidFileError(f"{path}: symbolic link loop", hint="fix the symbolic links on this path")
    if exc.errno == errno.ENOTDIR:
        return InvalidFileError(f"{path}: a parent of this path is not a directory", hint="check the path")
    return InvalidFileError(
        f"{path}: cannot read ({exc.strerror or exc})", hint="check the path and the disk"
    )


def _read_exact(fh: Any, n: int) -> bytes:
    chunks: list[bytes] = []
    left = n
    while left > 0:
        chunk = fh.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file, reading only the header bytes.

    Checks the length prefix, the JSON (UTF-8, an object, no duplicate keys), ``__metadata__`` (string to
    string), every tensor entry (dtype, shape, offsets, byte count) and the data layout (every tensor within
    the data section, no two tensors overlapping). Holes between tensors are tolerated.

    :raises InvalidFileError: with a one-line message naming the file and the problem.
    """
    p = Path(path)
    try:
        # stat first: opening a FIFO or a device could block or never end
        mode = os.stat(p).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(mode):
            raise InvalidFileError(f"{p}: not a regular file", hint="give the path of a .safetensors file")
        with open(p, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = _read_exact(fh, 8)
            if len(prefix) < 8:
                if not prefix:
                    raise InvalidFileError(f"{p}: file is empty", hint=_CORRUPT_HINT)
                raise InvalidFileError(
                    f"{p}: not a safetensors file (only {len(prefix)} bytes, "
                    "shorter than the 8-byte header length)",
                    hint=_CORRUPT_HINT,
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE:
                raise _not_safetensors(
                    p, prefix, f"header length {n} is over the {MAX_HEADER_SIZE // 1_000_000} MB limit"
                )
            if 8 + n > file_size:
                first = fh.read(1)
                if first == b"{":
                    raise InvalidFileError(
                        f"{p}: truncated safetensors file (header length {n} reaches past the end of the "
                        f"{file_size}-byte file)",
                        hint=_CORRUPT_HINT,
                    )
                raise _not_safetensors(
                    p, prefix + first, f"header length {n} reaches past the end of the file"
                )
            raw = _read_exact(fh, n)
    except OSError as exc:
        raise _open_error(p, exc) from exc
    if len(raw) < n:  # the file shrank while being read
        raise InvalidFileError(f"{p}: file changed while being read", hint="try again")
    # A header of thousands of tensors becomes tens of thousands of small dicts, lists and records, all
    # kept: the cyclic GC would scan them again and again while they are made and could free none. In a
    # process that already holds many objects (a loaded registry, a resize in progress) that doubled the
    # parse time (measured: 40 ms instead of 15 for 3156 tensors). So it is paused for the parse (and
    # left as it was: a caller that disabled it keeps it disabled).
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _parse(p, prefix, raw, file_size)
    finally:
        if paused:
            gc.enable()


def _parse(p: Path, prefix: bytes, raw: bytes, file_size: int) -> Header:
    n = len(raw)
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        if not raw.strip():
            raise InvalidFileError(f"{p}: header is empty (length {n})", hint=_CORRUPT_HINT)
        # no sniffing of the first bytes here: they are a valid header length, whose low byte would be read
        # as text ('<' for a 60-byte header made a JSON list "look like a text file")
        raise InvalidFileError(
            f"{p}: not a safetensors file (the header is not a JSON object)", hint=_NOT_SAFETENSORS_HINT
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFileError(
            f"{p}: header is not valid UTF-8 (bad byte at header offset {exc.start})", hint=_CORRUPT_HINT
        ) from exc
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise InvalidFileError(f"{p}: header has the key {exc.key!r} twice", hint=_CORRUPT_HINT) from exc
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        where = f" at header offset {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidFileError(f"{p}: header is not valid JSON ({msg}{where})", hint=_CORRUPT_HINT) from exc
    except RecursionError as exc:
        raise InvalidFileError(f"{p}: header JSON is nested too deeply", hint=_CORRUPT_HINT) from exc
    if not isinstance(obj, dict):
        raise InvalidFileError(f"{p}: header is not a JSON object", hint=_CORRUPT_HINT)

    metadata = _parse_metadata(p, obj.pop("__metadata__", None))
    data_size = file_size - 8 - n
    infos = [_parse_entry(p, name, entry, data_size) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.start, t.end))
    _check_overlap(p, infos)
    return Header(
        path=p, header_len=n, file_size=file_size, metadata=metadata, tensors={t.name: t for t in infos}
    )


def _parse_metadata(p: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InvalidFileError(
            f"{p}: __metadata__ is a JSON {_json_type(meta)}, not an object of strings", hint=_CORRUPT_HINT
        )
    for key, value in meta.items():
        if not isinstance(value, str):
            raise InvalidFileError(
                f"{p}: __metadata__ value of {key!r} is a JSON {_json_type(value)}, not a string",
                hint=_CORRUPT_HINT,
            )
    return dict(meta)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _parse_entry(p: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    # Fast path for a well-formed entry (every entry of a sound file): the same checks as below, with
    # exact type tests (JSON gives int, never an int subclass other than bool) and no message formatting.
    # A header has thousands of entries; this runs in a third of the time of the checked path, which
    # handles anything the fast path does not accept and says what is wrong.
    if type(entry) is dict:
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if (
            isinstance(dtype, str)
            and bits is not None
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
        ):
            start, end = offsets
            numel = 1
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    break
                numel *= dim
            else:
                if (
                    type(start) is int
                    and type(end) is int
                    and 0 <= start <= end <= data_size
                    and (bits * numel) % 8 == 0
                    and end - start == bits * numel // 8
                ):
                    return TensorInfo(name, dtype, tuple(shape), start, end)
    return _parse_entry_checked(p, name, entry, data_size)


def _parse_entry_checked(p: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{p}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InvalidFileError(
            f"{where}: entry is a JSON {_json_type(entry)}, not an object", hint=_CORRUPT_HINT
        )
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise InvalidFileError(f"{where}: entry has no {field!r}", hint=_CORRUPT_HINT)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise InvalidFileError(
            f"{where}: dtype is a JSON {_json_type(dtype)}, not a string", hint=_CORRUPT_HINT
        )
    if dtype not in DTYPE_BITS:
        raise InvalidFileError(
            f"{where}: unknown dtype {dtype!r}",
            hint="the file may come from a newer safetensors version; known: " + ", ".join(DTYPE_ORDER),
        )
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise InvalidFileError(f"{where}: shape {shape!r} is not a list of integers", hint=_CORRUPT_HINT)
    if any(d < 0 for d in shape):
        raise InvalidFileError(f"{where}: shape {shape!r} has a negative dimension", hint=_CORRUPT_HINT)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise InvalidFileError(
            f"{where}: data_offsets {offsets!r} is not a pair of integers", hint=_CORRUPT_HINT
        )
    start, end = offsets
    if start < 0 or end < start:
        raise InvalidFileError(f"{where}: data_offsets {offsets!r} are not increasing", hint=_CORRUPT_HINT)
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)
    expected = dtype_nbytes(dtype, info.numel)
    if expected is None:
        raise InvalidFileError(
            f"{where}: {info.numel} elements of {dtype} do not fill a whole number of bytes",
            hint=_CORRUPT_HINT,
        )
    if info.nbytes != expected:
        raise InvalidFileError(
            f"{where}: data_offsets span {info.nbytes} bytes "
            f"but shape {list(shape)} of {dtype} needs {expected}",
            hint=_CORRUPT_HINT,
        )
    if end > data_size:
        raise InvalidFileError(
            f"{where}: data ends at byte {end} of the data section, which has only {data_size} bytes "
            "(truncated file?)",
            hint=_CORRUPT_HINT,
        )
    return info


def _check_overlap(p: Path, infos: list[TensorInfo]) -> None:
    prev: TensorInfo | None = None
    for info in infos:
        if info.nbytes == 0:
            continue
        if prev is not None and info.start < prev.end:
            raise InvalidFileError(
                f"{p}: tensors {prev.name!r} [{prev.start}, {prev.end}) and {info.name!r} "
                f"[{info.start}, {info.end}) overlap",
                hint=_CORRUPT_HINT,
            )
        if prev is None or info.end > prev.end:
            prev = info
