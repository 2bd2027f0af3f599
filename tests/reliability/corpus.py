"""A corpus of malformed and hostile inputs for the reliability tests.

:func:`build_corpus` writes every input into a folder, together with the valid files the commands need
beside them (an SD1 base, an SD1 fine-tune, an SD1 LoRA, an SDXL LoRA and an SDXL base). Each
:class:`BadInput` has a ``kind`` that says what sort of file it is, and the test table
(``test_corpus.py``) decides from the kind, per command role, whether the command must refuse it or accept
it:

- ``file``: not a readable safetensors file at all (damaged header, wrong format, special files, links);
  every command refuses it, before writing anything, with a message naming the file and the problem.
- ``empty``: a valid safetensors file that holds nothing a command can use (no tensors, or one empty one).
- ``lora``: a valid safetensors file whose LoRA structure is wrong (mismatched rank, one factor, ...).
- ``nonfinite-lora``, ``nonfinite-base``: a valid LoRA / checkpoint holding NaN or Inf values.
- ``valid-lora``, ``valid-other-lora``, ``valid-other-base``, ``pickle``: valid inputs for some commands
  (a LoRA with megabytes of metadata, an SDXL LoRA or base next to SD1 files, a pickle checkpoint that
  only ``convert`` reads).

What cannot be simulated as root is left out (and listed in ``docs/reliability.md``): a file without read
permission and a folder without search permission are readable by root; they are added only when the
tests do not run as root.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorasmith.registry import get
from lorasmith.testing import make_checkpoint, make_lora, make_tuned, write_bad_files

#: What each ``kind`` means; see the module docstring.
KINDS = (
    "file",
    "empty",
    "lora",
    "nonfinite-lora",
    "nonfinite-base",
    "valid-lora",
    "valid-other-lora",
    "valid-other-base",
    "pickle",
)


@dataclass(frozen=True)
class BadInput:
    """One input of the corpus.

    :ivar name: a short identifier (also the file stem, for files the corpus writes).
    :ivar path: the path given to the commands.
    :ivar kind: one of :data:`KINDS`.
    :ivar problem: a regular expression that a refusal's message must match (case-insensitive).
    :ivar note: what the input is, in words.
    """

    name: str
    path: Path
    kind: str
    problem: str
    note: str


@dataclass
class Corpus:
    """The inputs and the valid companions they are used with."""

    folder: Path
    base: Path
    tuned: Path
    lora: Path
    xl_lora: Path
    xl_base: Path
    inputs: dict[str, BadInput] = field(default_factory=dict)

    def __iter__(self) -> Iterator[BadInput]:
        return iter(self.inputs.values())

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, name: str) -> BadInput:
        return self.inputs[name]


def _st(header: Any, data: bytes = b"", *, declared_len: int | None = None) -> bytes:
    """Safetensors bytes: the 8-byte length, the header (JSON of ``header`` or raw bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", length) + raw + data


def _entry(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


F32_4 = _entry("F32", [4], [0, 16])

# the messages of lorasmith.io.header, grouped by what they say
_CORRUPT = r"truncated|not a safetensors file|file is empty|header|tensor '|tensors '|__metadata__"


def _lora_pieces(lora: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors and metadata of the valid LoRA, and the name of one of its modules."""
    tensors = load_file(str(lora))
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata() or {}
    # a UNet module: the base is UNet-only, so every command uses it
    module = next(
        k[: -len(".lora_down.weight")]
        for k in tensors
        if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")
    )
    return tensors, meta, module


def build_corpus(folder: str | os.PathLike[str]) -> Corpus:
    """Write the corpus and its valid companions into ``folder`` and return it."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    sd1, sdxl = get("sd1"), get("sdxl")
    good = d / "good"
    good.mkdir(exist_ok=True)
    base_tensors = make_checkpoint(sd1, good / "base.safetensors", components=("unet",))
    weights = [k for k, v in base_tensors.items() if v.ndim == 2 and k.startswith("model.diffusion_model.")]
    make_tuned(sd1, base_tensors, good / "tuned.safetensors", modules=weights[:4], rank=2)
    make_lora(sd1, good / "lora.safetensors", rank=4, limit=6)
    make_lora(sdxl, good / "xl_lora.safetensors", rank=4, limit=6)
    make_checkpoint(sdxl, good / "xl_base.safetensors", components=("unet",))
    corpus = Corpus(
        folder=d,
        base=good / "base.safetensors",
        tuned=good / "tuned.safetensors",
        lora=good / "lora.safetensors",
        xl_lora=good / "xl_lora.safetensors",
        xl_base=good / "xl_base.safetensors",
    )
    bad = d / "bad"
    bad.mkdir(exist_ok=True)

    def add(name: str, path: Path, kind: str, problem: str, note: str) -> None:
        assert kind in KINDS, kind
        assert name not in corpus.inputs, name
        corpus.inputs[name] = BadInput(name, path, kind, problem, note)

    def write(name: str, blob: bytes, problem: str, note: str, kind: str = "file") -> None:
        p = bad / f"{name}.safetensors"
        p.write_bytes(blob)
        add(name, p, kind, problem, note)

    # ------------------------------------------------------------------ the shared basics of the factory
    basics = write_bad_files(bad / "basics")
    basic_problems = {
        "empty": ("file is empty", "0 bytes"),
        "short": ("shorter than the 8-byte header length", "3 bytes"),
        "truncated": ("truncated", "the header promises 16 data bytes, 8 are present"),
        "header_past_end": ("reaches past the end", "header length 4096, 30 bytes of file"),
        "corrupt_json": ("not valid JSON", "JSON cut in the middle"),
        "not_utf8": ("not valid UTF-8", "a tensor name with invalid UTF-8"),
        "json_list": ("not a JSON object|not a safetensors file", "a JSON list instead of an object"),
        "overlapping_offsets": ("overlap", "two tensors sharing bytes"),
        "unknown_dtype": ("unknown dtype", "dtype 'Q7'"),
        "nonstring_metadata": ("__metadata__ value", "a metadata value that is a number"),
        "byte_count_mismatch": ("needs 16", "shape and dtype need 16 bytes, the offsets give 12"),
        "random_bytes": ("not a safetensors file", "4 KiB of random bytes"),
        "pickle_renamed": ("not a safetensors file.*(zip|pickle)", "a torch.save zip named .safetensors"),
        "directory": ("is a directory", "a folder named *.safetensors"),
    }
    for name, (problem, note) in basic_problems.items():
        add(name, basics[name], "file", problem, note)
    add("pickle", basics["pickle"], "pickle", "not a safetensors file.*(zip|pickle)", "a torch.save .ckpt")

    # ---------------------------------------------------------------------- truncations of a valid LoRA
    blob = corpus.lora.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    cuts = {
        "trunc_in_length": (4, "shorter than the 8-byte header length"),
        "trunc_in_header": (8 + n // 2, "truncated safetensors file"),
        "trunc_at_data": (8 + n, "data ends at byte|truncated"),
        "trunc_in_data": (8 + n + (len(blob) - 8 - n) // 2, "data ends at byte|truncated"),
        "trunc_last_byte": (len(blob) - 1, "data ends at byte|truncated"),
    }
    for name, (size, problem) in cuts.items():
        write(name, blob[:size], problem, f"the valid LoRA cut to {size} of {len(blob)} bytes")

    # ------------------------------------------------------------------------------------- the length
    write("header_len_zero", _st(b"", b"\0" * 16), "header is empty", "header length 0")
    write(
        "header_len_huge",
        _st(b"{}", declared_len=2**64 - 1),
        "over the 100 MB limit",
        "header length 2**64-1",
    )
    write(
        "header_len_over_limit",
        _st(b"{}", declared_len=100_000_001),
        "over the 100 MB limit",
        "header length just over the 100 MB limit",
    )
    write(
        "header_len_past_end_json",
        _st(json.dumps({"w": F32_4}).encode(), b"\0" * 16, declared_len=10_000),
        "truncated safetensors file",
        "a JSON header whose length reaches past the end",
    )

    # ---------------------------------------------------------------------------------- the JSON text
    write("json_string", _st(b'"weights"'), "not a JSON object|not a safetensors file", "a JSON string")
    write("json_number", _st(b"42"), "not a JSON object|not a safetensors file", "a JSON number")
    write("json_null", _st(b"null"), "not a JSON object|not a safetensors file", "JSON null")
    write(
        "json_bom",
        _st(b"\xef\xbb\xbf" + json.dumps({"w": F32_4}).encode(), b"\0" * 16),
        "not a safetensors file|not a JSON object",
        "a UTF-8 byte-order mark before the JSON",
    )
    write(
        "json_deep",
        _st(b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        "nested too deeply|__metadata__",
        "metadata nested 200,000 levels deep",
    )
    write(
        "duplicate_tensor_key",
        _st(
            b'{"w": ' + json.dumps(F32_4).encode() + b', "w": ' + json.dumps(F32_4).encode() + b"}",
            b"\0" * 16,
        ),
        "key 'w' twice",
        "the same tensor name twice",
    )
    write(
        "duplicate_metadata_key",
        _st(b'{"__metadata__": {"a": "1", "a": "2"}, "w": ' + json.dumps(F32_4).encode() + b"}", b"\0" * 16),
        "key 'a' twice",
        "the same metadata key twice",
    )

    # ----------------------------------------------------------------------------- entries and offsets
    write(
        "offsets_past_end",
        _st({"w": _entry("F32", [4], [0, 16])}, b"\0" * 8),
        "data ends at byte 16",
        "a tensor ending past the end of the file",
    )
    write(
        "offsets_second_past_end",
        _st({"a": F32_4, "b": _entry("F32", [4], [16, 32])}, b"\0" * 20),
        "data ends at byte 32",
        "the second tensor ending past the end of the file",
    )
    write(
        "offsets_contained",
        _st({"a": _entry("F32", [8], [0, 32]), "b": _entry("F32", [2], [8, 16])}, b"\0" * 32),
        "overlap",
        "one tensor's bytes inside another's",
    )
    write(
        "offsets_decreasing",
        _st({"w": _entry("F32", [4], [16, 0])}, b"\0" * 16),
        "not increasing",
        "data_offsets [16, 0]",
    )
    write(
        "offsets_negative",
        _st({"w": _entry("F32", [4], [-16, 0])}, b"\0" * 16),
        "not increasing",
        "data_offsets [-16, 0]",
    )
    write(
        "offsets_not_pair",
        _st({"w": _entry("F32", [4], [0])}, b"\0" * 16),
        "not a pair of integers",
        "data_offsets [0]",
    )
    write(
        "offsets_float",
        _st({"w": _entry("F32", [4], [0.0, 16.0])}, b"\0" * 16),
        "not a pair of integers",
        "data_offsets [0.0, 16.0]",
    )
    write(
        "offsets_huge",
        _st({"w": _entry("F32", [2**62], [0, 2**64])}, b"\0" * 16),
        "data ends at byte|needs",
        "a tensor of 2**62 elements in a 16-byte data section",
    )
    write(
        "shape_dtype_disagree",
        _st({"w": _entry("F16", [3], [0, 12])}, b"\0" * 12),
        "needs 6",
        "3 F16 values (6 bytes) given 12 bytes",
    )
    write(
        "subbyte_odd",
        _st({"w": _entry("F4", [3], [0, 2])}, b"\0" * 2),
        "whole number of bytes",
        "3 F4 values (12 bits)",
    )
    write(
        "unknown_dtype_lowercase",
        _st({"w": _entry("f32", [4], [0, 16])}, b"\0" * 16),
        "unknown dtype 'f32'",
        "dtype 'f32'",
    )
    write(
        "dtype_not_string",
        _st({"w": _entry(4, [4], [0, 16])}, b"\0" * 16),  # type: ignore[arg-type]
        "dtype is a JSON number",
        "dtype 4",
    )
    write(
        "shape_negative",
        _st({"w": _entry("F32", [-4], [0, 16])}, b"\0" * 16),
        "negative dimension",
        "shape [-4]",
    )
    write(
        "shape_not_list",
        _st({"w": _entry("F32", "2x2", [0, 16])}, b"\0" * 16),  # type: ignore[arg-type]
        "not a list of integers",
        "shape '2x2'",
    )
    write(
        "shape_float",
        _st({"w": _entry("F32", [2.0, 2], [0, 16])}, b"\0" * 16),
        "not a list of integers",
        "shape [2.0, 2]",
    )
    write("entry_not_object", _st({"w": [1, 2, 3]}), "entry is a JSON array", "a tensor entry that is a list")
    write(
        "entry_missing_offsets",
        _st({"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
        "no 'data_offsets'",
        "a tensor entry without data_offsets",
    )

    # -------------------------------------------------------------------------------------- metadata
    write(
        "metadata_list",
        _st({"__metadata__": ["a", "b"], "w": F32_4}, b"\0" * 16),
        "__metadata__ is a JSON array",
        "__metadata__ that is a list",
    )
    write(
        "metadata_nested",
        _st({"__metadata__": {"ss_tag_frequency": {"a": 1}}, "w": F32_4}, b"\0" * 16),
        "__metadata__ value of 'ss_tag_frequency' is a JSON object",
        "a metadata value that is an object",
    )
    write(
        "metadata_null",
        _st({"__metadata__": {"ss_network_dim": None}, "w": F32_4}, b"\0" * 16),
        "__metadata__ value of 'ss_network_dim' is a JSON null",
        "a metadata value that is null",
    )
    lora_tensors, lora_meta, module = _lora_pieces(corpus.lora)
    huge = bad / "metadata_huge.safetensors"
    save_file(
        lora_tensors,
        str(huge),
        metadata={**lora_meta, "ss_tag_frequency": "x" * 4_000_000, "k" * 100_000: "long key"},
    )
    add("metadata_huge", huge, "valid-lora", "", "a valid LoRA with 4 MB of metadata and a 100 kB key")

    # ---------------------------------------------------------------------------------- nothing inside
    write("no_tensors", _st({}), "no|not", "a valid file with no tensors", kind="empty")
    write(
        "zero_sized_tensor",
        _st({"w": _entry("F32", [0, 4], [0, 0])}),
        "no|not",
        "a valid file with one tensor of shape [0, 4]",
        kind="empty",
    )

    # ----------------------------------------------------------------------------- LoRA structure
    def lora_variant(name: str, problem: str, note: str, change: Any, kind: str = "lora") -> None:
        tensors = {k: v.clone() for k, v in lora_tensors.items()}
        change(tensors)
        p = bad / f"{name}.safetensors"
        save_file(tensors, str(p), metadata=lora_meta or None)
        add(name, p, kind, problem, note)

    down, up, alpha = f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"

    def rank_mismatch(t: dict[str, torch.Tensor]) -> None:
        t[down] = t[down][:3].contiguous()

    def alpha_shape(t: dict[str, torch.Tensor]) -> None:
        t[alpha] = torch.ones(2, 2)

    def only_down(t: dict[str, torch.Tensor]) -> None:
        del t[up]

    def only_up(t: dict[str, torch.Tensor]) -> None:
        del t[down]

    def zero_rank(t: dict[str, torch.Tensor]) -> None:
        t[down] = t[down][:0].contiguous()
        t[up] = t[up][:, :0].contiguous()

    def up_nan(t: dict[str, torch.Tensor]) -> None:
        t[up][0, 0] = float("nan")

    def down_inf(t: dict[str, torch.Tensor]) -> None:
        t[down][0, 0] = float("inf")

    lora_variant(
        "lora_rank_mismatch", "rank|shape|mismatch", f"{module}: up rank 4, down rank 3", rank_mismatch
    )
    lora_variant("lora_alpha_shape", "alpha", f"{module}: alpha of shape [2, 2]", alpha_shape)
    lora_variant("lora_only_down", "lora_up|missing|factor|only", f"{module}: no lora_up", only_down)
    lora_variant("lora_only_up", "lora_down|missing|factor|only", f"{module}: no lora_down", only_up)
    lora_variant("lora_zero_rank", "rank|empty|zero", f"{module}: factors of rank 0", zero_rank)
    lora_variant(
        "lora_nan", "nan|non-?finite|infinite", f"{module}: a NaN in lora_up", up_nan, "nonfinite-lora"
    )
    lora_variant(
        "lora_inf", "nan|non-?finite|infinite", f"{module}: an Inf in lora_down", down_inf, "nonfinite-lora"
    )

    # ------------------------------------------------------------------------------ non-finite bases
    for name, value in (("base_nan", float("nan")), ("base_inf", float("-inf"))):
        tensors = {k: v.clone() for k, v in base_tensors.items()}
        tensors[weights[0]][0, 0] = value
        p = bad / f"{name}.safetensors"
        save_file(tensors, str(p))
        add(
            name,
            p,
            "nonfinite-base",
            "nan|non-?finite|infinite",
            f"the SD1 base with {value} in {weights[0]}",
        )

    # ---------------------------------------------------------------------------------- other family
    add("other_family_lora", corpus.xl_lora, "valid-other-lora", "sdxl|family", "an SDXL LoRA with SD1 files")
    add("other_family_base", corpus.xl_base, "valid-other-base", "sdxl|family", "an SDXL base with SD1 files")

    # ----------------------------------------------------------------------------------- file system
    fs = bad / "fs"
    fs.mkdir(exist_ok=True)
    loop_a, loop_b = fs / "loop_a.safetensors", fs / "loop_b.safetensors"
    loop_a.symlink_to(loop_b.name)
    loop_b.symlink_to(loop_a.name)
    add("symlink_loop", loop_a, "file", "symbolic link loop", "two links pointing at each other")
    selfloop = fs / "self.safetensors"
    selfloop.symlink_to(selfloop.name)
    add("symlink_self", selfloop, "file", "symbolic link loop", "a link pointing at itself")
    dangling = fs / "dangling.safetensors"
    dangling.symlink_to("nowhere.safetensors")
    add("symlink_dangling", dangling, "file", "broken symbolic link", "a link to a missing file")
    add("missing", fs / "missing.safetensors", "file", "no such file", "a path that does not exist")
    fifo = fs / "fifo.safetensors"
    os.mkfifo(fifo)
    add("fifo", fifo, "file", "not a regular file", "a named pipe (opening it would block)")
    sock_path = fs / "sock.safetensors"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
    finally:
        sock.close()  # the socket file stays
    add("socket", sock_path, "file", "not a regular file|no such device|cannot read", "a Unix socket")
    add("char_device", Path("/dev/null"), "file", "not a regular file", "a character device (/dev/null)")
    notdir = fs / "plain.safetensors"
    notdir.write_bytes(blob)
    add("parent_not_dir", notdir / "x.safetensors", "file", "not a directory", "a path under a plain file")
    add("name_too_long", fs / ("n" * 300 + ".safetensors"), "file", "too long|cannot read", "a 300-byte name")
    if os.geteuid() != 0:  # root reads through any permission bits: these only mean something for users
        locked = fs / "locked.safetensors"
        locked.write_bytes(blob)
        locked.chmod(0)
        add("unreadable", locked, "file", "permission denied", "a file without read permission")
        closed = fs / "closed"
        closed.mkdir()
        (closed / "x.safetensors").write_bytes(blob)
        closed.chmod(0o600)
        add(
            "no_search",
            closed / "x.safetensors",
            "file",
            "permission denied",
            "a folder without x permission",
        )
    return corpus
