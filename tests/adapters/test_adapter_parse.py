"""Spellings, alpha handling, shapes and every error path of parse_module."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorasmith.adapters import parse_module, parse_modules
from lorasmith.errors import AdapterError

F64 = torch.float64

SPELLINGS = [
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
]


def rnd(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("down_sfx", "up_sfx"), SPELLINGS)
def test_every_lora_spelling(down_sfx: str, up_sfx: str) -> None:
    up, down = rnd(6, 2), rnd(2, 4)
    m = parse_module("mod", {down_sfx: down, up_sfx: up})
    assert m.algo == "lora"
    assert m.scale == 1.0
    torch.testing.assert_close(m.delta(dtype=F64), up @ down)
    expected = {".lora_down.weight": "kohya", ".lora_A.weight": "peft", ".lora_A.default.weight": "peft"}
    assert m.summary.spelling == expected.get(down_sfx, "diffusers")


def test_suffix_without_leading_dot() -> None:
    m = parse_module(
        "m", {"lora_down.weight": rnd(2, 3), "lora_up.weight": rnd(4, 2), "alpha": torch.tensor(1.0)}
    )
    assert m.scale == 0.5


def test_alpha_dtypes_and_values() -> None:
    up, down = rnd(4, 4), rnd(4, 3)
    for alpha in (
        torch.tensor(2.0, dtype=torch.float16),
        torch.tensor([2.0], dtype=torch.bfloat16),
        torch.tensor(2),
    ):
        m = parse_module("m", {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": alpha})
        assert m.alpha == 2.0
        assert m.scale == 0.5


def test_half_precision_factors_are_computed_in_float32() -> None:
    up, down = rnd(8, 4), rnd(4, 8)
    m = parse_module("m", {".lora_down.weight": down.half(), ".lora_up.weight": up.half()})
    d = m.delta()
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, (up.half().float() @ down.half().float()))
    assert m.tensor_bytes == (32 + 32) * 2


def test_parse_modules_whole_state_dict() -> None:
    state = {
        "lora_unet_a.lora_down.weight": rnd(2, 3),
        "lora_unet_a.lora_up.weight": rnd(5, 2),
        "lora_unet_a.alpha": torch.tensor(1.0),
        "lora_unet_b.hada_w1_a": rnd(4, 2),
        "lora_unet_b.hada_w1_b": rnd(2, 3),
        "lora_unet_b.hada_w2_a": rnd(4, 2),
        "lora_unet_b.hada_w2_b": rnd(2, 3),
        "emb.weight": rnd(3, 3),
    }
    mods = parse_modules(state)
    assert sorted(mods) == ["lora_unet_a", "lora_unet_b"]
    assert mods["lora_unet_a"].algo == "lora"
    assert mods["lora_unet_b"].algo == "loha"


def test_shape_fitting_errors() -> None:
    m = parse_module("m", {".lora_down.weight": rnd(2, 3), ".lora_up.weight": rnd(5, 2)})
    with pytest.raises(AdapterError, match="does not fit the target weight"):
        m.delta(shape=(3, 5))
    with pytest.raises(AdapterError, match="'m'"):
        m.apply(rnd(5, 4))


def test_needs_base_error_and_shape_checks() -> None:
    m = parse_module("o", {".oft_blocks": rnd(2, 3, 3)})
    with pytest.raises(AdapterError, match="depends on the base weight"):
        m.delta()
    with pytest.raises(AdapterError, match="cover 6 rows"):
        m.apply(rnd(5, 4))
    d = parse_module(
        "d", {".lora_down.weight": rnd(2, 3), ".lora_up.weight": rnd(5, 2), ".dora_scale": rnd(5, 1).abs()}
    )
    with pytest.raises(AdapterError, match="DoRA lora module depends"):
        d.delta()
    g = parse_module(
        "g",
        {".a1.weight": rnd(3, 2), ".a2.weight": rnd(2, 3), ".b1.weight": rnd(4, 2), ".b2.weight": rnd(2, 3)},
    )
    with pytest.raises(AdapterError, match="does not fit the weight"):
        g.apply(rnd(4, 5))


BAD = [
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 3)}, "rank mismatch"),
    ({".lora_down.weight": (2, 3)}, "only one LoRA factor"),
    ({".lora_up.weight": (5, 2)}, "only one LoRA factor"),
    ({".lora_mid.weight": (2, 2, 3, 3)}, "lora_mid without"),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5,)}, "lora_up must be 2\\+-d"),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2, 3, 3)}, "lora_up must be"),
    (
        {
            ".lora_down.weight": (2, 3, 3, 3),
            ".lora_up.weight": (5, 2, 1, 1),
            ".lora_mid.weight": (2, 2, 3, 3),
        },
        "1x1",
    ),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2), ".alpha": (2,)}, "alpha must be"),
    ({".lora_down.weight": (2, 3), ".lora_A.weight": (2, 3), ".lora_up.weight": (5, 2)}, "same role"),
    ({".lora_A.weight": (2, 3), ".lora_up.weight": (5, 2)}, "mixes LoRA spellings"),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2), ".hada_w1_a": (5, 2)}, "several algorithms"),
    ({".alpha": ()}, "no adapter factors"),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2), ".bogus": (1,)}, "unknown tensor suffix"),
    ({".hada_w1_a": (4, 2), ".hada_w1_b": (2, 3), ".hada_w2_a": (4, 2)}, "missing hada_w2_b"),
    (
        {".hada_w1_a": (4, 2), ".hada_w1_b": (2, 3), ".hada_w2_a": (4, 2), ".hada_w2_b": (3, 3)},
        "rank mismatch",
    ),
    (
        {".hada_w1_a": (4, 2, 1), ".hada_w1_b": (2, 3), ".hada_w2_a": (4, 2), ".hada_w2_b": (2, 3)},
        "must be 2-d",
    ),
    (
        {
            ".hada_w1_a": (2, 4),
            ".hada_w1_b": (2, 3),
            ".hada_w2_a": (2, 4),
            ".hada_w2_b": (2, 3),
            ".hada_t1": (2, 2, 3, 3),
        },
        "both hada_t1 and hada_t2",
    ),
    ({".lokr_w1": (2, 3)}, "missing lokr_w2_a, lokr_w2_b"),
    ({".lokr_w1": (2, 3), ".lokr_w1_a": (2, 1), ".lokr_w2": (2, 2)}, "both lokr_w1 and"),
    ({".lokr_w1": (2, 3), ".lokr_w2_a": (4, 2), ".lokr_w2_b": (3, 5)}, "rank mismatch"),
    ({".oft_blocks": (2, 3, 4)}, "square blocks"),
    ({".oft_blocks": (2, 3)}, "3-d \\(OFT\\) or 4-d"),
    ({".oft_blocks": (2, 3, 3, 3)}, "butterfly"),
    ({".oft_blocks": (2, 3, 3), ".rescale": (5, 1)}, "rescale"),
    ({".oft_diag": (2, 3, 3)}, "oft_diag"),
    ({".a1.weight": (3, 2), ".a2.weight": (2, 3), ".b1.weight": (4, 2)}, "missing b2"),
    (
        {".a1.weight": (3, 2), ".a2.weight": (3, 3), ".b1.weight": (4, 2), ".b2.weight": (2, 3)},
        "no known layout",
    ),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2), ".dora_scale": (4, 1)}, "DoRA magnitude"),
    ({".lora_down.weight": (2, 3), ".lora_up.weight": (5, 2), ".diff_b": (4,)}, "diff_b has 4 entries"),
    ({".w_norm": (4,), ".dora_scale": (4, 1)}, "norm-layer"),
    ({".diff": (4, 3), ".diff_b": (4, 1)}, "diff_b must be 1-d"),
    # empty tensors: nothing to apply, and no rank for alpha to divide
    ({".lora_down.weight": (0, 3), ".lora_up.weight": (5, 0)}, r"rank 0 \(empty factors: lora_down"),
    ({".lora_down.weight": (0, 3, 3, 3), ".lora_up.weight": (5, 0, 1, 1)}, "rank 0"),
    ({".lora_A.weight": (0, 3), ".lora_B.weight": (5, 0), ".alpha": ()}, "rank 0"),
    (
        {".lora_down.weight": (2, 0), ".lora_up.weight": (5, 2)},
        r"empty tensor\(s\): lora_down.weight \[2, 0\]",
    ),
    ({".hada_w1_a": (4, 0), ".hada_w1_b": (0, 3), ".hada_w2_a": (4, 2), ".hada_w2_b": (2, 3)}, "empty"),
    ({".diff": (0, 3)}, "empty tensor"),
]


@pytest.mark.parametrize(("shapes", "match"), BAD)
def test_errors_name_module_and_problem(shapes: dict[str, tuple[int, ...]], match: str) -> None:
    tensors = {k: torch.ones(s, dtype=F64) for k, s in shapes.items()}
    with pytest.raises(AdapterError, match=match) as info:
        parse_module("lora_unet_block_7", tensors)
    assert "lora_unet_block_7" in info.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_alpha(value: float) -> None:
    with pytest.raises(AdapterError, match="alpha is") as info:
        parse_module(
            "m", {".lora_down.weight": rnd(2, 3), ".lora_up.weight": rnd(5, 2), ".alpha": torch.tensor(value)}
        )
    assert info.value.hint


def test_non_float_factor_and_non_tensor() -> None:
    with pytest.raises(AdapterError, match="not a float"):
        parse_module(
            "m", {".lora_down.weight": torch.ones(2, 3, dtype=torch.int64), ".lora_up.weight": rnd(5, 2)}
        )
    with pytest.raises(AdapterError, match="not a tensor"):
        parse_module("m", {".lora_down.weight": [[1.0]], ".lora_up.weight": rnd(5, 2)})  # type: ignore[dict-item]


def test_a_hand_built_rank_0_lora_module_does_not_crash() -> None:
    """parse_module refuses rank 0; a LoraModule built directly still flattens its factors (no ``-1``)."""
    from lorasmith.adapters.lora import LoraModule
    from lorasmith.adapters.summary import analyze

    summary = analyze("m", {".lora_down.weight": (2, 3, 3, 3), ".lora_up.weight": (5, 2, 1, 1)})
    empty = {"down": torch.ones(0, 3, 3, 3, dtype=F64), "up": torch.ones(5, 0, 1, 1, dtype=F64)}
    module = LoraModule(summary, empty, None, 1.0)
    low = module.lowrank()
    assert low is not None and tuple(low.down.shape) == (0, 27)
    assert torch.equal(module.delta(dtype=F64), torch.zeros(5, 3, 3, 3, dtype=F64))
