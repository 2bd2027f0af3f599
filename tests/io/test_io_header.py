"""Tests of lorasmith.io.header: the torch-free header reader and its validation."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from lorasmith.archs.base import KeyView
from lorasmith.errors import InvalidFileError
from lorasmith.io import DTYPE_SIZES, Header, TensorInfo, read_header
from lorasmith.io.header import DTYPE_BITS, DTYPE_ORDER, MAX_HEADER_SIZE

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def raw_file(
    path: Path, header: dict[str, Any] | str | bytes, data: bytes = b"", n: int | None = None
) -> Path:
    """Write a safetensors-like file by hand: length prefix, header bytes, data."""
    if isinstance(header, dict):
        hb = json.dumps(header).encode()
    elif isinstance(header, str):
        hb = header.encode()
    else:
        hb = header
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def test_import_is_torch_free() -> None:
    code = (
        "import sys, lorasmith.io, lorasmith.io.header, lorasmith.io.layout, lorasmith.io.hashes;"
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dtype_tables() -> None:
    assert DTYPE_SIZES["BF16"] == 2
    assert DTYPE_SIZES["F8_E4M3"] == 1
    assert DTYPE_SIZES["I64"] == 8
    assert "F4" not in DTYPE_SIZES  # sub-byte: only in DTYPE_BITS
    assert DTYPE_BITS["F4"] == 4
    assert set(DTYPE_ORDER) == set(DTYPE_BITS)


def test_valid_file(tmp_path: Path) -> None:
    hdr = {
        "__metadata__": {"ss_network_dim": "4", "format": "pt"},
        "b": entry("F32", [2, 2], 0, 16),
        "a": entry("F16", [3], 16, 22),
        "c": entry("I8", [], 22, 23),
    }
    p = raw_file(tmp_path / "x.safetensors", hdr, bytes(23))
    h = read_header(p)
    assert isinstance(h, Header)
    assert h.path == p
    assert h.metadata == {"ss_network_dim": "4", "format": "pt"}
    assert list(h.tensors) == ["b", "a", "c"]
    assert h.tensors["a"] == TensorInfo("a", "F16", (3,), 16, 22)
    assert h.tensors["a"].nbytes == 6
    assert h.tensors["a"].numel == 3
    assert h.tensors["c"].numel == 1
    assert h.header_len == len(json.dumps(hdr).encode())
    assert h.data_offset == 8 + h.header_len
    assert h.file_size == h.data_offset + 23
    assert h.data_size == 23
    assert h.data_end == 23


def test_tensors_in_offset_order_and_keyview(tmp_path: Path) -> None:
    hdr = {"z": entry("U8", [2], 4, 6), "y": entry("U8", [4], 0, 4), "e": entry("U8", [0], 6, 6)}
    h = read_header(raw_file(tmp_path / "x.safetensors", hdr, bytes(6)))
    assert list(h.tensors) == ["y", "z", "e"]
    # the KeyView protocol of lorasmith.archs.base: names -> .shape / .dtype, and .metadata
    view: KeyView = h  # checked by mypy
    assert {k: (v.shape, v.dtype) for k, v in view.tensors.items()}["z"] == ((2,), "U8")
    assert dict(view.metadata) == {}


def test_lenient_layouts(tmp_path: Path) -> None:
    # holes between tensors, a trailing gap, zero-size tensors sharing an offset, null metadata
    hdr = {
        "__metadata__": None,
        "a": entry("U8", [2], 0, 2),
        "b": entry("U8", [2], 4, 6),
        "e1": entry("F32", [0, 5], 6, 6),
        "e2": entry("F32", [0], 6, 6),
    }
    h = read_header(raw_file(tmp_path / "x.safetensors", hdr, bytes(10)))
    assert h.metadata == {}
    assert h.data_size == 10
    assert h.data_end == 6


def test_empty_header_object(tmp_path: Path) -> None:
    h = read_header(raw_file(tmp_path / "x.safetensors", "{}      "))
    assert h.tensors == {}
    assert h.data_size == 0


def test_large_sparse_file_reads_fast(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    p = raw_file(tmp_path / "big.safetensors", {"w": entry("BF16", [size // 2], 0, size)})
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size + size)
    h = read_header(p)
    assert h.tensors["w"].nbytes == size
    assert h.data_size == size


# ------------------------------------------------------------------------------------------ path errors
def expect_error(path: Path, *fragments: str) -> InvalidFileError:
    with pytest.raises(InvalidFileError) as info:
        read_header(path)
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg
    assert err.hint
    return err


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_directory(tmp_path: Path) -> None:
    expect_error(tmp_path, "is a directory")


@pytest.mark.skipif(IS_ROOT or sys.platform == "win32", reason="root reads everything")
def test_permission_denied(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", "{}      ")
    p.chmod(0)
    try:
        expect_error(p, "permission denied")
    finally:
        p.chmod(0o644)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    expect_error(fifo, "not a regular file")


def test_permission_denied_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    p = raw_file(tmp_path / "x.safetensors", "{}      ")
    monkeypatch.setattr("lorasmith.io.header.open", deny, raising=False)
    expect_error(p, "permission denied")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_loop_and_broken_link(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    expect_error(a, "symbolic link loop")
    c = tmp_path / "c.safetensors"
    c.symlink_to(tmp_path / "gone")
    expect_error(c, "broken symbolic link")


# ----------------------------------------------------------------------------------- format errors
def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"")
    expect_error(p, "file is empty")


def test_short_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    expect_error(p, "only 3 bytes")


def test_header_past_end_truncated(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", '{"a":1}', n=4000)
    expect_error(p, "truncated safetensors file", "4000")


def test_header_past_end_not_json(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", "hello world", n=4000)
    expect_error(p, "not a safetensors file", "past the end")


def test_header_too_large(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", '{"a":1}', n=MAX_HEADER_SIZE + 1)
    expect_error(p, "not a safetensors file", "100 MB limit")


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(bytes(range(7, 255)) * 10)
    expect_error(p, "not a safetensors file")


def test_zip_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "model.ckpt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    expect_error(p, "not a safetensors file", "zip archive")


def test_pickle_file(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(pickle.dumps({"state_dict": list(range(100))}, protocol=2))
    expect_error(p, "not a safetensors file", "pickle")


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hello": "world", "numbers": list(range(50))}))
    expect_error(p, "not a safetensors file", "text file")


def test_header_not_object(tmp_path: Path) -> None:
    expect_error(
        raw_file(tmp_path / "x.safetensors", "[1, 2, 3]"), "not a safetensors file", "not a JSON object"
    )


def test_header_blank(tmp_path: Path) -> None:
    expect_error(raw_file(tmp_path / "x.safetensors", "        "), "header is empty")


def test_header_not_utf8(tmp_path: Path) -> None:
    expect_error(raw_file(tmp_path / "x.safetensors", b'{"a\xff": 1}'), "not valid UTF-8")


def test_header_not_json(tmp_path: Path) -> None:
    expect_error(raw_file(tmp_path / "x.safetensors", '{"a": }'), "not valid JSON")


def test_duplicate_keys(tmp_path: Path) -> None:
    e = json.dumps(entry("U8", [1], 0, 1))
    p = raw_file(tmp_path / "x.safetensors", f'{{"a": {e}, "a": {e}}}', b"\x00")
    expect_error(p, "'a' twice")
    p = raw_file(tmp_path / "y.safetensors", '{"__metadata__": {"k": "1", "k": "2"}}')
    expect_error(p, "'k' twice")


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ([1, 2], "__metadata__ is a JSON array"),
        ("x", "__metadata__ is a JSON string"),
        ({"ok": "1", "ss_network_dim": 4}, "'ss_network_dim' is a JSON number"),
        ({"nested": {"a": "b"}}, "'nested' is a JSON object"),
        ({"flag": True}, "'flag' is a JSON boolean"),
        ({"none": None}, "'none' is a JSON null"),
    ],
)
def test_bad_metadata(tmp_path: Path, meta: Any, fragment: str) -> None:
    expect_error(raw_file(tmp_path / "x.safetensors", {"__metadata__": meta}), fragment)


@pytest.mark.parametrize(
    ("tensor", "data", "fragment"),
    [
        ([1, 2], 0, "entry is a JSON array"),
        ({"shape": [1], "data_offsets": [0, 1]}, 1, "no 'dtype'"),
        ({"dtype": "U8", "data_offsets": [0, 1]}, 1, "no 'shape'"),
        ({"dtype": "U8", "shape": [1]}, 1, "no 'data_offsets'"),
        (entry("U8", [1], 0, 1) | {"dtype": 8}, 1, "dtype is a JSON number"),
        (entry("F12", [1], 0, 1), 1, "unknown dtype 'F12'"),
        (entry("f32", [1], 0, 4), 4, "unknown dtype 'f32'"),
        (entry("U8", [1], 0, 1) | {"shape": "1"}, 1, "is not a list of integers"),
        (entry("U8", [1], 0, 1) | {"shape": [1.0]}, 1, "is not a list of integers"),
        (entry("U8", [1], 0, 1) | {"shape": [True]}, 1, "is not a list of integers"),
        (entry("U8", [-1, -2], 0, 2), 2, "negative dimension"),
        (entry("U8", [1], 0, 1) | {"data_offsets": [0]}, 1, "is not a pair of integers"),
        (entry("U8", [1], 0, 1) | {"data_offsets": [0, "1"]}, 1, "is not a pair of integers"),
        (entry("U8", [1], 0, 1) | {"data_offsets": [1, 0]}, 1, "are not increasing"),
        (entry("U8", [1], 0, 1) | {"data_offsets": [-1, 0]}, 1, "are not increasing"),
        (entry("F32", [2, 3], 0, 20), 24, "span 20 bytes but shape [2, 3] of F32 needs 24"),
        (entry("BF16", [4], 0, 8), 4, "data ends at byte 8 of the data section, which has only 4 bytes"),
        (entry("F4", [3], 0, 2), 2, "do not fill a whole number of bytes"),
    ],
)
def test_bad_tensor_entry(tmp_path: Path, tensor: Any, data: int, fragment: str) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": tensor}, bytes(data))
    err = expect_error(p, "tensor 'w'", fragment)
    assert err.hint


def test_overlap(tmp_path: Path) -> None:
    hdr = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    expect_error(raw_file(tmp_path / "x.safetensors", hdr, bytes(12)), "'a' [0, 8) and 'b' [4, 12) overlap")
    # an entry nested inside a bigger one, after an unrelated later one
    hdr = {"a": entry("U8", [10], 0, 10), "b": entry("U8", [2], 2, 4), "c": entry("U8", [2], 10, 12)}
    expect_error(raw_file(tmp_path / "y.safetensors", hdr, bytes(12)), "overlap")


def test_sub_byte_dtypes(tmp_path: Path) -> None:
    hdr = {"f4": entry("F4", [4], 0, 2), "f6": entry("F6_E2M3", [4], 2, 5)}
    h = read_header(raw_file(tmp_path / "x.safetensors", hdr, bytes(5)))
    assert h.tensors["f4"].nbytes == 2
    assert h.tensors["f6"].nbytes == 3
