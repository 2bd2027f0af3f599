"""Block-weight parsing and presets."""

from __future__ import annotations

import pytest

from lorasmith.ops.blocks import BlockWeightError, parse_blocks, preset_values
from lorasmith.registry import get


def test_counts_pick_notation() -> None:
    a = get("sdxl")
    assert parse_blocks(",".join(["1"] * 12), a).notation == "sdxl-12"
    assert parse_blocks(",".join(["1"] * 20), a).notation == "sdxl-20"
    assert parse_blocks("BASE=0,MID=0.5", a).weights["M00"] == 0.5
    with pytest.raises(BlockWeightError):
        parse_blocks("1,2,3", a)
    with pytest.raises(BlockWeightError):
        parse_blocks("NOPE=1", a)


def test_presets() -> None:
    labels = list(get("sd1").block_notations()["sd1-17"])
    v = preset_values("OUTALL", labels)
    assert v["BASE"] == 1 and v["IN01"] == 0 and v["OUT03"] == 1
    assert set(preset_values("ALL", labels).values()) == {1.0}
    with pytest.raises(BlockWeightError):
        preset_values("INS", list(get("flux").block_notations()["flux-61"]))
