"""What Ax is told of the trials' metrics: the objective and constraint strings, and each value
as Ax models it (memory peaks as logarithms)."""

from __future__ import annotations

import math

from pipeline.config import SearchConfig
from pipeline.core import names


def objective_string(search: SearchConfig) -> str:
    return ", ".join(("-" if o.minimize else "") + o.metric for o in search.objectives)


def outcome_constraints(search: SearchConfig) -> list[str]:
    """Ax's outcome constraint strings: the constraints, and multi-objective thresholds (memory
    bounds as logarithms, as Ax sees memory: `to_ax`)."""
    return [f"{c.metric} {c.op} {to_ax(c.metric, c.bound)[0]!r}" for c in search.all_outcome_constraints()]


def to_ax(metric: str, value: float, sem: float | None = None) -> tuple[float, float | None]:
    """A metric's value (and standard error) as Ax models it. Memory peaks are given as their
    logarithm: memory grows multiplicatively with rank, batch and sequence length, which a GP on
    log-memory fits with a few trials (and an out-of-memory point tells about its neighbours)."""
    if metric not in names.MEMORY_METRICS:
        return float(value), sem
    value = max(float(value), 1e-3)
    return math.log(value), (sem / value if sem is not None else None)


def from_ax(metric: str, value: float) -> float:
    """The inverse of `to_ax` for a value."""
    return math.exp(value) if metric in names.MEMORY_METRICS else value
