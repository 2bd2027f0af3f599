#!/usr/bin/env python3
"""``lorasmith extract`` on real-shaped SDXL checkpoints with a planted rank-64 delta, against the read floor.

Generates, outside the repository (``--workdir``, default ``$TMPDIR/lorasmith-bench``), once and reused:

- **base**: an SDXL checkpoint with every tensor of the package's canonical SDXL inventory (UNet, VAE, both
  text encoders) at its real shape, fp16, about 6.9 GB: ``bench_merge.generate_checkpoint`` (one seeded
  ``torch.randn * 0.02`` per tensor), so it is the very file ``bench_merge.py`` calls ``sdxl_a``;
- **tuned**: the base plus, on every 2-D and 4-D weight of the UNet (its linears, 1x1 and 3x3 convs), a
  planted rank-64 delta of Frobenius norm ``2%`` of the weight's, with singular values decaying like
  ``(1 + i)^-1/2`` (``s_63 = s_0 / 8``), plus Gaussian noise of ``1%`` of the delta's norm, rounded to
  fp16 (the rounding is more noise: about 1% of the delta). Text encoders and VAE are unchanged.

Then, each in a fresh process, with a warm page cache (both inputs are read once before any timing):

- **floor**: read both inputs once, every tensor through ``safetensors.safe_open(...).get_tensor`` one at a
  time, copied out of the memory map (no math, nothing kept); its peak RSS includes the file pages the
  map touched (page cache, shared), not only its own memory;
- **extract (library)**: :func:`lorasmith.ops.extract.extract` on the CPU, timed after imports; the child
  reports wall time, CPU time and peak RSS (``VmHWM``, which includes the ~230 MiB of an imported
  torch), and polls its RSS (``/proc/self/status``) to name the module being processed at the peak;
- **``lorasmith extract`` process**: the command line end to end, wall time, CPU time and peak RSS from
  ``getrusage(RUSAGE_CHILDREN)`` of a wrapper process that runs only it.

Cases: ``--rank 64`` and ``--auto`` (``--energy 0.95 --rank-max 64``); kxk convs are not extracted (no
``--conv-rank``), as by default.

**Error.** For ``--sample`` modules of each output (default 20, chosen with a fixed seed), the delta is
re-read in float64 and the written LoRA's relative error ``||D - up @ down * alpha / r||_F / ||D||_F``
(the factors as stored) compared with the exact truncated SVD's error at the same rank,
``sqrt(sum(S[r:]^2)) / ||D||_F`` from ``torch.linalg.svdvals`` in float64. Target: within 1% of it (ratio
at most 1.01); peak memory under 1.5 GB.

``--scale F`` keeps that fraction of the tensors (spread evenly, as ``bench_merge.py --scale``) for a quick
check; ``--arch sdxl`` is always passed so that a partial file is still taken as SDXL.

Prints Markdown tables and a JSON summary (``--json-out FILE`` also writes it).

``--threads N`` sets ``OMP_NUM_THREADS`` for the children (torch's intra-op threads): on a shared machine,
multi-threaded small LAPACK calls stall when a thread is descheduled, see ``docs/performance.md``.

Run: ``python benchmarks/bench_extract.py [--workdir DIR] [--scale F] [--repeat N] [--sample N] [--no-cli]
[--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    RssSampler,
    cpu_seconds,
    emit_json,
    loadavg,
    machine,
    markdown_table,
    measure_process,
    peak_rss_mib,
    rss_mib,
    run_json_child,
    warm,
)
from bench_merge import generate_checkpoint

RANK = 64  # planted rank, and the rank asked of --rank
DELTA_REL = 0.02  # ||delta||_F / ||W||_F of the planted delta
NOISE_REL = 0.01  # ||noise||_F / ||delta||_F
BASE_SEED, TUNED_SEED = 1, 7
MEMORY_TARGET_MIB = 1.5e9 / 2**20  # 1.5 GB
ERROR_TARGET = 1.01  # extracted error at most 1% above the exact truncated SVD's

CASES: dict[str, list[str]] = {
    f"--rank {RANK}": ["--rank", str(RANK)],
    "--auto": ["--auto", "--energy", "0.95", "--rank-max", "64"],
}


def _case_kwargs(flags: list[str]) -> dict[str, Any]:
    """The library keyword arguments of a case's command-line flags."""
    out: dict[str, Any] = {}
    it = iter(flags)
    for flag in it:
        name = flag.lstrip("-").replace("-", "_")
        if name == "auto":
            out["auto"] = True
        elif name in ("rank", "rank_max", "conv_rank"):
            out[name] = int(next(it))
        else:
            out[name] = float(next(it))
    return out


