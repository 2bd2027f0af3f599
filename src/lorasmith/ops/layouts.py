"""Checkpoint layout conversion through a family's :meth:`~lorasmith.archs.base.Architecture.layout_map`.

``canonical -> layout``: each canonical tensor is read once and written as its layout key(s): renamed,
split along ``dim`` into the entry's parts, and/or rewritten by an exact transform. ``layout -> canonical``
does the inverse. No arithmetic touches a value, so a round trip is bit-exact. Row counts in a map are the
real model's; a file whose tensors are smaller by a common factor (the shrunk test fixtures) gets them
scaled proportionally.

Layout keys: a key without ``/`` belongs to the inventory's own model (``transformer/`` for a
``diffusers-transformer`` inventory, ``unet/`` for ``diffusers-unet``); ``<subfolder>/<key>`` names another
model of the diffusers folder (``vae/encoder.conv_in.weight``, ``text_encoder_2/text_projection.weight``).
Transforms (:attr:`~lorasmith.archs.base.LayoutEntry.transform`), canonical -> layout:

- ``swap_halves``: the two halves along ``dim`` exchanged (FLUX ``norm_out``);
- ``drop_1x1``: a ``[C, C, 1, 1]`` 1x1 conv stored as a ``[C, C]`` linear (SD VAE mid-block attention);
- ``transpose``: a 2-D tensor transposed (OpenCLIP ``text_projection`` -> HF ``text_projection.weight``).

The torch-free shape helpers (:func:`layout_parts`, :func:`layout_shape`, :func:`canonical_shape`) live in
:mod:`lorasmith.archs.layout_shapes` (the family layer uses them too) and are re-exported here.

A diffusers output is a folder: each model's weights (``<sub>/diffusion_pytorch_model.safetensors``, or
``<sub>/model.safetensors`` for the transformers text encoders) with a ``config.json`` written from the
weights' shapes (:mod:`lorasmith.ops._diffusers_configs`), plus ``model_index.json`` and the scheduler config
for whole pipelines. Canonical tensors that have no place in diffusers (the ldm schedule buffers, SD2's
unused last text-encoder layer, ``logit_scale``) are kept verbatim in ``lorasmith_extras.safetensors`` at
the folder root, which diffusers ignores and ``--to single`` reads back. The folder is built under a
temporary name and renamed into place (:class:`TempFolder`), so an interrupted run leaves nothing behind.

A diffusers input is read model by model in whatever form ``save_pretrained`` left it: one safetensors
file, safetensors shards with their index, or ``.bin`` pickles (through the safe loader), one tensor at a
time (:mod:`lorasmith.ops._diffusers_weights`); :func:`main_header` lists every shard of the main model
for detection.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple

from lorasmith.archs.base import Architecture, Inventory, LayoutEntry
from lorasmith.archs.layout_shapes import canonical_shape, layout_parts, layout_shape
from lorasmith.errors import InvalidFileError, NotAvailableError, OutputExistsError

if TYPE_CHECKING:
    import torch

    from lorasmith.io.header import Header
    from lorasmith.io.reader import TensorFile
    from lorasmith.ops._convert_dtype import Piece, Recipe
    from lorasmith.ops._diffusers_weights import ModelWeights

__all__ = [
    "EXTRAS_NAME",
    "LAYOUT_WORDS",
    "FolderPlan",
    "LayoutSource",
    "TempFolder",
    "canonical_recipe",
    "canonical_shape",
    "check_folder_output",
    "diffusers_inventory",
    "layout_parts",
    "layout_recipes",
    "layout_shape",
    "main_header",
    "main_weights",
    "model_weights",
    "plan_folder",
]

#: ``--to`` words for checkpoints: the diffusers layout, or back to the single-file (canonical) layout.
LAYOUT_WORDS = {"diffusers": "diffusers", "single": "single", "original": "single", "bfl": "single"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: weights file of a transformers model (the text encoders) in a diffusers folder.
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
#: canonical tensors without a diffusers home, kept verbatim at the folder root.
EXTRAS_NAME = "lorasmith_extras.safetensors"
#: the subfolders whose weights tell a diffusers folder's family.
MAIN_SUBFOLDERS = ("transformer", "unet")


# --------------------------------------------------------------------------------------------- naming
def diffusers_inventory(arch: Architecture, variant: str | None) -> Inventory:
    """The family's diffusers inventory for ``variant`` (its layout starts with ``diffusers``).

    :raises NotAvailableError: the family has none.
    """
    for inv in arch.inventories():
        if inv.layout.startswith("diffusers") and (variant is None or inv.variant == variant):
            return inv
    raise NotAvailableError(
        f"family {arch.id!r} has no diffusers layout",
        hint="layouts convert for FLUX.1, SD1/SD2, SDXL, SD3/SD3.5 and Z-Image",
    )


def default_subfolder(inv: Inventory) -> str:
    """The subfolder of the inventory's own model: ``unet`` for ``diffusers-unet``, else ``transformer``."""
    return "unet" if inv.layout == "diffusers-unet" else "transformer"


