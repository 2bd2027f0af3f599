"""Run the ``lorasmith`` CLI in real child processes without paying for ``import torch`` every time.

Importing torch takes seconds, and the reliability tests need dozens of real processes (exit codes,
signals, resource limits). :class:`CliServer` starts one Python process that imports torch and the CLI
once, then forks a child per run: each child is a real process running ``lorasmith <argv>`` as the console
script does (``lorasmith.cli.main`` with ``sys.argv``; an uncaught exception prints a traceback and exits
1, an uncaught ``KeyboardInterrupt`` kills the process with SIGINT; at the end the atexit handlers run and
the output is flushed, then the child leaves with ``os._exit``, skipping only the seconds of module
teardown that torch costs), with its own stdout/stderr files, environment, working
folder and resource limits. The test process sees its pid, so it can send it signals.

``fresh_run`` runs a brand-new interpreter instead, for the few checks that must not depend on the fork.

Per-run options (:meth:`CliServer.start`):

- ``rlimits``: ``{"RLIMIT_FSIZE": bytes, ...}`` set in the child before the CLI runs;
  ``as_headroom``: an ``RLIMIT_AS`` of the child's current address space plus this many bytes;
- ``ignore_sigxfsz``: ignore SIGXFSZ, so that writing past ``RLIMIT_FSIZE`` fails with ``EFBIG``;
- ``throttle``: sleep this long before each write of the safetensors writer and each ``numpy.savez``, so
  that a run lasts long enough to be interrupted in the middle of writing (timing only; the code paths
  are the real ones);
- ``threads``: torch's intra-op thread count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON = sys.executable

#: Modules the server imports before forking (what the commands would import on their first use).
DEFAULT_PRELOAD = (
    "torch",
    "lorasmith.cli",
    "lorasmith.ops.inspect",
    "lorasmith.ops.merge",
    "lorasmith.ops.extract",
    "lorasmith.ops.resize",
    "lorasmith.ops.convert",
    "lorasmith.ops.cache.norms",
)

_SERVER = r"""
import json, os, resource, signal, sys, time, traceback

def _private_tmpfs(path, size, seed):
    # a tmpfs of `size` bytes on `path`, seen by this process only: a real "disk full"
    import ctypes, shutil
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = 0x00020000 if uid == 0 else 0x00020000 | 0x10000000  # CLONE_NEWNS (| CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    if libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"none", path.encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")
    for src in seed:
        shutil.copy(src, path)


def _listing(folder, target):
    import hashlib
    names = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            names[name] = hashlib.sha256(fh.read()).hexdigest()
    with open(target, "w") as fh:
        json.dump(names, fh)


def _child(req):
    if req["tmpfs"]:
        try:
            _private_tmpfs(req["tmpfs"]["path"], req["tmpfs"]["size"], req["tmpfs"]["seed"])
        except OSError as exc:
            with open(req["stderr"], "w") as fh:
                fh.write(f"harness: no private tmpfs ({exc})\n")
            os._exit(99)
    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    for key in req["unset"]:
        os.environ.pop(key, None)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a foreground run
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if req["ignore_sigxfsz"]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if req["threads"]:
        import torch
        torch.set_num_threads(req["threads"])
    if req["throttle"]:
        delay = req["throttle"]
        from lorasmith.io import writer
        pwrite = writer.SafetensorsWriter._pwrite
        def slow_pwrite(self, data, offset):
            time.sleep(delay)
            return pwrite(self, data, offset)
        writer.SafetensorsWriter._pwrite = slow_pwrite
        import numpy
        savez = numpy.savez
        def slow_savez(*a, **k):
            time.sleep(delay)
            return savez(*a, **k)
        numpy.savez = slow_savez
    for name, value in req["rlimits"].items():
        kind = getattr(resource, name)
        resource.setrlimit(kind, (value, resource.getrlimit(kind)[1]))
    if req["as_headroom"]:
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (vm + req["as_headroom"], hard))
    sys.argv = ["lorasmith", *req["argv"]]
    from lorasmith.cli import main
    code = 0
    try:
        main()
    except SystemExit as exc:  # what the interpreter would do with it
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # uncaught: Python prints it and dies of SIGINT
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    if req["tmpfs"]:  # the mount goes away with this process: record what it holds now
        _listing(req["tmpfs"]["path"], req["tmpfs"]["listing"])
    _finish()
    os._exit(code)


