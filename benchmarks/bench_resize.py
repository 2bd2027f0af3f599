#!/usr/bin/env python3
"""``lorasmith resize`` on a real-shaped SDXL LoRA of rank 128, against the I/O floor.

Generates, outside the repository (``--workdir``, default ``$TMPDIR/lorasmith-bench``), an SDXL LoRA in
kohya spelling with the default sd-scripts targets (attention, feed-forward and projection linears of the
UNet, its 1x1 and 3x3 convolutions (``conv_dim``), and the q/k/v/out/fc1/fc2 linears of both text
encoders): 1052 modules at rank 128 and alpha 64, fp16, about 0.95 GiB. Names and shapes come from the
package's own SDXL alias table and canonical inventory. The factors are seeded Gaussians shaped so that a
module's singular values decay like ``(1 + i)^-1/2``, a slowly decaying spectrum like a trained LoRA's.

Then, for each case (``--rank 32`` and ``--dynamic sv_fro --param 0.9``), in fresh processes:

- **ours**: :func:`lorasmith.ops.resize.resize` as a library call (the work of ``lorasmith resize`` without
  interpreter start-up), and ``lorasmith resize ... -q`` as a whole process;
- **floor**: ``safetensors.torch.load_file`` of the input and ``safetensors.torch.save_file`` of an output
  with the very tensor names and shapes ours wrote (slices of the loaded tensors: no math at all).

Each child reports its wall time (after imports) and its peak resident memory (``ru_maxrss``); the page
cache is warm for every run (the input is read once before timing). Prints a Markdown table and a JSON
summary.

Run: ``python benchmarks/bench_resize.py [--workdir DIR] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
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

CASES: dict[str, list[str]] = {
    "rank32": ["--rank", "32"],
    "sv_fro0.9": ["--dynamic", "sv_fro", "--param", "0.9"],
}

# sd-scripts' default SDXL targets (networks/lora.py with conv_dim): checked against the manifest
# lora-sdxl-conv-kohya (1052 modules).
_UNET = re.compile(
    r"^model\.diffusion_model\.(?:"
    r".*\.transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))"
    r"|.*\.proj_(?:in|out)"
    r"|(?:input_blocks|middle_block|output_blocks)\..*\.(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op"
    r"|output_blocks\.\d+\.\d+\.conv"
    r")\.weight$"
)
_TE = re.compile(r"_self_attn_(?:q|k|v|out)_proj$|_mlp_fc[12]$")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _loadavg() -> float:
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            return float(fh.read().split()[0])
    except OSError:
        return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def generate(path: Path, seed: int = 0) -> tuple[int, int]:
    """Write the benchmark LoRA; returns ``(modules, bytes)``."""
    import math

    import torch
    from safetensors.torch import save_file

    from lorasmith.registry import get_registry

    arch = get_registry().get("sdxl")
    inv = arch.canonical_inventory()
    gen = torch.Generator().manual_seed(seed)
    decay = (1.0 + torch.arange(RANK, dtype=torch.float32)) ** -0.25  # per factor: s_i ~ (1 + i)^-1/2
    tensors: dict[str, torch.Tensor] = {}
    count = 0
    for alias in arch.aliases(spelling="kohya"):
        key = alias.target.key
        if alias.component == "unet":
            if not _UNET.match(key):
                continue
        elif not _TE.search(alias.name):
            continue
        shape = tuple(inv.tensors[key].shape)
        if alias.target.slice is not None:
            shape = (alias.target.slice[2], *shape[1:])
        out, kernel = shape[0], shape[2:]
        fan_in = math.prod(shape[1:])
        down = torch.randn(RANK, fan_in, generator=gen) * (decay[:, None] / math.sqrt(fan_in))
        up = torch.randn(out, RANK, generator=gen) * (decay[None, :] * 0.01)
        if kernel:
            down = down.reshape(RANK, shape[1], *kernel)
            up = up.reshape(out, RANK, 1, 1)
        tensors[alias.name + ".lora_down.weight"] = down.half()
        tensors[alias.name + ".lora_up.weight"] = up.half()
        tensors[alias.name + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        count += 1
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_network_args": json.dumps({"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}),
        "ss_base_model_version": "sdxl_base_v1-0",
    }
    save_file(tensors, str(path), metadata=meta)
    return count, path.stat().st_size


# ------------------------------------------------------------------------------------------------ children
def child_ours(inp: str, out: str, args: list[str]) -> dict[str, Any]:
    """Run resize in-process (after imports) and report time and memory."""
    import torch  # noqa: F401  (import cost is not part of the measurement)

    from lorasmith.ops.resize import resize

    opts: dict[str, Any] = {}
    it = iter(args)
    for flag in it:
        name = flag.lstrip("-").replace("-", "_")
        value = next(it)
        opts[name] = float(value) if name == "param" else (int(value) if name == "rank" else value)
    baseline = _rss_mib()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    result = resize([inp], output=out, overwrite=True, device="cpu", **opts)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    s = result.outputs[0].summary
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "output_bytes": result.outputs[0].file_bytes,
        "rank_mean": s.rank_mean,
        "rel_error": s.rel_error_lora,
    }


def child_floor(inp: str, out: str, like: str) -> dict[str, Any]:
    """Load the input and save an output with the names and shapes of ``like`` (no math)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(like, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    baseline = _rss_mib()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    src = load_file(inp)
    dst: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = src[key]
        if t.ndim == 0:
            dst[key] = t.float()
        elif key.endswith(".lora_down.weight"):
            dst[key] = t[: shape[0]].contiguous()
        else:
            dst[key] = t[:, : shape[1]].contiguous()
    save_file(dst, out, metadata=meta)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - c0,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_rss_mib": baseline,
    }


