"""Options spelled once for every command, and the guard that turns errors into exit codes.

:func:`guarded` wraps every command body. Besides printing a :class:`~lorasmith.errors.LorasmithError` as
``error:``/``hint:`` lines with its exit code, it turns the failures a user can cause without a bug into
such errors too (see ``docs/reliability.md``):

- SIGINT and SIGTERM: exit code 130 once the writers have removed their temporary files;
- running out of memory (``MemoryError``, torch's "can't allocate memory", CUDA out of memory): one line
  saying how much the failed allocation asked for and what limit the process runs under;
- an ``OSError`` that names a file (a name too long, a disk that disappeared): the file and the reason;
- NaN or infinite values: when an output would hold them (the writer refuses), or when they made a linear
  algebra routine fail, the input files are scanned and the message names the file and its tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lorasmith.errors import EXIT_INTERRUPTED, InvalidFileError, LorasmithError
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
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite", help="Write NaN/Inf values instead of refusing the output (each is reported)."
    ),
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Re-read each written file's data and compare its hashes.")
]

#: Parameters of the command functions that name outputs (or folders), never inputs to scan.
_OUTPUT_PARAMS = frozenset({"output", "output_dir", "detail", "cache_dir", "dataset", "dataset_config"})
#: Largest number of non-finite tensors named per file.
_NAMED_TENSORS = 3
_OOM = re.compile(
    r"can't allocate memory|out of memory|unable to allocate|cannot allocate memory|can't start new thread",
    re.IGNORECASE,
)


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def write_checks(*, allow_nonfinite: bool = False, verify: bool = False) -> Iterator[None]:
    """The writers' policy for a command body (``--allow-nonfinite``, ``--verify``).

    Every non-finite tensor written because of ``--allow-nonfinite`` gets a ``warning:`` line on stderr.
    """
    from lorasmith.io.writer import write_policy
    from lorasmith.output import warn

    with write_policy(allow_nonfinite=allow_nonfinite, verify_data=verify) as policy:
        try:
            yield
        finally:
            for t in policy.nonfinite[:20]:
                warn(f"{t.path}: tensor {t.name!r} written with {t.describe()} (--allow-nonfinite)")
            if len(policy.nonfinite) > 20:
                warn(f"... and {len(policy.nonfinite) - 20} more tensors with NaN/Inf values")


# ------------------------------------------------------------------------------------ failure mapping
def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
_UNITS["TIB"] = 1024**4


def _requested_bytes(text: str) -> int | None:
    """The size of the failed allocation, from torch's and numpy's messages."""
    m = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:tried to allocate|unable to allocate) ([\d.]+) ?([KMGT]i?B|B)\b", text, re.IGNORECASE)
    if m:
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    return None


def _limit_text() -> str:
    """What memory the process may use: its address-space limit, or the memory the system has free."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return f"the process is limited to {_size(soft)} of address space"
    except (ImportError, OSError, ValueError):  # pragma: no cover - Windows
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return f"{_size(int(line.split()[1]) * 1024)} of memory is available"
    except OSError:  # pragma: no cover - not Linux
        pass
    return "memory ran out"  # pragma: no cover - not Linux


def out_of_memory(exc: BaseException) -> LorasmithError | None:
    """A :class:`LorasmithError` for an allocation failure, or ``None`` when ``exc`` is something else."""
    text = str(exc)
    if not isinstance(exc, MemoryError) and not (isinstance(exc, RuntimeError) and _OOM.search(text)):
        return None
    if "thread" in text:
        what = "cannot start a worker thread"
    else:
        need = _requested_bytes(text)
        what = f"needs about {_size(need)} more" if need else "an allocation failed"
    return LorasmithError(
        f"out of memory: {what}; {_limit_text()}",
        hint="free memory, or compute elsewhere (--device), in a smaller --precision, or with fewer inputs",
    )


def _os_error(exc: OSError) -> LorasmithError | None:
    """An ``OSError`` that names its file is a problem with that file, not a bug."""
    if exc.filename is None:
        return None
    return InvalidFileError(
        f"{exc.filename}: {exc.strerror or exc}", hint="check the path, its permissions and the disk"
    )


