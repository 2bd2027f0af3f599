"""Tests of lorasmith.io.hashes against the kohya/A1111 reference algorithm."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from lorasmith.errors import InvalidFileError
from lorasmith.io.hashes import (
    EMPTY_LEGACY_HASH,
    autov2_hash,
    data_sha256,
    describe_hash,
    file_sha256,
    sshs_hashes_of_file,
)
from lorasmith.io.layout import plan_layout, serialize_prefix


def reference_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's precalculate_safetensors_hashes: serialise with only ss_* metadata, then hash."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(tensors, metadata=ss)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n :]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def lora(big: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = 20000 if big else 16
    return {
        "lora_unet_x.lora_down.weight": torch.randn(8, n, generator=g).half(),
        "lora_unet_x.lora_up.weight": torch.randn(n, 8, generator=g).half(),
        "lora_unet_x.alpha": torch.tensor(8.0),
        "lora_te_y.lora_down.weight": torch.randn(4, n * 10, generator=g).bfloat16(),
        "lora_te_y.alpha": torch.tensor(4.0, dtype=torch.bfloat16),
    }


META = {
    "ss_network_dim": "8",
    "ss_network_alpha": "8",
    "ss_tag_frequency": json.dumps({"1_x": {"tag": 3}}),
    "modelspec.title": "not an ss key",
    "sshs_model_hash": "0xabc",
}


@pytest.mark.parametrize("big", [False, True])
def test_sshs_hashes_match_reference(tmp_path: Path, big: bool) -> None:
    tensors = lora(big)
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata=META)
    assert (p.stat().st_size > 0x110000) is big
    model, legacy = sshs_hashes_of_file(p)
    assert (model, legacy) == reference_hashes(tensors, META)
    assert (legacy == EMPTY_LEGACY_HASH) is not big
    assert EMPTY_LEGACY_HASH == "e3b0c442"


def test_window_straddles_header_and_data(tmp_path: Path) -> None:
    # one ss_ key (deterministic order) whose header ends inside the legacy window
    tensors = {"w": torch.randn(100_000)}
    meta = {"ss_tag_frequency": "x" * (0x100000 + 0x8000)}
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata=meta)
    assert sshs_hashes_of_file(p) == reference_hashes(tensors, meta)


def test_window_partly_past_the_end(tmp_path: Path) -> None:
    tensors = {"w": torch.randn((0x100000 + 0x4000) // 4)}
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p))
    assert p.stat().st_size < 0x110000
    assert sshs_hashes_of_file(p) == reference_hashes(tensors, {})


def test_non_canonical_file_hashes_like_its_canonical_rewrite(tmp_path: Path) -> None:
    """A file laid out in another order, with holes, hashes as kohya would hash its tensors."""
    g = torch.Generator().manual_seed(2)
    tensors = {
        "a": torch.randn(300, 700, generator=g).half(),
        "b": torch.randn(200, 600, generator=g),
        "c": torch.arange(10),
        "d": torch.zeros(0),
    }
    meta = {"ss_x": "1", "other": "2"}
    # hand-written layout: name order, a 16-byte hole after every tensor
    header: dict[str, object] = {"__metadata__": meta}
    data = b""
    for name in sorted(tensors):
        t = tensors[name]
        raw = bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        dtype = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw + b"\xee" * 16
    hb = json.dumps(header).encode()
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    assert sshs_hashes_of_file(p) == reference_hashes(tensors, meta)


def test_layout_prefix_matches_reference() -> None:
    tensors = lora(False)
    layout = plan_layout(
        (k, {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[v.dtype], tuple(v.shape))
        for k, v in tensors.items()
    )
    ref = save(tensors, metadata={"ss_a": "1"})
    prefix = serialize_prefix(layout, {"ss_a": "1"})
    assert ref.startswith(prefix)
    assert len(ref) == len(prefix) + layout[-1].end


def test_file_hashes(tmp_path: Path) -> None:
    tensors = lora(False)
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata={"a": "b"})
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert data_sha256(p) == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert file_sha256(p) == hashlib.sha256(raw).hexdigest()
    assert autov2_hash(p) == hashlib.sha256(raw).hexdigest()[:10]


def test_hash_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidFileError, match="no such file"):
        sshs_hashes_of_file(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidFileError, match="cannot read"):
        file_sha256(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(InvalidFileError):
        data_sha256(bad)


def test_describe_hash() -> None:
    assert "lycoris-style 0x value" in describe_hash("0x1234abcd")
    assert "sshs" in describe_hash("ab" * 32)
    assert "unrecognised" in describe_hash("hello")
    assert describe_hash("  ") == "empty"
