"""Write faults: a full disk, a file-size limit, folders that cannot be written.

Each gives exit code 1, one ``error:`` line naming the output, and leaves no partial or temporary file; an
existing output that was being replaced (``--overwrite``) is left as it was.

The full disk is real: the child process mounts a small tmpfs on the output folder in a private mount
namespace (root, or an unprivileged user namespace); where the system allows neither, that test is
skipped. The file-size limit is ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so that the write fails with
``EFBIG`` instead of the signal killing the process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from corpus import Corpus
from harness import CliServer, Completed, InProcess, file_digest

DISK = 256 * 1024  # the SD1 UNet base of the corpus is ~650 KiB: a bake into it does not fit


def _bake(corpus: Corpus, out: Path, *extra: str) -> list[str]:
    return ["merge", str(corpus.lora), "--base", str(corpus.base), "-o", str(out), "-q", *extra]


def _refused(result: Completed, what: str) -> None:
    assert result.code == 1, str(result)
    assert not result.traceback, str(result)
    assert len(result.error_lines) == 1, str(result)
    assert what in result.error_lines[0], str(result)


def _full_disk(server: CliServer, argv: list[str], folder: Path, seed: list[Path]) -> Completed:
    result = server.run(argv, tmpfs=(folder, DISK, seed))
    if result.code == 99:
        pytest.skip(result.stderr.strip())
    return result


def test_full_disk(corpus: Corpus, server: CliServer, tmp_path: Path) -> None:
    folder = tmp_path / "disk"
    folder.mkdir()
    result = _full_disk(server, _bake(corpus, folder / "out.safetensors"), folder, [])
    _refused(result, "No space left on device")
    assert "out.safetensors" in result.error_lines[0]
    assert result.listing == {}  # nothing left on the full disk, not even a temporary file


def test_full_disk_keeps_an_existing_output(corpus: Corpus, server: CliServer, tmp_path: Path) -> None:
    folder = tmp_path / "disk"
    folder.mkdir()
    old = tmp_path / "out.safetensors"
    old.write_bytes(corpus.lora.read_bytes())
    argv = _bake(corpus, folder / "out.safetensors", "--overwrite")
    result = _full_disk(server, argv, folder, [old])
    _refused(result, "No space left on device")
    assert result.listing == {"out.safetensors": file_digest(old)}


@pytest.mark.parametrize("existing", [False, True])
def test_file_size_limit(corpus: Corpus, server: CliServer, tmp_path: Path, existing: bool) -> None:
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(corpus.lora.read_bytes())
    before = file_digest(out) if existing else None
    argv = _bake(corpus, out, *(["--overwrite"] if existing else []))
    result = server.run(argv, rlimits={"RLIMIT_FSIZE": DISK}, ignore_sigxfsz=True)
    _refused(result, "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.safetensors"] if existing else [])
    if existing:
        assert file_digest(out) == before


def test_output_folder_is_a_file(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    result = inproc.run(_bake(corpus, plain / "out.safetensors"))
    _refused(result, "is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_output_folder_missing(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    result = inproc.run(_bake(corpus, tmp_path / "nowhere" / "out.safetensors"))
    _refused(result, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_folder(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    """The option parser refuses it (a usage error, exit code 2) before any work."""
    result = inproc.run(_bake(corpus, tmp_path))
    assert result.code == 2 and "is a directory" in result.stderr and not result.traceback, str(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder", ["/proc", "/proc/self"])
def test_output_folder_not_writable_even_for_root(corpus: Corpus, inproc: InProcess, folder: str) -> None:
    """procfs takes no new files, whoever asks."""
    result = inproc.run(_bake(corpus, Path(folder) / "out.safetensors"))
    _refused(result, folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_read_only(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = inproc.run(_bake(corpus, folder / "out.safetensors"))
        _refused(result, "not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)