def _finish():
    # what a normal exit does that matters here (atexit handlers: weakref.finalize cleanups; flushing),
    # without the seconds that tearing torch's modules down takes
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def _serve():
    for mod in sys.argv[1:]:
        __import__(mod)
    from lorasmith.registry import get_registry
    get_registry()
    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "preload":
            for mod in req["modules"]:
                __import__(mod)
            from lorasmith.ops.inspect import inspect_file
            for path in req["files"]:  # detection builds each family's alias tables once, here
                try:
                    inspect_file(path)
                except Exception:
                    pass
            reply.write(json.dumps({"ok": True}) + "\n")
        elif req["op"] == "exec":  # in a throwaway child: the server itself never runs torch ops
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    exec(req["source"], {"__name__": "__exec__"})
                except BaseException:
                    traceback.print_exc()
                    code = 1
                _finish()
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        elif req["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(req)
                sys.exit(0)
            reply.write(json.dumps({"pid": pid}) + "\n")
        elif req["op"] == "wait":
            deadline = time.monotonic() + req["timeout"]
            while True:
                done, status = os.waitpid(req["pid"], os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(req["pid"], signal.SIGKILL)
                    os.waitpid(req["pid"], 0)
                    status = None
                    break
                time.sleep(0.01)
            code = None if status is None else os.waitstatus_to_exitcode(status)
            reply.write(json.dumps({"code": code}) + "\n")
        reply.flush()

_serve()
"""


@dataclass(frozen=True)
class Completed:
    """A finished run: exit code (negative: killed by that signal; ``None``: timed out) and output."""

    argv: tuple[str, ...]
    code: int | None
    stdout: str
    stderr: str
    listing: dict[str, str] | None = None

    @property
    def error_lines(self) -> list[str]:
        """The ``error:`` lines of stderr."""
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def traceback(self) -> bool:
        """Whether stderr holds a Python traceback."""
        return "Traceback (most recent call last)" in self.stderr

    def __str__(self) -> str:
        return (
            f"lorasmith {' '.join(self.argv)} -> {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


@dataclass
class Child:
    """A running child: its pid and where its output goes."""

    pid: int
    argv: tuple[str, ...]
    stdout: Path
    stderr: Path
    listing: Path | None = None


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: no debug tracebacks, a wide terminal, plus ``extra``."""
    env = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.update(extra or {})
    return env


class CliServer:
    """A process that forks ``lorasmith`` runs; see the module docstring. Use as a context manager."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lorasmith-cli-")
        self._n = 0
        env = dict(os.environ)
        env.pop("LORASMITH_DEBUG", None)
        self._proc = subprocess.Popen(
            [PYTHON, "-c", _SERVER, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_default_sigint,
        )
        self._ask(None)

    def _ask(self, request: dict[str, Any] | None) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if request is not None:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI server died (exit code {self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def preload(self, *modules: str, files: Sequence[str | os.PathLike[str]] = ()) -> None:
        """Import ``modules`` and inspect ``files`` in the server, so that children start with the modules
        loaded and the families' lookup tables built."""
        self._ask({"op": "preload", "modules": list(modules), "files": [os.fspath(f) for f in files]})

    def exec(self, source: str) -> None:
        """Run Python ``source`` in a child of the server (with whatever the server has imported).

        :raises RuntimeError: the code raised (its traceback went to this process's stderr).
        """
        answer = self._ask({"op": "exec", "source": source})
        if answer["code"] != 0:
            raise RuntimeError(f"server-side code failed with exit code {answer['code']}")

    def start(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        rlimits: Mapping[str, int] | None = None,
        as_headroom: int | None = None,
        ignore_sigxfsz: bool = False,
        throttle: float = 0.0,
        threads: int = 0,
        tmpfs: tuple[str | os.PathLike[str], int, Sequence[str | os.PathLike[str]]] | None = None,
    ) -> Child:
        """Fork a child running ``lorasmith argv``; return at once.

        ``tmpfs=(folder, size, seed files)`` mounts a tmpfs of ``size`` bytes on ``folder`` that only the
        child sees (a private mount namespace), copies the seed files into it, and records the folder's
        contents (name -> sha256) when the run ends: :attr:`Completed.listing`. A child that cannot set
        it up exits with code 99.
        """
        self._n += 1
        out = Path(self._tmp.name) / f"{self._n}.out"
        err = Path(self._tmp.name) / f"{self._n}.err"
        listing = Path(self._tmp.name) / f"{self._n}.listing"
        fs = None
        if tmpfs is not None:
            fs = {
                "path": os.fspath(tmpfs[0]),
                "size": tmpfs[1],
                "seed": [os.fspath(f) for f in tmpfs[2]],
                "listing": str(listing),
            }
        args = tuple(os.fspath(a) for a in argv)
        answer = self._ask(
            {
                "op": "spawn",
                "argv": list(args),
                "cwd": os.fspath(cwd or os.getcwd()),
                "env": child_env(env),
                "unset": ["LORASMITH_DEBUG"],
                "stdout": str(out),
                "stderr": str(err),
                "rlimits": dict(rlimits or {}),
                "as_headroom": as_headroom or 0,
                "ignore_sigxfsz": ignore_sigxfsz,
                "throttle": throttle,
                "threads": threads,
                "tmpfs": fs,
            }
        )
        return Child(int(answer["pid"]), args, out, err, listing if fs else None)

    def wait(self, child: Child, timeout: float = 120.0) -> Completed:
        """Wait for ``child`` (killed after ``timeout`` seconds: exit code ``None``)."""
        answer = self._ask({"op": "wait", "pid": child.pid, "timeout": timeout})
        listing = None
        if child.listing is not None and child.listing.exists():
            listing = json.loads(child.listing.read_text())
        return Completed(
            child.argv,
            answer["code"],
            child.stdout.read_text(errors="replace"),
            child.stderr.read_text(errors="replace"),
            listing,
        )

    def run(self, argv: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0, **kw: Any) -> Completed:
        """Run ``lorasmith argv`` to the end (see :meth:`start` for the options)."""
        return self.wait(self.start(argv, **kw), timeout)

    def close(self) -> None:
        """Stop the server."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._tmp.cleanup()

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_sigint() -> None:
    # a test run started in the background inherits SIGINT ignored; a user's foreground run does not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fresh_run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Completed:
    """Run ``python -m lorasmith argv`` in a brand-new interpreter."""
    full = dict(os.environ)
    full.pop("LORASMITH_DEBUG", None)
    full.update(child_env(env))
    args = tuple(os.fspath(a) for a in argv)
    proc = subprocess.run(
        [PYTHON, "-m", "lorasmith", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_default_sigint,
    )
    return Completed(args, proc.returncode, proc.stdout, proc.stderr)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until it is true (return ``True``) or ``timeout`` passes (``False``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The hidden temporary files (``.*.tmp``) of a folder."""
    return sorted(Path(folder).glob(".*.tmp"))


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (for "inputs unchanged" checks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InProcess:
    """Run the CLI inside this process (no fork): for the many quick checks of the corpus table.

    The Typer app is turned into its command once (Typer's own test runner rebuilds it on every call).
    An exception that escapes the CLI is printed as a traceback on the captured stderr, as Python would.
    """

    def __init__(self) -> None:
        import typer.main

        from lorasmith.cli import app

        self._cli = typer.main.get_command(app)

    def run(self, argv: Sequence[str | os.PathLike[str]]) -> Completed:
        """Run ``lorasmith argv`` and return its exit code and output."""
        import contextlib
        import io
        import traceback

        args = tuple(os.fspath(a) for a in argv)
        out, err = io.StringIO(), io.StringIO()
        code: int | None = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                self._cli.main(args=list(args), prog_name="lorasmith")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
        return Completed(args, code, out.getvalue(), err.getvalue())