def split_layout_key(key: str, default: str) -> tuple[str, str]:
    """``(subfolder, key in that model)`` of a layout key (see the module docstring)."""
    sub, sep, rest = key.partition("/")
    return (sub, rest) if sep else (default, key)


def weights_file_name(sub: str) -> str:
    """The weights file of subfolder ``sub``: ``model.safetensors`` for text encoders."""
    return TRANSFORMERS_WEIGHTS_NAME if sub.startswith("text_encoder") else WEIGHTS_NAME


def model_weights(folder: Path) -> ModelWeights | None:
    """The weights of the model in ``folder`` (one file, shards or pickles; see
    :mod:`lorasmith.ops._diffusers_weights`), opened; ``None`` when the folder has none."""
    from lorasmith.ops._diffusers_weights import find_weights, open_weights

    found = find_weights(folder)
    return None if found is None else open_weights(*found)


def _main_folder(src: Path) -> Path:
    for sub in MAIN_SUBFOLDERS:
        if (src / sub).is_dir():
            from lorasmith.ops._diffusers_weights import find_weights

            if find_weights(src / sub) is not None:
                return src / sub
    raise InvalidFileError(
        f"{src}: no transformer/ or unet/ weights in this folder",
        hint="give a diffusers folder (safetensors, sharded safetensors or .bin weights)",
    )


def main_weights(src: Path) -> Path:
    """The file that names a checkpoint: ``src`` itself, or a folder's transformer/UNet weights file (or
    shard index). Read its tensors with :func:`main_header`, which also reads shards and pickles.

    :raises InvalidFileError: a folder without ``transformer/`` or ``unet/`` weights.
    """
    if not src.is_dir():
        return src
    from lorasmith.ops._diffusers_weights import find_weights

    found = find_weights(_main_folder(src))
    assert found is not None
    return found[0]


def main_header(src: Path) -> Header:
    """The header that tells a checkpoint's family: ``src``'s own, or that of a folder's transformer/UNet
    weights (every shard's tensors together; pickles are read through the safe loader).

    :raises InvalidFileError: a folder without ``transformer/`` or ``unet/`` weights, or unreadable weights.
    """
    from lorasmith.io.header import read_header

    if src.is_dir():
        weights = model_weights(_main_folder(src))
        assert weights is not None
        with weights:
            return weights.header
    if src.name.endswith(".index.json"):
        from lorasmith.ops._diffusers_weights import open_weights

        with open_weights(src) as w:
            return w.header
    return read_header(src)


# ------------------------------------------------------------------------------------------ transforms
def _swap(t: torch.Tensor, dim: int) -> torch.Tensor:
    import torch

    h = t.shape[dim] // 2
    return torch.cat([t.narrow(dim, h, t.shape[dim] - h), t.narrow(dim, 0, h)], dim=dim).contiguous()


def to_layout(t: torch.Tensor, entry: LayoutEntry) -> torch.Tensor:
    """Apply ``entry.transform`` to a canonical tensor (values are moved, never computed)."""
    if entry.transform == "swap_halves":
        return _swap(t, entry.dim)
    if entry.transform == "drop_1x1":
        if t.dim() != 4 or t.shape[2:] != (1, 1):
            raise InvalidFileError(
                f"expected a [C, C, 1, 1] tensor, got {list(t.shape)}",
                hint="the checkpoint's VAE attention has unexpected shapes; check the file",
            )
        return t.reshape(t.shape[0], t.shape[1])
    if entry.transform == "transpose":
        return t.t().contiguous()
    if entry.transform is not None:
        raise NotAvailableError(f"unknown layout transform {entry.transform!r}")
    return t


