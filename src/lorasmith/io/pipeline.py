"""Overlapped streaming of tensor data: read ahead, compute, write behind, in bounded memory.

A checkpoint-sized job (a merge, a bake, a dtype conversion) is a sequence of :class:`Step`\\ s, each making
one part of one output tensor from parts of input tensors. :func:`run_steps` runs three things at once:

- a *reader* thread reads the inputs of the next steps (``preadv`` into reusable buffers);
- the calling thread computes each step (torch releases the GIL, so this overlaps with the other two);
- a *writer* thread writes finished parts at their offsets and feeds the hash (``pwrite`` and ``sha256``
  release the GIL too).

Why: done one after the other, reading, computing, hashing and writing a 7 GB checkpoint each cost seconds;
overlapped, the wall time approaches that of the slowest of them. Why reusable buffers: a fresh
``torch.empty`` of a large tensor is fresh memory from the kernel, and page-faulting it in costs about as
much as reading the data, for every tensor of the model.

Memory is bounded by the buffer pools plus what a step allocates itself (a step whose parts do not fit a
pooled buffer gets a buffer of its own, freed after it is written). The pools' size is a budget
(:func:`memory_budget`): the more parts may be in flight, the further each thread can run ahead of the
others through the stretches where another one is the slowest (a bake's matrix products against the
writing and hashing of the tensors it leaves as they are).
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lorasmith.io.reader import TensorFile
    from lorasmith.io.writer import SafetensorsWriter

__all__ = [
    "MAX_MEMORY",
    "MIN_MEMORY",
    "BufferPool",
    "Source",
    "Step",
    "cast_steps",
    "copy_steps",
    "memory_budget",
    "part_elements",
    "run_steps",
    "split_range",
]

#: Stack size of the pipeline's threads.
_STACK_BYTES = 4 << 20

#: Bytes per pooled buffer: one part of one input (or of the output) of a step.
BUFFER_BYTES = 4 << 20

#: The smallest and largest pool budgets of :func:`memory_budget`. Why these: with 64 MiB (8 parts read
#: ahead, 8 in computation, writing and hashing) a small job stays small; past about 320 MiB no measured
#: job ran faster (a 7 GB SDXL bake and two-model merge on 2 cores: 64 MiB 16.9 s and 11.6 s, 200 MiB
#: 15.3 s and 11.0 s, 320 MiB 14.7 s and 10.1 s, 1 GiB 14.7 s and 10.2 s).
MIN_MEMORY = 64 << 20
MAX_MEMORY = 320 << 20

#: Environment variable: the pool budget in MiB, overriding :func:`memory_budget` (a container with a
#: tight memory limit; seven parts are the least it uses).
MEMORY_ENV = "LORASMITH_PIPELINE_MB"


def memory_budget(input_bytes: int) -> int:
    """Bytes the buffer pools of :func:`run_steps` may hold for a job reading ``input_bytes`` in all.

    A sixteenth of the input, within :data:`MIN_MEMORY` and :data:`MAX_MEMORY`; ``LORASMITH_PIPELINE_MB``
    overrides it. Why scale with the input: run-ahead only pays while there is work to run ahead into,
    and a small job (or a test under a memory limit) keeps the small pools.
    """
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        try:
            return max(1, int(float(env) * (1 << 20)))
        except ValueError:
            pass  # a malformed value: the computed budget (not worth stopping a run for)
    return max(MIN_MEMORY, min(MAX_MEMORY, input_bytes // 16))


@dataclass(frozen=True)
class Source:
    """Elements ``[start, start + count)`` of input tensor ``name`` of ``file`` (flattened)."""

    file: TensorFile
    name: str
    start: int
    count: int


#: ``compute(inputs, out)``: fill ``out`` from the inputs (1-d views, their stored dtypes). ``out`` is a 1-d
#: tensor of the output's dtype and the step's element count. ``None`` as the compute of a step copies its
#: single input's bytes (same dtype), without any arithmetic.
Compute = Callable[[list["torch.Tensor"], "torch.Tensor"], None]


@dataclass
class Step:
    """One part of one output tensor.

    :ivar name: the output tensor (planned in the writer).
    :ivar start: first output element of the part; parts of a tensor come in order.
    :ivar count: output elements in the part.
    :ivar sources: the input parts the reader thread reads for it.
    :ivar compute: fills the output part (see :data:`Compute`); ``None`` copies the single source.
    :ivar last: this part ends the tensor (progress is reported then).
    :ivar prepare: run on the reader thread before reading (e.g. to read a LoRA module's factors); its
        result is passed as :attr:`prepared` (so slow preparation overlaps with computing).
    """

    name: str
    start: int
    count: int
    sources: Sequence[Source]
    compute: Compute | None = None
    last: bool = True
    prepare: Callable[[], Any] | None = None
    prepared: Any = field(default=None, repr=False)


def split_range(count: int, per_part: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, length, last)`` parts of ``[0, count)`` of at most ``per_part`` elements (one for 0)."""
    per_part = max(1, per_part)
    if count == 0:
        yield 0, 0, True
        return
    for start in range(0, count, per_part):
        length = min(per_part, count - start)
        yield start, length, start + length == count


class BufferPool:
    """A fixed set of reusable byte buffers; :meth:`take` blocks while all are in use (back-pressure).

    A request larger than the buffers gets a buffer of its own (not pooled).
    """

    def __init__(self, count: int, nbytes: int) -> None:
        import torch

        self.nbytes = nbytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._ids: set[int] = set()
        # one allocation for all the buffers: if memory is short, the error says how much the pool needs
        slab = torch.empty(count * nbytes, dtype=torch.uint8)
        for i in range(count):
            buf = slab[i * nbytes : (i + 1) * nbytes]
            self._ids.add(buf.data_ptr())
            self._free.put(buf)

    def take(self, nbytes: int, stop: threading.Event | None = None) -> torch.Tensor:
        """A byte buffer of at least ``nbytes`` (waits for a free one; gives up when ``stop`` is set)."""
        import torch

        if nbytes > self.nbytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise _Stopped from None

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`take` (own buffers are simply dropped)."""
        if buf.data_ptr() in self._ids:
            self._free.put(buf)


class _Stopped(Exception):
    """Another thread failed; this one stops."""


@dataclass
class _Ready:
    step: Step
    inputs: list[torch.Tensor]
    buffers: list[torch.Tensor]


def _out_size(writer: SafetensorsWriter, name: str) -> tuple[torch.dtype, int]:
    import torch

    from lorasmith.io.dtypes import torch_dtype

    dtype = torch_dtype(writer.planned_dtype(name))
    return dtype, torch.empty((), dtype=dtype).element_size()


def run_steps(
    steps: Iterable[Step],
    writer: SafetensorsWriter,
    *,
    on_tensor: Callable[[str], None] | None = None,
    buffers: int = 8,
    buffer_bytes: int = BUFFER_BYTES,
    depth: int = 3,
    compute_threads: int = 1,
    memory: int | None = None,
) -> None:
    """Run ``steps`` (in the writer's data order for an incremental hash) into a planned ``writer``.

    ``on_tensor(name)`` is called on this thread as each output tensor's last part is computed. The
    finite-values check runs here too (``writer.check_part``). On any error (or an interrupt) the other
    threads stop, and the error is raised here; the caller aborts the writer.

    ``compute_threads`` is torch's intra-op thread count while the steps run (restored after). Why 1 by
    default: the reader and writer threads already keep the other cores busy, and idle OpenMP workers
    spin-wait for work, so on a small machine a second compute thread costs more than it gives.

    ``memory`` (bytes, e.g. from :func:`memory_budget`) sizes the pools instead of ``buffers`` and
    ``depth``: half of its buffers for the inputs read ahead, half for the outputs in flight, and queues
    as deep as the output pool allows.
    """
    import torch

    if memory is not None:
        buffers, depth = _pool_shape(memory, buffer_bytes)

    threads_before = torch.get_num_threads()
    gc_before = gc.isenabled()
    torch.set_num_threads(max(1, compute_threads))
    # Why: steps allocate many small objects, which makes the cyclic collector run over and over; they
    # hold no cycles (reference counting frees them), so it is off while the steps run.
    gc.disable()
    try:
        _run(steps, writer, on_tensor, buffers, buffer_bytes, depth)
    finally:
        torch.set_num_threads(threads_before)
        if gc_before:
            gc.enable()


def _pool_shape(memory: int, buffer_bytes: int) -> tuple[int, int]:
    """``(input buffers, queue depth)`` for a pool budget: the output pool is ``2 * depth + 3`` buffers
    (the two queues full, plus one part each in computation, writing and hashing). At most 128 buffers:
    tiny parts (tests) gain nothing from thousands of them."""
    count = max(4, min(128, memory // max(1, buffer_bytes)))
    inputs = max(2, count // 2)
    depth = max(1, (count - inputs - 3) // 2)
    return inputs, depth


def _run(
    steps: Iterable[Step],
    writer: SafetensorsWriter,
    on_tensor: Callable[[str], None] | None,
    buffers: int,
    buffer_bytes: int,
    depth: int,
) -> None:
    # Two pools, so that no thread waits for a buffer only a waiting thread could free: the reader takes
    # input buffers, which the computing thread frees; the computing thread takes output buffers, which
    # the last stage (hashing) frees, and the write and hash stages never wait for a buffer.
    inputs_pool = BufferPool(buffers, buffer_bytes)
    outputs_pool = BufferPool(2 * depth + 3, buffer_bytes)
    stop = threading.Event()
    ready: queue.Queue[_Ready | None] = queue.Queue(maxsize=depth)
    written: queue.Queue[_Part | None] = queue.Queue(maxsize=depth)
    hashing: queue.Queue[_Part | None] = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []
    busy = {"read": 0.0, "compute": 0.0, "write": 0.0, "hash": 0.0}

    def put(q: queue.Queue[Any], item: Any) -> None:
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if stop.is_set():
                    raise _Stopped from None

    def get(q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        """A thread body whose errors are handed to the calling thread (which then stops everything)."""

        def run() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the calling thread
                errors.append(exc)
                stop.set()

        return run

    def read() -> None:
        for step in steps:
            t0 = time.perf_counter()
            if step.prepare is not None:
                step.prepared = step.prepare()
            # a step with many inputs reads into its own buffers: the pool must hold any one step
            own = len(step.sources) > buffers // 2
            inputs: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            for src in step.sources:
                info = src.file.info(src.name)
                size = src.count * (info.nbytes // max(1, _numel(info.shape))) if info.nbytes else 0
                buf = inputs_pool.take(max(size, inputs_pool.nbytes + 1) if own else size, stop)
                bufs.append(buf)
                inputs.append(src.file.read_part(src.name, src.start, src.count, into=buf))
            busy["read"] += time.perf_counter() - t0
            put(ready, _Ready(step, inputs, bufs))
        put(ready, None)

    def stage(
        source: queue.Queue[_Part | None],
        handle: Callable[[_Part], None],
        what: str,
        sink: queue.Queue[_Part | None] | None,
    ) -> Callable[[], None]:
        def loop() -> None:
            while (item := get(source)) is not None:
                t0 = time.perf_counter()
                handle(item)
                busy[what] += time.perf_counter() - t0
                if sink is not None:
                    put(sink, item)
            if sink is not None:
                put(sink, None)

        return loop

    def write(item: _Part) -> None:
        writer.write_part(item.name, item.offset, item.data, check=False, hash_now=False)

    def hash_and_free(item: _Part) -> None:
        writer.hash_part(item.name, item.offset, item.data)
        item.pool.give(item.buffer)  # the last stage: the buffer may be reused now

    threads = [
        threading.Thread(target=guarded(read), name="lorasmith-read", daemon=True),
        threading.Thread(
            target=guarded(stage(written, write, "write", hashing)), name="lorasmith-write", daemon=True
        ),
        threading.Thread(
            target=guarded(stage(hashing, hash_and_free, "hash", None)), name="lorasmith-hash", daemon=True
        ),
    ]
    out_sizes: dict[str, tuple[torch.dtype, int]] = {}
    # Small stacks: the threads run short torch and I/O calls, and under an address-space limit
    # (RLIMIT_AS, a container) three default 8 MiB stacks are what would make ``start`` fail.
    old_stack: int | None = threading.stack_size()
    try:
        threading.stack_size(_STACK_BYTES)
    except (ValueError, RuntimeError):  # pragma: no cover - a platform that cannot set it
        old_stack = None
    try:
        for t in threads:
            t.start()
    finally:
        if old_stack is not None:
            threading.stack_size(old_stack)
    try:
        while (got := get(ready)) is not None:
            step = got.step
            t0 = time.perf_counter()
            if step.name not in out_sizes:
                out_sizes[step.name] = _out_size(writer, step.name)
            out_dtype, out_size = out_sizes[step.name]
            if step.compute is None:  # a plain copy: the input buffer goes on as the output
                if len(got.inputs) != 1 or got.inputs[0].dtype != out_dtype:
                    raise ValueError(f"step for {step.name!r}: a plain copy needs one input of {out_dtype}")
                item = _Part(step.name, step.start * out_size, got.inputs[0], got.buffers[0], inputs_pool)
            else:
                out_buf = outputs_pool.take(step.count * out_size, stop)
                part = out_buf[: step.count * out_size].view(out_dtype)
                step.compute(got.inputs, part)
                for buf in got.buffers:
                    inputs_pool.give(buf)
                item = _Part(step.name, step.start * out_size, part, out_buf, outputs_pool)
            writer.check_part(step.name, item.data)
            busy["compute"] += time.perf_counter() - t0
            put(written, item)
            if step.last and on_tensor is not None:
                on_tensor(step.name)
            del got, item
        put(written, None)
    except _Stopped:
        pass  # another thread failed: its error is raised below
    except BaseException:
        stop.set()  # this thread failed (or was interrupted): stop the others
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    if os.environ.get("LORASMITH_PIPELINE_STATS"):  # for benchmarks: where the time went
        print(
            "pipeline busy seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()),
            file=sys.stderr,
        )


@dataclass
class _Part:
    """A computed part on its way to the file: where it goes, its bytes, and the buffer to free after."""

    name: str
    offset: int
    data: torch.Tensor
    buffer: torch.Tensor
    pool: BufferPool


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def copy_steps(file: TensorFile, name: str, out_name: str, per_part: int) -> Iterator[Step]:
    """Steps that copy tensor ``name`` of ``file`` unchanged (same dtype) into ``out_name``."""
    numel = _numel(file.info(name).shape)
    for start, length, last in split_range(numel, per_part):
        yield Step(out_name, start, length, [Source(file, name, start, length)], None, last)


def cast_steps(file: TensorFile, name: str, out_name: str, per_part: int) -> Iterator[Step]:
    """Steps that write tensor ``name`` of ``file`` into ``out_name`` in the writer's planned dtype (one
    rounding; a plain copy when the dtypes agree is :func:`copy_steps`)."""
    numel = _numel(file.info(name).shape)

    def cast(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(inputs[0])

    for start, length, last in split_range(numel, per_part):
        yield Step(out_name, start, length, [Source(file, name, start, length)], cast, last)


def part_elements(*itemsizes: int, buffer_bytes: int = BUFFER_BYTES) -> int:
    """Elements per step so that a part of every input and of the output fits one pooled buffer."""
    return max(1, buffer_bytes // max(1, *itemsizes))
