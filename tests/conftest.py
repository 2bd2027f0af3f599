"""Suite-wide checks."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

# A shell starts background jobs with SIGINT ignored (`cmd &`, nohup), and children inherit that: the
# interrupt tests would then see no KeyboardInterrupt and their child processes could not be stopped with
# Ctrl-C. Give the test process (and so its children) Python's normal handler back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _signal_handlers_are_left_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test (nor the code it runs) may leave SIGINT/SIGTERM handled differently: a SIGINT left ignored
    is inherited by every child process the later tests start, which then cannot be interrupted."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    for sig, handler in before.items():
        if after[sig] != handler:
            signal.signal(sig, handler)  # put it back, so that one culprit does not fail the rest
            pytest.fail(f"{request.node.nodeid} left {signal.Signals(sig).name} handled by {after[sig]!r}")
