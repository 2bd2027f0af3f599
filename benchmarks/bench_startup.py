#!/usr/bin/env python3
"""Fixed cost of a short ``lorasmith`` process: imports, plugin loading, the first family detection.

Hub operators run ``lorasmith inspect`` on thousands of files, one process each, so what a process pays
before and around its (tiny) work matters. This script writes small test files with the package's own
fixture factory (shrunk shapes, real key structure: an SD1, an SDXL and a FLUX.1 LoRA in kohya spelling
with text-encoder modules, an SD1 and an SDXL single-file checkpoint) and times fresh processes:

- ``python -c pass``: the interpreter's own floor;
- ``import lorasmith.cli``;
- ``lorasmith --help``;
- ``lorasmith inspect FILE`` and ``lorasmith inspect --json FILE`` for each file;
- in-process split of one ``inspect`` run (imports, registry, first detection, the rest), from a child
  that times its own steps.

Each figure is the fastest of ``--repeat`` runs (default 7) and the median beside it: on a shared machine
the minimum is the steadier figure. The page cache is warm (files are tiny and read before timing), and so
is Python's bytecode cache, as in an installed package: children write and read their ``.pyc`` files under
``WORKDIR/pycache`` (``PYTHONPYCACHEPREFIX``) even where ``PYTHONDONTWRITEBYTECODE`` is set, which would
otherwise make every child compile lorasmith's sources again.

To compare with another checkout (before/after a change), put its ``src`` folders first on ``PYTHONPATH``:
the children inherit it.

Run: ``python benchmarks/bench_startup.py [--workdir DIR] [--repeat N] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit_json, loadavg, machine, markdown_table

#: (file stem, family, kind) of the inputs.
FILES: tuple[tuple[str, str, str], ...] = (
    ("sd1-lora", "sd1", "lora"),
    ("sdxl-lora", "sdxl", "lora"),
    ("flux-lora", "flux", "lora"),
    ("sd1-ckpt", "sd1", "checkpoint"),
    ("sdxl-ckpt", "sdxl", "checkpoint"),
)

# a child that times its own steps of one inspect run (perf_counter from interpreter start is unknowable,
# so "imports" starts at the child's first line)
_SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
import lorasmith.cli  # what the console script imports first
from lorasmith.ops.inspect import inspect_file
from lorasmith.io.header import read_header
t1 = time.perf_counter()
from lorasmith.registry import get_registry
reg = get_registry()
t2 = time.perf_counter()
header = read_header(sys.argv[1])
reg.detect(header)
t3 = time.perf_counter()
inspect_file(sys.argv[1])
t4 = time.perf_counter()
steps = {"imports": t1 - t0, "registry": t2 - t1, "first_detect": t3 - t2, "inspect_after": t4 - t3}
print(json.dumps(steps))
"""


def make_inputs(workdir: Path) -> dict[str, Path]:
    """Write (once) the test files; return stem -> path."""
    from lorasmith.registry import get_registry
    from lorasmith.testing import make_checkpoint, make_lora

    reg = get_registry()
    out: dict[str, Path] = {}
    for stem, family, kind in FILES:
        path = workdir / f"{stem}.safetensors"
        if not path.exists():
            if kind == "lora":
                make_lora(reg.get(family), path, rank=4)
            else:
                make_checkpoint(reg.get(family), path)
        out[stem] = path
    return out


def child_env(workdir: Path) -> dict[str, str]:
    """The environment of the measured children: bytecode cached under ``workdir/pycache``."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


def time_process(cmd: list[str], repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """(fastest, median) wall seconds of ``cmd`` as a fresh process (after one unmeasured run that fills
    the bytecode cache); exits on a failure."""
    subprocess.run(cmd, capture_output=True, text=True, env=env)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return min(times), statistics.median(times)


def split(path: Path, repeat: int, env: dict[str, str]) -> dict[str, float]:
    """The fastest of each in-process step over ``repeat`` children."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        cmd = [sys.executable, "-c", _SPLIT, str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            best[k] = min(best.get(k, v), v)
    return best


def main() -> None:
    """Time every case and print Markdown tables and a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorasmith-bench-startup"
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = make_inputs(args.workdir)
    for p in files.values():
        p.read_bytes()

    py = sys.executable
    env = child_env(args.workdir)
    cases: list[tuple[str, list[str]]] = [
        ("python -c pass", [py, "-c", "pass"]),
        ("import lorasmith.cli", [py, "-c", "import lorasmith.cli"]),
        ("lorasmith --help", [py, "-m", "lorasmith", "--help"]),
    ]
    for stem, _family, _kind in FILES:
        cases.append((f"inspect {stem}", [py, "-m", "lorasmith", "inspect", str(files[stem])]))
        cases.append(
            (f"inspect --json {stem}", [py, "-m", "lorasmith", "inspect", "--json", str(files[stem])])
        )

    figures: dict[str, Any] = {
        "machine": machine(),
        "loadavg_before": loadavg(),
        "processes": {},
        "split": {},
    }
    rows = []
    for label, cmd in cases:
        fastest, median = time_process(cmd, args.repeat, env)
        figures["processes"][label] = {"fastest_s": fastest, "median_s": median}
        rows.append((label, f"{fastest * 1000:.0f} ms", f"{median * 1000:.0f} ms"))
    print(markdown_table(("fresh process", "fastest", "median"), rows))
    print()
    split_rows = []
    for stem, _family, _kind in FILES:
        s = split(files[stem], args.repeat, env)
        figures["split"][stem] = s
        split_rows.append(
            (
                stem,
                *(f"{s[k] * 1000:.0f} ms" for k in ("imports", "registry", "first_detect", "inspect_after")),
            )
        )
    print(markdown_table(("file", "imports", "registry", "first detection", "inspect (after)"), split_rows))
    figures["loadavg_after"] = loadavg()
    print(f"\nload average before {figures['loadavg_before']}, after {figures['loadavg_after']}")
    emit_json(figures, args.json_out)


if __name__ == "__main__":
    main()
