"""When failed trials stop a search: too many of them, or all of them.

A space that cannot run fails every trial the same way, so while no trial has a score the rate
counts from the first trial; once one has, from 3 on (one bad draw should not end a search).
Out-of-memory trials teach Ax where memory runs out: alone they count from 3 on too. A search
that stops for failures registers nothing and says why in one line, with where the first
failure's traceback is.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import tracking
from pipeline.core import names
from pipeline.core.errors import SearchAborted
from pipeline.search.records import ABANDONED, FAILED, TrialRecord

MIN_TRIALS = 3  # once a trial has a score: failures count from this many trials on


def check(done: Sequence[TrialRecord], max_rate: float) -> None:
    """Stop the search (SearchAborted) when `max_rate` of the finished trials failed."""
    bad = [t for t in done if t.status in (FAILED, ABANDONED)]
    unscored = len(bad) == len(done) and any(t.status == FAILED for t in bad)
    if bad and (len(done) >= MIN_TRIALS or unscored) and len(bad) / len(done) >= max_rate:
        raise SearchAborted(_why(done, f"(search.max_failure_rate {max_rate:g})"))


def require_a_score(done: Sequence[TrialRecord]) -> None:
    """A search whose every trial failed has no champion: it fails too."""
    if done and all(t.status in (FAILED, ABANDONED) for t in done):
        raise SearchAborted(_why(done, "and none has a score"))


def _why(done: Sequence[TrialRecord], reason: str) -> str:
    bad = [t for t in done if t.status in (FAILED, ABANDONED)]
    first = bad[0]
    where = f" (run {first.run_id})" if first.run_id else ""
    if first.run_id and tracking.has_artifact(first.run_id, names.ERROR_FILE):
        where = f" (traceback: {names.ERROR_FILE} of run {first.run_id}, or rerun with -v)"
    return (
        f"search stopped: {len(bad)} of {len(done)} trials failed {reason}; nothing registered; "
        f"first failure, trial {first.index}: {first.failure_reason}{where}"
    )
