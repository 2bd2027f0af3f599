"""NaN/Inf never reach an output unless allowed; every write is checked, ``--verify`` re-reads the data.

Writer level: :class:`~lorasmith.io.writer.SafetensorsWriter` refuses a floating tensor holding NaN or
infinite values (:class:`~lorasmith.io.writer.NonFiniteError`, naming it) before anything is renamed into
place, in both modes; ``check_finite=False`` or :func:`~lorasmith.io.writer.write_policy` allow and record
them. ``verify_data`` re-reads the written bytes and compares their sha256 with the ones computed from the
tensors. Command level: the refusal names the input file and its tensors; ``--allow-nonfinite`` writes the
output and warns per tensor; ``--verify`` works on every writing command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from corpus import Corpus
from harness import InProcess
from safetensors.torch import load_file

from lorasmith.errors import InvalidFileError
from lorasmith.io import writer as writer_mod
from lorasmith.io.header import read_header
from lorasmith.io.writer import (
    NonFiniteError,
    SafetensorsWriter,
    allow_nonfinite,
    nonfinite_counts,
    save_file,
    write_policy,
)


# ------------------------------------------------------------------------------------- finite values
def test_counts() -> None:
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert nonfinite_counts(t) == (1, 2)
    assert nonfinite_counts(t.to(torch.float16)) == (1, 2)
    assert nonfinite_counts(t.to(torch.bfloat16)) == (1, 2)
    assert nonfinite_counts(torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)) == (1, 0)
    assert nonfinite_counts(torch.arange(5)) == (0, 0)
    assert nonfinite_counts(torch.zeros(0)) == (0, 0)
    assert nonfinite_counts(torch.tensor([complex(float("nan"), 0)])) == (1, 0)


def test_counts_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "_FINITE_CHUNK", 3)
    t = torch.zeros(10)
    t[1], t[8], t[9] = float("nan"), float("inf"), float("nan")
    assert nonfinite_counts(t.reshape(2, 5).t()) == (2, 1)  # non-contiguous too


@pytest.mark.parametrize("planned", [False, True])
def test_writer_refuses_nonfinite(tmp_path: Path, planned: bool) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    good, bad = torch.ones(4), torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    plan = {"a": ("F32", [4]), "b": ("F32", [4])} if planned else None
    w = SafetensorsWriter(out, overwrite=True, plan=plan)
    w.write("a", good)
    with pytest.raises(NonFiniteError) as info:
        w.write("b", bad)
    assert "'b'" in info.value.message and "1 NaN and 1 infinite values" in info.value.message
    assert info.value.tensor.nan == 1 and info.value.tensor.inf == 1
    assert "--allow-nonfinite" in (info.value.hint or "")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_writer_allows_when_asked(tmp_path: Path) -> None:
    bad = {"w": torch.tensor([float("nan"), 1.0])}
    save_file(bad, tmp_path / "a.safetensors", check_finite=False)
    assert torch.isnan(load_file(str(tmp_path / "a.safetensors"))["w"][0])
    with allow_nonfinite() as policy:
        save_file(bad, tmp_path / "b.safetensors")
        save_file({"ok": torch.ones(2)}, tmp_path / "c.safetensors")
    assert [(t.name, t.nan, t.inf) for t in policy.nonfinite] == [("w", 1, 0)]
    with pytest.raises(NonFiniteError):  # outside the block: refused again
        save_file(bad, tmp_path / "d.safetensors")


def test_policies_nest(tmp_path: Path) -> None:
    with write_policy(allow_nonfinite=True, verify_data=True) as outer:
        with write_policy(verify_data=False) as inner:
            assert inner.allow_nonfinite and not inner.verify_data
        assert outer.verify_data
        r = save_file({"w": torch.ones(3)}, tmp_path / "x.safetensors")
        assert r.verified


# -------------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("hashes", [False, True])
def test_verify_data_passes(tmp_path: Path, planned: bool, hashes: bool) -> None:
    tensors = {"b": torch.arange(6.0), "a": torch.ones(2, 3, dtype=torch.float16), "z": torch.zeros(0)}
    plan = {k: (("F16" if v.dtype == torch.float16 else "F32"), list(v.shape)) for k, v in tensors.items()}
    out = tmp_path / "o.safetensors"
    with SafetensorsWriter(out, plan=plan if planned else None, hashes=hashes, verify_data=True) as w:
        for name in ("z", "a", "b"):  # out of file order
            w.write(name, tensors[name])
        result = w.close()
    assert result.verified
    assert load_file(str(out))["b"].tolist() == tensors["b"].tolist()


def _corrupting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip one data byte of the finished temporary file, as a failing disk would."""
    original = SafetensorsWriter._verify

    def corrupt_then_verify(self: SafetensorsWriter, tmp: Path) -> None:
        with open(tmp, "r+b") as fh:
            fh.seek(self._data_offset + 1)
            byte = fh.read(1)
            fh.seek(self._data_offset + 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
        original(self, tmp)

    monkeypatch.setattr(SafetensorsWriter, "_verify", corrupt_then_verify)


@pytest.mark.parametrize("hashes", [False, True])
def test_verify_data_catches_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: bool
) -> None:
    _corrupting(monkeypatch)
    out = tmp_path / "o.safetensors"
    with pytest.raises(InvalidFileError, match="verification failed: tensor 'a'"):
        save_file({"a": torch.arange(8.0)}, out, verify_data=True, hashes=hashes)
    assert list(tmp_path.iterdir()) == []
    save_file({"a": torch.arange(8.0)}, out)  # without --verify the damage goes unnoticed
    assert load_file(str(out))["a"].tolist() != list(range(8))