def to_canonical(t: torch.Tensor, entry: LayoutEntry) -> torch.Tensor:
    """The inverse of :func:`to_layout`."""
    if entry.transform == "swap_halves":
        # the halves are equal in size, so swapping again restores the order
        return _swap(t, entry.dim)
    if entry.transform == "drop_1x1":
        return t.reshape(*t.shape, 1, 1)
    if entry.transform == "transpose":
        return t.t().contiguous()
    if entry.transform is not None:
        raise NotAvailableError(f"unknown layout transform {entry.transform!r}")
    return t


# ----------------------------------------------------------------------------------- streamed recipes
# Why ranges: with ``dim`` 0, concatenating parts, splitting into row blocks, dropping a 1x1 and swapping
# halves only move whole rows, so every tensor on either side is a few contiguous element ranges of the
# tensors on the other, and can be streamed in parts without ever holding it. A transpose (or a split along
# another axis) is no such thing: those tensors (a text projection) are read whole and rewritten.
def _by_rows(entry: LayoutEntry) -> bool:
    return entry.dim == 0 and entry.transform in (None, "drop_1x1", "swap_halves")


def _swapped(entry: LayoutEntry, pieces: tuple[Piece, ...], rows: int) -> tuple[Piece, ...]:
    """The elements of ``pieces`` (a tensor of ``rows`` rows) in the order :func:`_swap` puts them."""
    from lorasmith.ops._convert_dtype import select

    if entry.transform != "swap_halves":
        return pieces
    numel = sum(p.count for p in pieces)
    per_row = numel // rows if rows else 0
    h = rows // 2
    return select(pieces, [(h * per_row, numel), (0, h * per_row)])