def _slug(case: str) -> str:
    return case.lstrip("-").replace(" ", "")


# ---------------------------------------------------------------------------------------------- generation
def planted(component: str | None, name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor gets the planted delta: 2-D and 4-D weights of the UNet."""
    return component == "unet" and name.endswith(".weight") and len(shape) in (2, 4)


def generate_tuned(base: Path, path: Path, seed: int) -> tuple[int, int]:
    """Write ``base`` + planted rank-``RANK`` deltas + noise, streamed; returns ``(modules, bytes)``."""
    import torch

    from lorasmith.io.header import read_header
    from lorasmith.io.reader import open_tensors
    from lorasmith.io.writer import SafetensorsWriter
    from lorasmith.registry import get_registry

    inv = get_registry().get("sdxl").canonical_inventory()
    header = read_header(base)
    plan = {n: (i.dtype, tuple(i.shape)) for n, i in header.tensors.items()}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    writer = SafetensorsWriter(path, plan=plan, hashes=False, overwrite=True)
    try:
        with open_tensors(base) as tf:
            for name, (_dtype, shape) in plan.items():
                t = tf.get(name)
                if planted(inv.component_of(name), name, shape):
                    t = _plant(t, gen)
                    count += 1
                writer.write(name, t)
                del t
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return count, path.stat().st_size


def _plant(w16: Any, gen: Any) -> Any:
    """``w + low-rank delta + noise`` in float32, rounded back to ``w``'s dtype."""
    import torch

    w = w16.float().reshape(w16.shape[0], -1)
    out, fan_in = w.shape
    r = min(RANK, out, fan_in)
    # Gaussian factors scaled by 1/sqrt(length) are close to orthonormal, so the delta's singular values
    # are close to s; a decay like (1 + i)^-1/2 is a trained delta's slow tail (s_63 = s_0 / 8), and keeps
    # --auto's 95%-energy rank below 64 so that the two cases differ.
    s = (1.0 + torch.arange(r, dtype=torch.float32)) ** -0.5
    u = torch.randn(out, r, generator=gen) / math.sqrt(out)
    v = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
    low = (u * s) @ v
    low *= DELTA_REL * float(torch.linalg.vector_norm(w)) / float(torch.linalg.vector_norm(low))
    # Full-rank noise: what a truncation at any rank must leave behind (its singular values, about
    # sigma * (sqrt(out) + sqrt(in)), stay far below s_63, so the planted subspace is well separated).
    sigma = NOISE_REL * float(torch.linalg.vector_norm(low)) / math.sqrt(out * fan_in)
    w += low
    w += torch.randn(out, fan_in, generator=gen) * sigma
    return w.reshape(w16.shape).to(w16.dtype)


# ------------------------------------------------------------------------------------------------ children
def child_extract(base: str, tuned: str, out: str, flags: list[str]) -> dict[str, Any]:
    """Run :func:`lorasmith.ops.extract.extract` in this process (after imports); time, memory, records."""
    import torch  # (import cost is not part of the measurement)

    from lorasmith.ops.extract import extract
    from lorasmith.progress import ProgressEvent

    baseline = rss_mib()
    with RssSampler() as sampler:

        def progress(event: ProgressEvent) -> None:
            # The label is the step now under way: after module n is reported, module n+1 is read next.
            sampler.label = f"after {event.item}" if event.item else event.stage

        c0, t0 = cpu_seconds(), time.perf_counter()
        result = extract(
            base,
            tuned,
            output=out,
            arch="sdxl",
            device="cpu",
            overwrite=True,
            progress=progress,
            **_case_kwargs(flags),
        )
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        sampler.label = "done"
    ranks = [r.rank for r in result.records if r.kind == "lora"]
    from lorasmith.io.header import read_header

    dtypes = sorted({i.dtype for n, i in read_header(out).tensors.items() if n.endswith("_up.weight")})
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "torch_threads": torch.get_num_threads(),
        "sampled_peak_rss_mib": sampler.peak,
        "sampled_peak_at": sampler.peak_label,
        "sampled_top": sampler.top(5),
        "modules": result.modules,
        "diffs": result.diffs,
        "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "mean_rel_error": result.mean_rel_error,
        "max_rel_error": result.max_rel_error,
        "file_bytes": result.file_bytes,
        "factor_dtypes": dtypes,
        "components": {c.component: c.reason for c in result.components},
        "skipped": result.skipped,
        "records": [
            {"name": r.name, "key": r.key, "kind": r.kind, "rank": r.rank, "rel_error": r.rel_error}
            for r in result.records
        ],
    }


