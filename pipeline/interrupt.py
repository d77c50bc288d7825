"""Ctrl-C and SIGTERM as a request, not an exception: a flag that training and the search check
at safe points.

A signal handler that raises at an arbitrary point can land inside library code that swallows
the exception. Under `graceful_stop()` the signals only set `STOP_REQUESTED`; the training
callback raises KeyboardInterrupt after the current optimizer step (the trial's run ends KILLED),
and the search loop stops at the next trial boundary, so a finished trial is always recorded.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_REQUESTED = threading.Event()


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Route SIGINT and SIGTERM (a scheduler's kill) to STOP_REQUESTED while the block runs."""
    STOP_REQUESTED.clear()

    def handler(signum, frame):
        STOP_REQUESTED.set()

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        STOP_REQUESTED.clear()
