"""The search's records: what it knows about its baseline, trials, replicates and warm-start
trials, plain and JSON round-trippable (no Ax, MLflow or torch: the report reads them as data).
`journal.py` gives them their life on disk."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import OutcomeConstraint, SearchConfig
from pipeline.core import names

# Trial outcomes (the `trial.status` tag's values). `killed` trials were interrupted: they do not
# count toward n_trials; a resumed search continues them from their checkpoint, or runs their
# config again (`interrupted.py`).
COMPLETED, EARLY_STOPPED, FAILED = names.COMPLETED, names.EARLY_STOPPED, names.FAILED
ABANDONED, KILLED, RUNNING = names.ABANDONED, names.KILLED, names.RUNNING
CRASHED = "interrupted: the search process stopped"
BASELINE = "baseline"  # a ReplicateRecord's `of` when it replicates the baseline


def feasible(t: TrialRecord, constraints: Iterable[OutcomeConstraint]) -> bool:
    """Whether the trial meets every outcome constraint."""
    return all(c.holds(t.metrics.get(c.metric)) for c in constraints)


@dataclass(kw_only=True)
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
    eval_fingerprint: str | None = None
    adapter_dir: str | None = None  # local copy of the run's adapter, kept for the best trial only
    examples_per_step: int = 0  # step s of `evals` is s x this training examples (0: unknown)
    device_seconds: float = 0.0  # time on its device(s), what search.budget_gpu_hours counts
    stopped_by: str | None = None  # for early_stopped: "budget" when a budget, not the rule, stopped it

    @property
    def scored(self) -> bool:
        return (
            self.status in names.SCORED_STATUSES
            and self.eval_loss is not None
            and math.isfinite(self.eval_loss)
        )


@dataclass(kw_only=True)
class BaselineRecord:
    run_id: str
    parameters: dict[str, Any]
    eval_loss: float
    metrics: dict[str, float]
    reused: bool
    in_search_space: bool
    evals: list[tuple[int, float]] = field(default_factory=list)
    examples_per_step: int = 0
    why: str = ""  # why it was reused, or why it was trained


@dataclass(kw_only=True)
class ReplicateRecord:
    """One seed replicate: a replicated configuration (an Ax trial's, or the baseline's) trained
    again with another train.seed, after the search's trials."""

    of: str  # the Ax trial index it replicates, or "baseline"
    seed: int  # its train.seed
    parameters: dict[str, Any]  # the searched keys' values (as the replicated run's)
    chosen_by: str = ""  # why this configuration was replicated
    status: str = RUNNING
    run_id: str | None = None
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    device_seconds: float = 0.0
    failure_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.status in names.FINISHED_STATUSES


@dataclass(kw_only=True)
class WarmTrial:
    """One trial of an earlier search, and what became of it here."""

    source_search: str  # the earlier search's run id
    run_id: str  # the trial's run
    run_name: str
    status: str  # its trial.status there
    parameters: dict[str, Any] = field(default_factory=dict)  # its values of this space's keys
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    index: int | None = None  # its Ax trial index here; None when skipped
    skipped: str | None = None  # why it was not attached
    source_experiment: str = ""  # the earlier search's experiment (for links)

    @property
    def attached(self) -> bool:
        return self.index is not None


@dataclass
class SearchState:
    """Everything the search needs to resume, besides Ax's own JSON."""

    parent_run_id: str
    n_trials: int
    trials: list[TrialRecord] = field(default_factory=list)
    baseline: BaselineRecord | None = None
    retry: list[dict[str, Any]] = field(default_factory=list)  # configs of killed trials, to rerun
    # Ax indices of killed trials that continue from their last checkpoint, in their own run:
    # Ax still calls them running, and they are resubmitted before anything new.
    resumable: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0  # accumulated over sessions (a resumed search adds to it)
    sessions: int = 0
    stop_reason: str = ""
    # Trials of earlier searches given to Ax before the first trial (search.warm_start); None
    # until that is done (a search that crashed before it does it when resumed).
    warm: list[WarmTrial] | None = None
    # Seed replicates after the trials (search.replicates); None until they are chosen.
    replicates: list[ReplicateRecord] | None = None
    # Seed noise (pooled standard deviation of a single run) of each metric Ax is given, once
    # replicates measured it: Ax then gets every observation with this standard error.
    noise_sd: dict[str, float] = field(default_factory=dict)
    # A race's remembered noise ({"sd_pct", "df", "source"}), fixed when the race starts so that
    # its rounds decide the same again on resume and in the report; None: none was remembered.
    race_prior: dict[str, Any] | None = None
    # The started config's values of the keys a resume may not change (`journal.frozen_settings`):
    # a resume compares its config with these. Empty in records saved before they were kept.
    settings: dict[str, Any] = field(default_factory=dict)

    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status in names.FINISHED_STATUSES]

    def scored(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.scored]

    def contenders(self, search: SearchConfig) -> list[TrialRecord]:
        """The trials that can be the answer: completed (an early-stopped trial's loss is from part
        of the training: it ranks, but does not win), scored by the first objective, feasible."""
        metric = search.objectives[0].metric
        return [
            t
            for t in self.scored()
            if t.status == COMPLETED and metric in t.metrics and feasible(t, search.outcome_constraints)
        ]

    def replicated(self, replicate: ReplicateRecord) -> TrialRecord | BaselineRecord | None:
        """The selection run a replicate repeats: its trial's record, or the baseline's."""
        return self.baseline if replicate.of == BASELINE else self.record(int(replicate.of))

    def record(self, index: int) -> TrialRecord | None:
        return next((t for t in self.trials if t.index == index), None)

    def device_seconds(self) -> float:
        """Device time of every trial and replicate so far (what search.budget_gpu_hours counts)."""
        return sum(t.device_seconds for t in self.trials) + sum(
            r.device_seconds for r in self.replicates or []
        )

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
        warm, replicates = data.get("warm"), data.get("replicates")
        rest = {k: v for k, v in data.items() if k not in ("trials", "baseline", "warm", "replicates")}
        return cls(
            trials=trials,
            baseline=baseline,
            warm=None if warm is None else [WarmTrial(**w) for w in warm],
            replicates=None if replicates is None else [ReplicateRecord(**r) for r in replicates],
            **rest,
        )
