"""Memory: within an address-space limit a run streams; past it, it stops with a message, not the OOM killer.

The runs are real processes with ``RLIMIT_AS`` set to their address space at start plus a headroom (and
torch on one thread, so that no thread pool is created under the limit). The base has one 64 MiB tensor:
with 100 MiB of headroom the bake streams through it in parts; with 32 MiB it cannot even set up its
read/write buffers, and the run stops at once with "out of memory: needs about N MiB more; the process
is limited to ...".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from corpus import Corpus
from harness import CliServer

from lorasmith.commands._common import out_of_memory
from lorasmith.io.header import read_header
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint


@pytest.fixture(scope="module")
def big_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "base.safetensors"
    big = {"model.diffusion_model.extra.weight": torch.zeros(4096, 4096)}  # 64 MiB
    make_checkpoint(get("sd1"), path, components=("unet",), planted=big)
    return path


def _bake(corpus: Corpus, base: Path, out: Path) -> list[str]:
    return ["merge", str(corpus.lora), "--base", str(base), "-o", str(out), "-q"]


def test_streams_within_the_limit(corpus: Corpus, server: CliServer, big_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = server.run(_bake(corpus, big_base, out), as_headroom=100 << 20, threads=1)
    assert result.code == 0, str(result)
    assert read_header(out).tensors.keys() == read_header(big_base).tensors.keys()


def test_stops_with_a_message_past_the_limit(
    corpus: Corpus, server: CliServer, big_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.safetensors"
    result = server.run(_bake(corpus, big_base, out), as_headroom=32 << 20, threads=1)
    assert result.code == 1, str(result)
    assert not result.traceback, str(result)
    assert result.error_lines == [result.error_lines[0]]
    line = result.error_lines[0]
    assert re.match(r"error: out of memory: needs about \d+\.\d MiB more", line), line
    assert "limited to" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes."
            ),
            "needs about 1.0 GiB more",
        ),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)"), "2.0 GiB"),
        (MemoryError("Unable to allocate 512. MiB for an array with shape (1024, 131072)"), "512.0 MiB"),
        (MemoryError(), "an allocation failed"),
        (RuntimeError("can't start new thread"), "cannot start a worker thread"),
    ],
)
def test_out_of_memory_messages(exc: BaseException, says: str) -> None:
    err = out_of_memory(exc)
    assert err is not None and err.message.startswith("out of memory: ") and says in err.message
    assert err.hint


def test_other_runtime_errors_are_not_memory() -> None:
    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(ValueError("can't allocate memory")) is None
