"""Progress reporting shared by the ops (library side) and the CLI (rendering side).

Ops take an optional ``progress`` callback and call it with :class:`ProgressEvent` values; they never
print. The CLI turns events into a tqdm bar on stderr (:func:`cli_progress`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long operation.

    :ivar stage: what is being done (``"reading"``, ``"svd"``, ``"writing"``).
    :ivar done: units finished so far.
    :ivar total: units in all, ``None`` if unknown.
    :ivar item: the unit just finished (a module or tensor name), if any.
    """

    stage: str
    done: int
    total: int | None = None
    item: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def noop(_event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


@contextmanager
def cli_progress(enabled: bool = True) -> Iterator[ProgressCallback]:
    """A callback drawing one tqdm bar per stage on stderr; silent when ``enabled`` is false."""
    if not enabled:
        yield noop
        return
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def callback(event: ProgressEvent) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            bar = tqdm(total=event.total, desc=event.stage, unit="it", leave=False, dynamic_ncols=True)
            bars[event.stage] = bar
        bar.n = event.done
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.refresh()

    try:
        yield callback
    finally:
        for bar in bars.values():
            bar.close()
