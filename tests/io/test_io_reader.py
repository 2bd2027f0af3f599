"""Tests of lorasmith.io.reader: lazy per-tensor reads."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasmith.errors import InvalidFileError, NotAvailableError
from lorasmith.io.dtypes import safetensors_dtype, torch_dtype
from lorasmith.io.reader import TensorFile, load_all, open_tensors


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 4
    out: dict[str, torch.Tensor] = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2),
        "i64": (base * 1e6).long(),
        "i32": base.int(),
        "i16": base.short(),
        "i8": base.to(torch.int8),
        "u8": base.abs().to(torch.uint8),
        "bool": base > 0,
        "c64": torch.complex(base, -base),
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "empty3": torch.zeros(2, 0, 3),
    }
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            out[name] = base.abs().to(torch.int32).to(getattr(torch, name))
    if hasattr(torch, "float8_e8m0fnu"):
        out["f8e8m0"] = torch.full((4,), 2.0).to(torch.float8_e8m0fnu)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, also for dtypes without comparison kernels (fp8) and for 0-d tensors."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(b.reshape(-1).view(torch.uint8).numpy())


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    p = tmp_path / "ref.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    with open_tensors(p) as f:
        assert isinstance(f, TensorFile)
        assert f.path == p
        assert f.metadata == {"format": "pt"}
        assert len(f) == len(tensors)
        assert set(f.keys()) == set(tensors)
        assert list(f) == f.keys()
        assert "f32" in f
        assert "nope" not in f
        for name, ref in tensors.items():
            got = f.get(name)
            assert same(got, ref), name
            assert got.is_contiguous()
            assert f[name].dtype == ref.dtype
            assert f.info(name).dtype == safetensors_dtype(ref.dtype)
    assert load_all(p).keys() == tensors.keys()
    assert all(same(load_all(p)[k], v) for k, v in tensors.items())


def test_f4_round_trip(tmp_path: Path) -> None:
    t = torch.randint(0, 255, (3, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    p = tmp_path / "f4.safetensors"
    save_file({"w": t}, str(p))
    with open_tensors(p) as f:
        assert f.info("w").shape == (3, 8)
        got = f.get("w")
    assert got.dtype == torch.float4_e2m1fn_x2
    assert same(got, t)


def test_tensors_own_their_memory(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.arange(4)}, str(p))
    with open_tensors(p) as f:
        a = f.get("a")
        b = f.get("b")
        a2 = f.get("a")
    a += 1  # writable, and valid after the file is closed
    assert torch.equal(a2, torch.arange(10.0))
    assert torch.equal(b, torch.arange(4))
    assert a.untyped_storage().data_ptr() != a2.untyped_storage().data_ptr()
    assert a.untyped_storage().nbytes() == 40


def test_concurrent_reads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{i}": torch.randn(64, 64) for i in range(40)}
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p))
    with open_tensors(p) as f, ThreadPoolExecutor(8) as pool:
        got = dict(zip(tensors, pool.map(f.get, tensors)))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_missing_tensor(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(p))
    with open_tensors(p) as f, pytest.raises(KeyError, match="no tensor named 'b'"):
        f.get("b")


def test_bad_file_raises_invalid_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage!garbage!")
    with pytest.raises(InvalidFileError, match="not a safetensors file"):
        open_tensors(p)
    with pytest.raises(InvalidFileError, match="no such file"):
        load_all(tmp_path / "missing.safetensors")


def test_read_after_close(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(p))
    f = open_tensors(p)
    f.close()
    with pytest.raises(InvalidFileError, match="file is closed"):
        f.get("a")


def test_file_truncated_after_open(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1000)}, str(p))
    with open_tensors(p) as f:
        os.truncate(p, f.header.data_offset + 100)
        with pytest.raises(InvalidFileError, match="file ends inside tensor 'a'"):
            f.get("a")


def write_raw(path: Path, header: dict[str, object], data: bytes) -> Path:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def test_dtype_torch_cannot_hold(tmp_path: Path) -> None:
    p = write_raw(
        tmp_path / "x.safetensors",
        {
            "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]},
            "f4odd": {"dtype": "F4", "shape": [2, 3], "data_offsets": [3, 6]},
        },
        bytes(6),
    )
    with open_tensors(p) as f:
        with pytest.raises(NotAvailableError, match="F6_E2M3"):
            f.get("f6")
        with pytest.raises(NotAvailableError, match="even last dimension"):
            f.get("f4odd")


def test_holes_are_skipped(tmp_path: Path) -> None:
    p = write_raw(
        tmp_path / "x.safetensors",
        {
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "U8", "shape": [2], "data_offsets": [5, 7]},
        },
        bytes([1, 2, 0, 0, 0, 3, 4, 9]),
    )
    got = load_all(p)
    assert got["a"].tolist() == [1, 2]
    assert got["b"].tolist() == [3, 4]


def test_dtype_mapping() -> None:
    assert torch_dtype("BF16") is torch.bfloat16
    assert torch_dtype("F8_E4M3") is torch.float8_e4m3fn
    assert safetensors_dtype(torch.float8_e5m2) == "F8_E5M2"
    assert safetensors_dtype(torch.bool) == "BOOL"
    with pytest.raises(ValueError, match="cannot store"):
        safetensors_dtype(torch.complex128)
    with pytest.raises(NotAvailableError):
        torch_dtype("F6_E3M2")


def test_matches_reference_loader(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(64, 32).bfloat16(), "b": torch.randn(32)}
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p))
    ref = load_file(str(p))
    got = load_all(p)
    assert all(same(got[k], ref[k]) for k in tensors)


def test_reopen_with_parsed_header_skips_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header from an earlier read_header reopens the file without parsing it again."""
    from lorasmith.io import reader

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    with open_tensors(path) as first:
        header = first.header

    def no_parse(*_a: object, **_k: object) -> None:
        raise AssertionError("header parsed again")

    monkeypatch.setattr(reader, "read_header", no_parse)
    with open_tensors(path, header) as again:
        assert torch.equal(again.get("w"), torch.arange(6.0).reshape(2, 3))


def test_reopen_refuses_a_file_that_changed_size(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    with open_tensors(path) as first:
        header = first.header
    save_file({"w": torch.zeros(8)}, str(path))
    with pytest.raises(InvalidFileError, match="changed while in use"):
        open_tensors(path, header)


def test_lora_modules_reuse_the_parsed_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a LoRA module by module (a bake) must not parse the LoRA's header once per module."""
    from lorasmith.io import reader
    from lorasmith.ops._merge_lora import load_lora
    from lorasmith.registry import get_registry
    from lorasmith.testing import make_lora

    path = tmp_path / "l.safetensors"
    make_lora(get_registry().get("sd1"), path, rank=2, limit=5, seed=0)
    lora = load_lora(path, 1.0)
    calls: list[int] = []
    real = reader.read_header

    def counted(*a: object, **k: object) -> object:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "read_header", counted)
    for name in lora.names:
        lora.read(name)
    assert len(lora.names) == 5
    assert calls == []
