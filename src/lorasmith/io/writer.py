"""A streaming, atomic safetensors writer.

:class:`SafetensorsWriter` writes into a hidden temporary file next to the output
(``.<name>.<random>.tmp``), checks its header (fsyncs it when ``LORASMITH_FSYNC=1``) and then
``os.replace``\\ s it into place: an error, an interrupt or :meth:`SafetensorsWriter.abort` leaves no file
behind and an existing output intact.

The layout is byte for byte what ``safetensors.torch.save`` writes for the same tensors and metadata
(see :mod:`lorasmith.io.layout`; metadata keys are written sorted).

Two modes:

- *planned* (``plan`` given, name -> ``(dtype, shape)``): the header is written first, with placeholder
  hash values of the final length, and :meth:`~SafetensorsWriter.write` accepts tensors in any order,
  writing each at its offset, so nothing but the tensor being written is held in memory. At close every
  planned tensor must have been written; the hashes are computed (incrementally while tensors arrive in
  file order, otherwise by re-reading the data section) and the header is rewritten in place.
- *unplanned*: tensors are kept (by reference) until :meth:`~SafetensorsWriter.close`, which lays them out
  and writes them; meant for small outputs such as LoRAs.

With ``hashes=True`` the metadata gets ``sshs_model_hash`` and ``sshs_legacy_hash`` (see
:mod:`lorasmith.io.hashes`), and ``modelspec.hash_sha256`` when it holds ``modelspec.sai_model_spec``.

Checks, all made before anything is renamed into place:

- *finite values* (``check_finite``, on by default): a floating-point tensor holding NaN or infinite
  values raises :class:`NonFiniteError` naming it, so an output never contains them unless asked for
  (``--allow-nonfinite``, or :func:`write_policy` / ``check_finite=False``);
- *header*: the finished file's header is re-read and compared with what was planned (always);
- *data* (``verify_data``, ``--verify``): every tensor's bytes are re-read from the file (after dropping it
  from the page cache where the platform allows) and their sha256 compared with the one computed from the
  tensor while writing, and the whole data section with ``sshs_model_hash``.

:func:`write_policy` sets the defaults of the last two for every writer created inside it (the commands'
``--allow-nonfinite`` and ``--verify`` options), and collects the non-finite tensors written while allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from lorasmith.errors import InvalidFileError, LorasmithError, OutputExistsError
from lorasmith.io.dtypes import header_shape, safetensors_dtype
from lorasmith.io.hashes import iter_file_range, legacy_hash, ss_metadata
from lorasmith.io.header import TensorInfo, read_header
from lorasmith.io.layout import encode_header, plan_layout, serialize_prefix

if TYPE_CHECKING:
    import torch

__all__ = [
    "NonFiniteError",
    "NonFiniteTensor",
    "SafetensorsWriter",
    "WritePolicy",
    "WriteResult",
    "allow_nonfinite",
    "check_output_path",
    "nonfinite_counts",
    "save_file",
    "write_policy",
]

MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
MODELSPEC_KEY = "modelspec.sai_model_spec"
MODELSPEC_HASH_KEY = "modelspec.hash_sha256"

_PLACEHOLDER_MODEL = "0" * 64
_PLACEHOLDER_LEGACY = "0" * 8

#: Bytes written between two writeback hints (see ``SafetensorsWriter._start_writeback``).
WRITEBACK_BYTES = 256 << 20

# elements per finiteness pass: small enough to stay in the CPU caches, large enough to amortise the call
_FINITE_CHUNK = 1 << 22


# ------------------------------------------------------------------------------------- write policy
@dataclass(frozen=True)
class NonFiniteTensor:
    """A tensor written (or refused) with NaN or infinite values.

    :ivar path: the output file.
    :ivar name: the tensor name.
    :ivar nan: number of NaN values.
    :ivar inf: number of infinite values.
    """

    path: Path
    name: str
    nan: int
    inf: int

    def describe(self) -> str:
        """``"3 NaN and 1 infinite value(s)"``, naming only the kinds present."""
        return _describe_counts(self.nan, self.inf)


def _describe_counts(nan: int, inf: int) -> str:
    parts = [f"{nan} NaN"] if nan else []
    if inf:
        parts.append(f"{inf} infinite")
    return " and ".join(parts or ["0 non-finite"]) + (" value" if nan + inf == 1 else " values")


class NonFiniteError(LorasmithError):
    """A tensor about to be written holds NaN or infinite values and non-finite values are not allowed.

    :ivar tensor: what was found (output path, tensor name, counts).
    """

    def __init__(self, tensor: NonFiniteTensor) -> None:
        super().__init__(
            f"{tensor.path}: output tensor {tensor.name!r} would hold {tensor.describe()}",
            hint="an input holds NaN/Inf or the computation overflowed (try a wider --save-dtype); "
            "pass --allow-nonfinite to write it anyway",
        )
        self.tensor = tensor


@dataclass
class WritePolicy:
    """Defaults for the writers created inside :func:`write_policy`, and what they met.

    :ivar allow_nonfinite: write NaN/Inf values instead of raising :class:`NonFiniteError`.
    :ivar verify_data: re-read every written file's data and compare hashes.
    :ivar nonfinite: tensors written with NaN/Inf values (only while allowed), in write order.
    """

    allow_nonfinite: bool = False
    verify_data: bool = False
    nonfinite: list[NonFiniteTensor] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, tensor: NonFiniteTensor) -> None:
        """Note a non-finite tensor that was written (thread-safe; parts of one tensor add up)."""
        with self._lock:
            for i, seen in enumerate(self.nonfinite):
                if (seen.path, seen.name) == (tensor.path, tensor.name):
                    self.nonfinite[i] = NonFiniteTensor(
                        seen.path, seen.name, seen.nan + tensor.nan, seen.inf + tensor.inf
                    )
                    return
            self.nonfinite.append(tensor)


_POLICY: ContextVar[WritePolicy | None] = ContextVar("lorasmith_write_policy", default=None)


@contextlib.contextmanager
def write_policy(
    *, allow_nonfinite: bool | None = None, verify_data: bool | None = None
) -> Iterator[WritePolicy]:
    """Set the defaults of every :class:`SafetensorsWriter` created inside the ``with`` block.

    A value left ``None`` is inherited from an enclosing policy (default: refuse non-finite values, no
    data verification). The policy is read when a writer is created, so a writer made in this thread keeps
    it even when worker threads write its tensors.

    :return: the policy; its :attr:`~WritePolicy.nonfinite` lists the non-finite tensors written.
    """
    outer = _POLICY.get()
    policy = WritePolicy(
        allow_nonfinite=allow_nonfinite
        if allow_nonfinite is not None
        else (outer.allow_nonfinite if outer else False),
        verify_data=verify_data if verify_data is not None else (outer.verify_data if outer else False),
    )
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def allow_nonfinite() -> contextlib.AbstractContextManager[WritePolicy]:
    """``with allow_nonfinite():`` writers created inside write NaN/Inf values instead of refusing them."""
    return write_policy(allow_nonfinite=True)


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, infinite count)`` of a tensor; ``(0, 0)`` for integer, boolean and packed dtypes.

    Works through the tensor in chunks, so temporaries stay small whatever its size. The common all-finite
    case costs one sum per chunk. Why a sum and not ``isfinite``: a NaN or an infinity makes the sum
    non-finite (``inf + -inf`` is NaN), and a sum is several times faster than building a boolean mask.
    The sum keeps the chunk's dtype (torch accumulates 16-bit floats in float32 and rounds the result
    once); asking for a float32 result makes torch widen the whole chunk first, 2.5 times slower. The only
    false alarm (finite values whose sum overflows the dtype, above 65504 in float16) falls through to
    the exact count.
    """
    import math

    import torch

    t = tensor.detach()
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0, 0
    flat = t.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        if chunk.element_size() == 1:  # float8 kinds: isfinite and sum are not implemented for them
            try:
                chunk = chunk.to(torch.float16)
            except (RuntimeError, TypeError):  # pragma: no cover - a packed dtype torch cannot widen
                return 0, 0
        try:
            if chunk.is_floating_point():
                if math.isfinite(float(torch.sum(chunk))):
                    continue
            elif bool(torch.isfinite(chunk).all()):
                continue
        except (RuntimeError, NotImplementedError):  # pragma: no cover - a dtype without sum/isfinite
            return 0, 0
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
    return nan, inf


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a temporary file is created and recorded, then act on them.

    Python runs signal handlers in the main thread only, so this swaps the handlers there for one that
    notes the signal, restores them at the end and calls the original handler for each signal noted
    (``KeyboardInterrupt`` for SIGINT and, under the CLI, SIGTERM). In other threads no handler can raise,
    and nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[tuple[int, FrameType | None]] = []

    def note(signum: int, frame: FrameType | None) -> None:
        noted.append((signum, frame))

    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, note)
    except (ValueError, OSError):  # pragma: no cover - an embedding that forbids signal handlers
        for num, handler in old.items():
            signal.signal(num, handler)
        yield
        return
    try:
        yield
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)
        for signum, frame in noted:
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:  # pragma: no cover - the CLI always has handlers installed
                os.kill(os.getpid(), signum)


