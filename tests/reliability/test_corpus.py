"""Every malformed or hostile input of the corpus against every command that reads files.

The expected behaviour of each (input, command role) pair is spelled out in :data:`TABLE` (by the kind of
input) and :data:`OVERRIDES` (single inputs), and listed in ``docs/reliability.md``. A refusal means:
exit code 1 (2 where the option parser refuses the path), one ``error:`` line naming the file and the
problem (and at most a ``hint:`` line), no traceback, and nothing written: the output folder stays
empty (no output, no temporary file). An acceptance means exit code 0 and a readable output.

The whole table runs in this process (the CLI's Typer command, built once); a representative subset per
command also runs in real child processes (:mod:`harness`), and a few in fresh interpreters.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from corpus import Corpus
from harness import CliServer, Completed, InProcess, file_digest, fresh_run

from lorasmith.errors import InvalidFileError
from lorasmith.io.header import read_header

Role = Callable[[Corpus, str, Path], list[str]]


def _o(out: Path) -> str:
    return str(out / "out.safetensors")


#: Command roles: how a (possibly bad) file is given to each command that reads files. ``bad`` is the
#: corpus input, ``out`` an empty folder for outputs. Valid companions come from the corpus.
ALL_ROLES: dict[str, tuple[str, Role]] = {
    "inspect": ("inspect", lambda c, bad, out: ["inspect", bad]),
    "merge-lora": ("merge", lambda c, bad, out: ["merge", str(c.lora), bad, "-o", _o(out), "-q"]),
    "merge-base": ("merge", lambda c, bad, out: ["merge", str(c.lora), "--base", bad, "-o", _o(out), "-q"]),
    "merge-models": (
        "merge",
        lambda c, bad, out: ["merge", "--models", str(c.base), bad, "-o", _o(out), "-q"],
    ),
    "extract-base": (
        "extract",
        lambda c, bad, out: [
            "extract",
            "--base",
            bad,
            "--tuned",
            str(c.tuned),
            "--rank",
            "2",
            "-o",
            _o(out),
            "-q",
        ],
    ),
    "extract-tuned": (
        "extract",
        lambda c, bad, out: [
            "extract",
            "--base",
            str(c.base),
            "--tuned",
            bad,
            "--rank",
            "2",
            "-o",
            _o(out),
            "-q",
        ],
    ),
    "resize": ("resize", lambda c, bad, out: ["resize", bad, "--rank", "2", "-o", _o(out), "-q"]),
    "resize-base": (
        "resize",
        lambda c, bad, out: ["resize", str(c.lora), "--rank", "2", "--base", bad, "-o", _o(out), "-q"],
    ),
    "convert": ("convert", lambda c, bad, out: ["convert", bad, "--dtype", "fp16", "-o", _o(out), "-q"]),
    "cache-norms": (
        "cache",
        lambda c, bad, out: ["cache", "norms", "--base", bad, "--cache-dir", str(out / "norms"), "-q"],
    ),
}

#: The roles of the commands that exist in this tree (resize and convert may be missing in a checkout).
ROLES = {
    name: role
    for name, (module, role) in ALL_ROLES.items()
    if importlib.util.find_spec(f"lorasmith.commands.{module}") is not None
}


@dataclass(frozen=True)
class Expect:
    """What a command must do with an input.

    :ivar code: the exit code (0 accepted, 1 refused, 2 refused by the option parser); ``None``: not run.
    :ivar problem: for a refusal, a regex the message must match; ``None``: the input's own ``problem``.
    :ivar names_file: the message names the input file (always, today; false would mark a gap, to be
        listed in the docs).
    :ivar note: why, for the exceptions to the rule.
    :ivar bug: the run shows a known bug of another module: expected to fail (not strict). None is
        marked today; the field stays for the next bug found, to be listed in the docs' "Known gaps".
    """

    code: int | None
    problem: str | None = None
    names_file: bool = True
    note: str = ""
    bug: str = ""


OK = Expect(0)
REFUSE = Expect(1)
IS_LORA = Expect(1, r"LoRA")  # a checkpoint was expected
IS_CKPT = Expect(1, r"checkpoint")  # a LoRA was expected

#: Expected behaviour per kind of input (see ``corpus.KINDS``) and command role.
TABLE: dict[str, dict[str, Expect]] = {
    "file": dict.fromkeys(ALL_ROLES, REFUSE),
    "pickle": {**dict.fromkeys(ALL_ROLES, REFUSE), "convert": OK},
    "empty": {
        "inspect": OK,
        "merge-lora": Expect(1, r"no known family|no LoRA modules"),
        "merge-base": Expect(1, r"no known family"),
        "merge-models": Expect(1, r"no known family"),
        "extract-base": Expect(1, r"no known family"),
        "extract-tuned": Expect(1, r"no .* checkpoint keys"),
        "resize": Expect(1, r"no LoRA modules"),
        "resize-base": Expect(1, r"no known family"),
        "convert": Expect(None, note="a file with no weights converts to another file with none"),
        "cache-norms": Expect(0, note="no weights: nothing to cache"),
    },
    "lora": {
        "inspect": Expect(0, note="inspect reads headers; the structure is reported, not refused"),
        # the shared LoRA loader checks every module's structure from the header, before any tensor is
        # read, and names the file and the module: `lora.safetensors: adapter module '...': ...`
        "merge-lora": REFUSE,
        "merge-base": IS_LORA,
        "merge-models": IS_LORA,
        "extract-base": IS_LORA,
        "extract-tuned": REFUSE,
        "resize": REFUSE,
        "resize-base": IS_LORA,
        "convert": REFUSE,
        "cache-norms": IS_LORA,
    },
    "nonfinite-lora": {
        "inspect": Expect(0, note="inspect reads headers only"),
        "merge-lora": REFUSE,
        "merge-base": IS_LORA,
        "merge-models": IS_LORA,
        "extract-base": IS_LORA,
        "extract-tuned": REFUSE,
        "resize": REFUSE,
        "resize-base": IS_LORA,
        "convert": REFUSE,
        "cache-norms": IS_LORA,
    },
    "nonfinite-base": {
        "inspect": Expect(0, note="inspect reads headers only"),
        "merge-lora": IS_CKPT,
        "merge-base": REFUSE,
        "merge-models": REFUSE,
        "extract-base": REFUSE,
        "extract-tuned": REFUSE,
        "resize": IS_CKPT,
        "resize-base": REFUSE,
        "convert": REFUSE,
        "cache-norms": REFUSE,
    },
    "valid-lora": {
        "inspect": OK,
        "merge-lora": OK,
        "merge-base": IS_LORA,
        "merge-models": IS_LORA,
        "extract-base": IS_LORA,
        "extract-tuned": OK,
        "resize": OK,
        "resize-base": IS_LORA,
        "convert": OK,
        "cache-norms": IS_LORA,
    },
    "valid-other-lora": {
        "inspect": OK,
        "merge-lora": Expect(1, r"different families"),
        "merge-base": IS_LORA,
        "merge-models": IS_LORA,
        "extract-base": IS_LORA,
        "extract-tuned": Expect(1, r"is a sdxl LoRA, .* a sd1 checkpoint"),
        "resize": OK,
        "resize-base": IS_LORA,
        "convert": OK,
        "cache-norms": IS_LORA,
    },
    "valid-other-base": {
        "inspect": OK,
        "merge-lora": IS_CKPT,
        "merge-base": Expect(1, r"sdxl"),
        "merge-models": Expect(1, r"different families"),
        "extract-base": Expect(1, r"shape|famil|variant"),
        "extract-tuned": Expect(1, r"shape|famil|variant"),
        "resize": IS_CKPT,
        "resize-base": Expect(1, r"Stable Diffusion XL"),
        "convert": Expect(None, note="a valid checkpoint (covered by convert's own tests)"),
        "cache-norms": Expect(None, note="a valid checkpoint (covered by cache norms' own tests; slow)"),
    },
}

#: Single inputs whose behaviour differs from their kind's row.
OVERRIDES: dict[tuple[str, str], Expect] = {
    # Typer's `dir_okay=False` refuses a folder as a usage error before lorasmith sees it
    ("directory", "extract-base"): Expect(2, r"is a directory"),
    ("directory", "extract-tuned"): Expect(2, r"is a directory"),
    ("directory", "cache-norms"): Expect(2, r"is a directory"),
    ("directory", "convert"): Expect(1, r"is a folder", note="convert reads diffusers folders"),
    # refused by every LoRA role, convert included: a module with no delta is a damaged file
    **{("lora_zero_rank", role): Expect(1, r"rank 0") for role in ("merge-lora", "extract-tuned", "resize")},
    ("lora_zero_rank", "convert"): Expect(1, r"rank 0", note="refused like everywhere else, not copied"),
}

#: (input, role) pairs also run in real child processes: a damaged file for every command, a bad LoRA for
#: the LoRA roles, a checkpoint with NaN for the checkpoint roles, and a few file-system oddities.
SUBPROCESS_CASES = [
    *(("trunc_in_data", role) for role in ALL_ROLES),
    *(("lora_only_down", role) for role in ("merge-lora", "extract-tuned", "resize", "convert")),
    *(
        ("base_nan", role)
        for role in ("merge-base", "merge-models", "extract-base", "resize-base", "cache-norms")
    ),
    ("fifo", "inspect"),
    ("symlink_loop", "merge-base"),
    ("other_family_base", "merge-base"),
    ("lora_zero_rank", "merge-lora"),
    ("other_family_lora", "extract-tuned"),
    ("symlink_dangling", "convert"),
]


def expectation(corpus: Corpus, name: str, role: str) -> Expect:
    """The expected behaviour of ``role`` given the input ``name``."""
    if (name, role) in OVERRIDES:
        return OVERRIDES[(name, role)]
    return TABLE[corpus[name].kind][role]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digests(corpus: Corpus) -> dict[Path, str]:
    """Digests of every corpus file before any command ran."""
    return {p: file_digest(p) for p in _regular_files(corpus.folder)}


def _regular_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


# --------------------------------------------------------------------------------------------- checks
def check(result: Completed, expect: Expect, inp_path: Path, problem: str, out: Path) -> None:
    """Assert ``result`` is what ``expect`` says (see the module docstring)."""
    assert not result.traceback, str(result)
    assert result.code == expect.code, str(result)
    written = _files_in(out)
    if expect.code == 0:
        outputs = [p for p in written if p.suffix == ".safetensors"]
        for p in outputs:
            read_header(p)  # a complete, valid file
        assert not [p for p in written if p.name.endswith(".tmp")], written
        return
    assert written == [], f"a refused run wrote {written}\n{result}"
    message = "\n".join(result.stderr.splitlines())
    if expect.code == 2:  # the option parser's usage message
        assert re.search(expect.problem or problem, message, re.IGNORECASE), str(result)
        return
    errors = result.error_lines
    assert len(errors) == 1, str(result)
    other = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(("error:", "hint:"))]
    assert other == [], str(result)
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("hint:")]) <= 1, str(result)
    line = errors[0]
    assert re.search(expect.problem or problem, line, re.IGNORECASE), str(result)
    if expect.names_file:
        assert inp_path.name in line, f"the message does not name {inp_path.name}\n{result}"


def _cases(corpus_names: list[str], roles: list[str]) -> list[tuple[str, str]]:
    return [(n, r) for n in corpus_names for r in roles]


# names are known before the corpus is built: build a throwaway one at collection time would cost a
# second; the list below is checked against the corpus by test_every_input_is_in_the_table
INPUT_NAMES = [
    *("empty", "short", "truncated", "header_past_end", "corrupt_json", "not_utf8", "json_list"),
    *("overlapping_offsets", "unknown_dtype", "nonstring_metadata", "byte_count_mismatch", "random_bytes"),
    *("pickle_renamed", "directory", "pickle"),
    *("trunc_in_length", "trunc_in_header", "trunc_at_data", "trunc_in_data", "trunc_last_byte"),
    *("header_len_zero", "header_len_huge", "header_len_over_limit", "header_len_past_end_json"),
    *("json_string", "json_number", "json_null", "json_bom", "json_deep"),
    *("duplicate_tensor_key", "duplicate_metadata_key"),
    *("offsets_past_end", "offsets_second_past_end", "offsets_contained", "offsets_decreasing"),
    *("offsets_negative", "offsets_not_pair", "offsets_float", "offsets_huge"),
    *("shape_dtype_disagree", "subbyte_odd", "unknown_dtype_lowercase", "dtype_not_string"),
    *("shape_negative", "shape_not_list", "shape_float", "entry_not_object", "entry_missing_offsets"),
    *("metadata_list", "metadata_nested", "metadata_null", "metadata_huge"),
    *("no_tensors", "zero_sized_tensor"),
    *("lora_rank_mismatch", "lora_alpha_shape", "lora_only_down", "lora_only_up", "lora_zero_rank"),
    *("lora_nan", "lora_inf", "base_nan", "base_inf", "other_family_lora", "other_family_base"),
    *("symlink_loop", "symlink_self", "symlink_dangling", "missing", "fifo", "socket", "char_device"),
    *("parent_not_dir", "name_too_long"),
    *(() if os.geteuid() == 0 else ("unreadable", "no_search")),
]


def test_every_input_is_in_the_table(corpus: Corpus) -> None:
    assert len(corpus) >= 40
    assert sorted(corpus.inputs) == sorted(INPUT_NAMES)
    for inp in corpus:
        assert inp.kind in TABLE
        assert set(TABLE[inp.kind]) == set(ALL_ROLES), inp.kind


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_header_reader_on_each_input(corpus: Corpus, name: str) -> None:
    """The library level: a file input fails in the header reader, naming the file and the problem."""
    inp = corpus[name]
    if inp.kind not in ("file", "pickle"):
        read_header(inp.path)  # a valid safetensors file: its problems are for the commands to find
        return
    with pytest.raises(InvalidFileError) as info:
        read_header(inp.path)
    assert "\n" not in info.value.message
    assert inp.path.name in info.value.message
    assert re.search(inp.problem, info.value.message, re.IGNORECASE), info.value.message


@pytest.mark.parametrize(("name", "role"), _cases(INPUT_NAMES, list(ROLES)))
def test_command_on_each_input(
    corpus: Corpus,
    digests: dict[Path, str],
    inproc: InProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    name: str,
    role: str,
) -> None:
    inp = corpus[name]
    expect = expectation(corpus, name, role)
    if expect.code is None:
        pytest.skip(expect.note)
    if expect.bug:  # a known bug of another module (listed in docs/reliability.md): run it all the same
        request.applymarker(pytest.mark.xfail(reason=expect.bug, strict=False))
    out = tmp_path / "out"
    out.mkdir()
    result = inproc.run(ROLES[role](corpus, str(inp.path), out))
    check(result, expect, inp.path, inp.problem, out)


@pytest.mark.parametrize(("name", "role"), [(n, r) for n, r in SUBPROCESS_CASES if r in ROLES])
def test_command_on_input_in_a_process(
    corpus: Corpus, server: CliServer, tmp_path: Path, name: str, role: str
) -> None:
    """The same checks in real processes, for a representative subset of the inputs."""
    inp = corpus[name]
    expect = expectation(corpus, name, role)
    if expect.code is None or expect.bug:
        pytest.skip(expect.note or expect.bug)
    out = tmp_path / "out"
    out.mkdir()
    env = {"LORASMITH_CACHE_DIR": str(tmp_path / "cache")}
    result = server.run(ROLES[role](corpus, str(inp.path), out), env=env)
    check(result, expect, inp.path, inp.problem, out)


@pytest.mark.parametrize(("name", "role"), [("truncated", "inspect"), ("lora_rank_mismatch", "merge-lora")])
def test_fresh_interpreter(corpus: Corpus, tmp_path: Path, name: str, role: str) -> None:
    """Runs in brand-new interpreters (no fork, nothing preloaded; the second one imports torch)."""
    inp = corpus[name]
    out = tmp_path / "out"
    out.mkdir()
    result = fresh_run(ROLES[role](corpus, str(inp.path), out))
    check(result, expectation(corpus, name, role), inp.path, inp.problem, out)


def test_inputs_unchanged(corpus: Corpus, digests: dict[Path, str]) -> None:
    """Runs last in this module: no command modified any input."""
    assert {p: file_digest(p) for p in digests} == digests