def test_header_check_catches_a_different_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header re-read after every write compares tensors and metadata."""
    real = writer_mod.read_header

    def other_metadata(path: Path):  # type: ignore[no-untyped-def]
        h = real(path)
        return type(h)(h.path, h.header_len, h.file_size, {"x": "y"}, h.tensors)

    monkeypatch.setattr(writer_mod, "read_header", other_metadata)
    with pytest.raises(InvalidFileError, match="header does not match"):
        save_file({"a": torch.ones(2)}, tmp_path / "o.safetensors", metadata={"k": "v"})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ commands
def test_refusal_names_the_input_and_its_tensor(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    bad = corpus["lora_nan"].path
    result = inproc.run(["merge", str(corpus.lora), str(bad), "-o", str(tmp_path / "o.safetensors"), "-q"])
    assert result.code == 1 and not result.traceback, str(result)
    line = result.error_lines[0]
    assert bad.name in line and ".lora_up.weight' (1 NaN value)" in line, line
    assert list(tmp_path.iterdir()) == []


def test_base_refusal_names_the_tensor(corpus: Corpus, inproc: InProcess, tmp_path: Path) -> None:
    bad = corpus["base_inf"].path
    out = tmp_path / "o.safetensors"
    result = inproc.run(["merge", str(corpus.lora), "--base", str(bad), "-o", str(out), "-q"])
    assert result.code == 1 and not result.traceback, str(result)
    assert "model.diffusion_model." in result.error_lines[0] and "(1 infinite value)" in result.error_lines[0]


@pytest.mark.parametrize("role", ["merge-lora", "merge-base", "convert"])
def test_allow_nonfinite(corpus: Corpus, inproc: InProcess, tmp_path: Path, role: str) -> None:
    out = tmp_path / "o.safetensors"
    argv = {
        "merge-lora": ["merge", str(corpus.lora), str(corpus["lora_nan"].path)],
        "merge-base": ["merge", str(corpus.lora), "--base", str(corpus["base_nan"].path)],
        "convert": ["convert", str(corpus["lora_inf"].path)],
    }[role]
    result = inproc.run([*argv, "-o", str(out), "-q", "--allow-nonfinite"])
    assert result.code == 0, str(result)
    assert "(--allow-nonfinite)" in result.stderr and "warning:" in result.stderr
    tensors = load_file(str(out))
    assert any(not bool(torch.isfinite(t.float()).all()) for t in tensors.values() if t.is_floating_point())


WRITING = {
    "merge": lambda c, o: ["merge", str(c.lora), "--base", str(c.base), "-o", o],
    "extract": lambda c, o: [
        "extract",
        "--base",
        str(c.base),
        "--tuned",
        str(c.tuned),
        "--rank",
        "2",
        "-o",
        o,
    ],
    "resize": lambda c, o: ["resize", str(c.lora), "--rank", "2", "-o", o],
    "convert": lambda c, o: ["convert", str(c.lora), "-o", o],
}


@pytest.mark.parametrize(
    "command", [c for c in WRITING if importlib.util.find_spec(f"lorasmith.commands.{c}") is not None]
)
def test_verify_option(corpus: Corpus, inproc: InProcess, tmp_path: Path, command: str) -> None:
    out = tmp_path / "o.safetensors"
    result = inproc.run([*WRITING[command](corpus, str(out)), "-q", "--verify"])
    assert result.code == 0, str(result)
    read_header(out)


def test_verify_option_reports_corruption(
    corpus: Corpus, inproc: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corrupting(monkeypatch)
    out = tmp_path / "o.safetensors"
    result = inproc.run(
        ["merge", str(corpus.lora), "--base", str(corpus.base), "-o", str(out), "-q", "--verify"]
    )
    assert result.code == 1 and not result.traceback, str(result)
    assert "verification failed" in result.error_lines[0]
    assert list(tmp_path.iterdir()) == []
