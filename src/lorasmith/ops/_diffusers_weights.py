"""The weights of one model of a diffusers folder, however ``save_pretrained`` stored them.

A model's subfolder (``unet/``, ``transformer/``, ``vae/``, ``text_encoder*/``) holds its weights in one of
these forms; the first one found is read, safetensors before pickles:

- one file: ``diffusion_pytorch_model.safetensors`` (diffusers models) or ``model.safetensors``
  (transformers models, the text encoders);
- shards: ``diffusion_pytorch_model.safetensors.index.json`` (or ``model.safetensors.index.json``) whose
  ``weight_map`` names, for every tensor, the shard holding it (``diffusion_pytorch_model-00001-of-00003.
  safetensors``);
- a pickle: ``diffusion_pytorch_model.bin`` or ``pytorch_model.bin``, or pickle shards with a
  ``*.bin.index.json``. Pickles are read only through the safe loader of :mod:`lorasmith.ops.pickles`
  (``torch.load(weights_only=True)``, memory-mapped where the file allows it);
- when none of those exists, the same forms with a variant tag (``diffusion_pytorch_model.fp16.safetensors``,
  ``model.safetensors.index.fp16.json``), provided the folder holds one variant only.

:class:`ModelWeights` lists every tensor (name, dtype, shape) when it is opened, reading only headers
(safetensors) or unpickling each pickle once, one at a time. Tensors are then read one by one with
:meth:`ModelWeights.get`; at most one pickle shard is held at a time, so a sharded model is never loaded
whole. :meth:`ModelWeights.order` gives the tensors in storage order (shard by shard), the order that reads
each shard once.

Writing is the mirror image (:class:`ModelWeightsWriter`): one model's weights as one file, or, with a
shard size, as ``save_pretrained(max_shard_size=...)`` lays them out (:func:`plan_shards`,
:func:`parse_shard_size`): ``<stem>-00001-of-0000N.safetensors`` shards plus ``<stem>.safetensors.index.json``
holding ``metadata.total_size`` and ``weight_map``; a model that fits in one shard stays one unsharded file.

Internal to :mod:`lorasmith.ops.layouts` and :mod:`lorasmith.ops.convert`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from lorasmith.errors import InvalidFileError, UsageError
from lorasmith.io.header import Header, TensorInfo, dtype_nbytes, read_header

if TYPE_CHECKING:
    import torch

    from lorasmith.io.reader import TensorFile
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.ops._convert_dtype import Piece

__all__ = [
    "WEIGHT_STEMS",
    "ModelWeights",
    "ModelWeightsWriter",
    "ModelWriteResult",
    "find_weights",
    "index_file_name",
    "is_weights_name",
    "open_weights",
    "parse_shard_size",
    "plan_shards",
    "safetensors_name",
    "shard_file_name",
    "write_json",
]

#: stems of the safetensors weights (diffusers, transformers) and of the pickle weights.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")
_INDEX_HINT = "the index must map every tensor name to a shard file next to it (save_pretrained writes one)"

Kind = Literal["safetensors", "safetensors-shards", "pickle", "pickle-shards"]


def _candidates(tag: str) -> list[tuple[str, Kind]]:
    """File names to look for, in order of preference, for variant ``tag`` (``""`` for none)."""
    dot = f".{tag}" if tag else ""
    out: list[tuple[str, Kind]] = []
    for stem in WEIGHT_STEMS:
        out.append((f"{stem}{dot}.safetensors", "safetensors"))
        out.append((f"{stem}.safetensors.index{dot}.json", "safetensors-shards"))
    for stem in PICKLE_STEMS:
        out.append((f"{stem}{dot}.bin", "pickle"))
        out.append((f"{stem}.bin.index{dot}.json", "pickle-shards"))
    return out


_VARIANT = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)"
    r"(?:\.([A-Za-z0-9_]+)\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index\.([A-Za-z0-9_]+)\.json)$"
)


def find_weights(folder: Path) -> tuple[Path, Kind] | None:
    """The weights file (or index) of the model in ``folder`` and its kind; ``None`` when it has none.

    :raises InvalidFileError: only variant files of several variants (``fp16`` and ``bf16``...).
    """
    if not folder.is_dir():
        return None
    for name, kind in _candidates(""):
        if (folder / name).is_file():
            return folder / name, kind
    matches = [_VARIANT.match(p.name) for p in folder.iterdir() if p.is_file()]
    tags = sorted({t for m in matches if m is not None for t in m.groups() if t})
    if not tags:
        return None
    if len(tags) > 1:
        raise InvalidFileError(
            f"{folder}: weights of several variants ({', '.join(tags)}) and none without one",
            hint="keep the variant to convert (or rename its files without the variant tag)",
        )
    for name, kind in _candidates(tags[0]):
        if (folder / name).is_file():
            return folder / name, kind
    return None  # pragma: no cover - a shard name matched, but no file of the variant's forms exists


#: any weights file ``save_pretrained`` writes, in any form and variant: ``model.safetensors``,
#: ``diffusion_pytorch_model.fp16.safetensors``, ``model-00001-of-00002.safetensors``,
#: ``model-00001-of-00002.fp16.safetensors``, ``pytorch_model.bin``, ``model.safetensors.index.fp16.json``...
_ANY_WEIGHTS = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)"
    r"(?:(?:[.-][^/\\]*)?\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index(?:\.[A-Za-z0-9_]+)?\.json)$"
)


def is_weights_name(name: str) -> bool:
    """Whether ``name`` is a weights file (or shard index) of a diffusers/transformers model, in any form
    or variant (not ``model_index.json``, configs or tokenizer files)."""
    return _ANY_WEIGHTS.match(name) is not None


def safetensors_name(weights: Path) -> str:
    """The unsharded safetensors file ``save_pretrained`` writes for the model whose weights are named by
    ``weights`` (a file or an index, any form or variant): ``diffusion_pytorch_model.safetensors`` for a
    diffusers model, ``model.safetensors`` for a transformers one (``pytorch_model.bin``'s)."""
    stem = re.split(r"[.-]", weights.name, maxsplit=1)[0]
    return f"{'diffusion_pytorch_model' if stem == 'diffusion_pytorch_model' else 'model'}.safetensors"


#: suffixes of the pickle files :func:`open_weights` reads (through the safe loader).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _kind_of_file(path: Path) -> Kind:
    name = path.name
    if name.endswith(".json"):
        return "pickle-shards" if ".bin.index" in name else "safetensors-shards"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    return "safetensors"


def _read_index(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a ``*.index.json``; every shard must exist next to the index."""
    try:
        data: Any = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidFileError(f"{index}: not a readable shard index ({exc})", hint=_INDEX_HINT) from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise InvalidFileError(f"{index}: no 'weight_map' in this shard index", hint=_INDEX_HINT)
    out: dict[str, Path] = {}
    for name, shard in wmap.items():
        # a shard is a plain file name next to the index: never a path that leaves the folder
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise InvalidFileError(f"{index}: tensor {name!r} names the shard {shard!r}", hint=_INDEX_HINT)
        path = index.parent / shard
        if not path.is_file():
            raise InvalidFileError(f"{index}: shard {shard!r} is missing", hint="download every shard")
        out[str(name)] = path
    return out


@dataclass
class ModelWeights:
    """One model's weights: a file, safetensors shards or pickle(s); tensors read one at a time.

    Use as a context manager (or call :meth:`close`).

    :ivar path: what names the weights in messages: the weights file, or the shard index.
    :ivar kind: ``safetensors``, ``safetensors-shards``, ``pickle`` or ``pickle-shards``.
    :ivar tensors: name -> :class:`~lorasmith.io.header.TensorInfo` (for shards and pickles, ``start`` is 0
        and ``end`` the tensor's size: offsets are per file).
    :ivar metadata: the safetensors metadata of the first weights file (pickles have none).
    :ivar files: every file read (the index and each shard, or the one file).
    """

    path: Path
    kind: Kind
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    files: list[Path]
    _where: dict[str, Path] = field(default_factory=dict)
    _open: dict[Path, TensorFile] = field(default_factory=dict)
    _pickle: tuple[Path, dict[str, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------------------- reading
    @property
    def header(self) -> Header:
        """A header of every tensor (for detection); offsets are not file offsets for shards and pickles."""
        return Header(self.path, 0, 0, dict(self.metadata), dict(self.tensors))

    def order(self) -> list[str]:
        """Tensor names shard by shard, in each file's own order: reading in it opens each shard once."""
        rank = {p: i for i, p in enumerate(dict.fromkeys(self._where.values()))}
        names = list(self.tensors)
        if not rank:
            return names
        pos = {n: i for i, n in enumerate(names)}
        return sorted(names, key=lambda n: (rank[self._where[n]], self.tensors[n].start, pos[n]))

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._where.get(name, self.path)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (its stored dtype, CPU, owning its memory)."""
        path = self.file_of(name)
        if self.kind.startswith("pickle"):
            tensors = self._pickle_shard(path)
            return tensors[name].contiguous().clone()
        return self._file(path).get(name)

    def _file(self, path: Path) -> TensorFile:
        from lorasmith.io.reader import open_tensors

        tf = self._open.get(path)
        if tf is None:
            tf = self._open[path] = open_tensors(path)
        return tf

    @property
    def streamable(self) -> bool:
        """Whether the weights are safetensors (one file or shards), which can be read part by part."""
        return self.kind in ("safetensors", "safetensors-shards")

    def piece(self, name: str) -> Piece:
        """Every element of tensor ``name`` in its safetensors file (opened now, kept open until
        :meth:`close`), for :func:`~lorasmith.ops._convert_dtype.cast_stream`.

        :raises ValueError: pickle weights (:attr:`streamable` is false).
        """
        from lorasmith.ops._convert_dtype import whole_piece

        if not self.streamable:
            raise ValueError(f"{self.path}: pickle weights are not read part by part")
        return whole_piece(self._file(self.file_of(name)), name)

    def _pickle_shard(self, path: Path) -> dict[str, torch.Tensor]:
        # one pickle shard at a time: the previous one is released before the next is loaded
        if self._pickle is not None and self._pickle[0] == path:
            return self._pickle[1]
        self._pickle = None
        tensors = _load_pickle(path)
        self._pickle = (path, tensors)
        return tensors

    def release(self) -> None:
        """Release the pickle shard held for the next read (it is loaded again when needed)."""
        self._pickle = None

    def close(self) -> None:
        """Close every open file and release a held pickle shard."""
        for tf in self._open.values():
            tf.close()
        self._open.clear()
        self._pickle = None

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    from lorasmith.ops.pickles import load_pickle_state_dict

    tensors, _dropped = load_pickle_state_dict(path)
    return tensors


def _pickle_info(name: str, t: torch.Tensor) -> TensorInfo:
    from lorasmith.io.dtypes import safetensors_dtype

    dtype = safetensors_dtype(t.dtype)
    shape = tuple(int(d) for d in t.shape)
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(name, dtype, shape, 0, dtype_nbytes(dtype, numel) or 0)


def open_weights(path: Path, kind: Kind | None = None) -> ModelWeights:
    """Open the weights named by ``path`` (a weights file or a shard index) and list their tensors.

    :raises InvalidFileError: an unreadable file or index, a missing shard, a tensor in two shards, or a
        tensor the index places in a shard that lacks it.
    """
    kind = kind or _kind_of_file(path)
    if kind == "safetensors":
        h = read_header(path)
        return ModelWeights(path, kind, dict(h.tensors), dict(h.metadata), [path])
    if kind == "pickle":
        tensors = _load_pickle(path)
        listed = {n: _pickle_info(n, t) for n, t in tensors.items()}
        w = ModelWeights(path, kind, listed, {}, [path], dict.fromkeys(listed, path))
        w._pickle = (path, tensors)  # the only file: keep it for the reads that follow
        return w
    wmap = _read_index(path)
    shards = list(dict.fromkeys(wmap.values()))
    infos: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    metadata: dict[str, str] | None = None
    for shard in shards:
        if kind == "safetensors-shards":
            h = read_header(shard)
            found: dict[str, TensorInfo] = dict(h.tensors)
            if metadata is None:
                metadata = dict(h.metadata)
        else:
            # unpickled once to list it, then dropped: shards are never held together
            found = {n: _pickle_info(n, t) for n, t in _load_pickle(shard).items()}
        for name, info in found.items():
            if name in infos:
                raise InvalidFileError(
                    f"{path}: tensor {name!r} is in two shards ({where[name].name}, {shard.name})",
                    hint=_INDEX_HINT,
                )
            infos[name] = info
            where[name] = shard
    for name, shard in wmap.items():
        if where.get(name) != shard:
            raise InvalidFileError(
                f"{path}: tensor {name!r} is not in {shard.name}, where the index places it",
                hint="the shards do not belong to this index; download them again",
            )
    return ModelWeights(path, kind, infos, metadata or {}, [path, *shards], where)


# --------------------------------------------------------------------------------------------- writing
#: units of a shard size: decimal as ``huggingface_hub`` reads them (``5GB`` is 5 * 10**9 bytes), binary
#: with an ``i`` (``10GiB`` is 10 * 2**30 bytes); case does not matter and a bare number is bytes.
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_SIZE_HINT = "give a size such as 5GB, 500MB or 10GiB (GB = 10^9 bytes, GiB = 2^30 bytes)"


def parse_shard_size(size: str | int, option: str = "--shard-size") -> int:
    """Bytes named by a shard size: ``"5GB"``, ``"500MB"``, ``"1.5GB"``, ``"10GiB"``, ``"4096"`` or an int.

    Units are those of :data:`SIZE_UNITS`. Fractions are exact (``1.1GB`` is 1,100,000,000 bytes),
    rounded down to a whole byte.

    :raises UsageError: not a size, an unknown unit, or less than one byte.
    """
    from decimal import Decimal

    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise UsageError(f"{option} {size!r} is not a size", hint=_SIZE_HINT)
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.match(size)
        if m is None:
            raise UsageError(f"{option} {size!r} is not a size", hint=_SIZE_HINT)
        unit = m.group(2).upper() or "B"
        if unit not in SIZE_UNITS:
            raise UsageError(f"{option} {size!r}: unknown unit {m.group(2)!r}", hint=_SIZE_HINT)
        n = int(Decimal(m.group(1)) * SIZE_UNITS[unit])
    if n < 1:
        raise UsageError(f"{option} {size!r} is less than one byte", hint=_SIZE_HINT)
    return n


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors ``(name, bytes)`` into shards of at most ``max_bytes`` each, as ``save_pretrained`` does.

    Tensors are taken in the order given and never split: a tensor that would take the current shard over
    the limit starts the next one, and a tensor larger than the limit gets a shard of its own (placed
    where it is met, the current shard staying open for the tensors after it). No reordering is tried to
    fill shards better. An empty list gives no shard.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if nbytes > max_bytes:
            shards.append([name])
            continue
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(name: str, index: int, count: int) -> str:
    """The file of shard ``index`` (from 1) of ``count`` for weights file ``name``:
    ``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model-00002-of-00003.safetensors``."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    return f"{stem}-{index:05d}-of-{count:05d}" + (f".{ext}" if ext else "")


def index_file_name(name: str) -> str:
    """The shard index of weights file ``name``: ``model.safetensors`` -> ``model.safetensors.index.json``."""
    return f"{name}.index.json"


@dataclass(frozen=True)
class ModelWriteResult:
    """What :meth:`ModelWeightsWriter.close` wrote.

    :ivar path: what names the weights: the one file, or the shard index.
    :ivar files: the weights files (one, or every shard in order).
    :ivar file_bytes: total size of the weights files (the index not counted).
    :ivar total_size: bytes of tensor data (the index's ``metadata.total_size``).
    :ivar sshs_model_hash: the hash of the one file; ``None`` when sharded (each shard has its own).
    """

    path: Path
    files: list[Path]
    file_bytes: int
    total_size: int
    sshs_model_hash: str | None

    @property
    def sharded(self) -> bool:
        """Whether the weights were written as several shards with an index."""
        return len(self.files) > 1


def _tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return dtype_nbytes(dtype, numel) or 0


def write_json(path: Path, data: Mapping[str, object]) -> None:
    """Write ``data`` as ``save_pretrained`` writes its JSON files (indent 2, keys sorted, a final newline),
    atomically (a temporary file replaced into place), with the mode any new file gets (umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp's files are private (0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelWeightsWriter:
    """Write one model's weights into ``folder`` the way ``save_pretrained`` stores them.

    Without ``max_shard_size`` (or when everything fits in one shard) the model is one file, ``name``.
    Otherwise the tensors, in plan order, are grouped by :func:`plan_shards` into
    ``<stem>-0000k-of-0000N.<ext>`` files (:func:`shard_file_name`) and ``<name>.index.json`` is written
    with ``{"metadata": {"total_size": <tensor bytes>}, "weight_map": {tensor: shard file}}`` (keys sorted,
    indented by 2, as ``save_pretrained`` writes it). Every shard carries ``metadata``.

    Each file is a planned :class:`~lorasmith.io.writer.SafetensorsWriter`: tensors may come in any order
    and memory holds only the tensor being written. A shard's file is opened at its first tensor and
    finished as soon as its last one is written, so few files are open at a time. The shards are complete
    files only once :meth:`close` returns; meant to be used inside a
    :class:`~lorasmith.ops.layouts.TempFolder`, which makes the whole folder appear at once. :meth:`abort`
    (and leaving the ``with`` block by an exception) removes every file this writer made.

    :param folder: an existing folder (the model's subfolder).
    :param name: the unsharded weights file name (``diffusion_pytorch_model.safetensors``...).
    :param plan: tensor name -> ``(safetensors dtype, shape)``, in the order the shards are filled.
    :param metadata: safetensors metadata of every file (hashes are added per file by the writer).
    :param max_shard_size: the largest shard in bytes (see :func:`parse_shard_size`); ``None``: one file.
    :param groups: the tensors of each shard, in order, instead of ``max_shard_size`` (to keep the
        sharding of the weights a model is converted from); one group is one unsharded file.
    :ivar files: the weights files that will be written, in order.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        *,
        plan: Mapping[str, tuple[str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        max_shard_size: int | None = None,
        groups: Sequence[Sequence[str]] | None = None,
    ) -> None:
        self.folder = folder
        self.name = name
        self._metadata = dict(metadata) if metadata is not None else None
        sizes = [(k, _tensor_bytes(dtype, shape)) for k, (dtype, shape) in plan.items()]
        self.total_size = sum(n for _, n in sizes)
        if groups is not None:
            groups = [list(g) for g in groups if g]
            if sorted(k for g in groups for k in g) != sorted(plan):
                raise ValueError(f"{folder / name}: the shard groups do not hold every planned tensor once")
        elif max_shard_size is not None:
            groups = plan_shards(sizes, max_shard_size)
        else:
            groups = [list(plan)]
        if len(groups) <= 1:
            groups = [list(plan)]
            self.files = [folder / name]
        else:
            self.files = [folder / shard_file_name(name, i + 1, len(groups)) for i in range(len(groups))]
        self._plans = [{k: (plan[k][0], tuple(plan[k][1])) for k in g} for g in groups]
        self._shard_of = {k: i for i, g in enumerate(groups) for k in g}
        self._left = [set(g) for g in groups]
        self._open: dict[int, SafetensorsWriter] = {}
        self._finished: dict[int, tuple[Path, int, str | None]] = {}
        self._index: Path | None = None
        self._result: ModelWriteResult | None = None

    @property
    def sharded(self) -> bool:
        """Whether the weights are written as several shards with an index."""
        return len(self.files) > 1

    def _writer(self, i: int) -> SafetensorsWriter:
        w = self._open.get(i)
        if w is None:
            from lorasmith.io.writer import SafetensorsWriter

            w = self._open[i] = SafetensorsWriter(self.files[i], metadata=self._metadata, plan=self._plans[i])
        return w

    def _finish(self, i: int) -> None:
        w = self._writer(i)
        written = w.close()
        del self._open[i]
        self._finished[i] = (written.path, written.file_bytes, written.sshs_model_hash)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (in its planned dtype and shape) into its file.

        :raises ValueError: a name not in the plan, written twice, or of another dtype/shape than planned.
        """
        i = self._shard_of.get(name)
        if i is None:
            raise ValueError(f"{self.folder / self.name}: tensor {name!r} is not planned")
        self._writer(i).write(name, tensor)
        self._left[i].discard(name)
        if not self._left[i]:
            self._finish(i)

    def stream(self, fill: Callable[[SafetensorsWriter], None]) -> None:
        """Write every file not yet finished, one after the other, by handing its planned writer to
        ``fill``, which writes all of that file's planned tensors (e.g. through
        :func:`~lorasmith.ops._convert_dtype.cast_stream`); each file is finished as ``fill`` returns.
        """
        for i in range(len(self.files)):
            if i in self._finished:
                continue
            fill(self._writer(i))
            self._left[i].clear()
            self._finish(i)

    def close(self) -> ModelWriteResult:
        """Finish every file and, when sharded, write the index. Idempotent.

        :raises ValueError: planned tensors that were never written (nothing is left behind).
        """
        if self._result is not None:
            return self._result
        try:
            for i in range(len(self.files)):
                if i not in self._finished:
                    self._finish(i)  # the writer names what was never written
            if self.sharded:
                self._index = self.folder / index_file_name(self.name)
                weight_map = {k: self.files[i].name for k, i in self._shard_of.items()}
                write_json(
                    self._index, {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
                )
        except BaseException:
            self.abort()
            raise
        done = [self._finished[i] for i in range(len(self.files))]
        self._result = ModelWriteResult(
            path=self._index if self._index is not None else self.files[0],
            files=list(self.files),
            file_bytes=sum(n for _, n, _ in done),
            total_size=self.total_size,
            sshs_model_hash=None if self.sharded else done[0][2],
        )
        return self._result

    def abort(self) -> None:
        """Stop writing and remove every file written so far (idempotent; nothing happens after close)."""
        if self._result is not None:
            return
        for w in self._open.values():
            w.abort()
        self._open.clear()
        for path, _n, _h in self._finished.values():
            path.unlink(missing_ok=True)
        self._finished.clear()
        if self._index is not None:
            self._index.unlink(missing_ok=True)

    def __enter__(self) -> ModelWeightsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
