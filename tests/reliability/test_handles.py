"""No input file stays open after a command fails on a later input (or at a later step).

A leaked handle is closed only by the garbage collector: harmless in a process that exits, but a library
caller keeps the file open (locked, on Windows) and Python warns about it under ``-X dev``. The check
looks at the process itself: after each run, with the collector off, no file descriptor and no memory
map may point into the corpus folder.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from corpus import Corpus
from harness import InProcess
from test_corpus import ROLES

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")


def _open_under(folder: Path) -> list[str]:
    """Paths under ``folder`` that this process holds open (descriptors and memory maps)."""
    root = str(folder.resolve())
    found: list[str] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(root):
            found.append(target)
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        found += [line.split(maxsplit=5)[-1].strip() for line in fh if root in line]
    return found


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The collector off: a handle kept alive by a reference cycle stays visible."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


#: (role, bad input): the role's valid companion is opened first, then the bad input fails.
CASES = [
    ("merge-lora", "lora_rank_mismatch"),  # the second LoRA fails to load
    ("merge-lora", "trunc_in_data"),
    ("merge-lora", "other_family_lora"),  # both load, the family check fails
    ("merge-lora", "lora_nan"),  # fails while writing (non-finite output)
    ("merge-base", "base_nan"),  # the LoRA loads, the bake fails on the base's data
    ("merge-base", "other_family_base"),
    ("merge-models", "trunc_in_data"),
    ("merge-models", "other_family_base"),
    ("extract-tuned", "lora_zero_rank"),
    ("extract-tuned", "other_family_lora"),
    ("extract-base", "base_nan"),
    ("resize-base", "other_family_base"),
    ("resize", "lora_nan"),
    ("convert", "lora_only_up"),
]


@pytest.mark.parametrize(("role", "name"), CASES)
@pytest.mark.usefixtures("no_gc")
def test_no_handle_outlives_a_failed_run(
    corpus: Corpus, inproc: InProcess, tmp_path: Path, role: str, name: str
) -> None:
    if role not in ROLES:
        pytest.skip(f"no {role} command in this tree")
    out = tmp_path / "out"
    out.mkdir()
    result = inproc.run(ROLES[role](corpus, str(corpus[name].path), out))
    assert result.code == 1 and not result.traceback, str(result)
    assert _open_under(corpus.folder) == [], str(result)
