"""Plain records of a search, shared by the search loop, the report and the registry.

They are JSON round-trippable (``search_state/trials.json`` on the parent run), so a resumed
search and a report rebuilt later see exactly what the search saw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Trial outcomes. `killed` trials were interrupted (Ctrl-C, SIGTERM, a crash of the search
# process): they do not count toward n_trials, and a resumed search runs their config again.
COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
FAILED = "failed"
ABANDONED = "abandoned"
KILLED = "killed"
RUNNING = "running"
FINISHED_STATUSES = (COMPLETED, EARLY_STOPPED, FAILED, ABANDONED)
SCORED_STATUSES = (COMPLETED, EARLY_STOPPED)


@dataclass
class TrialRecord:
    index: int  # Ax trial index
    parameters: dict[str, Any]
    status: str = RUNNING
    run_id: str | None = None
    run_name: str = ""
    generation_method: str = ""
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    max_steps: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    failure_reason: str | None = None

    @property
    def scored(self) -> bool:
        return self.status in SCORED_STATUSES and self.eval_loss is not None and math.isfinite(self.eval_loss)


@dataclass
class BaselineRecord:
    run_id: str
    parameters: dict[str, Any]
    eval_loss: float
    metrics: dict[str, float]
    reused: bool
    in_search_space: bool
    evals: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SearchState:
    """Everything the search needs to resume, besides Ax's own JSON."""

    parent_run_id: str
    n_trials: int
    trials: list[TrialRecord] = field(default_factory=list)
    baseline: BaselineRecord | None = None
    retry: list[dict[str, Any]] = field(default_factory=list)  # configs of killed trials, to rerun
    wall_seconds: float = 0.0  # accumulated over sessions (a resumed search adds to it)
    sessions: int = 0
    stop_reason: str = ""

    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status in FINISHED_STATUSES]

    def scored(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.scored]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        trials = [
            TrialRecord(**{**t, "evals": [tuple(e) for e in t.get("evals", [])]})
            for t in data.get("trials", [])
        ]
        base = data.get("baseline")
        baseline = (
            BaselineRecord(**{**base, "evals": [tuple(e) for e in base.get("evals", [])]}) if base else None
        )
        rest = {k: v for k, v in data.items() if k not in ("trials", "baseline")}
        return cls(trials=trials, baseline=baseline, **rest)