def _run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "_child", *args], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Generate the LoRA if needed, time each case, print a Markdown table and JSON."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, inp, out, *rest = sys.argv[2:]
        res = child_ours(inp, out, rest) if kind == "ours" else child_floor(inp, out, rest[0])
        print(json.dumps(res))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorasmith-bench")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the best is kept)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    inp = args.workdir / f"sdxl_lora_r{RANK}.safetensors"
    if not inp.exists():
        t0 = time.perf_counter()
        modules, size = generate(inp)
        print(
            f"generated {inp} ({modules} modules, {size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s"
        )
    size = inp.stat().st_size
    with open(inp, "rb") as fh:  # warm the page cache: every run below reads from memory
        while fh.read(64 << 20):
            pass
    figures: dict[str, Any] = {
        "input": str(inp),
        "input_mib": round(size / 2**20, 1),
        "cpus": os.cpu_count(),
        "load_before": _loadavg(),
        "cases": {},
    }
    print()
    print(
        "| case | floor (load + save) | resize (library) | ratio | resize CPU time "
        "| `lorasmith resize` process | peak RSS floor | peak RSS resize | output |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, flags in CASES.items():
        out = args.workdir / f"out_{name}.safetensors"
        floor_out = args.workdir / f"floor_{name}.safetensors"
        ours = min(
            (_run_child("ours", str(inp), str(out), *flags) for _ in range(args.repeat)),
            key=lambda r: r["seconds"],
        )
        floor = min(
            (_run_child("floor", str(inp), str(floor_out), str(out)) for _ in range(args.repeat)),
            key=lambda r: r["seconds"],
        )
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lorasmith",
                "resize",
                str(inp),
                "-o",
                str(out),
                "--overwrite",
                "-q",
                "--device",
                "cpu",
                *flags,
            ],
            check=True,
            capture_output=True,
        )
        process = time.perf_counter() - t0
        ratio = ours["seconds"] / floor["seconds"]
        figures["cases"][name] = {
            "flags": flags,
            "ours": ours,
            "floor": floor,
            "process_seconds": process,
            "ratio": ratio,
        }
        print(
            f"| `{' '.join(flags)}` | {floor['seconds']:.2f} s | {ours['seconds']:.2f} s | {ratio:.2f}x | "
            f"{ours['cpu_seconds']:.1f} s | {process:.2f} s | {floor['peak_rss_mib']:.0f} MiB | "
            f"{ours['peak_rss_mib']:.0f} MiB | "
            f"{ours['output_bytes'] / 2**20:.0f} MiB, mean rank {ours['rank_mean']:g} |"
        )
        floor_out.unlink(missing_ok=True)
    figures["load_after"] = _loadavg()
    print(f"\nload average: {figures['load_before']} before, {figures['load_after']} after")
    emit_json(figures, args.json_out)


if __name__ == "__main__":
    main()
