"""extract's per-module work on parallel threads: ordered results, bounded window, identical outputs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorasmith.io.reader import load_all
from lorasmith.ops import _extract_math
from lorasmith.ops._extract_math import compute_threads, pipelined
from lorasmith.ops.extract import extract
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_tuned


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_pipelined_keeps_order_and_bounds_the_window() -> None:
    main = threading.get_ident()
    fetched_on: set[int] = set()
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def fetch(i: int) -> int:
        nonlocal in_flight, peak
        fetched_on.add(threading.get_ident())
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        return i

    def solve(i: int) -> int:
        time.sleep(0.002 * (i % 3))  # later items often finish first
        return i * i

    out = []
    for r in pipelined(fetch, solve, list(range(20)), 3, cost=lambda _i: 1):
        out.append(r)
        with lock:
            in_flight -= 1
    assert out == [i * i for i in range(20)]
    assert fetched_on == {main}  # reads stay on the calling thread
    assert peak <= 6  # 2 * workers


def test_pipelined_budget_and_errors() -> None:
    held: list[int] = []
    peak = 0

    def fetch(i: int) -> int:
        nonlocal peak
        held.append(i)
        peak = max(peak, sum(10 if j == 0 else 4 for j in held))
        return i

    def solve(i: int) -> int:
        return i

    results = []
    for r in pipelined(fetch, solve, list(range(8)), 4, cost=lambda i: 10 if i == 0 else 4, budget=12):
        results.append(r)
        held.remove(r)
    assert results == list(range(8))
    assert peak <= 12 or peak == 10  # an item over the budget still runs, alone

    def failing(i: int) -> int:
        if i == 2:
            raise ValueError("boom")
        return i

    results = pipelined(lambda i: i, failing, list(range(6)), 2, cost=lambda _i: 1)
    got = [next(results), next(results)]
    with pytest.raises(ValueError, match="boom"):
        next(results)
    assert got == [0, 1]  # the results before the failure, in order


def test_compute_threads_sets_and_restores(torch_threads: None) -> None:
    torch.set_num_threads(3)
    with compute_threads(torch.device("cpu")) as workers:
        assert workers == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError), compute_threads(torch.device("cpu")):
        raise RuntimeError("x")
    assert torch.get_num_threads() == 3


KEYS = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.0.in_layers.2.weight",
    "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.out_proj.weight",
]


def _run(tmp_path: Path, tag: str, threads: int, **kwargs: object) -> tuple[dict[str, torch.Tensor], object]:
    torch.set_num_threads(threads)
    out = tmp_path / f"{tag}.safetensors"
    res = extract(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        output=out,
        device="cpu",
        svd_method="randomized",
        seed=5,
        overwrite=True,
        **kwargs,  # type: ignore[arg-type]
    )
    assert torch.get_num_threads() == threads  # restored
    return load_all(out), res


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 3, "conv_rank": 2},
        {"auto": True, "energy": 0.9, "rank_max": 6, "conv_rank": 4, "full_layer": True},
        {"rank": 2, "as_checkpoint": True},
    ],
    ids=["rank", "auto", "checkpoint"],
)
def test_threads_give_identical_outputs(
    tmp_path: Path, torch_threads: None, monkeypatch: pytest.MonkeyPatch, options: dict[str, object]
) -> None:
    """One thread (sequential) and three (parallel modules) write the same tensors and records."""
    arch = get("sd1")
    tensors = make_checkpoint(arch, tmp_path / "base.safetensors", factor=8, dtype=torch.float32)
    make_tuned(arch, tensors, tmp_path / "tuned.safetensors", modules=KEYS, rank=4, noise=1e-4)
    seen: list[tuple[str, int]] = []
    real = _extract_math.decompose

    def spy(*args: object, **kwargs: object) -> _extract_math.Decomposition:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_extract_math, "decompose", spy)
    one, res1 = _run(tmp_path, "one", 1, **options)
    seen.clear()
    three, res3 = _run(tmp_path, "three", 3, **options)
    assert {n for n, _ in seen} - {"MainThread"}  # the parallel run used worker threads
    assert all(t == 1 for _, t in seen)  # each with one torch thread
    assert list(one) == list(three)
    for k in one:
        assert torch.equal(one[k], three[k]), k
    assert res1.model_dump(exclude={"output"}) == res3.model_dump(exclude={"output"})  # type: ignore[attr-defined]
