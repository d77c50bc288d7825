"""Where the time of a trial or a search goes: exclusive wall time per phase.

Phases nest (an evaluation hook inside training, a metric flush inside an evaluation); each
second is counted once, in the innermost phase running, so the phases add up to the time
measured. Logged as `time_<phase>_s` metrics; bench/overhead.py turns them into the pipeline's
overhead against pure training and evaluation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Clock = Callable[[], float]


class PhaseTimer:
    """Exclusive seconds per phase; `with timer.phase("x"):` or `timer.wrap("x", fn)`.

    `clock` is injectable (tests drive a fake one instead of sleeping)."""

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._since = clock()

    def _switch(self) -> None:
        now = self.clock()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def wrap(self, name: str, fn: F) -> F:
        """`fn`, timed as `name` at every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed  # type: ignore[return-value]

    def metrics(self, prefix: str = "time_") -> dict[str, float]:
        return {f"{prefix}{k}_s": round(v, 4) for k, v in sorted(self.seconds.items())}
