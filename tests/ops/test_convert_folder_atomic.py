"""convert --to diffusers: the output folder appears whole or not at all.

An error, a Ctrl-C (``KeyboardInterrupt``) or SIGTERM while the folder is written leaves no folder and no
hidden temporary next to it; an existing output given with ``--overwrite`` is kept as it was unless the
new folder is complete; the finished folder has the permissions of any new folder (not ``mkdtemp``'s 0700).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorasmith.errors import InvalidFileError
from lorasmith.io import writer as io_writer
from lorasmith.ops import _diffusers_weights, layouts
from lorasmith.ops.convert import convert
from lorasmith.registry import get
from lorasmith.testing import make_checkpoint


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD1 single file: four models (unet, vae, text encoder) and the extras file in its folder."""
    path = tmp_path_factory.mktemp("src") / "sd1.safetensors"
    make_checkpoint(get("sd1"), path)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fail_after(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> None:
    """Make the n-th tensor written by any writer raise ``exc`` (mid-folder: later models not begun).

    A tensor is written whole (``write``) or, streamed, in parts (``write_part``, on the pipeline's
    writer thread): its first part counts it.
    """
    real = io_writer.SafetensorsWriter.write
    real_part = io_writer.SafetensorsWriter.write_part
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise exc

    def write(self: io_writer.SafetensorsWriter, name: str, tensor: object) -> None:
        count()
        real(self, name, tensor)  # type: ignore[arg-type]

    def write_part(
        self: io_writer.SafetensorsWriter, name: str, offset: int, part: object, **kwargs: bool
    ) -> None:
        if offset == 0:
            count()
        real_part(self, name, offset, part, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(io_writer.SafetensorsWriter, "write", write)
    monkeypatch.setattr(io_writer.SafetensorsWriter, "write_part", write_part)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), InvalidFileError("disk full")])
def test_an_interrupted_folder_leaves_nothing(
    tmp_path: Path, sd1: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    _fail_after(monkeypatch, 900, exc)  # the UNet (686 tensors) is done, the VAE is being written
    with pytest.raises(type(exc)):
        convert(sd1, out_dir / "pipe", to="diffusers")
    assert _listing(out_dir) == []


def test_an_existing_output_survives_a_failed_overwrite(
    tmp_path: Path, sd1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pipe"
    convert(sd1, out, to="diffusers")
    (out / "mine.txt").write_text("keep me")
    before = _tree(out)
    with monkeypatch.context() as m:
        _fail_after(m, 50, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            convert(sd1, out, to="diffusers", overwrite=True)
    assert _tree(out) == before
    assert _listing(tmp_path) == ["pipe"]
    # a failure in the last step, moving the new folder into place, puts the old one back
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise OSError(13, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr(layouts.os, "rename", rename)
    with pytest.raises(InvalidFileError, match="cannot move the finished folder"):
        convert(sd1, out, to="diffusers", overwrite=True)
    assert _tree(out) == before
    assert _listing(tmp_path) == ["pipe"]


def test_a_failure_while_writing_configs_leaves_nothing(
    tmp_path: Path, sd1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("config bug")

    monkeypatch.setattr(_diffusers_weights, "write_json", broken)
    with pytest.raises(RuntimeError, match="config bug"):
        convert(sd1, tmp_path / "pipe", to="diffusers")
    assert _listing(tmp_path) == []


def test_the_folder_gets_ordinary_permissions(tmp_path: Path, sd1: Path) -> None:
    out = tmp_path / "pipe"
    sharded = tmp_path / "sharded"
    old = os.umask(0o022)
    try:
        convert(sd1, out, to="diffusers")
        convert(sd1, sharded, to="diffusers", shard_size="100KB")
    finally:
        os.umask(old)
    for folder in (out, sharded):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        # and every file in it those of any new file (config.json and shard indexes too, not 0600)
        files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
        assert "unet/config.json" in files
        assert {k: stat.S_IMODE(p.stat().st_mode) for k, p in files.items()} == dict.fromkeys(files, 0o644)
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_an_uncommitted_temp_folder_is_removed_when_dropped(tmp_path: Path) -> None:
    folder = layouts.TempFolder(tmp_path / "out")
    (folder.path / "x").write_text("partial")
    path = folder.path
    del folder  # e.g. an embedding application that drops the object without leaving a with block
    assert not path.exists()


_CHILD = r"""
import sys, time
from lorasmith.io import writer
real = writer.SafetensorsWriter._pwrite
def slow(self, data, offset):
    time.sleep(0.02)
    return real(self, data, offset)
writer.SafetensorsWriter._pwrite = slow
sys.argv = ["lorasmith", "convert", sys.argv[1], "-o", sys.argv[2], "--to", "diffusers"]
from lorasmith.cli import main
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_leaves_nothing(tmp_path: Path, sd1: Path, sig: int) -> None:
    """A real process, interrupted once its hidden folder exists: exit 130, no folder, no temporary."""
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(sd1), str(out_dir / "pipe")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
            assert child.poll() is None, child.stderr.read() if child.stderr else b""
            assert time.monotonic() < deadline, "no temporary folder appeared"
            time.sleep(0.01)
        # the first model is being written inside the hidden folder
        os.kill(child.pid, sig)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert _listing(out_dir) == []
