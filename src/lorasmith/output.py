"""One output sink with a human mode (rich) and a JSON mode.

Results go to stdout; progress, warnings and errors go to stderr. Commands build a pydantic result with
an ops function and hand it to :func:`emit` together with a renderer for the human mode.

rich is imported on first use of a console (:data:`stdout`, :data:`stderr`, :func:`warn`, the human mode
of :func:`emit`): ``--json`` runs and error reports never pay for it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from lorasmith.errors import LorasmithError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from rich.console import Console

    #: The console results are printed on (created on first use).
    stdout: Console
    #: The console warnings go to (created on first use).
    stderr: Console

T = TypeVar("T", bound="BaseModel")

_CONSOLES: dict[str, Console] = {}


def console(name: str = "stdout") -> Console:
    """The shared rich console ``stdout`` or ``stderr`` (built, and rich imported, on first use)."""
    found = _CONSOLES.get(name)
    if found is None:
        from rich.console import Console

        found = _CONSOLES[name] = Console(stderr=name == "stderr", soft_wrap=True, highlight=False)
    return found


def __getattr__(name: str) -> Any:
    """``output.stdout`` and ``output.stderr``: the consoles of :func:`console`."""
    if name in ("stdout", "stderr"):
        return console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    out = console("stdout")
    for i, item in enumerate(items):
        if i:
            out.print()
        render(out, item)


def warn(message: str) -> None:
    """A warning line on stderr."""
    console("stderr").print(f"[yellow]warning:[/] {message}", markup=True)


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
