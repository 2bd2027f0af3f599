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

Internal to :mod:`lorasmith.ops.layouts`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from lorasmith.errors import InvalidFileError
from lorasmith.io.header import Header, TensorInfo, dtype_nbytes, read_header

if TYPE_CHECKING:
    import torch

    from lorasmith.io.reader import TensorFile

__all__ = ["WEIGHT_STEMS", "ModelWeights", "find_weights", "open_weights"]

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


def _kind_of_file(path: Path) -> Kind:
    name = path.name
    if name.endswith(".json"):
        return "pickle-shards" if ".bin.index" in name else "safetensors-shards"
    if name.endswith(".bin"):
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
        from lorasmith.io.reader import open_tensors

        tf = self._open.get(path)
        if tf is None:
            tf = self._open[path] = open_tensors(path)
        return tf.get(name)

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
