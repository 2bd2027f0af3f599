#!/usr/bin/env python3
"""``lorasmith convert --dtype bf16`` on a real-shaped fp16 SDXL checkpoint and on its sharded diffusers
folder, against the floor.

Uses an existing fp16 SDXL checkpoint (``--input``, default the 6.46 GiB
``$TMPDIR/lorasmith-bench-merge/sdxl_a_s1.safetensors`` that ``benchmarks/bench_merge.py`` generates; it
is not generated here, unless ``--scale F`` asks for a smaller one, which is written into ``--workdir``
with ``bench_merge.generate_checkpoint``). Cases (``--case``, default both):

- **file**: ``lorasmith convert INPUT --dtype bf16 -o OUT``, one safetensors file cast;
- **folder**: ``lorasmith convert FOLDER --to diffusers --dtype bf16 -o OUT``, the same tensors as a
  folder of four ``save_pretrained``-sharded models (``unet``, ``vae``, ``text_encoder``,
  ``text_encoder_2``; shards of at most ``--shard-size``, default 2GB: the UNet in 3 shards), recast into
  another folder (every shard streamed through the pipeline, the other files copied). The folder is made
  once from the input (not timed; the tensors keep their single-file names, so it works at any
  ``--scale``) and kept in ``--workdir`` (default: next to the input).

With a warm page cache (the inputs are read once before any timing), each in a fresh process:

- **ours**: the ``lorasmith`` command line as a whole process;
- **floor**: ``safetensors.torch.load_file`` of each input file, ``.to(torch.bfloat16)`` of every floating
  tensor, ``safetensors.torch.save_file`` of the result (the folder's other files copied with
  ``shutil.copy2``); no counts, no hash, no fsync, no atomic rename;
- **before** (``--before``): ours with ``lorasmith.ops.convert.PIPELINE = False``, the whole-tensor path
  the pipeline replaced.

Wall time is measured around the child; peak memory is the child's peak resident set
(``getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that runs only that child). ``--repeat N``
keeps the best of N runs of each, taken back to back (ours, floor, ours, floor...) so that both see the
same load; the load average is printed with the figures (the machine may be shared).
``LORASMITH_PIPELINE_STATS=1`` in the environment makes ours print its threads' busy seconds (shown
with ``--stats``).

Run: ``python benchmarks/bench_convert.py [--input PATH | --scale F] [--case file|folder|all]
[--workdir DIR] [--repeat N] [--before] [--stats] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import emit_json, loadavg, machine, markdown_table, measure_process, warm


def floor(src: str, out: str) -> None:
    """Load with safetensors, cast the floating tensors to bf16, save with safetensors (a file, or every
    ``.safetensors`` file of a folder, the folder's other files copied)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def one(a: Path, b: Path) -> None:
        with safe_open(str(a), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(a))
        for k, t in tensors.items():  # in place, so that one model-sized copy is alive at a time
            if t.is_floating_point():
                tensors[k] = t.to(torch.bfloat16)
        save_file(tensors, str(b), metadata=meta)

    source, target = Path(src), Path(out)
    if source.is_file():
        one(source, target)
        return
    target.mkdir()
    for path in sorted(source.rglob("*")):
        dst = target / path.relative_to(source)
        if path.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".safetensors":
            one(path, dst)
        else:
            shutil.copy2(path, dst)


def _ours(src: Path, out: Path, folder: bool) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from lorasmith.cli import main; main()",
        "convert",
        str(src),
        *(["--to", "diffusers"] if folder else []),
        "--dtype",
        "bf16",
        "-o",
        str(out),
        "--overwrite",
        "-q",
    ]


# ``convert`` with whole tensors (``write_streaming``'s and the folder paths' ``get`` + ``cast_tensor`` +
# ``writer.write``), as before the pipeline: for a before/after comparison (``--before``).
_BEFORE = r"""
import sys
from lorasmith.ops import convert as c
c.PIPELINE = False
from lorasmith.cli import main
sys.argv = ["lorasmith", *sys.argv[1:]]
main()
"""


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


