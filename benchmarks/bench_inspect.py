#!/usr/bin/env python3
"""Header-level ``inspect`` on real-shaped multi-GB checkpoints.

Writes, outside the repository, sparse safetensors files whose headers are exactly those of the real
checkpoints (every key, real shapes and dtypes, from the packaged inventories) and whose data sections are
holes (no disk used), then times ``lorasmith inspect`` as a library call and as a fresh process.

Run: ``python benchmarks/bench_inspect.py [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorasmith.io.layout import plan_layout, serialize_prefix
from lorasmith.registry import get_registry

CASES = [("sdxl", None), ("flux", "dev"), ("sd3", "sd3.5-large"), ("zimage", None)]


def write_sparse(arch_id: str, variant: str | None, path: Path) -> int:
    """Write a header-exact, data-sparse checkpoint; return its size in bytes."""
    inv = get_registry().get(arch_id).canonical_inventory(variant)
    layout = plan_layout((k, s.dtype, s.shape) for k, s in inv.tensors.items())
    header = serialize_prefix(layout, {"format": "pt"})
    data_size = max((t.end for t in layout), default=0)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + data_size)
    return len(header) + data_size


def main() -> None:
    """Time inspect on each case and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorasmith-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from lorasmith.ops.inspect import inspect_file

    print("| checkpoint | file size | tensors | library call | `lorasmith inspect` process |")
    print("|---|---:|---:|---:|---:|")
    for arch_id, variant in CASES:
        path = args.workdir / f"{arch_id}-{variant or 'default'}-sparse.safetensors"
        size = write_sparse(arch_id, variant, path)
        t0 = time.perf_counter()
        r = inspect_file(path)
        lib = time.perf_counter() - t0
        assert r.arch == arch_id, r.reason
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lorasmith", "inspect", str(path)], check=True, capture_output=True
        )
        proc = time.perf_counter() - t0
        print(
            f"| {arch_id} {variant or ''} | {size / 2**30:.2f} GiB | {r.tensor_count} | {lib * 1000:.0f} ms "
            f"| {proc * 1000:.0f} ms |"
        )
        path.unlink()


if __name__ == "__main__":
    main()
