#!/usr/bin/env python3
"""``lorasmith merge`` on real-shaped SDXL files: a two-model weighted sum and a bake, against the floor.

Generates, outside the repository (``--workdir``, default ``$TMPDIR/lorasmith-bench-merge``):

- two SDXL checkpoints with every tensor of the package's canonical SDXL inventory (UNet, VAE, both text
  encoders) at its real shape, float tensors in fp16 (about 6.9 GB, 6.5 GiB each), random values (one seeded
  ``torch.randn`` per tensor), streamed to disk through a planned ``SafetensorsWriter``;
- a rank-128 SDXL LoRA (kohya spelling, fp16, alpha 64) on the linears of the UNet's transformer blocks and
  ``proj_in``/``proj_out`` and on the attention and MLP linears of both text encoders.

``--scale F`` keeps that fraction of the tensors (spread evenly over the file; the LoRA only targets kept
weights) for a quick run; ``--arch sdxl`` is passed so that a partial file is still taken as SDXL.

Then, each in a fresh process, with a warm page cache (the inputs are read once before any timing):

- **ours**: ``lorasmith merge --models A B -o OUT`` (weighted sum, equal ratios) and
  ``lorasmith merge --base A LORA:0.8 -o OUT``, as whole command-line processes;
- **floor**: the same inputs read and an output of the same size written with ``safetensors.torch``
  (``load_file`` of the inputs, ``save_file`` of the first one's tensors: no math at all).

Wall time is measured around the child; peak memory is the child's peak resident set
(``resource.getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that runs only that child). Prints a
Markdown table and a JSON summary.

Run: ``python benchmarks/bench_merge.py [--workdir DIR] [--scale F] [--repeat N] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit_json

RANK = 128
ALPHA = 64.0
LORA_RATIO = 0.8

# LoRA targets: transformer-block linears and proj_in/out of the UNet, attention/MLP linears of the TEs
_UNET = re.compile(
    r"\.transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))\.weight$"
    r"|\.proj_(?:in|out)\.weight$"
)
_TE = re.compile(r"_self_attn_(?:q|k|v|out)_proj$|_mlp_fc[12]$")


def _kept(names: list[str], scale: float) -> list[str]:
    """About ``scale`` of ``names``, spread evenly (index i is kept when floor(i*s) moves)."""
    if scale >= 1.0:
        return names
    return [n for i, n in enumerate(names) if math.floor((i + 1) * scale) != math.floor(i * scale)]


def generate_checkpoint(path: Path, scale: float, seed: int) -> int:
    """Write one SDXL checkpoint (streamed); returns its size in bytes."""
    import torch

    from lorasmith.io.dtypes import torch_dtype
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.registry import get_registry

    inv = get_registry().get("sdxl").canonical_inventory()
    floats = {"F16", "F32", "BF16", "F64"}
    names = _kept(list(inv.tensors), scale)
    plan = {
        n: ("F16" if inv.tensors[n].dtype in floats else inv.tensors[n].dtype, tuple(inv.tensors[n].shape))
        for n in names
    }
    gen = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(path, plan=plan, hashes=False, overwrite=True)
    try:
        for n in names:
            dtype, shape = plan[n]
            if dtype == "F16":
                t = (torch.randn(shape, generator=gen) * 0.02).half()
            else:  # position ids (the one integer tensor): 0..n-1 along the last dimension
                t = torch.arange(shape[-1]).expand(shape).to(torch_dtype(dtype)).contiguous()
            writer.write(n, t)
            del t
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return path.stat().st_size


def generate_lora(path: Path, kept: set[str], seed: int) -> tuple[int, int]:
    """Write the rank-128 LoRA on kept weights; returns ``(modules, bytes)``."""
    import torch

    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.registry import get_registry

    arch = get_registry().get("sdxl")
    inv = arch.canonical_inventory()
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for alias in arch.aliases(spelling="kohya"):
        key = alias.target.key
        if key not in kept or alias.target.slice is not None or len(inv.tensors[key].shape) != 2:
            continue
        if not (_UNET.search(key) if alias.component == "unet" else _TE.search(alias.name)):
            continue
        out, fan_in = inv.tensors[key].shape
        plan[alias.name + ".lora_down.weight"] = ("F16", (RANK, fan_in))
        plan[alias.name + ".lora_up.weight"] = ("F16", (out, RANK))
        plan[alias.name + ".alpha"] = ("F16", ())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    gen = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(path, plan=plan, metadata=meta, hashes=False, overwrite=True)
    try:
        for name, (_, shape) in plan.items():
            if name.endswith(".alpha"):
                t = torch.tensor(ALPHA, dtype=torch.float16)
            else:
                t = (torch.randn(shape, generator=gen) / math.sqrt(shape[-1])).half()
            writer.write(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return len(plan) // 3, path.stat().st_size


# ------------------------------------------------------------------------------------------------ children
def floor(inputs: list[str], out: str) -> None:
    """Read every input with safetensors and write the first one's tensors again (no math)."""
    from safetensors.torch import load_file, save_file

    loaded = [load_file(p) for p in inputs]
    save_file(loaded[0], out)


