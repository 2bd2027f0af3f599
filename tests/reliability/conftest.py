"""Shared fixtures of the reliability tests: the corpus, the CLI runners."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from corpus import Corpus, build_corpus
from harness import CliServer, InProcess


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """The corpus of bad inputs and its valid companions; the norms cache is kept out of $HOME."""
    c = build_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("norms-cache")
    old = os.environ.get("LORASMITH_CACHE_DIR")
    os.environ["LORASMITH_CACHE_DIR"] = str(cache)  # resize --base caches norms
    yield c
    if old is None:
        os.environ.pop("LORASMITH_CACHE_DIR", None)
    else:
        os.environ["LORASMITH_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def server(corpus: Corpus) -> Iterator[CliServer]:
    """One forking CLI server for the whole session (torch imported once)."""
    with CliServer() as s:
        s.preload(files=[corpus.lora, corpus.base, corpus.xl_lora])
        yield s


@pytest.fixture(scope="session")
def inproc() -> InProcess:
    """The CLI run inside the test process."""
    return InProcess()
