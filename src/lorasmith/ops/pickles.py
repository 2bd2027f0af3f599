"""Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) read safely and written as safetensors.

A pickle can run any code when it is loaded. lorasmith reads one only through
``torch.load(weights_only=True)``, torch's restricted unpickler, which builds tensors, containers and
plain values and refuses every other global; a file that names one (``os.system``, ``builtins.exec``, a
class of some project) is refused with :class:`~lorasmith.errors.InvalidFileError` before anything of it
runs.

Memory: a pickle cannot be read part by part, so it is read tensor by tensor. ``mmap=True`` is used where
the file allows it (torch's zip format, the default of ``torch.save`` since torch 1.6): the tensors are then
views of the memory-mapped file, paged in from the page cache as they are written (pages the kernel can
drop at will), and the process holds one cast copy of one tensor at a time. A legacy (pre-zip) pickle
cannot be mapped: it is loaded whole (about its file size in memory), and each tensor is let go as soon as
it is written, so that memory falls as the conversion goes.

Checkpoints saved by PyTorch Lightning (the original SD 1.x ``.ckpt`` files and their fine-tunes) also name
a few classes and functions in their training bookkeeping: Lightning's ``ModelCheckpoint`` callback (as a
dict key), numpy scalars and arrays (``global_step``, a best score) and ``_codecs.encode`` (how protocol 2
stores their bytes). Those names, and only those, are given to the restricted unpickler as inert stand-ins
(:class:`_Inert`: built from any arguments, they keep nothing and run nothing; the real modules are never
imported), so such a checkpoint converts; the entries they appear in are not tensors and are dropped. Any
other global is still refused.

What is kept: the tensors of the state dict, found at the top level or under a wrapper key
(``state_dict`` first, then ``model``, then ``module``); nested dicts of tensors are flattened with ``.``.
Every other entry (epoch numbers, strings, anything that is not a tensor) is dropped and named in the
result.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasmith.errors import InvalidFileError
from lorasmith.progress import ProgressCallback

if TYPE_CHECKING:
    import torch

    from lorasmith.ops.convert import ConvertResult

__all__ = ["load_pickle_state_dict", "pickle_to_safetensors"]

_WRAPPERS = ("state_dict", "model", "module")


class _Inert:
    """A stand-in for a harmless global of a training checkpoint: takes any arguments, keeps nothing.

    Subclasses carry the real global's module and name (so the restricted unpickler matches them, and a
    dropped entry is named after what it was); calling, building or setting the state of one runs nothing.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        """A new, empty stand-in (the arguments are ignored)."""
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Ignore the arguments."""

    def __setstate__(self, state: Any) -> None:
        """Ignore the pickled state."""


#: Globals that PyTorch Lightning checkpoints name outside their tensors (A1111's safe unpickler allows the
#: same ones): the ModelCheckpoint callback (a dict key), numpy scalars/arrays/dtypes, and _codecs.encode.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.model_checkpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "_codecs.encode",
)


def _inert_globals() -> list[type]:
    out: list[type] = []
    for path in _INERT_GLOBALS:
        module, _, name = path.rpartition(".")
        out.append(type(name, (_Inert,), {"__module__": module, "__qualname__": name}))
    return out


def _load_restricted(path: Path, *, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` with the inert stand-ins allowed (where this torch can)."""
    import contextlib

    import torch

    serialization: Any = torch.serialization
    allow = getattr(serialization, "safe_globals", None)  # torch >= 2.5: scoped to this load
    with warnings.catch_warnings():
        # torch warns about pickle protocols its restricted unpickler was not written for; the user can do
        # nothing about it, and the load still either works or fails with the message below
        warnings.simplefilter("ignore")
        with allow(_inert_globals()) if allow is not None else contextlib.nullcontext():
            if mmap:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        raise InvalidFileError(
            f"{path}: file is empty", hint="the download or copy did not finish; get it again"
        )
    try:
        try:
            return _load_restricted(path, mmap=True)
        except RuntimeError as exc:
            # legacy (non-zip) pickles cannot be memory-mapped; read them normally, still restricted
            if "mmap" not in str(exc):
                raise
            return _load_restricted(path, mmap=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), "")
        raise InvalidFileError(
            f"{path}: refused: this pickle asks to run code or build objects that are not weights"
            + (f" ({why.strip()})" if why else ""),
            hint="only plain tensor state dicts are read (torch.load weights_only=True); nothing was run",
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # the restricted unpickler fails on garbage in many ways
        # (EOFError, OSError, zip errors, and KeyError/IndexError/TypeError from a damaged opcode stream)
        detail = next(iter(str(exc).strip().splitlines()), "")
        raise InvalidFileError(
            f"{path}: not a readable PyTorch pickle ({type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + ")",
            hint="check that the file is complete and is a .ckpt/.pt/.pth checkpoint",
        ) from None