def measure(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` as the only child of this process; its wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024.0}


def _measured(cmd: list[str]) -> dict[str, Any]:
    """``measure(cmd)`` in a fresh wrapper process (RUSAGE_CHILDREN is a maximum over all children)."""
    proc = subprocess.run(
        [sys.executable, __file__, "_measure", json.dumps(cmd)], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lorasmith.cli import main; main()", "merge", *args]


def _warm(paths: list[Path]) -> None:
    """Read the files once so that every timing sees a warm page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    """Generate the inputs if needed, time each case, print a Markdown table and JSON."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor(sys.argv[3:], sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorasmith-bench-merge")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the tensors (0 < F <= 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (the best is kept)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not 0.0 < args.scale <= 1.0:
        parser.error("--scale must be in (0, 1]")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tag = f"s{args.scale:g}"
    a, b = work / f"sdxl_a_{tag}.safetensors", work / f"sdxl_b_{tag}.safetensors"
    lora = work / f"sdxl_lora_r{RANK}_{tag}.safetensors"
    for path, seed in ((a, 1), (b, 2)):
        if not path.exists():
            t0 = time.perf_counter()
            size = generate_checkpoint(path, args.scale, seed)
            print(f"generated {path} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    if not lora.exists():
        from lorasmith.io.header import read_header

        modules, size = generate_lora(lora, set(read_header(a).tensors), 3)
        print(f"generated {lora} ({modules} modules, {size / 2**20:.0f} MiB)")
    _warm([a, b, lora])

    out = work / "out.safetensors"
    cases: dict[str, dict[str, list[str]]] = {
        "weighted sum (2 models)": {
            "ours": _cli("--models", str(a), str(b), "-o", str(out), "--arch", "sdxl", "--overwrite", "-q"),
            "floor": [sys.executable, __file__, "_floor", str(out), str(a), str(b)],
        },
        f"bake (rank-{RANK} LoRA)": {
            "ours": _cli(
                f"{lora}:{LORA_RATIO}",
                "--base",
                str(a),
                "-o",
                str(out),
                "--arch",
                "sdxl",
                "--overwrite",
                "-q",
            ),
            "floor": [sys.executable, __file__, "_floor", str(out), str(a), str(lora)],
        },
    }
    results: dict[str, dict[str, Any]] = {}
    for case, cmds in cases.items():
        row: dict[str, Any] = {}
        for who, cmd in cmds.items():
            runs = []
            for _ in range(max(1, args.repeat)):
                out.unlink(missing_ok=True)
                runs.append(_measured(cmd))
            row[who] = min(runs, key=lambda r: r["seconds"])
        row["ratio"] = row["ours"]["seconds"] / row["floor"]["seconds"]
        results[case] = row
        print(f"{case}: ours {row['ours']} floor {row['floor']}")
    out.unlink(missing_ok=True)

    print()
    print(
        f"scale {args.scale:g}; inputs {a.stat().st_size / 2**30:.2f} GiB each, "
        f"LoRA {lora.stat().st_size / 2**20:.0f} MiB"
    )
    print()
    print("| case | ours (s) | floor (s) | ours / floor | ours peak RSS (MiB) | floor peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for case, row in results.items():
        print(
            f"| {case} | {row['ours']['seconds']:.2f} | {row['floor']['seconds']:.2f} | {row['ratio']:.2f}x "
            f"| {row['ours']['peak_rss_mib']:.0f} | {row['floor']['peak_rss_mib']:.0f} |"
        )
    summary = {"scale": args.scale, "input_bytes": a.stat().st_size, "results": results}
    emit_json(summary, args.json_out)


if __name__ == "__main__":
    main()
