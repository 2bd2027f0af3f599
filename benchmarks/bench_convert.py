#!/usr/bin/env python3
"""``lorasmith convert CKPT --dtype bf16`` on a real-shaped fp16 SDXL checkpoint, against the floor.

Uses an existing fp16 SDXL checkpoint (``--input``, default the 6.46 GiB
``$TMPDIR/lorasmith-bench-merge/sdxl_a_s1.safetensors`` that ``benchmarks/bench_merge.py`` generates; it
is not generated here). With a warm page cache (the input is read once before any timing), each in a fresh
process:

- **ours**: ``lorasmith convert INPUT --dtype bf16 -o OUT --overwrite -q`` as a whole command-line process;
- **floor**: ``safetensors.torch.load_file`` of the input, ``.to(torch.bfloat16)`` of every floating
  tensor, ``safetensors.torch.save_file`` of the result (no counts, no hash, no fsync, no atomic rename).

Wall time is measured around the child; peak memory is the child's peak resident set
(``getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that runs only that child). ``--repeat N``
keeps the best of N runs of each, taken back to back (ours, floor, ours, floor...) so that both see the
same load; the load average is printed with the figures (the machine may be shared).
``LORASMITH_PIPELINE_STATS=1`` in the environment makes ours print its threads' busy seconds (shown
with ``--stats``).

Run: ``python benchmarks/bench_convert.py [--input PATH] [--repeat N] [--stats] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import emit_json, loadavg, machine, markdown_table, measure_process, warm


def floor(src: str, out: str) -> None:
    """Load with safetensors, cast the floating tensors to bf16, save with safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    for k, t in tensors.items():  # in place, so that one model-sized copy is alive at a time
        if t.is_floating_point():
            tensors[k] = t.to(torch.bfloat16)
    save_file(tensors, out)


def _ours(src: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from lorasmith.cli import main; main()",
        "convert",
        str(src),
        "--dtype",
        "bf16",
        "-o",
        str(out),
        "--overwrite",
        "-q",
    ]


# ``convert`` with ``write_streaming``'s whole-tensor path (``get`` + ``cast_tensor`` + ``writer.write``),
# as before the pipeline: for a before/after comparison (``--before``).
_BEFORE = r"""
import sys
from lorasmith.ops import convert as c
original = c.write_streaming
def whole(*args, **kwargs):
    kwargs.pop("file", None)
    return original(*args, **kwargs)
c.write_streaming = whole
from lorasmith.cli import main
sys.argv = ["lorasmith", *sys.argv[1:]]
main()
"""


def main() -> None:
    """Time ours and the floor back to back; print a Markdown table and JSON."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor(sys.argv[2], sys.argv[3])
        return
    default = Path(tempfile.gettempdir()) / "lorasmith-bench-merge" / "sdxl_a_s1.safetensors"
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", type=Path, default=default, help="an fp16 safetensors checkpoint")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where outputs go (default: next to input)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (the best is kept)")
    parser.add_argument("--before", action="store_true", help="also time the whole-tensor path it replaced")
    parser.add_argument("--stats", action="store_true", help="print ours' pipeline busy seconds")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    src: Path = args.input
    if not src.is_file():
        parser.error(f"{src} does not exist (generate it with benchmarks/bench_merge.py)")
    work: Path = args.workdir or src.parent
    out = work / "convert_out.safetensors"
    gib_s = warm([src])
    print(f"input {src} ({src.stat().st_size / 2**30:.2f} GiB), warmed at {gib_s:.1f} GiB/s")
    ours = _ours(src, out)
    if args.stats:
        os.environ["LORASMITH_PIPELINE_STATS"] = "1"  # inherited by the children
        # the stats go to stderr, which the wrapper keeps only on failure; ``exec`` adds no process
        ours = ["sh", "-c", f"exec {shlex.join(ours)} 2>&1"]
    cmds = {"ours": ours, "floor": [sys.executable, __file__, "_floor", str(src), str(out)]}
    if args.before:
        cmds["before"] = [sys.executable, "-c", _BEFORE, *_ours(src, out)[3:]]
    runs: dict[str, list[dict[str, Any]]] = {who: [] for who in cmds}
    loads = [loadavg()]
    for _ in range(max(1, args.repeat)):
        for who, cmd in cmds.items():  # back to back, so that both see the same load
            out.unlink(missing_ok=True)
            res = measure_process(cmd)
            runs[who].append(res)
            tail = str(res.get("stdout_tail", "")).strip()
            print(f"{who}: {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB {tail}")
            loads.append(loadavg())
    out.unlink(missing_ok=True)
    best = {who: min(rs, key=lambda r: r["seconds"]) for who, rs in runs.items()}
    ratio = best["ours"]["seconds"] / best["floor"]["seconds"]
    rows = [
        [
            f"convert --dtype bf16 ({who})",
            f"{best[who]['seconds']:.2f}",
            f"{best[who]['cpu_seconds']:.2f}",
            f"{best[who]['seconds'] / best['floor']['seconds']:.2f}x",
            f"{best[who]['peak_rss_mib']:.0f}",
        ]
        for who in best
    ]
    load1 = [round(x[0], 2) for x in loads]
    print()
    print(f"{src.name}: {src.stat().st_size / 2**30:.2f} GiB fp16 -> bf16; best of {max(1, args.repeat)}")
    print(f"load average (1 min) before and after each run: {load1}")
    print()
    print(markdown_table(["case", "wall (s)", "CPU (s)", "/ floor", "peak RSS (MiB)"], rows))
    summary = {
        "input": str(src),
        "input_bytes": src.stat().st_size,
        "repeat": max(1, args.repeat),
        "machine": machine(),
        "loadavg_1min": load1,
        "best": best,
        "runs": runs,
        "ratio": ratio,
    }
    emit_json(summary, args.json_out)


if __name__ == "__main__":
    main()