def canonical_recipe(entry: LayoutEntry, parts: list[tuple[Piece, tuple[int, ...]]]) -> Recipe:
    """The recipe of a canonical tensor from its layout parts ``(piece, stored shape)``, in order
    (:meth:`LayoutSource.get` streamed)."""
    from lorasmith.ops._convert_dtype import Recipe

    pieces = tuple(p for p, _ in parts)
    if _by_rows(entry):
        rows = sum(int(shape[0]) for _, shape in parts) if parts[0][1] else 0
        return Recipe(_swapped(entry, pieces, rows))
    shapes = [shape for _, shape in parts]

    def combine(inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        views = [t.view(shape) for t, shape in zip(inputs, shapes, strict=True)]
        t = views[0] if len(views) == 1 else torch.cat(views, dim=entry.dim)
        return to_canonical(t, entry).contiguous()

    return Recipe(pieces, combine)


def layout_recipes(entry: LayoutEntry, piece: Piece, canonical: tuple[int, ...]) -> list[tuple[str, Recipe]]:
    """``(layout key, recipe)`` of every layout tensor of one canonical tensor stored whole as ``piece``
    with shape ``canonical`` (the streamed counterpart of :func:`to_layout` and the row split).

    The first part counts the canonical tensor's cast (its values), the others nothing, as a cast of the
    whole canonical tensor counts it once.
    """
    from lorasmith.ops._convert_dtype import Recipe, select

    shape = layout_shape(canonical, entry.transform)
    rows_total = shape[entry.dim] if shape else 1
    parts = layout_parts(entry, rows_total)
    out: list[tuple[str, Recipe]] = []
    numel = piece.count
    start = 0
    if _by_rows(entry):
        per_row = numel // rows_total if rows_total else 0
        ordered = _swapped(entry, (piece,), rows_total)
        for i, (key, rows) in enumerate(parts):
            pieces = select(ordered, [(start * per_row, (start + rows) * per_row)])
            out.append((key, Recipe(pieces, counted=i == 0, values=numel)))
            start += rows
        return out
    for i, (key, rows) in enumerate(parts):

        def combine(inputs: list[torch.Tensor], start: int = start, rows: int = rows) -> torch.Tensor:
            t = to_layout(inputs[0].view(canonical), entry)
            return t.narrow(entry.dim, start, rows).contiguous()

        out.append((key, Recipe((piece,), combine, counted=i == 0, values=numel)))
        start += rows
    return out


# --------------------------------------------------------------------------------------------- reading
class LayoutSource:
    """A checkpoint in a family's diffusers layout (a folder or one weights file), read under canonical keys.

    Fused canonical tensors are assembled from their parts on :meth:`get`, transforms undone; tensors of
    ``lorasmith_extras.safetensors`` are read as they are. Each model's weights may be one safetensors
    file, safetensors shards with an index, or ``.bin`` pickles (read safely); tensors are read one at a
    time (:mod:`lorasmith.ops._diffusers_weights`). Use as a context manager.

    :ivar keys: canonical keys available, in the canonical inventory's order.
    :ivar specs: canonical key -> ``(safetensors dtype, canonical shape)``.
    :ivar files: subfolder -> what names its weights (the weights file, or the shard index).
    :raises InvalidFileError: a tensor the map does not know, or a fused tensor with only some parts.
    """

    def __init__(self, src: Path, arch: Architecture, inv: Inventory) -> None:
        from lorasmith.io.header import read_header
        from lorasmith.ops._diffusers_weights import open_weights

        self.src = src
        self.mapping = arch.layout_map(inv.id)
        default = default_subfolder(inv)
        self._default = default
        subs = {default} | {
            split_layout_key(p, default)[0] for e in self.mapping.values() for p, _ in e.parts
        }
        self.models: dict[str, ModelWeights] = {}
        extras: Path | None = None
        try:
            if src.is_dir():
                for sub in sorted(subs):
                    weights = model_weights(src / sub)
                    if weights is not None:
                        self.models[sub] = weights
                extras = src / EXTRAS_NAME if (src / EXTRAS_NAME).is_file() else None
            else:
                self.models[default] = open_weights(src)
            self._index(src, arch)
            self._extras: Header | None = read_header(extras) if extras is not None else None
        except BaseException:
            self.close()
            raise
        if self._extras is not None:
            for k, info in self._extras.tensors.items():
                self.specs.setdefault(k, (info.dtype, tuple(info.shape)))
        order = arch.canonical_inventory(inv.variant).tensors
        self.keys: list[str] = [k for k in order if k in self.specs] + [
            k for k in self.specs if k not in order
        ]
        self._extras_file: TensorFile | None = None
        self._last = ""

    def _index(self, src: Path, arch: Architecture) -> None:
        """Fill :attr:`specs` from the models' tensors; every tensor must belong to a mapped key."""
        if not self.models:
            raise InvalidFileError(
                f"{src}: no weights of a {arch.name} diffusers folder", hint="check the folder"
            )
        self.files: dict[str, Path] = {sub: w.path for sub, w in self.models.items()}
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._entries: dict[str, LayoutEntry] = {}
        used: dict[str, set[str]] = {sub: set() for sub in self.models}
        for key, entry in self.mapping.items():
            names = [split_layout_key(p, self._default) for p, _ in entry.parts]
            have = [sub in self.models and n in self.models[sub].tensors for sub, n in names]
            if not all(have):
                if any(have):
                    raise InvalidFileError(
                        f"{src}: only some parts of {key!r} are present", hint="the checkpoint is incomplete"
                    )
                continue
            infos = [self.models[sub].tensors[n] for sub, n in names]
            if len({i.dtype for i in infos}) > 1:
                raise InvalidFileError(
                    f"{src}: the parts of {key!r} have different dtypes",
                    hint="recast the folder to one dtype first (convert FOLDER --to diffusers --dtype D)",
                )
            shape = list(infos[0].shape)
            if len(infos) > 1:
                shape[entry.dim] = sum(int(i.shape[entry.dim]) for i in infos)
            self.specs[key] = (infos[0].dtype, canonical_shape(tuple(shape), entry.transform))
            self._entries[key] = entry
            for sub, n in names:
                used[sub].add(n)
        for sub, w in self.models.items():
            extra = sorted(set(w.tensors) - used[sub])
            if extra:
                raise InvalidFileError(
                    f"{w.path}: {len(extra)} tensor(s) are not {arch.name} diffusers keys, e.g. {extra[0]!r}",
                    hint="give a diffusers checkpoint of this family",
                )

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata of the main weights file."""
        w = self.models.get(self._default) or next(iter(self.models.values()))
        return dict(w.metadata)

    @property
    def paths(self) -> list[Path]:
        """Every file read (weights, shard indexes and shards, and the extras file)."""
        out = [p for w in self.models.values() for p in w.files]
        if self._extras is not None:
            out.append(self._extras.path)
        return out

    def read_order(self) -> list[str]:
        """:attr:`keys` in storage order: model by model, shard by shard (each shard is then read once).

        Extras come last. A writer with a plan may write in any order, so this changes nothing in its
        output; it only spares re-reading shards (pickle shards above all, which are loaded whole).
        """
        position: dict[str, tuple[int, int]] = {}
        for m, (sub, w) in enumerate(self.models.items()):
            for i, name in enumerate(w.order()):
                position[f"{sub}/{name}"] = (m, i)
        last = (len(self.models), 0)

        def where(key: str) -> tuple[int, int]:
            entry = self._entries.get(key)
            if entry is None:
                return last
            sub, name = split_layout_key(entry.parts[0][0], self._default)
            return position[f"{sub}/{name}"]

        return sorted(self.keys, key=where)  # stable: the extras keep their order

    @property
    def streamable(self) -> bool:
        """Whether every model is stored as safetensors (so :meth:`recipes` can stream it)."""
        return all(w.streamable for w in self.models.values())

    def recipes(self) -> dict[str, Recipe]:
        """Canonical key -> :class:`~lorasmith.ops._convert_dtype.Recipe` from the layout tensors, for
        :func:`~lorasmith.ops._convert_dtype.cast_stream`; every file is opened now (and closed by
        :meth:`close`).

        :raises ValueError: a model stored as pickles (:attr:`streamable` is false).
        """
        from lorasmith.ops._convert_dtype import Recipe, whole_piece

        out: dict[str, Recipe] = {}
        for key in self.keys:
            entry = self._entries.get(key)
            if entry is None:
                assert self._extras is not None
                if self._extras_file is None:
                    from lorasmith.io.reader import open_tensors

                    self._extras_file = open_tensors(self._extras.path, self._extras)
                out[key] = Recipe((whole_piece(self._extras_file, key),))
                continue
            parts = []
            for p, _ in entry.parts:
                sub, name = split_layout_key(p, self._default)
                model = self.models[sub]
                parts.append((model.piece(name), tuple(model.tensors[name].shape)))
            out[key] = canonical_recipe(entry, parts)
        return out

    def get(self, key: str) -> torch.Tensor:
        """The canonical tensor ``key`` (its stored dtype, CPU)."""
        import torch

        entry = self._entries.get(key)
        if entry is None:
            assert self._extras is not None
            if self._extras_file is None:
                from lorasmith.io.reader import open_tensors

                self._extras_file = open_tensors(self._extras.path)
            return self._extras_file.get(key)
        parts = []
        for p, _ in entry.parts:
            sub, name = split_layout_key(p, self._default)
            if sub != self._last:
                # one pickle shard held in the whole folder: moving to another model releases the last one's
                if self._last in self.models:
                    self.models[self._last].release()
                self._last = sub
            parts.append(self.models[sub].get(name))
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=entry.dim)
        return to_canonical(t, entry).contiguous()

    def close(self) -> None:
        """Close every open file."""
        for w in self.models.values():
            w.close()
        extras = getattr(self, "_extras_file", None)
        if extras is not None:
            extras.close()
            self._extras_file = None

    def __enter__(self) -> LayoutSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- writing
def check_folder_output(output: Path, overwrite: bool, src: Path) -> None:
    """Refuse a diffusers output folder that exists (without ``overwrite``), is a file, holds the input
    ``src``, lies inside an input folder or has no parent folder, before any work."""
    out_abs, src_abs = output.resolve(), src.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise OutputExistsError(
            f"{output}: the output folder holds the input", hint="write the output to a new folder"
        )
    if src_abs in out_abs.parents:
        # writing there would change the input folder (and a folder being copied would copy itself)
        raise OutputExistsError(
            f"{output}: the output folder is inside the input folder {src}",
            hint="write the output next to the input, not into it",
        )
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output}: output already exists", hint="pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise InvalidFileError(
            f"{output}: a diffusers output is a folder, and this is a file",
            hint="give a folder name to -o (a file is never replaced by a folder)",
        )
    if not output.parent.is_dir():
        raise InvalidFileError(
            f"{output.parent}: output folder does not exist", hint="create the folder first"
        )


class TempFolder:
    """A hidden temporary folder next to ``output`` that becomes ``output`` on :meth:`commit`, or vanishes.

    The folder counterpart of the single-file writer's temporary file. Creating it and recording it for
    clean-up, and the renames of :meth:`commit`, run with SIGINT/SIGTERM held back (they are acted on right
    after), so an interrupt never leaves a folder nobody removes. Leaving the ``with`` block by an
    exception (an error, ``KeyboardInterrupt``, the CLI's SIGTERM) removes it; so does garbage collection or
    interpreter exit of an uncommitted folder. An existing ``output`` is replaced as a whole on commit and
    is put back if the new folder cannot be moved into place.

    :ivar path: the temporary folder (``.<output name>.<random>.tmp``).
    """

    def __init__(self, output: Path) -> None:
        from lorasmith.io.writer import _signals_deferred

        self.output = output
        self._committed = False
        with _signals_deferred():  # an interrupt between creating and recording would leak the folder
            try:
                made = tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
            except OSError as exc:
                raise InvalidFileError(
                    f"{output.parent}: cannot create a folder in the output folder ({exc.strerror or exc})",
                    hint="choose another folder or fix its permissions",
                ) from exc
            self.path = Path(made)
            self._finalizer = weakref.finalize(self, shutil.rmtree, made, True)
        # mkdtemp makes the folder private (0700); the output gets the mode any new folder gets (umask)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.path, 0o777 & ~mask)

    def discard(self) -> None:
        """Remove the temporary folder (idempotent; nothing happens after a commit)."""
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
        self._finalizer.detach()

    def commit(self) -> None:
        """Move the finished folder to ``output``, replacing an existing folder as a whole.

        :raises InvalidFileError: the folder cannot be moved into place (an existing output is kept).
        """
        from lorasmith.io.writer import _signals_deferred

        old: Path | None = None
        with _signals_deferred():
            try:
                if self.output.exists():
                    old = Path(
                        tempfile.mkdtemp(
                            dir=self.output.parent, prefix=f".{self.output.name}.", suffix=".old"
                        )
                    )
                    os.rmdir(old)
                    os.rename(self.output, old)
                    try:
                        os.rename(self.path, self.output)
                    except BaseException:
                        os.rename(old, self.output)  # the previous output goes back where it was
                        old = None
                        raise
                else:
                    os.rename(self.path, self.output)
            except OSError as exc:
                raise InvalidFileError(
                    f"{self.output}: cannot move the finished folder into place ({exc.strerror or exc})",
                    hint="check the folder's permissions",
                ) from exc
            self._committed = True
            self._finalizer.detach()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> TempFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()


class FolderPlan(NamedTuple):
    """What a diffusers folder written from a single file holds, per subfolder.

    :ivar plans: subfolder -> layout key -> ``(dtype, shape)``.
    :ivar order: subfolder -> the canonical keys written there, in input order.
    :ivar extras: canonical keys without a place in the layout (kept in :data:`EXTRAS_NAME`).
    """

    plans: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    order: dict[str, list[str]]
    extras: list[str]


def plan_folder(
    arch: Architecture,
    mapping: Mapping[str, LayoutEntry],
    default: str,
    specs: Mapping[str, tuple[str, tuple[int, ...]]],
) -> FolderPlan:
    """Plan the diffusers folder of canonical tensors ``specs`` (key -> ``(dtype, shape)``)."""
    plans: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    order: dict[str, list[str]] = {}
    extras: list[str] = []
    for key, (dtype, canon_shape) in specs.items():
        entry = mapping.get(key)
        if entry is None:
            extras.append(key)
            continue
        shape = layout_shape(canon_shape, entry.transform)
        subs = set()
        for part, rows in layout_parts(entry, shape[entry.dim]):
            sub, name = split_layout_key(part, default)
            subs.add(sub)
            plans.setdefault(sub, {})[name] = (dtype, (*shape[: entry.dim], rows, *shape[entry.dim + 1 :]))
        if len(subs) != 1:
            raise NotAvailableError(f"{arch.id}: the parts of {key!r} span several models")
        order.setdefault(subs.pop(), []).append(key)
    return FolderPlan(plans, order, extras)