def child_floor(base: str, tuned: str) -> dict[str, Any]:
    """Read every tensor of both inputs once with safetensors (one at a time, no math)."""
    import torch  # noqa: F401
    from safetensors import safe_open

    baseline = rss_mib()
    c0, t0 = cpu_seconds(), time.perf_counter()
    total = 0
    with safe_open(base, "pt") as fb, safe_open(tuned, "pt") as ft:
        for key in fb.keys():  # noqa: SIM118  (safe_open is not a mapping)
            # get_tensor returns a view of the memory-mapped file, read only when touched: the copy is
            # what actually reads the bytes into the process, like lorasmith's reader does
            a = fb.get_tensor(key).clone()
            b = ft.get_tensor(key).clone()
            total += a.numel() * a.element_size() + b.numel() * b.element_size()
            del a, b
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - c0,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "bytes": total,
    }


# -------------------------------------------------------------------------------------------------- errors
def error_check(
    base: Path, tuned: Path, lora: Path, records: list[dict[str, Any]], n: int, seed: int
) -> list[dict[str, Any]]:
    """Per sampled module: the written LoRA's error against the exact truncated SVD's at the same rank."""
    import torch
    from safetensors import safe_open

    pool = sorted((r for r in records if r["kind"] == "lora"), key=lambda r: r["name"])
    sample = random.Random(seed).sample(pool, min(n, len(pool)))
    rows = []
    with safe_open(base, "pt") as fb, safe_open(tuned, "pt") as ft, safe_open(lora, "pt") as fl:
        for rec in sorted(sample, key=lambda r: r["name"]):
            wb = fb.get_tensor(rec["key"]).double()
            d = (ft.get_tensor(rec["key"]).double() - wb).reshape(wb.shape[0], -1)
            del wb
            k = rec["rank"]
            fro = float(torch.linalg.vector_norm(d))
            # float64 singular values of the very delta extract saw (the files' fp16 values, exactly)
            s = torch.linalg.svdvals(d)
            exact = math.sqrt(float(s[k:].square().sum())) / fro
            up = fl.get_tensor(rec["name"] + ".lora_up.weight").double().reshape(d.shape[0], -1)
            down = fl.get_tensor(rec["name"] + ".lora_down.weight").double().reshape(up.shape[1], -1)
            alpha = float(fl.get_tensor(rec["name"] + ".alpha"))
            lora_err = float(torch.linalg.vector_norm(d - (up @ down) * (alpha / up.shape[1]))) / fro
            rows.append(
                {
                    "name": rec["name"],
                    "shape": list(d.shape),
                    "rank": k,
                    "exact": exact,
                    "lora": lora_err,
                    "reported": rec["rel_error"],
                    "ratio": lora_err / exact if exact > 0 else math.inf,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------- main
def _child_cmd(*args: str) -> list[str]:
    return [sys.executable, __file__, "_child", *args]


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    """Generate the inputs if needed, time each case, check the errors, print Markdown tables and JSON."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, *rest = sys.argv[2:]
        if kind == "floor":
            res = child_floor(rest[0], rest[1])
        else:
            res = child_extract(rest[0], rest[1], rest[2], rest[3:])
        print(json.dumps(res))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorasmith-bench")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the tensors (0 < F <= 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (the fastest is kept)")
    parser.add_argument("--sample", type=int, default=20, help="modules checked against the exact SVD")
    parser.add_argument("--seed", type=int, default=0, help="seed of the module sample")
    parser.add_argument("--no-cli", action="store_true", help="skip the `lorasmith extract` process runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: torch's own)"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not 0.0 < args.scale <= 1.0:
        parser.error("--scale must be in (0, 1]")
    if args.threads is not None:
        # set before any child starts: torch reads it when it is imported
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tag = f"s{args.scale:g}"
    base = work / f"sdxl_base_{tag}.safetensors"
    tuned = work / f"sdxl_tuned_r{RANK}_{tag}.safetensors"
    if not base.exists():
        t0 = time.perf_counter()
        size = generate_checkpoint(base, args.scale, BASE_SEED)
        print(f"generated {base} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    if not tuned.exists():
        t0 = time.perf_counter()
        count, size = generate_tuned(base, tuned, TUNED_SEED)
        print(
            f"generated {tuned} ({size / 2**30:.2f} GiB, {count} planted modules) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    gib_s = warm([base, tuned])
    print(f"page cache warmed ({gib_s:.2f} GiB/s)")

    figures: dict[str, Any] = {
        "machine": machine(),
        "scale": args.scale,
        "threads": args.threads,
        "inputs": {"base": str(base), "tuned": str(tuned), "bytes_each": base.stat().st_size},
        "planted": {"rank": RANK, "delta_rel": DELTA_REL, "noise_rel": NOISE_REL},
        "targets": {"peak_rss_mib": MEMORY_TARGET_MIB, "error_ratio": ERROR_TARGET},
        "load": {"before": loadavg()},
        "cases": {},
    }
    floor = _best(
        [run_json_child(_child_cmd("floor", str(base), str(tuned))) for _ in range(max(1, args.repeat))]
    )
    floor["load_after"] = loadavg()
    figures["floor"] = floor
    print(f"floor: {floor}")
    for case, flags in CASES.items():
        out = work / f"extract_{_slug(case)}_{tag}.safetensors"
        runs = []
        for _ in range(max(1, args.repeat)):
            runs.append(run_json_child(_child_cmd("extract", str(base), str(tuned), str(out), *flags)))
        lib = _best(runs)
        lib["load_after"] = loadavg()
        records = lib.pop("records")
        print(
            f"{case}: library {lib['seconds']:.1f} s, CPU {lib['cpu_seconds']:.1f} s, "
            f"peak RSS {lib['peak_rss_mib']:.0f} MiB (at {lib['sampled_peak_at']}), load {lib['load_after']}"
        )
        row: dict[str, Any] = {"flags": flags, "library": lib, "ratio": lib["seconds"] / floor["seconds"]}
        if not args.no_cli:
            cli_out = work / f"extract_{_slug(case)}_{tag}_cli.safetensors"
            cmd = [
                sys.executable,
                "-m",
                "lorasmith",
                "extract",
                "--base",
                str(base),
                "--tuned",
                str(tuned),
                "-o",
                str(cli_out),
                *flags,
                "--arch",
                "sdxl",
                "--device",
                "cpu",
                "--overwrite",
                "-q",
            ]
            proc = _best([measure_process(cmd) for _ in range(max(1, args.repeat))])
            proc.pop("stdout_tail", None)
            proc["load_after"] = loadavg()
            row["process"] = proc
            cli_out.unlink(missing_ok=True)
            print(
                f"{case}: process {proc['seconds']:.1f} s, CPU {proc['cpu_seconds']:.1f} s, "
                f"peak RSS {proc['peak_rss_mib']:.0f} MiB"
            )
        t0 = time.perf_counter()
        errs = error_check(base, tuned, out, records, args.sample, args.seed)
        row["errors"] = errs
        row["error_ratio_max"] = max((e["ratio"] for e in errs), default=float("nan"))
        row["error_ratio_median"] = sorted(e["ratio"] for e in errs)[len(errs) // 2] if errs else float("nan")
        peak = max(lib["peak_rss_mib"], row.get("process", {}).get("peak_rss_mib", 0.0))
        row["memory_met"] = peak < MEMORY_TARGET_MIB
        row["error_met"] = row["error_ratio_max"] <= ERROR_TARGET
        print(f"{case}: error check of {len(errs)} modules in {time.perf_counter() - t0:.1f} s")
        figures["cases"][case] = row
        out.unlink(missing_ok=True)
    figures["load"]["after"] = loadavg()

    m = figures["machine"]
    print()
    print(
        f"SDXL base and tuned, {base.stat().st_size / 2**30:.2f} GiB each (scale {args.scale:g}); "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; "
        f"OMP_NUM_THREADS {args.threads or 'unset'}; load average "
        f"{figures['load']['before'][0]:.2f} before, {figures['load']['after'][0]:.2f} after"
    )
    print()
    rows = []
    for case, row in figures["cases"].items():
        li: dict[str, Any] = row["library"]
        pr: dict[str, Any] | None = row.get("process")
        rows.append(
            [
                f"`{case}`",
                f"{floor['seconds']:.1f} s",
                f"{li['seconds']:.1f} s",
                f"{row['ratio']:.1f}x",
                f"{li['cpu_seconds']:.0f} s",
                f"{pr['seconds']:.1f} s" if pr else "-",
                f"{floor['peak_rss_mib']:.0f} MiB",
                f"{li['peak_rss_mib']:.0f} MiB",
                f"{pr['peak_rss_mib']:.0f} MiB" if pr else "-",
                f"{li['modules']} modules, ranks {li['rank_min']}-{li['rank_max']} "
                f"(mean {li['rank_mean']:.1f}), {'/'.join(li['factor_dtypes'])}, "
                f"{li['file_bytes'] / 2**20:.0f} MiB",
            ]
        )
    print(
        markdown_table(
            [
                "case",
                "floor (read both)",
                "extract (library)",
                "ratio",
                "extract CPU",
                "`lorasmith extract` process",
                "peak RSS floor",
                "peak RSS library",
                "peak RSS process",
                "output",
            ],
            rows,
        )
    )
    print()
    err_rows = []
    for case, row in figures["cases"].items():
        errs = row["errors"]
        exact = [e["exact"] for e in errs]
        err_rows.append(
            [
                f"`{case}`",
                len(errs),
                f"{min(exact):.2e} .. {max(exact):.2e}" if errs else "-",
                f"{row['error_ratio_median']:.5f}",
                f"{row['error_ratio_max']:.5f}",
                f"{max(abs(e['reported'] / e['exact'] - 1) for e in errs):.1e}" if errs else "-",
                "met" if row["error_met"] else "**missed**",
                "met" if row["memory_met"] else "**missed**",
            ]
        )
    print(
        markdown_table(
            [
                "case",
                "modules checked",
                "exact truncated SVD error",
                "LoRA / exact (median)",
                "LoRA / exact (max)",
                "reported vs exact (max rel. diff)",
                "error target",
                "memory target",
            ],
            err_rows,
        )
    )
    emit_json(figures, args.json_out)


if __name__ == "__main__":
    main()