@dataclass(frozen=True)
class WriteResult:
    """What :meth:`SafetensorsWriter.close` wrote.

    :ivar path: the output file.
    :ivar n_tensors: number of tensors.
    :ivar data_bytes: size of the data section.
    :ivar file_bytes: size of the file.
    :ivar sshs_model_hash: sha256 hex of the data section (``None`` when hashes were off).
    :ivar sshs_legacy_hash: the kohya legacy hash (``None`` when hashes were off).
    :ivar verified: the data was re-read from the file and its hashes compared (``verify_data``).
    """

    path: Path
    n_tensors: int
    data_bytes: int
    file_bytes: int
    sshs_model_hash: str | None
    sshs_legacy_hash: str | None
    verified: bool = False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Check that ``path`` may be written; return it as a :class:`~pathlib.Path`.

    Commands call this before any heavy work, so that a refused output fails in a second.

    :raises OutputExistsError: the output exists and ``overwrite`` is false, or it is one of ``inputs``.
    :raises InvalidFileError: the output is a directory, or its folder is missing or not writable.
    """
    p = Path(path)
    for inp in inputs:
        if _same_file(p, Path(inp)):
            raise OutputExistsError(
                f"{p}: output would overwrite its own input",
                hint="write the output to a new file; inputs are never modified",
            )
    if p.is_dir():
        raise InvalidFileError(f"{p}: output is a directory", hint="give a file name for the output")
    if os.path.lexists(p) and not overwrite:
        raise OutputExistsError(f"{p}: output already exists", hint="pass --overwrite to replace it")
    parent = p.parent
    if not parent.is_dir():
        what = "does not exist" if not os.path.lexists(parent) else "is not a directory"
        raise InvalidFileError(f"{parent}: output folder {what}", hint="create the folder first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidFileError(
            f"{parent}: output folder is not writable", hint="choose another folder or fix its permissions"
        )
    return p


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (no copy when it is already CPU and contiguous)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.dtype != torch.uint8:
        t = t.reshape(-1).view(torch.uint8)
    return t.reshape(-1).numpy().data


def _describe(tensor: object) -> tuple[str, tuple[int, ...]]:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"cannot write a {tensor.layout} tensor; make it dense first")
    dtype = safetensors_dtype(tensor.dtype)
    return dtype, header_shape(dtype, tuple(tensor.shape))


class _TempFile:
    """The temporary file being written; removes itself unless committed."""

    def __init__(self, parent: Path, name: str) -> None:
        created = False
        try:
            with _signals_deferred():  # an interrupt between creating and recording would leak the file
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
                except OSError as exc:
                    raise InvalidFileError(
                        f"{parent}: cannot create a file in the output folder ({exc.strerror or exc})",
                        hint="choose another folder or fix its permissions",
                    ) from exc
                self.path = Path(tmp)
                created = True
                self.fh = os.fdopen(fd, "r+b", buffering=0)
        except BaseException:
            # a signal held back above is raised as the block ends: the file is known by then
            if created:
                self.discard()
            raise

    def discard(self) -> None:
        fh = getattr(self, "fh", None)  # not there when the descriptor could not be wrapped
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class SafetensorsWriter:
    """Write a safetensors file atomically, streaming tensors in planned mode.

    :param path: the output file.
    :param metadata: ``__metadata__`` (string to string); ``None`` writes none (unless hashes add some).
    :param overwrite: replace an existing output.
    :param inputs: the files the output is made from; writing over one of them is refused.
    :param plan: name -> ``(safetensors dtype, header shape)`` of every tensor, for streaming (planned) mode.
    :param hashes: add ``sshs_model_hash``, ``sshs_legacy_hash`` (and ``modelspec.hash_sha256``) to the
        metadata; when false the metadata is written as given.
    :param check_finite: refuse floating-point tensors holding NaN/Inf (:class:`NonFiniteError`);
        ``None`` follows the current :func:`write_policy` (default: refuse).
    :param verify_data: after writing, re-read the data and compare sha256 hashes with those computed
        while writing; ``None`` follows the current :func:`write_policy` (default: off).
    :raises OutputExistsError, InvalidFileError: see :func:`check_output_path`.
    :raises ValueError: a bad plan (unknown dtype, duplicate name...) or metadata that is not str -> str.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike[str]] = (),
        plan: Mapping[str, tuple[str, Sequence[int]]] | None = None,
        hashes: bool = True,
        check_finite: bool | None = None,
        verify_data: bool | None = None,
    ) -> None:
        self.path = check_output_path(path, overwrite=overwrite, inputs=inputs)
        policy = _POLICY.get()
        self._policy = policy
        self._check_finite = (
            check_finite if check_finite is not None else not (policy is not None and policy.allow_nonfinite)
        )
        self._verify_data = (
            verify_data if verify_data is not None else (policy is not None and policy.verify_data)
        )
        self._digests: dict[str, bytes] = {}
        self._parts: dict[str, int] = {}
        self._unsynced = (1 << 62, 0)  # the byte range written since the last writeback hint
        self._part_digests: dict[str, Any] = {}
        self._final_meta: dict[str, str] | None = None
        if metadata is not None:
            for key, value in metadata.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ValueError(
                        f"metadata must map strings to strings, got {key!r}: {type(value).__name__}"
                    )
        self._user_metadata = dict(metadata) if metadata is not None else None
        self._hashes = hashes
        self._planned = plan is not None
        self._pending: dict[str, torch.Tensor] = {}
        self._tmp: _TempFile | None = None
        self._finalizer: weakref.finalize[[], SafetensorsWriter] | None = None
        self._layout: dict[str, TensorInfo] = {}
        self._written: set[str] = set()
        self._hasher = hashlib.sha256()
        self._hashed_upto = 0
        self._data_offset = 0
        self._data_size = 0
        self._header_len = 0
        self._result: WriteResult | None = None
        self._aborted = False
        if plan is not None:
            layout = plan_layout((name, dtype, shape) for name, (dtype, shape) in plan.items())
            try:
                self._start(layout)
            except BaseException:
                self.abort()
                raise

    # ---------------------------------------------------------------------------------------- internals
    def _final_metadata(self, model: str, legacy: str) -> dict[str, str] | None:
        if self._user_metadata is None and not self._hashes:
            return None
        meta = dict(self._user_metadata or {})
        if self._hashes:
            meta[MODEL_HASH_KEY] = model
            meta[LEGACY_HASH_KEY] = legacy
            if MODELSPEC_KEY in meta:
                meta[MODELSPEC_HASH_KEY] = "0x" + model
        return meta

    def _start(self, layout: list[TensorInfo]) -> None:
        """Create the temporary file and write the header (with placeholder hashes)."""
        self._layout = {t.name: t for t in layout}
        header = encode_header(layout, self._final_metadata(_PLACEHOLDER_MODEL, _PLACEHOLDER_LEGACY))
        self._header_len = len(header)
        self._data_offset = 8 + len(header)
        self._data_size = layout[-1].end if layout else 0
        tmp = _TempFile(self.path.parent, self.path.name)
        self._tmp = tmp
        self._finalizer = weakref.finalize(self, tmp.discard)
        with contextlib.suppress(OSError, AttributeError):  # fchmod is missing on Windows
            os.fchmod(tmp.fh.fileno(), _umask_mode())
        self._pwrite(struct.pack("<Q", len(header)) + header, 0)
        try:
            tmp.fh.truncate(self._data_offset + self._data_size)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> InvalidFileError:
        return InvalidFileError(
            f"{self.path}: cannot write ({exc.strerror or exc})",
            hint="check free disk space and the folder's permissions",
        )

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        assert self._tmp is not None
        fh = self._tmp.fh
        view = memoryview(data).cast("B")
        try:
            fh.seek(offset)
            while view:
                n = fh.write(view)
                if n is None or n <= 0:  # pragma: no cover - a blocking regular file never does this
                    raise OSError("short write")
                view = view[n:]
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _finite(self, name: str, tensor: torch.Tensor) -> None:
        """Refuse (or, when allowed, record) a tensor holding NaN or infinite values."""
        if not self._check_finite and self._policy is None:
            return  # nothing would refuse or record it: skip the pass over the data
        nan, inf = nonfinite_counts(tensor)
        if not (nan or inf):
            return
        found = NonFiniteTensor(self.path, name, nan, inf)
        if self._check_finite:
            raise NonFiniteError(found)
        if self._policy is not None:
            self._policy.record(found)

    def _write_planned(self, name: str, tensor: torch.Tensor, *, check: bool = True) -> None:
        info = self._layout.get(name)
        if info is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the plan")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dtype, shape = _describe(tensor)
        if (dtype, shape) != (info.dtype, info.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {dtype} {list(shape)}, "
                f"the plan says {info.dtype} {list(info.shape)}"
            )
        if check:
            self._finite(name, tensor)
        data = _tensor_bytes(tensor)
        if data.nbytes != info.nbytes:  # pragma: no cover - guaranteed by the dtype and shape check
            raise ValueError(f"{self.path}: tensor {name!r} has {data.nbytes} bytes, expected {info.nbytes}")
        if data.nbytes:
            self._pwrite(data, self._data_offset + info.start)
            self._start_writeback(self._data_offset + info.start, data.nbytes)
        if self._verify_data:
            self._digests[name] = hashlib.sha256(data).digest()
        self._written.add(name)
        if self._hashes and info.start == self._hashed_upto:
            self._hasher.update(data)
            self._hashed_upto = info.end

    def write_part(
        self, name: str, offset: int, part: torch.Tensor, *, check: bool = True, hash_now: bool = True
    ) -> None:
        """Write the bytes of ``part`` at byte ``offset`` of planned tensor ``name`` (streaming a tensor).

        Parts of one tensor must come in order and without gaps (``offset`` is the number of its bytes
        written so far); the tensor counts as written once its last byte is. ``part`` must hold whole
        elements of the planned dtype. ``check=False`` skips the finite-values check (the caller made it
        with :meth:`check_part`, e.g. on another thread). ``hash_now=False`` leaves the bytes out of the
        running ``sshs_model_hash``: the caller then gives them to :meth:`hash_part` (from another
        thread, so that hashing and writing overlap). Meant for one writing thread at a time.

        :raises ValueError: not planned mode, a name not in the plan, a part out of order, of another dtype
            or past the tensor's end.
        :raises NonFiniteError, InvalidFileError: as :meth:`write` (the writer is then aborted).
        """
        self._check_open()
        if not self._planned:
            raise ValueError(f"{self.path}: write_part needs a planned writer")
        info = self._layout.get(name)
        if info is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the plan")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        done = self._parts.get(name, 0)
        dtype, _ = _describe(part)
        if dtype != info.dtype:
            raise ValueError(f"{self.path}: part of {name!r} is {dtype}, the plan says {info.dtype}")
        data = _tensor_bytes(part)
        if offset != done or done + data.nbytes > info.nbytes:
            raise ValueError(
                f"{self.path}: part of {name!r} at byte {offset} ({data.nbytes} bytes) does not continue "
                f"the {done} bytes written of {info.nbytes}"
            )
        try:
            if check:
                self.check_part(name, part)
            if data.nbytes:
                self._pwrite(data, self._data_offset + info.start + done)
                self._start_writeback(self._data_offset + info.start + done, data.nbytes)
            if self._verify_data:
                self._part_digests.setdefault(name, hashlib.sha256()).update(data)
            if hash_now:
                self._hash_bytes(info.start + done, data)
        except BaseException:
            self.abort()
            raise
        done += data.nbytes
        if done == info.nbytes:
            self._parts.pop(name, None)
            self._written.add(name)
            if self._verify_data:
                self._digests[name] = self._part_digests.pop(name, hashlib.sha256()).digest()
        else:
            self._parts[name] = done

    @property
    def planned_names(self) -> list[str]:
        """The planned tensor names in data order (writing in this order lets the hash run as data
        arrives instead of re-reading the file at the end); empty in unplanned mode."""
        return list(self._layout) if self._planned else []

    def _start_writeback(self, offset: int, nbytes: int) -> None:
        """Every :data:`WRITEBACK_BYTES` written, ask the kernel to start writing the data to the disk.

        Why: the file is fsynced before it is renamed into place; without a hint the kernel holds
        gigabytes of dirty pages until then and the final fsync waits for all of them, while started
        early the disk works during the computation. ``POSIX_FADV_DONTNEED`` on Linux starts an
        asynchronous writeback of the range (and drops whatever is already clean); it never blocks on it.
        """
        if not (_durable() or self._verify_data):
            # No fsync to come: like any program's writes, the data may stay in the page cache (the
            # kernel writes it back in its own time), so the disk is not made to work during the run.
            return
        lo, hi = self._unsynced
        lo, hi = min(lo, offset), max(hi, offset + nbytes)
        if hi - lo < WRITEBACK_BYTES or self._tmp is None:
            self._unsynced = (lo, hi)
            return
        self._unsynced = (1 << 62, 0)
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            with contextlib.suppress(OSError):
                advise(self._tmp.fh.fileno(), lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def planned_dtype(self, name: str) -> str:
        """The safetensors dtype planned for tensor ``name``.

        :raises ValueError: not planned mode, or a name not in the plan.
        """
        info = self._layout.get(name) if self._planned else None
        if info is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the plan")
        return info.dtype

    def hash_part(self, name: str, offset: int, part: torch.Tensor) -> None:
        """Feed the bytes of a part written with ``write_part(..., hash_now=False)`` to the running hash.

        Parts must come in data order for the hash to use them as they come; any other part is skipped
        here and read back from the file at :meth:`close` instead. One hashing thread at a time.
        """
        info = self._layout.get(name)
        if info is not None:
            self._hash_bytes(info.start + offset, _tensor_bytes(part))

    def _hash_bytes(self, data_offset: int, data: memoryview) -> None:
        if self._hashes and data_offset == self._hashed_upto:
            self._hasher.update(data)
            self._hashed_upto = data_offset + data.nbytes

    def check_part(self, name: str, part: torch.Tensor) -> None:
        """Apply the finite-values policy to (part of) tensor ``name`` without writing it.

        Thread-safe; :meth:`write_part` calls it unless told the caller did.

        :raises NonFiniteError: ``part`` holds NaN/Inf values and they are not allowed (the writer is
            not aborted here: the caller decides).
        """
        self._finite(name, part)

    # ------------------------------------------------------------------------------------------- public
    @property
    def planned(self) -> bool:
        """Whether the writer streams to a plan (``plan`` was given)."""
        return self._planned

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write (planned mode) or queue (unplanned mode) one tensor, in its own dtype.

        The caller casts; GPU or non-contiguous tensors are copied to contiguous CPU memory first.

        :raises ValueError: a name not in the plan, written twice, or of another dtype/shape than planned.
        :raises TypeError: ``tensor`` is not a torch tensor.
        :raises NonFiniteError: the tensor holds NaN/Inf values and they are not allowed (the writer is
            aborted: the temporary file is removed).
        :raises InvalidFileError: the disk refused the write.
        """
        self._check_open()
        try:
            if self._planned:
                self._write_planned(name, tensor)
            else:
                if name in self._pending:
                    raise ValueError(f"{self.path}: tensor {name!r} written twice")
                if name == "__metadata__":
                    raise ValueError("'__metadata__' cannot be a tensor name")
                _describe(tensor)
                self._finite(name, tensor)
                self._pending[name] = tensor
        except (ValueError, TypeError):
            raise
        except BaseException:
            self.abort()
            raise

    def _check_open(self) -> None:
        if self._aborted:
            raise RuntimeError(f"{self.path}: writer was aborted")
        if self._result is not None:
            raise RuntimeError(f"{self.path}: writer is closed")

    def close(self) -> WriteResult:
        """Finish the file: check completeness, compute hashes, fsync, validate, replace into place.

        Idempotent: a second call returns the first result. On any error the temporary file is removed.

        :raises ValueError: planned tensors that were never written.
        :raises InvalidFileError: a write or the final check failed.
        """
        if self._result is not None:
            return self._result
        if self._aborted:
            raise RuntimeError(f"{self.path}: writer was aborted")
        try:
            self._result = self._finish()
        except BaseException:
            self.abort()
            raise
        return self._result

    def _finish(self) -> WriteResult:
        if not self._planned:
            pending, self._pending = self._pending, {}
            specs = []
            for name, tensor in pending.items():
                dtype, shape = _describe(tensor)
                specs.append((name, dtype, shape))
            self._start(plan_layout(specs))
            for info in list(self._layout.values()):
                self._write_planned(info.name, pending.pop(info.name), check=False)
        missing = [n for n in self._layout if n not in self._written]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(
                f"{self.path}: {len(missing)} planned tensors never written: "
                + ", ".join(repr(m) for m in missing[:3])
                + more
            )
        assert self._tmp is not None
        tmp = self._tmp
        model: str | None = None
        legacy: str | None = None
        try:
            if self._hashes:
                model, legacy = self._compute_hashes()
                self._final_meta = self._final_metadata(model, legacy)
                header = encode_header(list(self._layout.values()), self._final_meta)
                if len(header) != self._header_len:  # pragma: no cover - placeholders have the final length
                    raise AssertionError("header length changed when filling in the hashes")
                self._pwrite(header, 8)
            else:
                self._final_meta = self._final_metadata(_PLACEHOLDER_MODEL, _PLACEHOLDER_LEGACY)
            tmp.fh.flush()
            if _durable() or self._verify_data:  # --verify re-reads from the disk: the data must be there
                os.fsync(tmp.fh.fileno())
            tmp.fh.close()
        except OSError as exc:
            raise self._write_error(exc) from exc
        self._verify(tmp.path)
        if self._verify_data:
            self._verify_bytes(tmp.path, model)
        try:
            os.replace(tmp.path, self.path)
        except OSError as exc:
            raise InvalidFileError(
                f"{self.path}: cannot move the finished file into place ({exc.strerror or exc})",
                hint="check the folder's permissions",
            ) from exc
        if self._finalizer is not None:
            self._finalizer.detach()
        if _durable():
            _fsync_dir(self.path.parent)
        return WriteResult(
            path=self.path,
            n_tensors=len(self._layout),
            data_bytes=self._data_size,
            file_bytes=self._data_offset + self._data_size,
            sshs_model_hash=model,
            sshs_legacy_hash=legacy,
            verified=self._verify_data,
        )

    def _compute_hashes(self) -> tuple[str, str]:
        assert self._tmp is not None
        tmp = self._tmp
        if self._hashed_upto < self._data_size:
            start = self._data_offset + self._hashed_upto
            for chunk in iter_file_range(tmp.fh, start, self._data_size - self._hashed_upto, tmp.path):
                self._hasher.update(chunk)
            self._hashed_upto = self._data_size
        model = self._hasher.hexdigest()
        layout = list(self._layout.values())
        prefix = serialize_prefix(layout, ss_metadata(self._user_metadata))

        def read_data(offset: int, length: int) -> bytes:
            length = max(0, min(length, self._data_size - offset))
            return b"".join(
                bytes(c) for c in iter_file_range(tmp.fh, self._data_offset + offset, length, tmp.path)
            )

        return model, legacy_hash(prefix, read_data)

    def _verify(self, tmp: Path) -> None:
        """Re-read the finished temporary file's header and check it against the layout."""
        header = read_header(tmp)
        expected = [(t.name, t.dtype, t.shape, t.start, t.end) for t in self._layout.values()]
        got = [(t.name, t.dtype, t.shape, t.start, t.end) for t in header.tensors.values()]
        if (
            got != expected
            or header.data_size != self._data_size
            or header.metadata != (self._final_meta or {})
        ):  # pragma: no cover - a bug (or a disk returning other bytes) if it happens
            raise InvalidFileError(
                f"{self.path}: the written file's header does not match what was written",
                hint="check the disk; if it is sound this is a bug, please report it",
            )

    def _verify_bytes(self, tmp: Path, model: str | None) -> None:
        """Re-read the data section and compare each tensor's sha256 (and the sshs hash) with what was
        computed from the tensors while writing."""
        whole = hashlib.sha256()
        try:
            with open(tmp, "rb", buffering=0) as fh:
                _drop_page_cache(fh.fileno())
                pos = 0
                for info in sorted(self._layout.values(), key=lambda t: t.start):
                    if info.start > pos:  # a hole (our layouts have none) is part of the data section too
                        for chunk in iter_file_range(fh, self._data_offset + pos, info.start - pos, tmp):
                            whole.update(chunk)
                    digest = hashlib.sha256()
                    for chunk in iter_file_range(fh, self._data_offset + info.start, info.nbytes, tmp):
                        digest.update(chunk)
                        whole.update(chunk)
                    pos = max(pos, info.end)
                    if digest.digest() != self._digests.get(info.name):
                        raise InvalidFileError(
                            f"{self.path}: verification failed: tensor {info.name!r} reads back different "
                            "bytes than were written",
                            hint="the disk or file system corrupted the write; check it and write again",
                        )
                if pos < self._data_size:
                    for chunk in iter_file_range(fh, self._data_offset + pos, self._data_size - pos, tmp):
                        whole.update(chunk)
        except OSError as exc:
            raise InvalidFileError(
                f"{self.path}: cannot re-read the written file to verify it ({exc.strerror or exc})",
                hint="check the disk",
            ) from exc
        if model is not None and whole.hexdigest() != model:
            raise InvalidFileError(
                f"{self.path}: verification failed: the data section does not match sshs_model_hash",
                hint="the disk or file system corrupted the write; check the disk and write again",
            )

    def abort(self) -> None:
        """Stop writing and remove the temporary file; an existing output is left untouched. Idempotent."""
        if self._result is not None:
            return
        self._aborted = True
        self._pending = {}
        if self._tmp is not None:
            self._tmp.discard()
        if self._finalizer is not None:
            self._finalizer.detach()

    @property
    def temp_path(self) -> Path | None:
        """The temporary file being written (``None`` before it exists, e.g. unplanned mode before close)."""
        return None if self._tmp is None else self._tmp.path

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            if not self._aborted:
                self.close()
        else:
            self.abort()


def _drop_page_cache(fd: int) -> None:
    """Ask the kernel to forget the file's cached pages (they are clean after fsync), so that a re-read
    comes from the disk; best effort."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:  # pragma: no cover - macOS, Windows
        return
    with contextlib.suppress(OSError):
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _durable() -> bool:
    """Whether finished files are fsynced before (and their folder after) the rename: only when the
    environment says ``LORASMITH_FSYNC=1`` (or ``true``, ``yes``, ``on``).

    Why off by default: an output is complete and atomic for every interrupt and error without it (the
    rename happens only after everything was written and checked), as with ``safetensors``, ``torch.save``
    and the trainers; the fsync adds the time to put the whole file on the disk (on a slow disk, longer
    than the rest of a checkpoint merge) to protect against one thing only, a crash of the whole machine
    in the seconds after the command returns. Operators who need that turn it on.
    """
    return os.environ.get("LORASMITH_FSYNC", "0").strip().lower() in ("1", "true", "yes", "on")


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort; not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    hashes: bool = True,
    check_finite: bool | None = None,
    verify_data: bool | None = None,
) -> WriteResult:
    """Write ``tensors`` to ``path`` atomically (unplanned mode); see :class:`SafetensorsWriter`."""
    with SafetensorsWriter(
        path,
        metadata=metadata,
        overwrite=overwrite,
        inputs=inputs,
        hashes=hashes,
        check_finite=check_finite,
        verify_data=verify_data,
    ) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
        return w.close()
