"""Test support for lorasmith and its plugins: fixture factory, conformance suite, a toy family.

Plugin authors reuse it to test their own families::

    from lorasmith.testing import ArchitectureConformance, make_checkpoint, make_lora

    class TestMyFamily(ArchitectureConformance):
        arch_cls = MyArch

    def test_merge(tmp_path):
        base = make_checkpoint(MyArch(), tmp_path / "base.safetensors")
        lora = make_lora(MyArch(), tmp_path / "lora.safetensors", rank=4)
        expected = lora.expected_weights(base)   # float64, exact

The conformance suite, the views and the toy family never import torch; the fixture factory
(:mod:`lorasmith.testing.fixtures`, loaded on first use of one of its names) does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorasmith.testing.conformance import (
    CHECKS,
    ArchitectureConformance,
    ConformanceReport,
    check_aliases,
    check_architecture,
    check_blocks,
    check_checkpoint_detection,
    check_describe,
    check_identity,
    check_inventories,
    check_lora_detection,
    check_name_bounds,
    conformance_report,
)
from lorasmith.testing.toy import ToyArch
from lorasmith.testing.views import (
    DEFAULT_FACTOR,
    checkpoint_view,
    lora_shapes,
    lora_view,
    select_aliases,
    shrink_dim,
    shrink_shape,
    shrink_slice,
    shrink_target,
    sliced_shape,
    suffix_style,
    target_spec,
)

if TYPE_CHECKING:
    from lorasmith.testing.fixtures import (
        ALGOS,
        DTYPES,
        ExpectedModule,
        LoraFixture,
        lokr_factorization,
        make_checkpoint,
        make_lora,
        make_tuned,
        resolve_inventory,
        write_bad_files,
    )

# the fixture factory imports torch: load it on first use, so that the conformance suite does not
_FIXTURES = frozenset(
    {
        "ALGOS",
        "DTYPES",
        "ExpectedModule",
        "LoraFixture",
        "lokr_factorization",
        "make_checkpoint",
        "make_lora",
        "make_tuned",
        "resolve_inventory",
        "write_bad_files",
    }
)


def __getattr__(name: str) -> Any:
    """Load the fixture factory (and torch) on first use of one of its names."""
    if name in _FIXTURES:
        from lorasmith.testing import fixtures

        return getattr(fixtures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALGOS",
    "CHECKS",
    "DEFAULT_FACTOR",
    "DTYPES",
    "ArchitectureConformance",
    "ConformanceReport",
    "ExpectedModule",
    "LoraFixture",
    "ToyArch",
    "check_aliases",
    "check_architecture",
    "check_blocks",
    "check_checkpoint_detection",
    "check_describe",
    "check_identity",
    "check_inventories",
    "check_lora_detection",
    "check_name_bounds",
    "checkpoint_view",
    "conformance_report",
    "lokr_factorization",
    "lora_shapes",
    "lora_view",
    "make_checkpoint",
    "make_lora",
    "make_tuned",
    "resolve_inventory",
    "select_aliases",
    "shrink_dim",
    "shrink_shape",
    "shrink_slice",
    "shrink_target",
    "sliced_shape",
    "suffix_style",
    "target_spec",
    "write_bad_files",
]
