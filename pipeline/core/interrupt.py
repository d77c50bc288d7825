"""Ctrl-C and SIGTERM as a request, not an exception: one flag that training and the search check
at safe points, and the only place that reads it.

A signal handler that raises at an arbitrary point can land inside library code that swallows
the exception. Under `graceful_stop()` the signals only set the flag; the training callback
(`callbacks.StopOnRequest`) raises KeyboardInterrupt after the current optimizer step (the trial's
run ends KILLED), and the search loop stops at the next trial boundary, so a finished trial is
always recorded.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_STOP = threading.Event()


def stop_requested() -> bool:
    """Was a stop requested (SIGINT or SIGTERM under `graceful_stop`)?"""
    return _STOP.is_set()


def request_stop() -> None:
    """Ask everything that checks to stop at its next safe point (what the signals do)."""
    _STOP.set()


def raise_if_requested(where: str) -> None:
    """KeyboardInterrupt(`where`) if a stop was requested: the safe points call this."""
    if _STOP.is_set():
        raise KeyboardInterrupt(where)


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Route SIGINT and SIGTERM (a scheduler's kill) to the stop flag while the block runs."""
    _STOP.clear()

    def handler(signum, frame):
        _STOP.set()

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
        _STOP.clear()
