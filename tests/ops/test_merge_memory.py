"""merge streams: a checkpoint merge and a bake succeed under an address-space limit smaller than one input.

Each run happens in a subprocess that imports torch and lorasmith, warms up on tiny files (so that the
thread pool, the malloc arenas and the lazily imported modules already exist), measures its own virtual
size, and only then sets ``RLIMIT_AS`` to that baseline plus a margin of half an input. A merge that held
one whole input (or a float32 copy of one) would fail with a MemoryError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasmith.io.reader import load_all, open_tensors
from lorasmith.io.writer import SafetensorsWriter
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")

#: The large tensors replacing some UNet linear weights: 16 x 16 MB of fp16 = 256 MB per input.
BIG_SHAPE = (1024, 8192)
N_BIG = 16
RANK = 4

CHILD = r"""
import json, re, resource, sys, time
t0 = time.perf_counter()
import torch
from lorasmith.ops.merge import merge

def vm():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmSize:\s+(\d+)", fh.read()).group(1)) * 1024

args = json.loads(sys.argv[1])
warm = args["warm"]
merge(models=warm["models"], output=warm["out1"], arch="sd1", overwrite=True)
merge([warm["lora"]], base=warm["models"][0], output=warm["out2"], arch="sd1", overwrite=True)
x = torch.ones(1 << 23)  # large enough to start the intra-op thread pool (its stacks and arenas)
float((x * 2 + x).sum())
del x
baseline = vm()
limit = baseline + args["margin"]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
r = merge(**args["call"])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "baseline": baseline, "limit": limit, "changed": r.changed}))
"""


def _big_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    keys = [
        k
        for k, v in tensors.items()
        if v.ndim == 2
        and k.startswith("model.diffusion_model.")
        and k.endswith(("to_q.weight", "to_out.0.weight"))
    ]
    assert len(keys) >= N_BIG
    return keys[:N_BIG]


def _write_big(path: Path, small: dict[str, torch.Tensor], big: list[str], seed: int) -> None:
    """The small checkpoint with ``big`` replaced by large random fp16 tensors, streamed to disk."""
    plan = {
        k: ("F16" if k in big else _st_dtype(v), BIG_SHAPE if k in big else tuple(v.shape))
        for k, v in small.items()
    }
    gen = torch.Generator().manual_seed(seed)
    w = SafetensorsWriter(path, plan=plan)
    for k, v in small.items():
        w.write(k, (torch.randn(BIG_SHAPE, generator=gen) * 0.02).to(torch.float16) if k in big else v)
    w.close()


def _st_dtype(t: torch.Tensor) -> str:
    from lorasmith.io.dtypes import safetensors_dtype

    return safetensors_dtype(t.dtype)


def _run(tmp: Path, call: dict[str, object], margin: int) -> dict[str, int]:
    warm = {
        "models": [str(tmp / "w0.safetensors"), str(tmp / "w1.safetensors")],
        "lora": str(tmp / "wl.safetensors"),
        "out1": str(tmp / "wo1.safetensors"),
        "out2": str(tmp / "wo2.safetensors"),
    }
    # fixed malloc behaviour: few arenas and no dynamic mmap threshold, so that freed chunks go back and
    # the address space measures what is alive
    env = dict(os.environ, MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"warm": warm, "margin": margin, "call": call})],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("mem")
    small = make_checkpoint(get("sd1"), tmp / "small.safetensors", dtype=torch.float16)
    big = _big_keys(small)
    make_checkpoint(get("sd1"), tmp / "w0.safetensors", seed=5, dtype=torch.float16)
    make_checkpoint(get("sd1"), tmp / "w1.safetensors", seed=6, dtype=torch.float16)
    make_lora(get("sd1"), tmp / "wl.safetensors", rank=2, limit=4)
    _write_big(tmp / "a.safetensors", small, big, 1)
    _write_big(tmp / "b.safetensors", small, big, 2)
    return tmp, big


def _input_bytes(path: Path) -> int:
    return path.stat().st_size


def test_weighted_sum_under_limit(inputs: tuple[Path, list[str]]) -> None:
    tmp, big = inputs
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    size = _input_bytes(a)
    assert size > N_BIG * 16 * 2**20
    margin = size // 2
    out = tmp / "ws.safetensors"
    got = _run(
        tmp,
        {"models": [f"{a}:0.25", f"{b}:0.75"], "output": str(out), "arch": "sd1", "overwrite": True},
        margin,
    )
    assert got["limit"] - got["baseline"] < size
    assert got["changed"] >= N_BIG
    with open_tensors(a) as fa, open_tensors(b) as fb, open_tensors(out) as fo:
        for k in (big[0], big[-1], next(k for k in fa.keys() if k not in big and k.endswith(".weight"))):
            ref = (0.25 * fa.get(k).float() + 0.75 * fb.get(k).float()).to(torch.float16)
            torch.testing.assert_close(fo.get(k), ref, rtol=1e-3, atol=1e-4)


def test_bake_under_limit(inputs: tuple[Path, list[str]]) -> None:
    tmp, big = inputs
    base = tmp / "a.safetensors"
    arch = get("sd1")
    names = {al.target.key: al.name for al in arch.aliases(None, "kohya")}
    gen = torch.Generator().manual_seed(9)
    lora: dict[str, torch.Tensor] = {}
    for k in big:
        n = names[k]
        lora[f"{n}.lora_down.weight"] = torch.randn(RANK, BIG_SHAPE[1], generator=gen).to(torch.float16)
        lora[f"{n}.lora_up.weight"] = (torch.randn(BIG_SHAPE[0], RANK, generator=gen) * 0.01).to(
            torch.float16
        )
        lora[f"{n}.alpha"] = torch.tensor(float(RANK) / 2)
    from lorasmith.io.writer import save_file

    save_file(lora, tmp / "big_lora.safetensors")
    size = _input_bytes(base)
    out = tmp / "baked.safetensors"
    got = _run(
        tmp,
        {
            "loras": [f"{tmp / 'big_lora.safetensors'}:0.8"],
            "base": str(base),
            "output": str(out),
            "arch": "sd1",
        },
        size // 2,
    )
    assert got["limit"] - got["baseline"] < size
    assert got["changed"] == N_BIG
    lo = load_all(tmp / "big_lora.safetensors")
    with open_tensors(base) as fb, open_tensors(out) as fo:
        for k in (big[0], big[-1]):
            n = names[k]
            d = lo[f"{n}.lora_up.weight"].double() @ lo[f"{n}.lora_down.weight"].double() * 0.5
            ref = (fb.get(k).double() + 0.8 * d).to(torch.float16)
            torch.testing.assert_close(fo.get(k), ref, rtol=1e-3, atol=1e-3)
