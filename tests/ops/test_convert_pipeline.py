"""convert of a single safetensors checkpoint through the streaming pipeline: byte-identical to the
whole-tensor path it replaced, with the same cast counts, progress, records and errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.io import pipeline
from lorasmith.io.writer import NonFiniteError, write_policy
from lorasmith.ops import convert as convert_mod
from lorasmith.ops._convert_dtype import cast_into, cast_tensor
from lorasmith.ops.convert import ConvertResult, convert
from lorasmith.progress import ProgressEvent
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint

#: a UNet weight and a text-encoder weight of the shrunk SDXL inventory (planted with extreme values)
_UNET_KEY = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"
_TE_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 4 KiB, so that the shrunk tensors are cut into many parts (as real ones are)."""
    monkeypatch.setattr(pipeline, "BUFFER_BYTES", 4096)


@contextlib.contextmanager
def _old_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While active, convert reads whole tensors (the path the pipeline replaced)."""
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "PIPELINE", False)
        yield


def _both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, src: Path, **options: Any
) -> tuple[tuple[ConvertResult, list[ProgressEvent]], tuple[ConvertResult, list[ProgressEvent]]]:
    """Convert ``src`` by the pipeline and by the old path; compare the files; return both results."""
    new_events: list[ProgressEvent] = []
    old_events: list[ProgressEvent] = []
    runs: list[int] = []
    run_steps = pipeline.run_steps

    def counted(*args: Any, **kwargs: Any) -> None:
        runs.append(1)
        run_steps(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_steps", counted)
        new = convert(src, tmp_path / "new.safetensors", progress=new_events.append, **options)
    assert runs == [1]  # the new path did stream through the pipeline
    with _old_path(monkeypatch):
        old = convert(src, tmp_path / "old.safetensors", progress=old_events.append, **options)
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    return (new, new_events), (old, old_events)


def _same_report(new: ConvertResult, old: ConvertResult, events: tuple[list[Any], list[Any]]) -> None:
    assert new.model_dump(exclude={"output"}) == old.model_dump(exclude={"output"})
    new_events, old_events = events
    # one event per tensor, counted the same; the pipeline reports them in the output's data order
    assert [(e.stage, e.done, e.total) for e in new_events] == [
        (e.stage, e.done, e.total) for e in old_events
    ]
    assert sorted(e.item for e in new_events) == sorted(e.item for e in old_events)


def _sdxl(path: Path, dtype: torch.dtype, planted: dict[str, torch.Tensor] | None = None) -> None:
    make_checkpoint(get("sdxl"), path, dtype=dtype, planted=planted, metadata={"modelspec.title": "t"})


def test_fp16_to_bf16_matches_whole_tensor_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sdxl16.safetensors"
    _sdxl(src, torch.float16)
    (new, ne), (old, oe) = _both(monkeypatch, tmp_path, src, dtype="bf16")
    _same_report(new, old, (ne, oe))
    assert new.cast.tensors > 0 and new.cast.untouched > 0  # position ids are copied, not cast


def test_fp32_to_fp16_overflow_counts_match(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sdxl32.safetensors"
    shape = tuple(make_checkpoint(get("sdxl"), tmp_path / "probe.safetensors")[_UNET_KEY].shape)
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(shape, generator=gen) * 6e4  # about a quarter of them beyond fp16's 65504
    big.view(-1)[::97] = 1e-9  # flushed to zero in fp16, in several parts
    big.view(-1)[5] = 65519.0  # rounds to 65504 without overflowing to inf, yet beyond the largest finite
    _sdxl(src, torch.float32, planted={_UNET_KEY: big})
    (new, ne), (old, oe) = _both(monkeypatch, tmp_path, src, dtype="fp16")
    _same_report(new, old, (ne, oe))
    assert new.cast.overflowed > 1000 and new.cast.flushed_to_zero > 50


def test_per_component_matches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sdxl32.safetensors"
    _sdxl(src, torch.float32)
    (new, ne), (old, oe) = _both(
        monkeypatch, tmp_path, src, dtype="fp16", unet_dtype="bf16", te_dtype="fp8_e4m3fn", vae_dtype="fp32"
    )
    _same_report(new, old, (ne, oe))
    assert set(new.dtypes) >= {"BF16", "F8_E4M3", "F32"}


def test_cli_json_matches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "sdxl16.safetensors"
    _sdxl(src, torch.float16)
    runner = CliRunner()

    def run(out: str) -> dict[str, Any]:
        res = runner.invoke(
            app, ["convert", str(src), "--dtype", "bf16", "-o", str(tmp_path / out), "--json"]
        )
        assert res.exit_code == 0, res.output
        data: dict[str, Any] = json.loads(res.stdout)
        data.pop("output", None)
        return data

    new = run("new.safetensors")
    with _old_path(monkeypatch):
        old = run("old.safetensors")
    assert new == old
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()


def _nonfinite_source(tmp_path: Path) -> Path:
    src = tmp_path / "bad.safetensors"
    shape = tuple(make_checkpoint(get("sdxl"), tmp_path / "probe.safetensors")[_TE_KEY].shape)
    bad = torch.zeros(shape)
    bad.view(-1)[::50] = float("nan")  # NaNs in many parts of the tensor
    bad.view(-1)[7] = float("inf")
    _sdxl(src, torch.float32, planted={_TE_KEY: bad})
    return src


def _refusal(run: Callable[[], object]) -> str:
    with pytest.raises(NonFiniteError) as info:
        run()
    return str(info.value)


def test_nonfinite_refusal_names_whole_tensor_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = _nonfinite_source(tmp_path)
    out = tmp_path / "o.safetensors"
    before = sorted(tmp_path.iterdir())
    new = _refusal(lambda: convert(src, out, dtype="bf16"))
    with _old_path(monkeypatch):
        old = _refusal(lambda: convert(src, out, dtype="bf16"))
    assert new == old and _TE_KEY in new
    assert sorted(tmp_path.iterdir()) == before  # atomic: nothing left behind


def test_nonfinite_allowed_records_match(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = _nonfinite_source(tmp_path)
    with write_policy(allow_nonfinite=True) as policy:
        convert(src, tmp_path / "new.safetensors", dtype="fp8_e4m3fn")
    new = [(t.name, t.nan, t.inf) for t in policy.nonfinite]
    with _old_path(monkeypatch):
        with write_policy(allow_nonfinite=True) as policy:
            convert(src, tmp_path / "old.safetensors", dtype="fp8_e4m3fn")
    old = [(t.name, t.nan, t.inf) for t in policy.nonfinite]
    assert new == old and new
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()


_TARGETS = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@pytest.mark.parametrize("st", sorted(_TARGETS))
def test_cast_into_parts_add_up(st: str) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=gen, dtype=torch.float64) * 1e5
    t[::7] = 1e-300  # flushed to zero in every target
    t[1::11] = -1e300  # beyond every target, bf16 included
    t[3], t[4], t[5] = float("nan"), float("inf"), 0.0
    whole, stats = cast_tensor(t, st)
    out = torch.empty(1000, dtype=_TARGETS[st])
    over = flushed = 0
    for a in range(0, 1000, 300):
        part = cast_into(t[a : a + 300], out[a : a + 300])
        over, flushed = over + part.overflowed, flushed + part.flushed
        assert part.tensors == 0 and part.values == 0
    assert torch.equal(out.view(torch.uint8), whole.view(torch.uint8))
    assert (over, flushed) == (stats.overflowed, stats.flushed) and over > 0 and flushed > 0


def test_empty_and_mixed_tensors_match(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lorasmith.io.writer import save_file

    src = tmp_path / "mixed.safetensors"
    gen = torch.Generator().manual_seed(2)
    tensors = {
        "a.weight": torch.randn(3000, generator=gen) * 1e5,  # several parts, some values overflow fp16
        "empty.weight": torch.zeros(0, 4),  # one empty part: still one tensor cast, of 0 values
        "ids": torch.arange(5),
        "wide.weight": torch.randn(100, generator=gen, dtype=torch.float64),
        "same.weight": torch.randn(10, generator=gen).half(),  # already the target: copied
    }
    save_file(tensors, src)
    (new, ne), (old, oe) = _both(monkeypatch, tmp_path, src, dtype="fp16")
    _same_report(new, old, (ne, oe))
    assert (new.cast.tensors, new.cast.values, new.cast.untouched) == (3, 3100, 2)
    assert new.cast.overflowed > 0
