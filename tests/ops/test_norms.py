"""The base-norm cache: values, content identity (not path), hits and misses, info and clear."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorasmith.ops.norms as norms
from lorasmith.errors import LorasmithError
from lorasmith.ops.norms import (
    cache_info,
    clear_cache,
    compute_norms,
    content_identity,
    default_cache_dir,
    load_norms,
    weight_norms,
)


def _base(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "a.weight": torch.randn(12, 20, generator=g, dtype=torch.float64),
        "qkv.weight": torch.randn(30, 8, generator=g, dtype=torch.float64),
        "conv.weight": torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64),
    }
    save_file(tensors, str(path), metadata={"note": "base"})
    return tensors


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


KEYS = [("a.weight", None), ("qkv.weight", (0, 10, 10)), ("conv.weight", None)]


def test_norm_values(tmp_path: Path) -> None:
    tensors = _base(tmp_path / "b.safetensors")
    report = compute_norms(tmp_path / "b.safetensors", KEYS, device="cpu", cache_dir=tmp_path / "c")
    for key, sl in KEYS:
        w = tensors[key]
        if sl is not None:
            w = w.narrow(*sl)
        w = w.reshape(w.shape[0], -1)
        got = report.norms[(key, sl)]
        assert got.spectral == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-6)
        assert got.frobenius == pytest.approx(float(w.norm()), rel=1e-12)
    wide = torch.randn(3, 50, dtype=torch.float64)
    assert weight_norms(wide).spectral == pytest.approx(
        float(torch.linalg.matrix_norm(wide, ord=2)), rel=1e-6
    )


def test_cache_is_keyed_by_content_not_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    base = tmp_path / "b.safetensors"
    _base(base)
    first = compute_norms(base, KEYS, device="cpu", cache_dir=cache)
    assert (first.hits, first.computed) == (0, 3)
    assert first.cache_file is not None and first.cache_file.parent == cache

    # a copy elsewhere, under another name: every norm comes from the cache, nothing is computed
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(base, copy)
    monkeypatch.setattr(norms, "weight_norms", lambda w: pytest.fail("computed instead of cached"))
    second = compute_norms(copy, KEYS, device="cpu", cache_dir=cache)
    assert (second.hits, second.computed) == (3, 0)
    assert second.norms == first.norms
    assert content_identity(copy) == content_identity(base)
    monkeypatch.undo()

    # one byte of data changed: a new identity and a miss
    _flip_byte(copy)
    assert content_identity(copy) != content_identity(base)
    third = compute_norms(copy, KEYS, device="cpu", cache_dir=cache)
    assert (third.hits, third.computed) == (0, 3)
    assert len(cache_info(cache)) == 2


def test_header_change_changes_identity(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = _base(a)
    save_file(tensors, str(b), metadata={"note": "other"})
    assert content_identity(a) != content_identity(b)


def test_sampled_identity_of_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norms, "FULL_HASH_LIMIT", 256)
    monkeypatch.setattr(norms, "SAMPLE_SIZE", 64)
    monkeypatch.setattr(norms, "SAMPLE_COUNT", 4)
    a = tmp_path / "a.safetensors"
    _base(a)
    ident = content_identity(a)
    b = tmp_path / "b.safetensors"
    shutil.copyfile(a, b)
    assert content_identity(b) == ident
    _flip_byte(b, 1)  # the last byte is always in the last sample
    assert content_identity(b) != ident


def test_entries_accumulate_and_load(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = tmp_path / "b.safetensors"
    _base(base)
    compute_norms(base, KEYS[:1], device="cpu", cache_dir=cache)
    report = compute_norms(base, KEYS, device="cpu", cache_dir=cache)
    assert (report.hits, report.computed) == (1, 2)
    loaded = load_norms(base, cache_dir=cache)
    assert set(loaded) == set(KEYS)
    (info,) = cache_info(cache)
    assert info.entries == 3 and info.source == str(base) and info.file_size == base.stat().st_size


def test_no_cache_mode_and_clear(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = tmp_path / "b.safetensors"
    _base(base)
    report = compute_norms(base, KEYS, device="cpu", cache_dir=cache, use_cache=False)
    assert report.cache_file is None and not cache.exists()
    compute_norms(base, KEYS, device="cpu", cache_dir=cache)
    assert clear_cache(cache) == 1
    assert cache_info(cache) == []
    assert clear_cache(tmp_path / "missing") == 0


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = tmp_path / "b.safetensors"
    _base(base)
    first = compute_norms(base, KEYS, device="cpu", cache_dir=cache)
    assert first.cache_file is not None
    first.cache_file.write_text("{not json")
    again = compute_norms(base, KEYS, device="cpu", cache_dir=cache)
    assert again.computed == 3
    assert compute_norms(base, KEYS, device="cpu", cache_dir=cache).hits == 3


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASMITH_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "norms"
    monkeypatch.delenv("LORASMITH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lorasmith" / "norms"


def test_missing_key_and_bad_slice(tmp_path: Path) -> None:
    base = tmp_path / "b.safetensors"
    _base(base)
    with pytest.raises(LorasmithError, match=r"no tensor 'nope\.weight'"):
        compute_norms(base, [("nope.weight", None)], device="cpu", cache_dir=tmp_path / "c")
    with pytest.raises(LorasmithError, match="outside its shape"):
        compute_norms(base, [("qkv.weight", (0, 25, 10))], device="cpu", cache_dir=tmp_path / "c")
