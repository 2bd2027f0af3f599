"""The overlapped read-compute-write pipeline and the writer's part API it uses."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorasmith.errors import InvalidFileError
from lorasmith.io import pipeline
from lorasmith.io.header import read_header
from lorasmith.io.pipeline import (
    MAX_MEMORY,
    MIN_MEMORY,
    BufferPool,
    Source,
    Step,
    cast_steps,
    copy_steps,
    memory_budget,
    part_elements,
    run_steps,
    split_range,
)
from lorasmith.io.reader import load_all, open_tensors
from lorasmith.io.writer import NonFiniteError, SafetensorsWriter, allow_nonfinite, save_file


def _inputs(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    a = {
        "big": torch.randn(300, 77, generator=gen).half(),
        "small": torch.randn(5, generator=gen),
        "ids": torch.arange(12, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    b = {k: (v * 3 if v.is_floating_point() else v) for k, v in a.items()}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb, a, b


def _plan(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    names = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    return {k: (names[v.dtype], tuple(v.shape)) for k, v in tensors.items()}


def _sum_steps(fa: object, fb: object, names: list[str], per_part: int) -> Iterator[Step]:
    from lorasmith.io.reader import TensorFile

    assert isinstance(fa, TensorFile) and isinstance(fb, TensorFile)

    def add(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        torch.add(inputs[0].float(), inputs[1].float(), out=out) if out.dtype == torch.float32 else out.copy_(
            inputs[0].float() + inputs[1].float()
        )

    for name in names:
        info = fa.info(name)
        n = 1
        for d in info.shape:
            n *= d
        if info.dtype == "I64":
            yield from copy_steps(fa, name, name, per_part)
            continue
        for start, length, last in split_range(n, per_part):
            yield Step(
                name,
                start,
                length,
                [Source(fa, name, start, length), Source(fb, name, start, length)],
                add,
                last,
            )


@pytest.mark.parametrize("per_part", [1, 7, 1000, 10**6])
def test_parts_give_the_same_file_as_a_whole_write(tmp_path: Path, per_part: int) -> None:
    pa, pb, a, b = _inputs(tmp_path)
    expected = {
        k: (a[k].float() + b[k].float()).to(a[k].dtype) if a[k].is_floating_point() else a[k] for k in a
    }
    ref = save_file(expected, tmp_path / "ref.safetensors", metadata={"k": "v"})
    done: list[str] = []
    with open_tensors(pa) as fa, open_tensors(pb) as fb:
        w = SafetensorsWriter(tmp_path / "out.safetensors", metadata={"k": "v"}, plan=_plan(expected))
        run_steps(
            _sum_steps(fa, fb, w.planned_names, per_part),
            w,
            on_tensor=done.append,
            buffers=4,
            buffer_bytes=4096,
        )
        res = w.close()
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert res.sshs_model_hash == ref.sshs_model_hash
    assert sorted(done) == sorted(expected)
    data = (tmp_path / "out.safetensors").read_bytes()[
        read_header(tmp_path / "out.safetensors").data_offset :
    ]
    assert res.sshs_model_hash == hashlib.sha256(data).hexdigest()


def test_cast_steps_round_once(tmp_path: Path) -> None:
    pa, _, a, _ = _inputs(tmp_path)
    with open_tensors(pa) as fa:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F16", (5,))})
        run_steps(cast_steps(fa, "small", "small", 2), w)
        w.close()
    assert torch.equal(load_all(tmp_path / "o.safetensors")["small"], a["small"].half())


def test_many_sources_do_not_exhaust_the_pool(tmp_path: Path) -> None:
    """A step with more inputs than half the pool reads into its own buffers instead of waiting forever."""
    pa, _, a, _ = _inputs(tmp_path)

    def total(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(sum(x.float() for x in inputs))

    with open_tensors(pa) as fa:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F32", (5,))})
        steps = [Step("small", 0, 5, [Source(fa, "small", 0, 5)] * 9, total, True)]
        run_steps(steps, w, buffers=2, buffer_bytes=64)
        w.close()
    assert torch.allclose(load_all(tmp_path / "o.safetensors")["small"], a["small"] * 9)


def _one_step(fa: object, compute: object) -> list[Step]:
    from lorasmith.io.reader import TensorFile

    assert isinstance(fa, TensorFile)
    return [Step("small", 0, 5, [Source(fa, "small", 0, 5)], compute, True)]  # type: ignore[arg-type]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failing_step_stops_every_thread(tmp_path: Path, exc: BaseException) -> None:
    pa, *_ = _inputs(tmp_path)

    def fail(inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        raise exc

    before = threading.active_count()
    with open_tensors(pa) as fa:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F32", (5,))})
        with pytest.raises(type(exc)):
            run_steps(_one_step(fa, fail), w)
        w.abort()
    assert threading.active_count() == before
    assert list(tmp_path.glob("*.tmp")) == [] and not (tmp_path / "o.safetensors").exists()


def test_a_read_error_reaches_the_caller(tmp_path: Path) -> None:
    pa, *_ = _inputs(tmp_path)
    with open_tensors(pa) as fa:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F32", (5,))})
        fa.close()  # reading now fails on the reader thread
        with pytest.raises(InvalidFileError, match="closed"):
            run_steps(copy_steps(fa, "small", "small", 2), w)
        w.abort()


def test_nonfinite_parts_are_refused_or_recorded_once(tmp_path: Path) -> None:
    bad = torch.tensor([1.0, float("nan"), 2.0, float("inf"), float("nan")])
    p = tmp_path / "bad.safetensors"
    save_file({"small": bad}, p, check_finite=False)
    with open_tensors(p) as f:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F32", (5,))})
        with pytest.raises(NonFiniteError, match="NaN"):
            run_steps(copy_steps(f, "small", "small", 2), w)
        w.abort()
        with allow_nonfinite() as policy:
            w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"small": ("F32", (5,))})
            run_steps(copy_steps(f, "small", "small", 2), w)
            w.close()
    assert [(t.name, t.nan, t.inf) for t in policy.nonfinite] == [("small", 2, 1)]


def test_write_part_checks_order_and_dtype(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"x": ("F32", (4,))})
    with pytest.raises(ValueError, match="does not continue"):
        w.write_part("x", 4, torch.ones(2))
    with pytest.raises(ValueError, match="F16"):
        w.write_part("x", 0, torch.ones(2).half())
    with pytest.raises(ValueError, match="not in the plan"):
        w.write_part("y", 0, torch.ones(2))
    w.write_part("x", 0, torch.ones(2))
    with pytest.raises(ValueError, match="does not continue"):
        w.write_part("x", 8, torch.ones(4))
    w.write_part("x", 8, torch.ones(2) * 2)
    with pytest.raises(ValueError, match="written twice"):
        w.write_part("x", 16, torch.ones(1))
    w.close()
    assert torch.equal(load_all(tmp_path / "o.safetensors")["x"], torch.tensor([1.0, 1, 2, 2]))
    unplanned = SafetensorsWriter(tmp_path / "u.safetensors")
    with pytest.raises(ValueError, match="planned"):
        unplanned.write_part("x", 0, torch.ones(1))


def test_read_part_reads_a_range_into_a_buffer(tmp_path: Path) -> None:
    pa, _, a, _ = _inputs(tmp_path)
    buf = torch.empty(1 << 16, dtype=torch.uint8)
    with open_tensors(pa) as f:
        part = f.read_part("big", 100, 50, into=buf)
        assert part.data_ptr() == buf.data_ptr()
        assert torch.equal(part, a["big"].reshape(-1)[100:150])
        with pytest.raises(ValueError):
            f.read_part("big", 300 * 77 - 1, 2)
        with pytest.raises(ValueError):
            f.read_part("big", 0, 50, into=torch.empty(10, dtype=torch.uint8))


def test_helpers() -> None:
    assert list(split_range(0, 4)) == [(0, 0, True)]
    assert list(split_range(10, 4)) == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert part_elements(2, 4, buffer_bytes=64) == 16
    pool = BufferPool(1, 16)
    buf = pool.take(8)
    big = pool.take(100)  # larger than the pool's buffers: its own
    assert big.numel() == 100
    pool.give(big)
    pool.give(buf)
    assert pool.take(16).data_ptr() == buf.data_ptr()


def test_memory_budget_scales_with_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pipeline.MEMORY_ENV, raising=False)
    assert memory_budget(0) == MIN_MEMORY
    assert memory_budget(16 * MIN_MEMORY + 160) == MIN_MEMORY + 10
    assert memory_budget(100 << 30) == MAX_MEMORY
    monkeypatch.setenv(pipeline.MEMORY_ENV, "24")
    assert memory_budget(100 << 30) == 24 << 20
    monkeypatch.setenv(pipeline.MEMORY_ENV, "lots")  # malformed: the computed budget
    assert memory_budget(0) == MIN_MEMORY


def test_pool_shape_fits_the_budget() -> None:
    for memory in (1, MIN_MEMORY, MAX_MEMORY, 1 << 30):
        inputs, depth = pipeline._pool_shape(memory, pipeline.BUFFER_BYTES)
        count = inputs + 2 * depth + 3
        assert inputs >= 2 and depth >= 1
        if memory >= MIN_MEMORY:
            assert count * pipeline.BUFFER_BYTES <= memory
    assert pipeline._pool_shape(1 << 40, 64) == (64, 30)  # at most 128 buffers, however small


def test_run_steps_with_a_memory_budget(tmp_path: Path) -> None:
    pa, _, a, _ = _inputs(tmp_path)
    with open_tensors(pa) as fa:
        w = SafetensorsWriter(tmp_path / "o.safetensors", plan={"big": ("F16", tuple(a["big"].shape))})
        run_steps(copy_steps(fa, "big", "big", 100), w, buffer_bytes=4096, memory=5 * 4096)
        w.close()
    assert torch.equal(load_all(tmp_path / "o.safetensors")["big"], a["big"])
