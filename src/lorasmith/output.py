"""One output sink with a human mode (rich) and a JSON mode.

Results go to stdout; progress, warnings and errors go to stderr. Commands build a pydantic result with
an ops function and hand it to :func:`emit` together with a renderer for the human mode.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console

from lorasmith.errors import LorasmithError

T = TypeVar("T", bound=BaseModel)

stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def emit(result: T | Sequence[T], as_json: bool, render: Callable[[Console, T], None]) -> None:
    """Print ``result`` (one model or several) as JSON or through ``render``."""
    items: Sequence[T] = result if isinstance(result, Sequence) else [result]
    if as_json:
        payload: Any = [m.model_dump(mode="json") for m in items]
        if not isinstance(result, Sequence):
            payload = payload[0]
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    for i, item in enumerate(items):
        if i:
            stdout.print()
        render(stdout, item)


def warn(message: str) -> None:
    """A warning line on stderr."""
    stderr.print(f"[yellow]warning:[/] {message}", markup=True)


def report_error(exc: LorasmithError) -> None:
    """Print ``error: ...`` and ``hint: ...`` on stderr (the traceback only with ``LORASMITH_DEBUG=1``)."""
    if os.environ.get("LORASMITH_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    # print() with markup off: messages can contain [brackets] from file names and shapes
    # plain writes: no markup, no wrapping, one line each whatever the terminal width
    sys.stderr.write(f"error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")
    sys.stderr.flush()
