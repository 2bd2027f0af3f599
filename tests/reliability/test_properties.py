"""Property tests: the parsers of untrusted text and bytes raise nothing but lorasmith's own errors.

Covered: the safetensors header reader (random bytes, mutated valid files, random JSON headers), the LoRA
key parser, the weighted merge-spec parsers, the block-weight parser of every family and the resize
recipe parser. Example counts are kept small (CI budget); no deadline (the first examples import things).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasmith.archs.base import split_lora_key
from lorasmith.errors import InvalidFileError, LorasmithError
from lorasmith.io.header import DTYPE_BITS, read_header
from lorasmith.registry import get, get_registry

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props") / "f.safetensors"


def _read(path: Path, blob: bytes) -> None:
    """Write ``blob`` and read its header: a valid header or an InvalidFileError, nothing else."""
    path.write_bytes(blob)
    try:
        h = read_header(path)
    except InvalidFileError as exc:
        message = exc.message
        assert message and "\n" not in message and str(path) in message
        return
    for t in h.tensors.values():  # what the reader accepts, it has checked
        assert 0 <= t.start <= t.end <= h.data_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())


def _st(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


_VALID = _st(
    json.dumps(
        {
            "__metadata__": {"ss_network_dim": "4"},
            "a.lora_down.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "a.lora_up.weight": {"dtype": "F16", "shape": [3, 2], "data_offsets": [24, 36]},
            "a.alpha": {"dtype": "BF16", "shape": [], "data_offsets": [36, 38]},
        }
    ).encode(),
    bytes(range(38)),
)


@FAST
@given(blob=st.binary(max_size=300))
def test_header_reader_random_bytes(scratch: Path, blob: bytes) -> None:
    _read(scratch, blob)


@FAST
@given(
    header=st.binary(max_size=200),
    declared=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    data=st.binary(max_size=64),
)
def test_header_reader_random_header(scratch: Path, header: bytes, declared: int | None, data: bytes) -> None:
    _read(scratch, _st(header, data, declared))


@FAST
@given(
    cuts=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6),
    truncate=st.one_of(st.none(), st.integers(0, len(_VALID))),
    extra=st.binary(max_size=16),
)
def test_header_reader_mutated_valid_file(
    scratch: Path, cuts: list[tuple[int, int]], truncate: int | None, extra: bytes
) -> None:
    blob = bytearray(_VALID)
    for pos, value in cuts:
        blob[pos] = value
    data = bytes(blob[:truncate]) if truncate is not None else bytes(blob) + extra
    _read(scratch, data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_DTYPE = st.sampled_from([*DTYPE_BITS, "f32", "Q7", ""]) | _JSON
_INT = st.integers(-4, 40) | st.integers(-(2**66), 2**66)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _DTYPE,
        "shape": st.lists(_INT, max_size=3) | _JSON,
        "data_offsets": st.lists(_INT, max_size=3) | _JSON,
    },
)


@FAST
@given(
    entries=st.dictionaries(st.text(max_size=10), _ENTRY | _JSON, max_size=4),
    metadata=st.one_of(st.none(), _JSON, st.dictionaries(st.text(max_size=5), st.text(max_size=5) | _JSON)),
    data=st.binary(max_size=48),
)
def test_header_reader_random_json(
    scratch: Path, entries: dict[str, Any], metadata: Any, data: bytes
) -> None:
    header: dict[str, Any] = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    _read(scratch, _st(json.dumps(header, allow_nan=True).encode(), data))


# ------------------------------------------------------------------------------------------ key parser
_SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".hada_w1_a", ".diff", ""]


@FAST
@given(
    key=st.text(max_size=60) | st.builds(lambda a, b: a + b, st.text(max_size=30), st.sampled_from(_SUFFIXES))
)
def test_split_lora_key(key: str) -> None:
    parts = split_lora_key(key)
    if parts is not None:
        name, suffix = parts
        assert name and name + suffix == key


@FAST
@given(
    keys=st.lists(
        st.text(max_size=30) | st.sampled_from(["a.lora_up.weight", "a.alpha", ".alpha"]), max_size=20
    )
)
def test_lora_modules(keys: list[str]) -> None:
    from lorasmith.archs.base import lora_modules

    grouped = lora_modules(keys)
    for name, parts in grouped.items():
        for suffix, key in parts.items():
            assert key == name + suffix and key in keys


# ------------------------------------------------------------------------------------ merge-spec parsers
_SPEC = st.text(alphabet=st.sampled_from(list("ab.:,-+0123456789eEinfa_ /\\")), max_size=30) | st.text(
    max_size=30
)


@FAST
@given(text=_SPEC)
def test_parse_merge_spec(text: str) -> None:
    from lorasmith.ops.loralib import parse_merge_spec

    try:
        items = parse_merge_spec(text)
    except LorasmithError:
        return
    assert all(path and math.isfinite(w) for path, w in items)


@FAST
@given(text=_SPEC)
def test_parse_weighted(text: str) -> None:
    from lorasmith.ops._merge_lora import parse_weighted

    try:
        _path, ratio = parse_weighted(text)
    except LorasmithError:
        return
    assert ratio is None or math.isfinite(ratio)


# ------------------------------------------------------------------------------------ block weights
_BLOCKS = st.text(
    alphabet=st.sampled_from(list("0123456789.,:=-+eE INOUTMIDLBWALLDBSBFULLHALFin_outmidx")), max_size=60
) | st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30).map(
    lambda xs: ",".join(repr(x) for x in xs)
)


@pytest.mark.parametrize("arch_id", sorted(get_registry().archs()))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_BLOCKS | st.text(max_size=40))
def test_parse_blocks(arch_id: str, spec: str) -> None:
    from lorasmith.ops.blocks import parse_blocks

    try:
        weights = parse_blocks(spec, get(arch_id))
    except LorasmithError:
        return
    assert weights is not None


# --------------------------------------------------------------------------------------- resize recipes
_KEYS = ["fro_ckpt", "spn_ckpt", "spn_lora", "fro_lora", "subspace", "params", "thr", "size", "rescale", "x"]
_RECIPE = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(_KEYS) | st.text(max_size=5),
            st.sampled_from(["=", "", "=="]),
            st.sampled_from(["1", "-3.5", "0", "nan", "inf", "1e308", "-1e308", "", "x", "1_0"])
            | st.text(max_size=4),
        ).map("".join),
        min_size=0,
        max_size=4,
    ).map(",".join),
    min_size=1,
    max_size=3,
).map(":".join)


@pytest.mark.skipif(importlib.util.find_spec("lorasmith.ops.resize") is None, reason="no resize yet")
@FAST
@given(text=_RECIPE | st.text(max_size=40))
def test_parse_recipes(text: str) -> None:
    from lorasmith.ops.resize import parse_recipes

    try:
        recipes = parse_recipes(text)
    except LorasmithError:
        return
    for r in recipes:
        assert all(math.isfinite(w) for w in r.weights.values()), (text, r)
        assert (r.threshold is None) != (r.size_mib is None)
