"""Tests of lorasmith.io.writer: layout identical to safetensors, planned streaming, atomicity, refusals."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from lorasmith.errors import InvalidFileError, OutputExistsError
from lorasmith.io.hashes import sshs_hashes_of_file
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import SafetensorsWriter, WriteResult, check_output_path, save_file

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    return {
        "lora_unet_b.lora_down.weight": x.half(),
        "lora_unet_b.lora_up.weight": x.T.contiguous().half(),
        "lora_unet_b.alpha": torch.tensor(4.0),
        "lora_unet_a.lora_down.weight": x.bfloat16(),
        "lora_unet_a.alpha": torch.tensor(8.0, dtype=torch.bfloat16),
        "z.f64": x.double(),
        "y.i64": torch.arange(5),
        "x.i32": torch.arange(3, dtype=torch.int32),
        "w.fp8": x.to(torch.float8_e4m3fn),
        "v.fp8b": x.to(torch.float8_e5m2),
        "u.bool": x > 0,
        "t.u8": torch.arange(7, dtype=torch.uint8),
        "s.i8": torch.arange(-3, 3, dtype=torch.int8),
        "r.i16": torch.arange(9, dtype=torch.int16),
        "q.empty": torch.zeros(0, 3),
        "p.scalar_u8": torch.tensor(5, dtype=torch.uint8),
        'Ünïcode "quoted" \\ /\t\u0001\u2028 😀': torch.ones(2),
    }


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(b.reshape(-1).view(torch.uint8).numpy())


def assert_same_as_reference(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file equals safetensors' own serialisation up to the order of the metadata keys."""
    ref = save(tensors, metadata=metadata)
    got = out.read_bytes()
    assert len(got) == len(ref)
    n = struct.unpack("<Q", ref[:8])[0]
    assert got[:8] == ref[:8]
    assert got[8 + n :] == ref[8 + n :]
    assert json.loads(got[8 : 8 + n]) == json.loads(ref[8 : 8 + n])
    return got


# ----------------------------------------------------------------------------------- byte equality
def test_byte_equal_without_metadata(tmp_path: Path) -> None:
    tensors = mixed()
    out = tmp_path / "out.safetensors"
    result = save_file(tensors, out, hashes=False)
    assert out.read_bytes() == save(tensors)
    assert result.sshs_model_hash is None
    assert result.n_tensors == len(tensors)
    assert result.file_bytes == out.stat().st_size
    assert no_temps(tmp_path)


def test_byte_equal_with_metadata(tmp_path: Path) -> None:
    tensors = mixed()
    meta = {"ss_network_dim": "4"}  # one key: the reference writer's key order is random beyond one
    out = tmp_path / "out.safetensors"
    save_file(tensors, out, metadata=meta, hashes=False)
    assert out.read_bytes() == save(tensors, metadata=meta)
    out2 = tmp_path / "empty_meta.safetensors"
    save_file(tensors, out2, metadata={}, hashes=False)
    assert out2.read_bytes() == save(tensors, metadata={})


def test_equal_to_reference_with_hashes(tmp_path: Path) -> None:
    tensors = mixed()
    meta = {
        "ss_network_dim": "4",
        "ss_network_alpha": "8",
        "modelspec.title": "x",
        "zz": "last",
        "aa": "first",
    }
    out = tmp_path / "out.safetensors"
    result = save_file(tensors, out, metadata=meta)
    written = read_header(out).metadata
    got = assert_same_as_reference(out, tensors, written)
    n = struct.unpack("<Q", got[:8])[0]
    # metadata keys are written sorted (reproducible output)
    keys = list(json.loads(got[8 : 8 + n])["__metadata__"])
    assert keys == sorted(keys)
    assert written["sshs_model_hash"] == result.sshs_model_hash
    assert written["sshs_legacy_hash"] == result.sshs_legacy_hash