def _input_files(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Path]:
    """The existing files among a command's arguments (outputs excluded; ``a.safetensors:0.7`` specs
    and comma-separated merge specs understood)."""
    found: list[Path] = []

    def visit(value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
            return
        if not isinstance(value, (str, os.PathLike)):
            return
        text = os.fspath(value)
        candidates = [text]
        for item in text.split(","):
            head, sep, _tail = item.rpartition(":")
            candidates.extend([item, head] if sep else [item])
        for c in candidates:
            with contextlib.suppress(OSError, ValueError):
                p = Path(c.strip())
                if c.strip() and p.is_file() and p not in found:
                    found.append(p)

    for name, value in kwargs.items():
        if name not in _OUTPUT_PARAMS:
            visit(value)
    for value in args:
        visit(value)
    return found


def _scan_nonfinite(path: Path) -> tuple[list[str], bool]:
    """Describe the first tensors of ``path`` holding NaN/Inf (``"'name' (1 NaN value)"``); the flag says
    whether the scan stopped before the end."""
    from lorasmith.io.reader import open_tensors
    from lorasmith.io.writer import nonfinite_counts

    found: list[str] = []
    try:
        with open_tensors(path) as f:
            for name in f:
                if f.info(name).dtype in ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"):
                    continue
                try:
                    nan, inf = nonfinite_counts(f.get(name))
                except LorasmithError:  # a dtype this torch cannot hold
                    continue
                if nan or inf:
                    from lorasmith.io.writer import NonFiniteTensor

                    found.append(f"{name!r} ({NonFiniteTensor(path, name, nan, inf).describe()})")
                    if len(found) > _NAMED_TENSORS:
                        return found[:_NAMED_TENSORS], True
    except (LorasmithError, OSError):
        return found, False
    return found, False


def _nonfinite_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], hint: str) -> LorasmithError | None:
    """An error naming the input files (and tensors) that hold NaN/Inf, or ``None`` when none does."""
    parts: list[str] = []
    for path in _input_files(args, kwargs):
        if path.suffix.lower() != ".safetensors":
            continue
        tensors, more = _scan_nonfinite(path)
        if tensors:
            parts.append(f"{path}: NaN/Inf values in {', '.join(tensors)}{' and more' if more else ''}")
    if not parts:
        return None
    return LorasmithError("; ".join(parts), hint=hint)


def _is_linalg_failure(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    linalg_error = getattr(getattr(torch, "linalg", None), "LinAlgError", None) if torch else None
    return linalg_error is not None and isinstance(exc, linalg_error)


def _translate(exc: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LorasmithError | None:
    """The user error behind an exception that is not a :class:`LorasmithError`, or ``None`` (a bug)."""
    from lorasmith.io.writer import NonFiniteError

    if isinstance(exc, NonFiniteError):
        found = _nonfinite_inputs(
            args,
            kwargs,
            "the inputs hold NaN/Inf values (a damaged file or a diverged training run); fix or drop those "
            "modules, or pass --allow-nonfinite to write the output anyway",
        )
        return found or exc
    if isinstance(exc, LorasmithError):
        return exc
    oom = out_of_memory(exc)
    if oom is not None:
        return oom
    if _is_linalg_failure(exc):
        return _nonfinite_inputs(
            args,
            kwargs,
            "the computation cannot use NaN/Inf values; fix or drop those modules (a damaged file or a "
            "diverged training run)",
        )
    if isinstance(exc, OSError):
        return _os_error(exc)
    return None


def guarded(fn: F) -> F:
    """Run a command body: a :class:`LorasmithError` becomes ``error:``/``hint:`` lines and its exit code;
    SIGINT and SIGTERM become exit code 130 after the writers have cleaned up; out-of-memory, a file
    system error naming a file, and NaN/Inf values become one-line errors too (see the module docstring).
    Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        old = signal.signal(signal.SIGTERM, _sigterm)
        try:
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise  # typer's own control flow (it subclasses RuntimeError)
            except (LorasmithError, MemoryError, RuntimeError, OSError) as exc:
                err = _translate(exc, args, kwargs)  # may scan the inputs: still interruptible below
                if err is None:
                    raise
                if err is not exc and os.environ.get("LORASMITH_DEBUG"):
                    import traceback

                    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
                report_error(err)
                raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if os.environ.get("LORASMITH_DEBUG"):
                raise
            sys.stderr.write("error: interrupted; no partial output was left\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, old)

    return wrapper  # type: ignore[return-value]
