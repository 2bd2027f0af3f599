"""Lazy, one-tensor-at-a-time reading of safetensors files into torch tensors.

The header is validated first (:func:`~lorasmith.io.header.read_header`), so a bad file fails with an
:class:`~lorasmith.errors.InvalidFileError` before any tensor is read. Each :meth:`TensorFile.get` reads
exactly the tensor's bytes straight into a freshly allocated tensor (one copy, from the page cache), so the
result owns its memory and stays valid after the file is closed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from lorasmith.errors import InvalidFileError
from lorasmith.io.dtypes import torch_dtype, torch_shape
from lorasmith.io.header import Header, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

__all__ = ["TensorFile", "load_all", "open_tensors"]

_HAVE_PREADV = hasattr(os, "preadv")


class TensorFile:
    """An open safetensors file; tensors are read on demand with :meth:`get`.

    Use it as a context manager (or call :meth:`close`). Iterating yields tensor names in file order.
    Where the platform has ``preadv`` (Linux, BSD), reads are positional, so several threads may call
    :meth:`get` at once (to overlap reading with compute).

    :ivar header: the validated :class:`~lorasmith.io.header.Header`.
    :ivar path: the file.
    """

    def __init__(self, path: str | os.PathLike[str], header: Header | None = None) -> None:
        self.header: Header = read_header(path) if header is None else header
        self.path: Path = self.header.path
        try:
            self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise InvalidFileError(
                f"{self.path}: cannot open ({exc.strerror or exc})", hint="check the file"
            ) from exc
        if header is not None:
            # A header parsed earlier (a file reopened): a file of another size is another file now.
            size = os.fstat(self._fh.fileno()).st_size
            if size != header.file_size:
                self._fh.close()
                raise InvalidFileError(
                    f"{self.path}: changed while in use ({header.file_size} bytes when its header was read, "
                    f"{size} now)",
                    hint="do not write to an input while lorasmith runs",
                )

    # --------------------------------------------------------------------------------- mapping-like access
    def keys(self) -> list[str]:
        """Tensor names in file-offset order."""
        return list(self.header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__``."""
        return self.header.metadata

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor ``name``.

        :raises KeyError: no such tensor.
        """
        try:
            return self.header.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (CPU, its stored dtype and shape; the tensor owns its memory).

        :raises KeyError: no such tensor.
        :raises InvalidFileError: the file is closed, or ended early.
        :raises NotAvailableError: torch cannot hold the tensor's dtype.
        """
        import torch

        info = self.info(name)
        dtype = torch_dtype(info.dtype)
        shape = torch_shape(info.dtype, info.shape)
        if self._fh.closed:
            raise InvalidFileError(
                f"{self.path}: file is closed", hint="read tensors inside the `with` block"
            )
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._read_into(raw, self.header.data_offset + info.start, name)
        return raw.view(dtype).reshape(shape)

    def read_part(self, name: str, start: int, count: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read elements ``[start, start + count)`` of tensor ``name`` (flattened) as a 1-d tensor.

        ``into`` is a byte buffer (``torch.uint8``, at least the part's size) to read into, so that a
        streaming loop can reuse a few buffers instead of allocating (and page-faulting) fresh memory for
        every tensor; the result is then a view of it. Thread-safe where ``preadv`` exists.

        :raises KeyError: no such tensor.
        :raises ValueError: the range is outside the tensor, or ``into`` is too small or not bytes.
        :raises InvalidFileError, NotAvailableError: as :meth:`get`.
        """
        import torch

        info = self.info(name)
        dtype = torch_dtype(info.dtype)
        numel = 1
        for d in info.shape:
            numel *= int(d)
        size = torch.empty((), dtype=dtype).element_size()
        if start < 0 or count < 0 or start + count > numel or size * numel != info.nbytes:
            raise ValueError(f"{self.path}: elements {start}:{start + count} of {name!r} ({numel} elements)")
        nbytes = count * size
        if into is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        else:
            if into.dtype != torch.uint8 or into.ndim != 1 or into.numel() < nbytes:
                raise ValueError(f"read_part: buffer of {into.numel()} {into.dtype} for {nbytes} bytes")
            raw = into[:nbytes]
        if self._fh.closed:
            raise InvalidFileError(
                f"{self.path}: file is closed", hint="read tensors inside the `with` block"
            )
        if nbytes:
            self._read_into(raw, self.header.data_offset + info.start + start * size, name)
        return raw.view(dtype)

    def _read_into(self, raw: torch.Tensor, offset: int, name: str) -> None:
        view = raw.numpy().data
        done = 0
        total = len(view)
        while done < total:
            try:
                if _HAVE_PREADV:  # positional read: one syscall, no shared file position
                    got: int | None = os.preadv(self._fh.fileno(), [view[done:]], offset + done)
                else:  # pragma: no cover - Windows
                    self._fh.seek(offset + done)
                    got = self._fh.readinto(view[done:])
            except OSError as exc:
                raise InvalidFileError(
                    f"{self.path}: cannot read tensor {name!r} ({exc.strerror or exc})", hint="check the disk"
                ) from exc
            if not got:
                raise InvalidFileError(
                    f"{self.path}: file ends inside tensor {name!r} (truncated?)",
                    hint="the file changed or is damaged; download or export it again",
                )
            done += got

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    # ------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the file (tensors already read stay valid)."""
        self._fh.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self)} tensors)"


def open_tensors(path: str | os.PathLike[str], header: Header | None = None) -> TensorFile:
    """Open a safetensors file for lazy reading (validates the header first).

    ``header``: the file's header from an earlier :func:`~lorasmith.io.header.read_header`, to reopen a file
    without parsing its header again (the file's size is checked against it).

    :raises InvalidFileError: the file is missing, unreadable or not a valid safetensors file.
    """
    return TensorFile(path, header)


def load_all(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read every tensor of a (small) safetensors file, in file order.

    Meant for LoRAs and other small files; stream big checkpoints with :func:`open_tensors`.
    """
    with open_tensors(path) as f:
        return {name: f.get(name) for name in f}