def test_empty_file_equal(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    save_file({}, out, hashes=False)
    assert out.read_bytes() == save({})
    assert read_header(out).tensors == {}


def test_f4_and_noncontiguous(tmp_path: Path) -> None:
    t = torch.randint(0, 255, (2, 3), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    nc = torch.arange(12.0).reshape(3, 4).T  # not contiguous
    out = tmp_path / "out.safetensors"
    save_file({"f4": t, "nc": nc}, out, hashes=False)
    assert out.read_bytes() == save({"f4": t, "nc": nc.contiguous()})
    assert read_header(out).tensors["f4"].shape == (2, 6)
    back = load_all(out)
    assert same(back["f4"], t)
    assert torch.equal(back["nc"], nc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor(tmp_path: Path) -> None:  # pragma: no cover - GPU machines only
    t = torch.randn(8, 8, device="cuda")
    out = tmp_path / "out.safetensors"
    save_file({"t": t}, out, hashes=False)
    assert torch.equal(load_all(out)["t"], t.cpu())


def test_round_trip_with_reference_loader(tmp_path: Path) -> None:
    tensors = mixed()
    out = tmp_path / "out.safetensors"
    save_file(tensors, out)
    ref = load_file(str(out))
    ours = load_all(out)
    for k, v in tensors.items():
        assert same(ref[k], v.contiguous()), k
        assert same(ours[k], v.contiguous()), k


# -------------------------------------------------------------------------------------- planned mode
def plan_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    from lorasmith.io.dtypes import safetensors_dtype

    return {k: (safetensors_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()}


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled"])
def test_planned_any_order(tmp_path: Path, order: str) -> None:
    tensors = mixed()
    tensors["big"] = torch.randn(300, 1000)  # > 1 MiB so that the legacy hash reads real data
    meta = {"ss_network_dim": "4", "other": "x"}
    out = tmp_path / "out.safetensors"
    names = list(tensors)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        names = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(3))]
    with SafetensorsWriter(out, metadata=meta, plan=plan_of(tensors)) as w:
        assert w.planned
        tmp = w.temp_path
        assert tmp is not None
        assert tmp.exists()
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.safetensors.")
        assert tmp.name.endswith(".tmp")
        assert not out.exists()
        for name in names:
            w.write(name, tensors[name])
    assert not tmp.exists()
    assert no_temps(tmp_path)
    written = read_header(out).metadata
    assert_same_as_reference(out, tensors, written)
    got = load_all(out)
    assert all(same(got[k], v.contiguous()) for k, v in tensors.items())
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == sshs_hashes_of_file(out)
    assert written["sshs_legacy_hash"] != "e3b0c442"
    assert written["other"] == "x"


def test_planned_matches_unplanned(tmp_path: Path) -> None:
    tensors = mixed()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    meta = {"ss_x": "1", "modelspec.sai_model_spec": "1.0.1"}
    ra = save_file(tensors, a, metadata=meta)
    with SafetensorsWriter(b, metadata=meta, plan=plan_of(tensors)) as w:
        for name in reversed(list(tensors)):
            w.write(name, tensors[name])
    rb = w.close()  # idempotent: returns the first result
    assert a.read_bytes() == b.read_bytes()
    assert ra.sshs_model_hash == rb.sshs_model_hash
    assert ra.sshs_legacy_hash == rb.sshs_legacy_hash


def test_planned_missing_tensor(tmp_path: Path) -> None:
    tensors = mixed()
    out = tmp_path / "out.safetensors"

    def run() -> None:
        with SafetensorsWriter(out, plan=plan_of(tensors)) as w:
            w.write("z.f64", tensors["z.f64"])

    with pytest.raises(ValueError, match="planned tensors never written"):
        run()
    assert not out.exists()
    assert no_temps(tmp_path)


def test_planned_contract_violations(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    plan = {"a": ("F32", (2, 3)), "b": ("F16", (4,))}
    w = SafetensorsWriter(out, plan=plan)
    with pytest.raises(ValueError, match="is not in the plan"):
        w.write("c", torch.zeros(1))
    with pytest.raises(ValueError, match=r"F32 \[3, 2\], the plan says F32 \[2, 3\]"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"F32 \[4\], the plan says F16 \[4\]"):
        w.write("b", torch.zeros(4))
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        w.write("b", [1.0, 2.0])  # type: ignore[arg-type]
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.zeros(2, 3))
    w.abort()
    w.abort()  # idempotent
    assert no_temps(tmp_path)
    assert not out.exists()
    with pytest.raises(RuntimeError, match="aborted"):
        w.write("b", torch.zeros(4, dtype=torch.float16))


def test_bad_plan_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        SafetensorsWriter(out, plan={"a": ("F33", (1,))})
    with pytest.raises(ValueError, match="'__metadata__' cannot be a tensor name"):
        SafetensorsWriter(out, plan={"__metadata__": ("F32", (1,))})
    with pytest.raises(ValueError, match="strings to strings"):
        SafetensorsWriter(out, metadata={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="cannot store"):
        save_file({"c": torch.zeros(2, dtype=torch.complex128)}, out)
    assert no_temps(tmp_path)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ atomicity
class Boom(Exception):
    pass


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_inside_with_leaves_nothing(
    tmp_path: Path, planned: bool, exc: type[BaseException]
) -> None:
    tensors = mixed()
    out = tmp_path / "out.safetensors"

    def run() -> None:
        with SafetensorsWriter(out, plan=plan_of(tensors) if planned else None) as w:
            for i, (name, t) in enumerate(tensors.items()):
                w.write(name, t)
                if i == 3:
                    raise exc()

    with pytest.raises(exc):
        run()
    assert not out.exists()
    assert no_temps(tmp_path)


@pytest.mark.parametrize("planned", [False, True])
def test_existing_output_stays_intact(tmp_path: Path, planned: bool) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    tensors = mixed()

    def run() -> None:
        with SafetensorsWriter(out, overwrite=True, plan=plan_of(tensors) if planned else None) as w:
            w.write("y.i64", tensors["y.i64"])
            raise Boom

    with pytest.raises(Boom):
        run()
    assert out.read_bytes() == b"precious"
    assert no_temps(tmp_path)


def test_failure_at_close_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.safetensors"

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lorasmith.io.writer.os.replace", fail)
    with pytest.raises(InvalidFileError, match="No space left on device"):
        save_file({"a": torch.zeros(3)}, out)
    assert not out.exists()
    assert no_temps(tmp_path)


def test_failure_writing_the_header_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: SafetensorsWriter, data: bytes, offset: int) -> None:
        raise self._write_error(OSError(28, "No space left on device"))

    monkeypatch.setattr(SafetensorsWriter, "_pwrite", fail)
    with pytest.raises(InvalidFileError, match="No space left on device"):
        SafetensorsWriter(tmp_path / "out.safetensors", plan={"a": ("F32", (2,))})
    assert no_temps(tmp_path)


def test_dropped_writer_cleans_up(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "out.safetensors", plan={"a": ("F32", (2,))})
    tmp = w.temp_path
    assert tmp is not None
    assert tmp.exists()
    del w
    gc.collect()
    assert not tmp.exists()


def test_abort_in_unplanned_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    w = SafetensorsWriter(out)
    assert w.temp_path is None
    w.write("a", torch.zeros(2))
    w.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        w.close()
    assert not out.exists()
    assert no_temps(tmp_path)


def test_write_after_close(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "out.safetensors")
    w.write("a", torch.zeros(2))
    r = w.close()
    assert isinstance(r, WriteResult)
    with pytest.raises(RuntimeError, match="closed"):
        w.write("b", torch.zeros(2))
    w.abort()  # no effect after a successful close
    assert r.path.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_output_mode_follows_umask(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    old = os.umask(0o022)
    try:
        save_file({"a": torch.zeros(2)}, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------- refusals
def test_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="already exists") as info:
        save_file({"a": torch.zeros(2)}, out)
    assert info.value.hint is not None
    assert "--overwrite" in info.value.hint
    assert str(out) in str(info.value)
    assert out.read_bytes() == b"old"
    save_file({"a": torch.zeros(2)}, out, overwrite=True)
    assert load_all(out)["a"].tolist() == [0.0, 0.0]


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_refuses_own_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.zeros(2)}, src)
    before = src.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    monkeypatch.chdir(tmp_path)
    cases: list[tuple[Path, str | Path]] = [
        (src, src),
        (Path("in.safetensors"), src),
        (tmp_path / "sub" / ".." / "in.safetensors", "in.safetensors"),
        (link, src),
        (src, link),
    ]
    for out, inp in cases:
        with pytest.raises(OutputExistsError, match="overwrite its own input"):
            save_file({"a": torch.ones(2)}, out, overwrite=True, inputs=[tmp_path / "other", inp])
    assert src.read_bytes() == before
    check_output_path(tmp_path / "new.safetensors", inputs=[src])  # a different file is fine


def test_refuses_bad_output_locations(tmp_path: Path) -> None:
    with pytest.raises(InvalidFileError, match="output folder does not exist"):
        save_file({"a": torch.zeros(2)}, tmp_path / "missing" / "out.safetensors")
    with pytest.raises(InvalidFileError, match="output is a directory"):
        save_file({"a": torch.zeros(2)}, tmp_path, overwrite=True)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(InvalidFileError, match="is not a directory"):
        save_file({"a": torch.zeros(2)}, tmp_path / "afile" / "out.safetensors")


@pytest.mark.skipif(IS_ROOT or sys.platform == "win32", reason="root writes everywhere")
def test_refuses_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InvalidFileError, match="not writable"):
            save_file({"a": torch.zeros(2)}, folder / "out.safetensors")
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lorasmith.io.writer.tempfile.mkstemp", deny)
    with pytest.raises(InvalidFileError, match="cannot create a file in the output folder"):
        save_file({"a": torch.zeros(2)}, tmp_path / "out.safetensors")


