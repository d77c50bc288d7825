"""The search's budgets: wall-clock minutes (`search.budget_minutes`, over all sessions of a
resumed search) and device-hours (`search.budget_gpu_hours`: each trial's time on every device it
holds, replicates and still-running trials included). One function of the records and a clock, so
a test drives it with a fake clock."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.config import SearchConfig
from pipeline.search.records import SearchState


def spent(
    search: SearchConfig,
    records: SearchState,
    now: float,
    accounted_at: float,
    running: Mapping[int, float],
    devices_per_trial: float,
) -> str | None:
    """Why the search must stop now (a spent budget), or None. `records.wall_seconds` holds the
    wall time up to the clock value `accounted_at`; `running`: when each job still running
    started, on the same clock as `now`."""
    elapsed = records.wall_seconds + now - accounted_at
    if search.budget_minutes and elapsed >= search.budget_minutes * 60:
        return f"wall-clock budget of {search.budget_minutes:g} minutes spent"
    if search.budget_gpu_hours:
        in_flight = sum(now - t for t in running.values()) * devices_per_trial
        used = (records.device_seconds() + in_flight) / 3600
        if used >= search.budget_gpu_hours:
            return f"device budget of {search.budget_gpu_hours:g} device-hours spent ({used:.3g} used)"
    return None
