"""``cache norms``, ``cache info``, ``cache clear``: the base-norm cache through the command group."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.ops.cache.norms import cache_base_norms, clear_norms_cache, norms_cache_info
from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint

runner = CliRunner()


def _base(tmp_path: Path) -> Path:
    arch = get_registry().get("sd1")
    path = tmp_path / "base.safetensors"
    make_checkpoint(arch, path, factor=64, components=["unet"])
    return path


def test_norms_cached_by_content_then_info_and_clear(tmp_path: Path) -> None:
    base = _base(tmp_path)
    cache = tmp_path / "cache"
    first = cache_base_norms(base, cache_dir=cache, device="cpu")
    assert first.arch == "sd1" and first.weights > 0
    assert first.computed == first.weights and first.hits == 0
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(base, copy)
    second = cache_base_norms(copy, cache_dir=cache, device="cpu")
    assert (second.hits, second.computed, second.identity) == (first.weights, 0, first.identity)
    info = norms_cache_info(cache)
    assert [f.identity for f in info.files] == [first.identity] and info.files[0].entries == first.weights
    assert clear_norms_cache(cache, [copy]).removed == 1
    assert norms_cache_info(cache).files == []


def test_cli_norms_info_clear(tmp_path: Path) -> None:
    base = _base(tmp_path)
    cache = str(tmp_path / "cache")
    res = runner.invoke(
        app, ["cache", "norms", "--base", str(base), "--cache-dir", cache, "--device", "cpu", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["computed"] > 0
    res = runner.invoke(app, ["cache", "info", "--cache-dir", cache, "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)["files"]) == 1
    res = runner.invoke(app, ["cache", "clear", "--cache-dir", cache])
    assert res.exit_code == 0 and "removed 1" in res.stdout
    res = runner.invoke(
        app, ["cache", "norms", "--base", str(tmp_path / "missing.safetensors"), "--cache-dir", cache]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
