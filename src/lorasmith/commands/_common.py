"""Options spelled once for every command, and the guard that turns errors into exit codes."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lorasmith.errors import EXIT_INTERRUPTED, LorasmithError
from lorasmith.output import report_error

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Force the family (sd1, sdxl, flux, sd3, zimage, or a plugin's).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Output file.", dir_okay=False)]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where to compute: auto, cpu, cuda or cuda:N.", show_default=True)
]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Per-module details.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")]


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def guarded(fn: F) -> F:
    """Run a command body: a :class:`LorasmithError` becomes ``error:``/``hint:`` lines and its exit code;
    SIGINT and SIGTERM become exit code 130 after the writers have cleaned up."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        old = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, **kwargs)
        except LorasmithError as exc:
            report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if os.environ.get("LORASMITH_DEBUG"):
                raise
            sys.stderr.write("error: interrupted; no partial output was left\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, old)

    return wrapper  # type: ignore[return-value]
