"""Streaming checkpoint paths of merge: bake LoRAs into a checkpoint, and checkpoint + checkpoint merges.

Both read one tensor at a time (:func:`lorasmith.io.reader.open_tensors`) and write through a planned
:class:`~lorasmith.io.writer.SafetensorsWriter` whose plan comes from the first checkpoint's header, so the
peak memory is a few tensors whatever the model size. Internal to :mod:`lorasmith.ops.merge`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from lorasmith.adapters.base import AdapterModule
from lorasmith.archs.base import STRIP_PREFIXES, Architecture, Inventory
from lorasmith.errors import AdapterError, ArchMismatchError, LorasmithError, ShapeMismatchError
from lorasmith.io.dtypes import safetensors_dtype, torch_dtype
from lorasmith.io.header import Header, read_header
from lorasmith.io.pipeline import (
    Source,
    Step,
    cast_steps,
    copy_steps,
    memory_budget,
    part_elements,
    run_steps,
    split_range,
)
from lorasmith.io.reader import TensorFile, open_tensors
from lorasmith.io.writer import SafetensorsWriter, WriteResult
from lorasmith.ops._merge_lora import LoadedLora, check_same_family, merged_metadata
from lorasmith.ops.blocks import BlockWeights
from lorasmith.progress import ProgressCallback, ProgressEvent
from lorasmith.registry import get_registry

__all__ = [
    "BakeJob",
    "CkptOutcome",
    "bake",
    "bake_steps",
    "bake_tensor",
    "fit_slice",
    "merge_checkpoints",
]

_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})

#: Elements per chunk of the elementwise loops when the dtypes are not known (the scratch buffer's least
#: size). Why chunks: a tensor is converted to the compute dtype and combined a chunk at a time, so the
#: float32 temporaries of a 100 MB fp16 weight stay a few MB instead of several copies of the whole tensor
#: (peak memory is then the tensors as read plus the output, nothing more).
CHUNK_ELEMENTS = 1 << 20


def chunk_elements(*itemsizes: int) -> int:
    """Elements per chunk for inputs and an output of these item sizes: as many as fill one pooled buffer
    of :mod:`lorasmith.io.pipeline` (2M for fp16, 1M for fp32). Why as many: every part costs a few
    Python-level operations on each thread, so fewer, fuller parts leave the cores to the arithmetic."""
    return part_elements(*itemsizes)


def _band_rows(cols: int, *itemsizes: int) -> int:
    """Rows per band of a low-rank bake of a weight with ``cols`` columns (one chunk of elements)."""
    return max(1, chunk_elements(*itemsizes) // max(1, cols))


@dataclass
class CkptOutcome:
    """What a streaming path did."""

    tensors: int
    changed: int
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notation: str | None = None
    write: WriteResult | None = None


def _plan(header: Header, save: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        name: (save if (save is not None and info.dtype in _FLOATS) else info.dtype, tuple(info.shape))
        for name, info in header.tensors.items()
    }


def _key_index(header: Header, inventory: Inventory | None = None) -> dict[str, str]:
    """Canonical key -> file key, for files whose keys carry a wrapper prefix (or lack one).

    With the family's canonical ``inventory``, a bare component file (an SD1/SDXL UNet saved without
    ``model.diffusion_model.``) and a wrapped one (a FLUX transformer under ``model.diffusion_model.``) map
    onto the canonical names through the inventory's component prefixes; keys the inventory does not know
    fall back to the wrapper prefixes alone.
    """
    index: dict[str, str] = {}
    if inventory is not None:
        from lorasmith.ops._extract_io import canonical_map

        index.update(canonical_map(header, inventory))
    for name in header.tensors:
        index.setdefault(name, name)
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                index.setdefault(name[len(prefix) :], name)
    return index


#: Component names of the diffusion model itself (what ``--unet-only`` merges).
MAIN_COMPONENTS = frozenset({"unet", "transformer", "mmdit", "diffusion_model"})


def main_model_rule(
    family: Architecture, variant: str | None, header: Header, canonical_of: dict[str, str]
) -> Callable[[str], bool]:
    """Whether a file key of a checkpoint belongs to the diffusion model (``--unet-only``).

    A key the canonical inventory knows belongs to it when its component is the diffusion model's; any other
    key is told by the family's single-file part prefixes (a FLUX or Z-Image file that bundles ``vae.`` and
    ``text_encoders.`` keys next to ``model.diffusion_model.``): under another part's prefix it is not, else
    it is (wrapper keys, keys no inventory lists).
    """
    inventory = family.canonical_inventory(variant)
    mains = {c for c in inventory.components if c in MAIN_COMPONENTS}
    slots = family.part_slots(variant)
    if not mains and slots:
        mains = {c for c, prefix in inventory.components.items() if prefix == slots[0].prefix}
    if not mains:
        mains = set(inventory.components)
    others = tuple(s.prefix for s in slots[1:] if s.prefix)
    canonical = set(inventory.tensors)

    def is_main(name: str) -> bool:
        key = canonical_of.get(name, name)
        if key in canonical:
            return inventory.component_of(key) in mains
        if name.startswith(others):
            return False
        comp = inventory.component_of(key)
        return comp is None or comp in mains

    return is_main


def fit_slice(sl: tuple[int, int, int], real: int | None, actual: int, name: str) -> tuple[int, int, int]:
    """Map a slice of the real weight onto this file's weight (the same slice, or scaled when shrunk)."""
    dim, start, length = sl
    if real is None or real == actual:
        return sl
    if real % actual == 0 and start % (real // actual) == 0 and length % (real // actual) == 0:
        f = real // actual
        return (dim, start // f, length // f)
    raise ShapeMismatchError(
        f"module {name!r}: its rows {start}:{start + length} of a fused weight of {real} rows do not fit "
        f"the checkpoint's {actual} rows",
        hint="the LoRA was made for another model of the family",
    )


def _detect_ckpt(path: Path, header: Header, arch: str | None) -> tuple[Architecture, str | None]:
    det = get_registry().detect(header, arch=arch, source=str(path))
    if det.kind == "lora":
        raise LorasmithError(
            f"{path}: is a LoRA, not a checkpoint", hint="give LoRAs as positional arguments"
        )
    return get_registry().get(det.arch), det.variant


@dataclass
class BakeJob:
    """One LoRA module to apply to one base tensor.

    ``what`` is the parsed module, or a function that reads it: then the module is read when its tensor
    comes and :meth:`release` forgets it, so a bake holds one tensor's modules at a time.
    """

    what: AdapterModule | Callable[[], AdapterModule]
    ratio: float
    slice: tuple[int, int, int] | None
    source: str
    _read: AdapterModule | None = None

    @property
    def module(self) -> AdapterModule:
        """The parsed module."""
        if isinstance(self.what, AdapterModule):
            return self.what
        if self._read is None:
            self._read = self.what()
        return self._read

    def release(self) -> None:
        """Forget a module that was read on demand (its tensors are freed)."""
        self._read = None


def _bake_whole(
    t: torch.Tensor, jobs: Sequence[BakeJob], bias_jobs: Sequence[BakeJob], compute: torch.dtype
) -> torch.Tensor:
    """Apply every job to the whole tensor (DoRA, OFT, GLoRA, LoHa, ... need the whole weight)."""
    out_dtype = t.dtype
    w = t.to(compute)
    for job in jobs:
        part = w if job.slice is None else w.narrow(*job.slice)
        module = job.module  # reading it names the file itself if the module is broken
        try:
            new = module.apply(part, job.ratio, dtype=compute)
        except AdapterError as exc:
            raise AdapterError(f"{job.source}: {exc.message}", hint=exc.hint) from None
        part.copy_(new.reshape(part.shape))
        del new
    for job in bias_jobs:
        bd = job.module.bias_delta(compute)
        if bd is not None:
            w += job.ratio * bd.reshape(w.shape)
    return w.to(out_dtype)


#: ``(first row, up [rows, r] with ratio and scale folded in, down [r, cols])`` of one low-rank job.
_RowFactors = tuple[int, torch.Tensor, torch.Tensor]


def _lowrank_jobs(jobs: Sequence[BakeJob], t: torch.Tensor, compute: torch.dtype) -> list[_RowFactors] | None:
    """The jobs as row-placed factor pairs when every one is a plain low-rank delta; ``None`` otherwise.

    Why: a plain LoRA's delta is ``up @ down``, so any band of rows of the new weight only needs the
    matching rows of ``up``; the weight can then be updated in bands without a float copy of all of it.
    Anything else (a Tucker-free check fails, DoRA, weight-dependent algorithms, a slice along another
    dimension, shapes that do not fit) goes to :func:`_bake_whole`, which also reports shape errors.
    """
    if t.ndim < 2 or not t.is_floating_point():
        return None
    rows, cols = int(t.shape[0]), t.numel() // max(1, int(t.shape[0]))
    out: list[_RowFactors] = []
    for job in jobs:
        mod = job.module
        if mod.needs_base:
            return None
        lr = mod.lowrank()
        if lr is None:
            return None
        start, length = 0, rows
        if job.slice is not None:
            dim, start, length = job.slice
            if dim != 0:
                return None
        folded = lr.fold(compute)
        up = folded.up.to(compute).reshape(folded.up.shape[0], -1)
        down = folded.down.to(compute).reshape(folded.down.shape[0], -1)
        if up.shape[0] != length or down.shape[1] != cols or up.shape[1] != down.shape[0]:
            return None
        # the strength and alpha / rank scale on the small factor, once
        out.append((start, up * (job.ratio * lr.scale), down))
    return out


def _apply_band(w: torch.Tensor, first: int, factors: Sequence[_RowFactors]) -> None:
    """``w += up[rows] @ down`` for every factor pair overlapping the band of rows starting at ``first``.

    The one kernel of every low-rank bake (streamed or whole-tensor), so that they agree bit for bit.
    """
    last = first + int(w.shape[0])
    for start, up, down in factors:
        lo, hi = max(first, start), min(last, start + int(up.shape[0]))
        if lo < hi:
            w[lo - first : hi - first].addmm_(up[lo - start : hi - start], down)


def bake_tensor(
    t: torch.Tensor,
    jobs: Sequence[BakeJob],
    bias_jobs: Sequence[BakeJob],
    compute: torch.dtype,
    final: torch.dtype,
) -> torch.Tensor:
    """``t`` with ``jobs`` (and bias jobs) applied, in ``final``: the whole-tensor form of :func:`bake_steps`
    (same bands, same arithmetic, so the two give the same bits). Releases the jobs' modules."""
    factors = _lowrank_jobs(jobs, t, compute) if not bias_jobs else None
    out = (
        _bake_chunked(t, factors, compute, final)
        if factors is not None
        else _bake_whole(t, jobs, bias_jobs, compute)
    )
    for job in [*jobs, *bias_jobs]:
        job.release()
    return out if out.dtype == final else out.to(final)


def _bake_chunked(
    t: torch.Tensor, factors: Sequence[_RowFactors], compute: torch.dtype, final: torch.dtype
) -> torch.Tensor:
    """``W + sum up_j @ down_j`` band by band; written in ``final`` (in place when it is ``t``'s dtype)."""
    rows = int(t.shape[0])
    w2 = t.reshape(rows, -1)
    cols = int(w2.shape[1])
    out = t if final == t.dtype else torch.empty(t.shape, dtype=final)
    o2 = out.reshape(rows, -1)
    band = _band_rows(cols, t.element_size(), out.element_size())
    for a in range(0, rows, band):
        b = min(rows, a + band)
        wc = w2[a:b].to(compute)
        _apply_band(wc, a, factors)
        o2[a:b].copy_(wc)
    return out


#: torch threads for the bake's matrix products: the cores left after the reader, writer and hash threads.
#: Why not more: an OpenMP team whose threads get descheduled by those three waits at every barrier; on
#: two cores, two torch threads ran the products at 9 to 30 GFLOP/s, one thread at 90.
_BAKE_THREADS = max(1, (os.cpu_count() or 1) - 3)


def bake_steps(
    f: TensorFile,
    name: str,
    jobs: Sequence[BakeJob],
    bias_jobs: Sequence[BakeJob],
    compute: torch.dtype,
    scratch: _Scratch,
    out_itemsize: int,
) -> Iterator[Step]:
    """The steps that write base tensor ``name`` of ``f`` with ``jobs`` (and bias jobs) applied
    (``out_itemsize``: bytes per element of the output tensor).

    Plain low-rank jobs are applied band by band of rows (``W[a:b] += up[a:b] @ down``), so a weight is never
    held whole in float32; anything else (DoRA, OFT, a bias delta, a slice along another dimension) gets one
    step over the whole tensor. Runs on the reader thread of :func:`~lorasmith.io.pipeline.run_steps`: the
    LoRA modules are read and folded there, overlapping with the computation of earlier tensors.
    """
    info = f.info(name)
    shape = tuple(int(d) for d in info.shape)
    numel = _numel(shape)
    meta = torch.empty(shape, dtype=torch_dtype(info.dtype), device="meta")
    factors = _lowrank_jobs(jobs, meta, compute) if not bias_jobs else None
    if factors is None:

        def whole(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
            t = inputs[0].reshape(shape)
            if t.data_ptr() == out.data_ptr():  # pragma: no cover - the pipeline never aliases them
                t = t.clone()
            new = _bake_whole(t, jobs, bias_jobs, compute)
            for job in [*jobs, *bias_jobs]:
                job.release()
            out.copy_(new.reshape(-1))

        yield Step(name, 0, numel, [Source(f, name, 0, numel)], whole, True)
        return
    for job in jobs:
        job.release()  # the folded factors live on in ``factors``
    rows = shape[0]
    cols = numel // max(1, rows)
    band = _band_rows(cols, meta.element_size(), out_itemsize)

    def rows_of(a: int, b: int) -> Step:
        def apply(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
            w = scratch.get((b - a) * cols, compute).view(b - a, cols)
            w.copy_(inputs[0].view(b - a, cols))
            _apply_band(w, a, factors)
            out.view(b - a, cols).copy_(w)

        return Step(
            name, a * cols, (b - a) * cols, [Source(f, name, a * cols, (b - a) * cols)], apply, b == rows
        )

    for a in range(0, rows, band):
        yield rows_of(a, min(rows, a + band))


def bake(
    base: Path,
    loras: Sequence[LoadedLora],
    output: Path,
    *,
    arch: str | None,
    blocks_spec: str | None,
    compute: torch.dtype,
    save_dtype: torch.dtype | None,
    strict: bool,
    overwrite: bool,
    progress: ProgressCallback,
) -> CkptOutcome:
    """Fold LoRAs into ``base``: ``W' = W + sum_i w_i * b(key) * dW_i`` (DoRA/OFT/GLoRA via ``apply``)."""
    from lorasmith.ops.blocks import parse_blocks

    header = read_header(base)
    family, variant = _detect_ckpt(base, header, arch)
    check_same_family(loras)
    if loras and loras[0].detection.arch != family.id:
        raise ArchMismatchError(
            f"{loras[0].path.name} is a {loras[0].detection.arch} LoRA, {base.name} a {family.id} checkpoint",
            hint="bake a LoRA into a checkpoint of its own family",
        )
    for lora in loras:
        # a LoRA of another variant whose names mean other weights there (an SD2 LoRA's text-encoder names
        # are OpenCLIP weights; in SD1 the same names are CLIP-L's): its modules would land on what they
        # happen to match. Variants whose names mean the same weights (FLUX dev and schnell) pass: what the
        # checkpoint lacks is reported as unmatched.
        lv = lora.detection.variant
        if lv is None or variant is None or lv == variant or variant not in family.variants:
            continue
        own, theirs = family.alias_table(lv), family.alias_table(variant)
        moved = [n for n in lora.names if n in own and n in theirs and own[n].target != theirs[n].target]
        if moved:
            raise ArchMismatchError(
                f"{lora.path.name} is a LoRA for {lv}, {base.name} a {variant} checkpoint (its module "
                f"{moved[0]!r} means another weight in {variant})",
                hint="bake a LoRA into a checkpoint of the variant it was made for",
            )
    blocks: BlockWeights | None = parse_blocks(blocks_spec, family) if blocks_spec is not None else None
    index = _key_index(header, family.canonical_inventory(variant))
    jobs: dict[str, list[BakeJob]] = {}
    bias_jobs: dict[str, list[BakeJob]] = {}
    unmatched: list[str] = []
    for lora in loras:
        for name in lora.names:
            alias = lora.alias(name)
            file_key = index.get(alias.target.key) if alias is not None else None
            if alias is None or file_key is None:
                unmatched.append(f"{lora.path.name}: {name}")
                continue
            info = header.tensors[file_key]
            sl = alias.target.slice
            if sl is not None:
                spec = family.target_spec(alias.target.key, variant)
                real = spec.shape[sl[0]] if spec is not None else None
                sl = fit_slice(sl, real, int(info.shape[sl[0]]), name)
            bw = blocks.weight(family, alias.target.key) if blocks is not None else 1.0
            job = BakeJob(partial(lora.read, name), lora.ratio * bw, sl, f"{lora.path.name}: {name}")
            jobs.setdefault(file_key, []).append(job)
            if lora.has_bias(name) and file_key.endswith(".weight"):
                bkey = file_key[: -len("weight")] + "bias"
                if bkey in header.tensors:
                    bias_jobs.setdefault(bkey, []).append(job)
    if unmatched and strict:
        raise LorasmithError(
            f"{len(unmatched)} LoRA module(s) match no weight of {base.name}, e.g. {unmatched[0]}",
            hint="drop --strict to skip them, or check that the LoRA is for this model",
        )
    save = safetensors_dtype(save_dtype) if save_dtype is not None else None
    meta = merged_metadata(
        [(base, None, dict(header.metadata))] + [(lr.path, lr.ratio, lr.metadata) for lr in loras],
        keep_ss=False,
    )
    writer = SafetensorsWriter(
        output,
        metadata=meta,
        overwrite=overwrite,
        inputs=[base, *(lr.path for lr in loras)],
        plan=_plan(header, save),
    )
    changed = 0
    total = len(header.tensors)
    tick = _ticker(progress, "baking", total)

    scratch = _Scratch()
    try:
        with open_tensors(base, header) as f:

            def steps() -> Iterator[Step]:
                nonlocal changed
                for name in writer.planned_names:
                    info = header.tensors[name]
                    floating = info.dtype in _FLOATS
                    out_dtype = save_dtype if (save_dtype is not None and floating) else None
                    if not (jobs.get(name) or bias_jobs.get(name)):
                        yield from _pass_through(f, name, out_dtype)
                        continue
                    changed += 1
                    yield from bake_steps(
                        f,
                        name,
                        jobs.get(name, []),
                        bias_jobs.get(name, []),
                        compute,
                        scratch,
                        _itemsize(writer.planned_dtype(name)),
                    )

            run_steps(
                steps(),
                writer,
                on_tensor=tick,
                compute_threads=_BAKE_THREADS,
                memory=memory_budget(_sizes([base, *(lr.path for lr in loras)])),
            )
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    return CkptOutcome(
        tensors=total,
        changed=changed,
        unmatched=unmatched,
        notation=blocks.notation if blocks else None,
        write=result,
    )


# ------------------------------------------------------------------------------------ checkpoint merges
def _dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{index}:{name}".encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * n)`` entries of largest magnitude (ties at the threshold kept)."""
    n = t.numel()
    k = math.ceil(density * n)
    if k >= n:
        return t
    if k <= 0:
        return torch.zeros_like(t)
    mag = t.abs().reshape(-1)
    thr = mag.kthvalue(n - k + 1).values
    return torch.where(t.abs() >= thr, t, torch.zeros_like(t))


def combine(
    method: str,
    tensors: Sequence[torch.Tensor],
    ratios: Sequence[float],
    *,
    density: float,
    drop: float,
    lam: float,
    block: float,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """One tensor (or one flat chunk of it) of a checkpoint merge, in the compute dtype of ``tensors``.

    See ``docs/merge.md``. ``block`` scales the change against the first model: ``A + block * (merged - A)``.
    Every method but TIES is elementwise, so it may be given successive chunks of flattened tensors; DARE's
    masks are drawn from ``generators`` (one per model after the first, consumed in order), so chunks
    draw the same stream as one call would.

    :raises LorasmithError: DARE without generators.
    """
    a = tensors[0]
    if method == "weighted-sum":
        merged = sum((r * t for r, t in zip(ratios, tensors, strict=True)), torch.zeros_like(a))
    elif method == "add-difference":
        merged = a + ratios[1] * (tensors[1] - tensors[2])
    elif method == "ties":
        taus = [(_trim(t - a, density), w) for t, w in zip(tensors[1:], ratios[1:], strict=True)]
        weighted = [w * tau for tau, w in taus]
        elected = torch.sign(sum(weighted, torch.zeros_like(a)))
        num = torch.zeros_like(a)
        den = torch.zeros_like(a)
        for (tau, w), wt in zip(taus, weighted, strict=True):
            agree = (torch.sign(tau) == elected) & (tau != 0)
            num += torch.where(agree, wt, torch.zeros_like(wt))
            den += torch.where(agree, torch.full_like(wt, w), torch.zeros_like(wt))
        tau_m = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), den)
        merged = a + lam * tau_m
    elif method == "dare":
        keep = 1.0 - drop
        total = torch.zeros_like(a)
        if generators is None or len(generators) != len(tensors) - 1:
            raise LorasmithError("DARE needs one mask generator per merged model")  # pragma: no cover
        for t, w, gen in zip(tensors[1:], ratios[1:], generators, strict=True):
            tau = t - a
            mask = torch.rand(tau.shape, generator=gen) < keep
            total += w * torch.where(mask, tau / keep, torch.zeros_like(tau))
        merged = a + lam * total
    else:  # pragma: no cover - validated by the caller
        raise LorasmithError(f"unknown merge method {method!r}")
    if block != 1.0:
        merged = a + block * (merged - a)
    return merged


def _itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return torch_dtype(st_dtype).itemsize


def _sizes(paths: Sequence[Path]) -> int:
    """Bytes of the input files together (what the pipeline's pools are sized by)."""
    return sum(p.stat().st_size for p in paths)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pass_through(file: TensorFile, name: str, out_dtype: torch.dtype | None) -> Iterator[Step]:
    """Steps that copy a tensor unchanged, or cast to ``out_dtype`` (a float tensor and ``--save-dtype``)."""
    info = file.info(name)
    size = info.nbytes // max(1, _numel(info.shape))
    if out_dtype is None:
        return copy_steps(file, name, name, part_elements(size))
    return cast_steps(file, name, name, part_elements(size, out_dtype.itemsize))


def _ticker(progress: ProgressCallback, stage: str, total: int) -> Callable[[str], None]:
    """A per-tensor progress callback for :func:`~lorasmith.io.pipeline.run_steps` (counts the tensors)."""
    done = 0

    def tick(name: str) -> None:
        nonlocal done
        done += 1
        progress(ProgressEvent(stage, done, total, name))

    return tick


class _Scratch:
    """One reusable float buffer for the elementwise steps (they all run on the computing thread)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        if self._buf is None or self._buf.dtype != dtype or self._buf.numel() < count:
            self._buf = torch.empty(max(count, CHUNK_ELEMENTS), dtype=dtype)
        return self._buf[:count]


def _merge_steps(
    files: Sequence[TensorFile],
    name: str,
    method: str,
    ratios: Sequence[float],
    block: float,
    compute: torch.dtype,
    *,
    density: float,
    drop: float,
    lam: float,
    seed: int,
    scratch: _Scratch,
    out_itemsize: int,
) -> Iterator[Step]:
    """The steps of one merged tensor: elementwise methods part by part, TIES on the whole tensor
    (``out_itemsize``: bytes per element of the output tensor)."""
    numel = _numel(files[0].info(name).shape)

    if method == "ties":  # the top-k threshold needs each whole task vector

        def whole(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
            ts = [x.to(compute) for x in inputs]
            merged = combine(method, ts, ratios, density=density, drop=drop, lam=lam, block=block)
            out.copy_(merged.reshape(-1))

        yield Step(name, 0, numel, [Source(f, name, 0, numel) for f in files], whole, True)
        return

    gens = [_dare_generator(seed, name, i) for i in range(1, len(files))] if method == "dare" else None

    # Two models whose ratios add up to 1 (the default): ``lerp`` computes ``a + t (b - a)`` in float32
    # (torch's internal precision for half types) and rounds once into the output, in one pass over the
    # data instead of four (widen, scale, add, narrow). Other dtypes and precisions take the general path.
    lerp_t = ratios[1] if (len(ratios) == 2 and abs(ratios[0] + ratios[1] - 1.0) < 1e-12) else None

    def part(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        if (
            method == "weighted-sum"
            and lerp_t is not None
            and block == 1.0
            and compute == torch.float32
            and inputs[0].dtype == inputs[1].dtype == out.dtype
            and out.dtype in (torch.float16, torch.bfloat16, torch.float32)
        ):
            torch.lerp(inputs[0], inputs[1], lerp_t, out=out)
            return
        if method == "weighted-sum":
            # sum_i r_i x_i in one float buffer, in place: no temporaries, one rounding into ``out``
            w = scratch.get(out.numel(), compute)
            w.copy_(inputs[0])  # widen first: a half-precision product would be rounded to half
            w.mul_(ratios[0])
            for x, r in zip(inputs[1:], ratios[1:], strict=True):
                w.add_(x, alpha=r)
            if block != 1.0:  # a + block * (merged - a)
                w.mul_(block).add_(inputs[0], alpha=1.0 - block)
        elif method == "add-difference":
            # a + block * r (b - c)
            w = scratch.get(out.numel(), compute)
            w.copy_(inputs[1])
            w.sub_(inputs[2])
            w.mul_(ratios[1] * block).add_(inputs[0])
        else:
            w = combine(
                method,
                [x.to(compute) for x in inputs],
                ratios,
                density=density,
                drop=drop,
                lam=lam,
                block=block,
                generators=gens,
            )
        out.copy_(w)

    sizes = [_itemsize(f.info(name).dtype) for f in files]
    for start, length, last in split_range(numel, chunk_elements(*sizes, out_itemsize)):
        yield Step(name, start, length, [Source(f, name, start, length) for f in files], part, last)


def merge_checkpoints(
    models: Sequence[tuple[Path, float]],
    output: Path,
    *,
    method: str,
    arch: str | None,
    blocks_spec: str | None,
    unet_only: bool,
    density: float,
    drop: float,
    lam: float,
    seed: int,
    compute: torch.dtype,
    save_dtype: torch.dtype | None,
    overwrite: bool,
    progress: ProgressCallback,
) -> CkptOutcome:
    """Merge checkpoints tensor by tensor (weighted sum, add difference, TIES, DARE)."""
    from lorasmith.ops.blocks import parse_blocks

    headers = [read_header(p) for p, _ in models]
    fams = [_detect_ckpt(p, h, arch) for (p, _), h in zip(models, headers, strict=True)]
    family, variant = fams[0]
    for (p, _), (fam, _) in zip(models[1:], fams[1:], strict=True):
        if fam.id != family.id:
            raise ArchMismatchError(
                f"checkpoints of different families: {models[0][0].name} is {family.id}, "
                f"{p.name} is {fam.id}",
                hint="merge only checkpoints of one family",
            )
    blocks = parse_blocks(blocks_spec, family) if blocks_spec is not None else None
    first = headers[0]
    inventory = family.canonical_inventory(variant)
    # file key -> canonical key (block weights and --unet-only are told from the canonical names)
    canonical_of: dict[str, str] = {}
    for canon, name in _key_index(first, inventory).items():
        if canon != name and canon in inventory.tensors:
            canonical_of.setdefault(name, canon)
    for canon, name in _key_index(first).items():
        if canon != name and name not in inventory.tensors:
            canonical_of.setdefault(name, canon)
    is_main = main_model_rule(family, variant, first, canonical_of)

    def merged_key(name: str) -> bool:
        return not unet_only or is_main(name)

    for (p, _), h in zip(models[1:], headers[1:], strict=True):
        for name, info in first.tensors.items():
            if not merged_key(name):
                continue
            other = h.tensors.get(name)
            if other is None:
                raise ShapeMismatchError(
                    f"{p.name}: missing tensor {name!r} that {models[0][0].name} has",
                    hint="merge checkpoints of the same layout (convert first), or use --unet-only",
                )
            if tuple(other.shape) != tuple(info.shape):
                raise ShapeMismatchError(
                    f"{name}: shape {list(other.shape)} in {p.name}, "
                    f"{list(info.shape)} in {models[0][0].name}",
                    hint="the checkpoints are different models (variants) of the family",
                )
    save = safetensors_dtype(save_dtype) if save_dtype is not None else None
    meta = merged_metadata(
        [(p, r, dict(h.metadata)) for (p, r), h in zip(models, headers, strict=True)], keep_ss=False
    )
    meta["lorasmith.merge.method"] = method
    writer = SafetensorsWriter(
        output, metadata=meta, overwrite=overwrite, inputs=[p for p, _ in models], plan=_plan(first, save)
    )
    ratios = [r for _, r in models]
    changed = 0
    total = len(first.tensors)
    tick = _ticker(progress, "merging", total)

    scratch = _Scratch()
    try:
        with ExitStack() as stack:
            files = [
                stack.enter_context(open_tensors(p, h)) for (p, _), h in zip(models, headers, strict=True)
            ]

            def steps() -> Iterator[Step]:
                nonlocal changed
                for name in writer.planned_names:
                    info = first.tensors[name]
                    floating = info.dtype in _FLOATS
                    out_dtype = save_dtype if (save_dtype is not None and floating) else None
                    if not (merged_key(name) and floating):
                        yield from _pass_through(files[0], name, out_dtype)
                        continue
                    changed += 1
                    bw = blocks.weight(family, canonical_of.get(name, name)) if blocks else 1.0
                    yield from _merge_steps(
                        files,
                        name,
                        method,
                        ratios,
                        bw,
                        compute,
                        density=density,
                        drop=drop,
                        lam=lam,
                        seed=seed,
                        scratch=scratch,
                        out_itemsize=_itemsize(writer.planned_dtype(name)),
                    )

            run_steps(steps(), writer, on_tensor=tick, memory=memory_budget(_sizes([p for p, _ in models])))
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    return CkptOutcome(
        tensors=total, changed=changed, notation=blocks.notation if blocks else None, write=result
    )