def _flatten(obj: Mapping[Any, Any], prefix: str, dropped: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping):
            yield from _flatten(value, name + ".", dropped)
        else:
            dropped.append(f"{name} ({type(value).__name__})")


def load_pickle_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a pickle checkpoint (see the module docstring) and the entries dropped.

    :raises InvalidFileError: a pickle that needs anything but tensors and plain containers (nothing of
        it runs), an unreadable file, or a file without tensors.
    """
    p = Path(path)
    obj = _torch_load(p)
    dropped: list[str] = []
    if not isinstance(obj, Mapping):
        raise InvalidFileError(
            f"{p}: the pickle holds a {type(obj).__name__}, not a state dict", hint="give a checkpoint file"
        )
    root: Mapping[Any, Any] = obj
    for wrapper in _WRAPPERS:
        inner = root.get(wrapper)
        if isinstance(inner, Mapping):
            dropped.extend(f"{k} (outside {wrapper})" for k in root if k != wrapper)
            root = inner
            break
    tensors = dict(_flatten(root, "", dropped))
    if not tensors:
        raise InvalidFileError(f"{p}: no tensors in this pickle", hint="give a checkpoint file")
    return tensors, dropped


def pickle_to_safetensors(
    src: Path,
    output: Path,
    *,
    dtypes: Mapping[str, str | None],
    arch: str | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> ConvertResult:
    """Read ``src`` safely and write its tensors as safetensors (dtype options applied per component)."""
    from lorasmith.archs.base import SimpleKeyView, TensorSpec
    from lorasmith.io.dtypes import safetensors_dtype
    from lorasmith.ops.convert import component_dtypes, key_components, write_streaming

    tensors, dropped = load_pickle_state_dict(src)
    # tied weights share storage; each key is written as its own copy, so drop views into one buffer
    specs = {k: (safetensors_dtype(t.dtype), tuple(int(d) for d in t.shape)) for k, t in tensors.items()}
    view = SimpleKeyView({k: TensorSpec(shape, st) for k, (st, shape) in specs.items()})
    keys = list(tensors)
    try:
        comps, family, variant = key_components(keys, view, arch)
    except InvalidFileError:
        comps, family, variant = dict.fromkeys(keys), None, None
    targets = component_dtypes(keys, dtypes, comps)
    for k in keys:
        if k.endswith(".alpha") and not specs[k][1]:
            # a LoRA's alpha scalar keeps its dtype, as on the safetensors LoRA path: a cast would round
            # alphas such as 0.7 and with them every module's strength
            targets[k] = None
    result = write_streaming(
        src,
        output,
        keys=keys,
        specs=specs,
        # popped: each tensor is let go once written (a legacy pickle's memory falls as the file is written)
        get=lambda k: tensors.pop(k).contiguous(),
        targets=targets,
        metadata={},
        record={"from": "pickle", "dtype": {k: v for k, v in dtypes.items() if v is not None}},
        family=family,
        variant=variant,
        overwrite=overwrite,
        progress=progress,
        dropped=dropped,
    )
    if dropped:
        result.warnings.append(f"{len(dropped)} non-tensor entr{'y' if len(dropped) == 1 else 'ies'} dropped")
    return result
