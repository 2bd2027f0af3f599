"""How resize writes its outputs: single-pass outputs in the file's data order, streamed ones unit by unit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorasmith.io.header import read_header
from lorasmith.io.layout import sort_key
from lorasmith.io.writer import SafetensorsWriter
from lorasmith.ops.resize import resize
from lorasmith.progress import ProgressEvent
from lorasmith.registry import get_registry
from lorasmith.testing import make_lora

F64 = torch.float64


def _written_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    order: list[str] = []
    real = SafetensorsWriter.write

    def spy(self: SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        order.append(name)
        real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", spy)
    return order


def test_single_pass_output_is_written_in_data_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One per-module policy: every tensor is made in pass 1 and written front to back."""
    fx = make_lora(get_registry().get("sdxl"), tmp_path / "in.safetensors", rank=6, limit=10, dtype=F64)
    order = _written_order(monkeypatch)
    events: list[ProgressEvent] = []
    out = tmp_path / "out.safetensors"
    result = resize([fx.path], output=out, rank=3, device="cpu", precision="float64", progress=events.append)
    header = read_header(out)
    assert order == list(header.tensors)  # the header lists tensors in data-offset order
    assert order == sorted(order, key=lambda k: sort_key(k, header.tensors[k].dtype))
    # one write event per unit, counting up to the number of units, each unit named once
    writes = [e for e in events if e.stage.startswith("write")]
    assert [e.done for e in writes] == list(range(1, len(fx.modules) + 1))
    assert {e.total for e in writes} == {len(fx.modules)}
    assert sorted(str(e.item) for e in writes) == sorted(fx.modules)
    assert result.outputs[0].summary.resized == len(fx.modules)


def test_streamed_and_single_pass_outputs_agree(tmp_path: Path) -> None:
    """The same recipe written alone (single pass) and beside another one (pass 2 re-reads the factors)."""
    fx = make_lora(get_registry().get("sdxl"), tmp_path / "in.safetensors", rank=6, limit=10, dtype=F64)
    alone = tmp_path / "alone.safetensors"
    resize([fx.path], output=alone, recipe="fro_lora=1,thr=-0.8", device="cpu", precision="float64")
    folder = tmp_path / "both"
    folder.mkdir()
    both = resize(
        [fx.path],
        output_dir=folder,
        recipe="fro_lora=1,thr=-0.8:spn_lora=1,thr=-0.5",
        device="cpu",
        precision="float64",
    )
    streamed = Path(next(o.path for o in both.outputs if o.recipe == "fro_lora=1,thr=-0.8"))
    a, b = read_header(alone), read_header(streamed)
    assert [(t.name, t.dtype, t.shape, t.start) for t in a.tensors.values()] == [
        (t.name, t.dtype, t.shape, t.start) for t in b.tensors.values()
    ]
    ta, tb = load_file(str(alone)), load_file(str(streamed))
    for key, t in ta.items():
        torch.testing.assert_close(t, tb[key], rtol=1e-9, atol=1e-12)
    with safe_open(str(alone), "pt") as fa, safe_open(str(streamed), "pt") as fb:
        assert fa.metadata()["ss_network_dim"] == fb.metadata()["ss_network_dim"]


def test_single_pass_progress_counts_dropped_modules(tmp_path: Path) -> None:
    """A recipe that drops modules: every unit still gets its one write event, the dropped ones first."""
    fx = make_lora(get_registry().get("sdxl"), tmp_path / "in.safetensors", rank=6, limit=10, dtype=F64)
    # fro_lora scores s_i against ||s|| of its own module: a threshold between the modules' best scores
    # (log10(s_0 / ||s||)) drops the modules below it and keeps a triplet or more of the others
    best = sorted(
        math.log10(float(s[0] / s.norm()))
        for s in (torch.linalg.svdvals(em.delta.reshape(em.delta.shape[0], -1)) for em in fx.modules.values())
    )
    thr = (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2
    events: list[ProgressEvent] = []
    out = tmp_path / "out.safetensors"
    result = resize(
        [fx.path],
        output=out,
        recipe=f"fro_lora=1,thr={thr!r}",
        device="cpu",
        precision="float64",
        progress=events.append,
    )
    dropped = [m.name for m in result.outputs[0].modules if m.status == "dropped"]
    assert dropped, "the threshold was meant to drop some modules"
    writes = [e for e in events if e.stage.startswith("write")]
    assert [e.done for e in writes] == list(range(1, len(fx.modules) + 1))
    assert sorted(str(e.item) for e in writes) == sorted(fx.modules)
    assert {str(e.item) for e in writes[: len(dropped)]} == set(dropped)
    header = read_header(out)
    assert not any(k.startswith(tuple(n + "." for n in dropped)) for k in header.tensors)


@pytest.mark.parametrize("keep", [[0, 1, 2], [0, 2], [1, 3]])
def test_output_factors_of_kept_triplets(keep: list[int]) -> None:
    """Prefixes (slices) and other selections (gathers), for low-rank and dense decompositions."""
    from lorasmith.linalg.gram import gram_factorized_eig
    from lorasmith.ops.loralib import UnitExtras
    from lorasmith.ops.resize import _Decomp, _output_factors

    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(12, 5, generator=gen, dtype=F64), torch.randn(5, 9, generator=gen, dtype=F64)
    scale = torch.full((5,), 0.5, dtype=F64)
    delta = (up * scale) @ down
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    want = 1.5 * ((u[:, keep] * s[keep]) @ vh[keep])
    g = -0.25  # a negative module scale: its sign goes to up'
    extras = UnitExtras(scale=g, dora=None, dora_suffix=None, bias=None)
    (eig,) = gram_factorized_eig([up], [down], [scale], F64)
    left, right = eig.coefficients(4)
    lowrank = _Decomp(S=eig.S.clone(), scale=g, extras=extras, left=left, right=right)
    dense = _Decomp(S=s.clone(), scale=g, extras=extras, U=u[:, :4], Vh=vh[:4])
    dev = torch.device("cpu")
    for d, factors in ((lowrank, (up, down, scale)), (dense, None)):
        pu, pd = _output_factors(None, d, keep, 1.5, dev, F64, factors)  # type: ignore[arg-type]
        assert pu.shape == (12, len(keep)) and pd.shape == (len(keep), 9)
        torch.testing.assert_close(g * (pu @ pd), want, rtol=0, atol=1e-12 * float(s[0]))
