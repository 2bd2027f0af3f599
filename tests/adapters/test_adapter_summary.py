"""The torch-free header summary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorasmith.adapters import parse_module
from lorasmith.adapters.summary import ModuleSummary, module_summary
from lorasmith.archs.base import TensorSpec
from lorasmith.errors import AdapterError


def test_summary_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from lorasmith.adapters.summary import module_summary\n"
        "import lorasmith.adapters\n"
        "s = module_summary('m', {'.lora_down.weight': ((4, 8), 'F16'), '.lora_up.weight': ((16, 4), 'F16'),"
        " '.alpha': ((), 'F32')})\n"
        "assert s.algo == 'lora' and s.rank == 4, s\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lora_summary_fields() -> None:
    s = module_summary(
        "lora_unet_x",
        {
            ".lora_down.weight": ((4, 320, 3, 3), "F16"),
            ".lora_up.weight": ((640, 4, 1, 1), "F16"),
            ".alpha": ((), "F32"),
            ".dora_scale": ((640, 1, 1, 1), "F16"),
        },
    )
    assert isinstance(s, ModuleSummary)
    assert (s.algo, s.rank, s.has_alpha, s.has_dora, s.dora_axis) == ("lora", 4, True, True, 0)
    assert (s.out_features, s.in_features, s.kernel) == (640, 320, (3, 3))
    assert s.delta_shape == (640, 320, 3, 3)
    assert s.needs_base
    assert s.spelling == "kohya"
    assert s.tensor_bytes == 2 * (4 * 320 * 9 + 640 * 4 + 640) + 4
    assert s.shapes[".lora_down.weight"] == (4, 320, 3, 3)


@pytest.mark.parametrize(
    ("entries", "algo", "rank"),
    [
        ({".hada_w1_a": (8, 2), ".hada_w1_b": (2, 6), ".hada_w2_a": (8, 2), ".hada_w2_b": (2, 6)}, "loha", 2),
        ({".lokr_w1": (2, 2), ".lokr_w2_a": (4, 3), ".lokr_w2_b": (3, 5)}, "lokr", 3),
        ({".lokr_w1": (2, 2), ".lokr_w2": (4, 5)}, "lokr", None),
        ({".diff": (8, 6), ".diff_b": (8,)}, "full", None),
        ({".w_norm": (8,), ".b_norm": (8,)}, "norm", None),
        ({".oft_blocks": (2, 4, 4)}, "oft", None),
        ({".oft_blocks": (2, 4, 2, 2)}, "boft", None),
        (
            {".a1.weight": (6, 2), ".a2.weight": (2, 6), ".b1.weight": (8, 2), ".b2.weight": (2, 6)},
            "glora",
            2,
        ),
        ({".lora_A.weight": (3, 6), ".lora_B.weight": (8, 3)}, "lora", 3),
    ],
)
def test_summary_agrees_with_parse(entries: dict[str, tuple[int, ...]], algo: str, rank: int | None) -> None:
    s = module_summary("m", {k: TensorSpec(v, "BF16") for k, v in entries.items()})
    assert s.algo == algo
    assert s.rank == rank
    assert s.out_features == 8
    m = parse_module("m", {k: torch.randn(v, dtype=torch.bfloat16) for k, v in entries.items()})
    assert m.summary.algo == s.algo
    assert m.summary.delta_shape == s.delta_shape
    assert m.tensor_bytes == s.tensor_bytes
    assert m.out_features == s.out_features
    assert m.needs_base == s.needs_base


def test_summary_errors_and_unknown_dtype() -> None:
    with pytest.raises(AdapterError, match="rank mismatch"):
        module_summary("m", {".lora_down.weight": ((4, 8), "F16"), ".lora_up.weight": ((16, 3), "F16")})
    s = module_summary("m", {".lora_down.weight": ((4, 8), "F16"), ".lora_up.weight": ((16, 4), "X9")})
    assert s.tensor_bytes is None


def test_rank_0_is_refused_from_the_header_alone() -> None:
    """The header-level check and parse_module agree: a rank-0 module is an error, with a hint."""
    with pytest.raises(AdapterError, match=r"adapter module 'm': rank 0") as info:
        module_summary("m", {".lora_down.weight": ((0, 8), "F16"), ".lora_up.weight": ((16, 0), "F16")})
    assert info.value.hint
    with pytest.raises(AdapterError, match="rank 0"):
        parse_module("m", {".lora_down.weight": torch.ones(0, 8), ".lora_up.weight": torch.ones(16, 0)})


@pytest.mark.parametrize(("shape", "axis"), [((320,), 0), ((1, 320, 1, 1), 0)])
def test_peft_dora_magnitude_is_per_output_row(shape: tuple[int, ...], axis: int) -> None:
    """PEFT's Conv2d magnitude [1, out, 1, 1] is per row even when ``in`` is a multiple of ``out`` (where
    its shape alone would also fit the per-column [1, in] reading)."""
    s = module_summary(
        "unet.conv",
        {
            ".lora_A.weight": ((4, 640, 3, 3), "F32"),
            ".lora_B.weight": ((320, 4, 1, 1), "F32"),
            ".lora_magnitude_vector": (shape, "F32"),
        },
    )
    assert s.has_dora and s.dora_axis == axis
    with pytest.raises(AdapterError, match="rows"):
        module_summary(
            "unet.conv",
            {
                ".lora_A.weight": ((4, 640, 3, 3), "F32"),
                ".lora_B.weight": ((320, 4, 1, 1), "F32"),
                ".lora_magnitude_vector": ((1, 640, 1, 1), "F32"),
            },
        )