#: single-file key prefix -> diffusers model subfolder, for the folder case's input.
_MODELS = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "conditioner.embedders.0.": "text_encoder",
    "conditioner.embedders.1.": "text_encoder_2",
}


def _make_folder(src: Path, folder: Path, shard_size: str) -> None:
    """A folder of ``save_pretrained``-sharded models holding the tensors of ``src`` (made once, not timed).

    Each model is the tensors under one single-file prefix (their names kept: recasting and resharding do
    not look at names, and this works at any ``--scale``), written as ``diffusion_pytorch_model`` /
    ``model`` shards of at most ``shard_size`` with their index, plus a small ``config.json``, a tokenizer
    file and a ``model_index.json`` for the copying.
    """
    import json

    from lorasmith.io.reader import open_tensors
    from lorasmith.ops._diffusers_weights import ModelWeightsWriter, parse_shard_size

    if folder.is_dir():
        return
    print(f"writing {folder} (shards of at most {shard_size}) ...")
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open_tensors(src) as tf:
        groups: dict[str, list[str]] = {}
        for name in tf:
            sub = next((s for p, s in _MODELS.items() if name.startswith(p)), "unet")
            groups.setdefault(sub, []).append(name)
        for sub, names in groups.items():
            (tmp / sub).mkdir()
            stem = "model" if sub.startswith("text_encoder") else "diffusion_pytorch_model"
            plan = {n: (tf.info(n).dtype, tuple(tf.info(n).shape)) for n in names}
            with ModelWeightsWriter(
                tmp / sub, f"{stem}.safetensors", plan=plan, max_shard_size=parse_shard_size(shard_size)
            ) as w:
                for n in names:
                    w.write(n, tf.get(n))
            (tmp / sub / "config.json").write_text(json.dumps({"_class_name": sub}) + "\n")
    (tmp / "tokenizer").mkdir()
    (tmp / "tokenizer" / "vocab.json").write_text("{}\n")
    (tmp / "model_index.json").write_text(json.dumps({sub: ["x", "y"] for sub in groups}) + "\n")
    tmp.rename(folder)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    """Time ours and the floor back to back, per case; print a Markdown table and JSON."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor(sys.argv[2], sys.argv[3])
        return
    default = Path(tempfile.gettempdir()) / "lorasmith-bench-merge" / "sdxl_a_s1.safetensors"
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    parser.add_argument("--input", type=Path, default=None, help="an fp16 safetensors checkpoint")
    parser.add_argument(
        "--scale", type=float, default=None, help="generate an SDXL input with this fraction of the tensors"
    )
    parser.add_argument("--case", choices=["file", "folder", "all"], default="all", help="what to time")
    parser.add_argument("--shard-size", default="2GB", help="shards of the folder case's input")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where outputs go (default: next to input)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (the best is kept)")
    parser.add_argument("--before", action="store_true", help="also time the whole-tensor path it replaced")
    parser.add_argument("--stats", action="store_true", help="print ours' pipeline busy seconds")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.scale is not None:
        if not 0.0 < args.scale <= 1.0:
            parser.error("--scale must be in (0, 1]")
        if args.input is not None:
            parser.error("give --input or --scale, not both")
        from bench_merge import generate_checkpoint

        work = args.workdir or Path(tempfile.gettempdir()) / "lorasmith-bench-convert"
        work.mkdir(parents=True, exist_ok=True)
        src: Path = work / f"sdxl_s{args.scale:g}.safetensors"
        if not src.is_file():
            print(f"generating {src} ...")
            generate_checkpoint(src, args.scale, 1)
    else:
        src = args.input or default
        if not src.is_file():
            parser.error(
                f"{src} does not exist (generate it with benchmarks/bench_merge.py, or give --scale)"
            )
        work = args.workdir or src.parent
    cases: dict[str, tuple[Path, Path]] = {}
    if args.case in ("file", "all"):
        cases["file"] = (src, work / "convert_out.safetensors")
    if args.case in ("folder", "all"):
        folder = work / f"{src.stem}_diffusers_{args.shard_size}"
        _make_folder(src, folder, args.shard_size)
        cases["folder"] = (folder, work / "convert_out_folder")
    inputs = [
        p
        for case_in, _ in cases.values()
        for p in ([case_in] if case_in.is_file() else sorted(case_in.rglob("*")))
    ]
    gib_s = warm([p for p in inputs if p.is_file()])
    print(f"input {src} ({src.stat().st_size / 2**30:.2f} GiB), warmed at {gib_s:.1f} GiB/s")
    if args.stats:
        os.environ["LORASMITH_PIPELINE_STATS"] = "1"  # inherited by the children
    cmds: dict[tuple[str, str], list[str]] = {}
    for case, (case_in, out) in cases.items():
        ours = _ours(case_in, out, case == "folder")
        if args.stats:
            # the stats go to stderr, which the wrapper keeps only on failure; ``exec`` adds no process
            ours = ["sh", "-c", f"exec {shlex.join(ours)} 2>&1"]
        cmds[(case, "ours")] = ours
        cmds[(case, "floor")] = [sys.executable, __file__, "_floor", str(case_in), str(out)]
        if args.before:
            cmds[(case, "before")] = [
                sys.executable,
                "-c",
                _BEFORE,
                *_ours(case_in, out, case == "folder")[3:],
            ]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in cmds}
    loads = [loadavg()]
    for _ in range(max(1, args.repeat)):
        for (case, who), cmd in cmds.items():  # back to back, so that both see the same load
            out = cases[case][1]
            _remove(out)
            res = measure_process(cmd)
            runs[(case, who)].append(res)
            tail = str(res.get("stdout_tail", "")).strip()
            print(f"{case} {who}: {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB {tail}")
            loads.append(loadavg())
    for _case_in, out in cases.values():
        _remove(out)
    best = {key: min(rs, key=lambda r: r["seconds"]) for key, rs in runs.items()}
    rows = []
    for case, who in best:
        ref = best[(case, "floor")]["seconds"]
        label = "convert --dtype bf16" if case == "file" else "convert FOLDER --to diffusers --dtype bf16"
        rows.append(
            [
                f"{label} ({who})",
                f"{best[(case, who)]['seconds']:.2f}",
                f"{best[(case, who)]['cpu_seconds']:.2f}",
                f"{best[(case, who)]['seconds'] / ref:.2f}x",
                f"{best[(case, who)]['peak_rss_mib']:.0f}",
            ]
        )
    load1 = [round(x[0], 2) for x in loads]
    print()
    sizes = ", ".join(f"{case} {_size(case_in) / 2**30:.2f} GiB" for case, (case_in, _) in cases.items())
    print(f"{src.name}: fp16 -> bf16 ({sizes}); best of {max(1, args.repeat)}")
    print(f"load average (1 min) before and after each run: {load1}")
    print()
    print(markdown_table(["case", "wall (s)", "CPU (s)", "/ floor", "peak RSS (MiB)"], rows))
    summary = {
        "input": str(src),
        "input_bytes": src.stat().st_size,
        "cases": {case: str(case_in) for case, (case_in, _) in cases.items()},
        "repeat": max(1, args.repeat),
        "machine": machine(),
        "loadavg_1min": load1,
        "best": {f"{case}/{who}": r for (case, who), r in best.items()},
        "runs": {f"{case}/{who}": r for (case, who), r in runs.items()},
        "ratio": {case: best[(case, "ours")]["seconds"] / best[(case, "floor")]["seconds"] for case in cases},
    }
    emit_json(summary, args.json_out)


if __name__ == "__main__":
    main()