# --------------------------------------------------------------------------------------------- hashes
def reference_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(tensors, metadata=ss)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n :]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("big", [False, True])
def test_hashes_in_metadata(tmp_path: Path, big: bool) -> None:
    tensors = mixed()
    if big:
        tensors["big.weight"] = torch.randn(600, 1000).half()
    meta = {
        "ss_network_dim": "4",
        "ss_tag_frequency": json.dumps({"a": {"b": 1}}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": "t",
        "sshs_model_hash": "0xdeadbeef",  # a stale LyCORIS value is replaced
    }
    out = tmp_path / "out.safetensors"
    result = save_file(tensors, out, metadata=meta)
    written = read_header(out).metadata
    model, legacy = reference_hashes(tensors, meta)
    assert written["sshs_model_hash"] == model == result.sshs_model_hash
    assert written["sshs_legacy_hash"] == legacy == result.sshs_legacy_hash
    assert written["modelspec.hash_sha256"] == "0x" + model
    assert (legacy == "e3b0c442") is not big
    assert written["modelspec.title"] == "t"


def test_modelspec_hash_only_with_modelspec(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    save_file({"a": torch.zeros(2)}, out, metadata={"ss_x": "1"})
    meta = read_header(out).metadata
    assert "modelspec.hash_sha256" not in meta
    assert set(meta) == {"ss_x", "sshs_model_hash", "sshs_legacy_hash"}


def test_hashes_off_keeps_metadata_as_given(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    save_file({"a": torch.zeros(2)}, out, metadata={"sshs_model_hash": "keep"}, hashes=False)
    assert read_header(out).metadata == {"sshs_model_hash": "keep"}
    out2 = tmp_path / "out2.safetensors"
    save_file({"a": torch.zeros(2)}, out2, hashes=False)
    assert read_header(out2).metadata == {}


@pytest.mark.parametrize(
    ("env", "synced"), [(None, False), ("1", True), ("on", True), ("0", False), ("off", False)]
)
def test_fsync_is_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, synced: bool
) -> None:
    """``LORASMITH_FSYNC=1`` fsyncs finished files (off by default; the rename is atomic either way);
    --verify always syncs the file."""
    import os

    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    if env is None:
        monkeypatch.delenv("LORASMITH_FSYNC", raising=False)
    else:
        monkeypatch.setenv("LORASMITH_FSYNC", env)
    save_file({"x": torch.ones(3)}, tmp_path / "a.safetensors")
    assert bool(calls) == synced
    assert torch.equal(load_all(tmp_path / "a.safetensors")["x"], torch.ones(3))
    calls.clear()
    save_file({"x": torch.ones(3)}, tmp_path / "b.safetensors", verify_data=True)
    assert calls
