"""encode_lora round trips, and the low-rank view."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lorasmith.adapters import encode_lora, parse_module
from lorasmith.errors import AdapterError

F64 = torch.float64


def rnd(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


@pytest.mark.parametrize("style", ["kohya", "peft"])
@pytest.mark.parametrize("alpha", [None, 4.0, -3.0, 0.5])
def test_round_trip_linear(style: str, alpha: float | None) -> None:
    r = 8
    up, down = rnd(6, r), rnd(r, 5)
    g = 1.0 if alpha is None else alpha / r
    enc = encode_lora(up, down, alpha, suffixes=style)  # type: ignore[arg-type]
    if style == "kohya":
        assert set(enc) == {".lora_down.weight", ".lora_up.weight", ".alpha"}
        assert enc[".alpha"].ndim == 0
        assert enc[".alpha"].dtype == torch.float32
        assert float(enc[".alpha"]) == (r if alpha is None else alpha)
    else:
        assert set(enc) == {".lora_A.weight", ".lora_B.weight"}
        # the scale is split evenly: both factors carry sqrt(|g|)
        torch.testing.assert_close(enc[".lora_A.weight"], down * math.sqrt(abs(g)))
    m = parse_module("m", enc)
    torch.testing.assert_close(m.delta(dtype=F64), g * up @ down)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_round_trip_conv(style: str) -> None:
    r, out, inp = 3, 5, 4
    up, down = rnd(out, r), rnd(r, inp, 3, 3)
    enc = encode_lora(up, down, 1.5, suffixes=style, conv=True)  # type: ignore[arg-type]
    down_key = ".lora_down.weight" if style == "kohya" else ".lora_A.weight"
    up_key = ".lora_up.weight" if style == "kohya" else ".lora_B.weight"
    assert tuple(enc[down_key].shape) == (r, inp, 3, 3)
    assert tuple(enc[up_key].shape) == (out, r, 1, 1)
    ref = 0.5 * (up @ down.reshape(r, -1)).reshape(out, inp, 3, 3)
    torch.testing.assert_close(parse_module("c", enc).delta(dtype=F64), ref)
    # the same from a flattened down plus an explicit kernel
    enc2 = encode_lora(up, down.reshape(r, -1), 1.5, suffixes=style, conv=True, kernel=(3, 3))  # type: ignore[arg-type]
    torch.testing.assert_close(parse_module("c", enc2).delta(dtype=F64), ref)
    # a 1x1 conv
    enc3 = encode_lora(up, rnd(r, inp), None, conv=True)
    assert tuple(enc3[".lora_down.weight"].shape) == (r, inp, 1, 1)


def test_round_trip_of_parsed_lowrank_incl_tucker() -> None:
    r, out, inp = 3, 6, 4
    m = parse_module(
        "t",
        {
            ".lora_up.weight": rnd(out, r, 1, 1),
            ".lora_mid.weight": rnd(r, r, 3, 3),
            ".lora_down.weight": rnd(r, inp, 1, 1),
            ".alpha": torch.tensor(2.0, dtype=F64),
        },
    )
    low = m.lowrank()
    assert low is not None
    f = low.fold(F64)
    enc = encode_lora(f.up, f.down, f.scale * f.rank, conv=True, kernel=f.kernel)
    torch.testing.assert_close(parse_module("t", enc).delta(dtype=F64), m.delta(dtype=F64))
    # no Tucker core: fold() is the identity and the factors come back as stored
    plain = parse_module("p", {".lora_up.weight": rnd(out, r), ".lora_down.weight": rnd(r, inp)})
    pl = plain.lowrank()
    assert pl is not None
    assert pl.fold() is pl
    torch.testing.assert_close(pl.dense(F64), plain.delta(dtype=F64))


def test_dtype_and_contiguity() -> None:
    up, down = rnd(6, 2), rnd(2, 5)
    enc = encode_lora(up.T.contiguous().T, down, 2.0, suffixes="peft", dtype=torch.float16)
    assert all(t.dtype == torch.float16 and t.is_contiguous() for t in enc.values())
    torch.testing.assert_close(parse_module("m", enc).delta(), (up @ down).float(), rtol=5e-3, atol=5e-3)


def test_encode_errors() -> None:
    with pytest.raises(AdapterError, match="rank mismatch"):
        encode_lora(rnd(4, 2), rnd(3, 5), None)
    with pytest.raises(AdapterError, match="up must be"):
        encode_lora(rnd(4), rnd(3, 5), None)
    with pytest.raises(AdapterError, match="pass conv=True"):
        encode_lora(rnd(4, 2), rnd(2, 5, 3, 3), None)
    with pytest.raises(AdapterError, match="does not divide"):
        encode_lora(rnd(4, 2), rnd(2, 10), None, conv=True, kernel=(3, 3))
    with pytest.raises(AdapterError, match="alpha is"):
        encode_lora(rnd(4, 2), rnd(2, 5), float("nan"))
    with pytest.raises(AdapterError, match="suffix style"):
        encode_lora(rnd(4, 2), rnd(2, 5), None, suffixes="comfy")  # type: ignore[arg-type]


def test_lowrank_none_for_materialised_algorithms() -> None:
    loha = parse_module(
        "h",
        {".hada_w1_a": rnd(4, 2), ".hada_w1_b": rnd(2, 3), ".hada_w2_a": rnd(4, 2), ".hada_w2_b": rnd(2, 3)},
    )
    assert loha.lowrank() is None
    assert parse_module("k", {".lokr_w1": rnd(2, 2), ".lokr_w2": rnd(2, 2)}).lowrank() is None
    assert parse_module("f", {".diff": rnd(2, 2)}).lowrank() is None
    assert parse_module("o", {".oft_blocks": rnd(1, 2, 2)}).lowrank() is None
