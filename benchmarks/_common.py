"""Helpers shared by the benchmark scripts: machine facts, warm page cache, child processes, memory.

Only the standard library is imported here (torch is imported by the callers that need it), so a wrapper
process built from these helpers adds nothing to a measured child's memory.

- :func:`machine` / :func:`loadavg`: what the figures were taken on, and how busy it was;
- :func:`warm`: read files once so that every timing sees a warm page cache;
- :func:`cpu_seconds`, :func:`rss_mib`, :func:`peak_rss_mib`: this process's own figures (the peak from
  ``VmHWM``, see :func:`peak_rss_mib`);
- :class:`RssSampler`: polls the resident set of this process in a thread and remembers what it was
  doing (a label the caller sets) when the peak was reached;
- :func:`run_json_child`: run a child that prints one JSON line last;
- :func:`measure_process`: run a command as the only child of a small wrapper process and report its wall
  time, CPU time and peak RSS (``getrusage(RUSAGE_CHILDREN)`` is a maximum over all children, hence the
  wrapper);
- :func:`markdown_table`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "RssSampler",
    "cpu_seconds",
    "loadavg",
    "machine",
    "markdown_table",
    "measure_process",
    "peak_rss_mib",
    "rss_mib",
    "run_json_child",
    "warm",
]


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where ``/proc/loadavg`` is unreadable)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            a, b, c = (float(x) for x in fh.read().split()[:3])
            return a, b, c
    except (OSError, ValueError):
        nan = float("nan")
        return nan, nan, nan


def machine() -> dict[str, Any]:
    """CPU model, core count, RAM, Python and torch versions (torch only if already imported)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gib = float("nan")
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
    }


def warm(paths: Iterable[Path]) -> float:
    """Read every file once (warm page cache); returns the read rate in GiB/s."""
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    seconds = time.perf_counter() - t0
    return total / 2**30 / seconds if seconds > 0 else float("inf")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _status_mib(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set of this process image (``VmHWM``; ``ru_maxrss`` where ``/proc`` is missing).

    ``ru_maxrss`` is not used first because Linux carries it over ``fork`` and ``exec``: a child started
    by a parent that holds 800 MiB reports at least 800 MiB. ``VmHWM`` belongs to the process's own
    memory map, which ``exec`` replaces.
    """
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib(pid: int | str = "self") -> float:
    """Current resident set of a process (``VmRSS``), 0 if unknown."""
    return _status_mib("VmRSS", pid) or 0.0


class RssSampler:
    """Poll this process's resident set every ``interval`` seconds in a daemon thread.

    Set :attr:`label` to what the process is doing (the module being processed); the sampler remembers
    the label current at the peak and the largest resident set seen under each label, which tells which
    step of a long run needed the memory. A short spike between two samples can be missed: compare
    :attr:`peak` with ``ru_maxrss``.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.label = "start"
        self.peak = 0.0
        self.peak_label = "start"
        self.by_label: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        rss, label = rss_mib(), self.label
        self.samples += 1
        if rss > self.by_label.get(label, 0.0):
            self.by_label[label] = rss
        if rss > self.peak:
            self.peak, self.peak_label = rss, label

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` labels with the largest resident sets seen, largest first."""
        return sorted(self.by_label.items(), key=lambda kv: -kv[1])[:n]

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_json_child(cmd: Sequence[str]) -> dict[str, Any]:
    """Run ``cmd`` and return the JSON object of its last stdout line; exit with its stderr on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# The wrapper runs in a fresh interpreter with only the standard library, so that RUSAGE_CHILDREN sees
# exactly one child: the measured command.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.run(cmd, capture_output=True, text=True)
seconds = time.perf_counter() - t0
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "returncode": proc.returncode,
    "seconds": seconds,
    "cpu_seconds": r.ru_utime + r.ru_stime,
    "peak_rss_mib": r.ru_maxrss / 1024.0,
    "stdout_tail": proc.stdout[-2000:],
    "stderr_tail": proc.stderr[-3000:],
}))
"""


def measure_process(cmd: Sequence[str]) -> dict[str, Any]:
    """Wall time, CPU time and peak RSS of ``cmd`` run as the only child of a fresh wrapper process.

    :returns: ``seconds``, ``cpu_seconds``, ``peak_rss_mib`` and ``stdout_tail``.
    """
    res = run_json_child([sys.executable, "-c", _WRAPPER, json.dumps(list(cmd))])
    if res["returncode"] != 0:
        raise SystemExit(f"failed ({res['returncode']}): {' '.join(cmd)}\n{res['stderr_tail']}")
    res.pop("stderr_tail", None)
    res.pop("returncode", None)
    return res


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` gives one character per column, ``l`` or ``r`` (default: ``r``
    except the first)."""
    spec = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in spec]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit_json(figures: dict[str, Any], json_out: Path | None) -> None:
    """Print the figures as JSON after a blank line, and write them to ``json_out`` if given."""
    text = json.dumps(figures, indent=2)
    print()
    print(text)
    if json_out is not None:
        json_out.write_text(text + "\n")
