"""Per-module work on parallel Python threads, one torch thread each (resize and extract).

On a CPU the per-module problems (small QRs, SVDs, eigensolvers, Gram products of a few hundred columns)
are too small for OpenMP: its barriers cost more than the work, and its idle workers spin, which stalls
badly when another process takes a core (measured on 2 cores: resize's 128 x 128 ``eigh`` 1 s instead
of 12 ms; extract 14 s with one torch thread against 47 - 94 s with two on the same 102 modules). So torch
runs one intra-op thread per Python thread, and modules are spread over as many Python threads as torch
would have used (torch releases the GIL in its kernels). Results come back in order, so what is written
and reported is the same as a sequential run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["INFLIGHT_BYTES", "compute_threads", "ordered", "pipelined"]

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

#: Default in-flight budget of :func:`pipelined`, in units of the items' ``cost`` (extract: bytes of each
#: module's delta in the compute dtype). A module's working set is a few times its delta (base, tuned,
#: delta, factors), so this keeps the extra memory of the modules in flight to some hundreds of MiB
#: whatever the core count; an item larger than the budget still runs, alone.
INFLIGHT_BYTES = 192 * 2**20


@contextmanager
def compute_threads(dev: torch.device) -> Iterator[int]:
    """How many modules to work on at once, with torch's intra-op threads set to 1 meanwhile.

    On a CPU: as many as torch's thread count (restored afterwards, also after an error). On a GPU, one
    thread feeds the device (batched kernels there): 1.
    """
    import torch

    if dev.type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, threads)
    finally:
        torch.set_num_threads(threads)


def _one_thread() -> None:
    import torch

    # MKL's and OpenMP's thread counts are per thread: set them in each worker too, not only globally
    torch.set_num_threads(1)


def pipelined(
    fetch: Callable[[T], P],
    solve: Callable[[P], R],
    items: Sequence[T],
    workers: int,
    cost: Callable[[T], int],
    budget: int = INFLIGHT_BYTES,
) -> Generator[R, None, None]:
    """``solve(fetch(item))`` for every item, in order, with ``solve`` on ``workers`` threads.

    ``fetch`` (the reads) runs on the calling thread, one item after the other, so the inputs are read
    sequentially by the one thread that owns them; ``solve`` runs in the pool. Results come back in the
    items' order whatever the scheduling. At most ``2 * workers`` items are in flight, and no more than
    ``budget`` of their summed ``cost`` (one item always is), so the memory held stays bounded. An error
    in ``solve`` is raised when its item's turn comes, after the results before it.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield solve(fetch(item))
        return
    window = 2 * workers
    pool = ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="lorasmith-work", initializer=_one_thread
    )
    try:
        pending: deque[tuple[Future[R], int]] = deque()
        held, nxt = 0, 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                c = cost(items[nxt])
                if pending and held + c > budget:
                    break
                pending.append((pool.submit(solve, fetch(items[nxt])), c))
                held += c
                nxt += 1
            future, c = pending.popleft()
            result = future.result()
            held -= c
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``2 * workers`` items in flight
    (``fn`` does its own reading: resize's units read their own modules)."""
    return pipelined(lambda item: item, fn, items, workers, cost=lambda _item: 0)
