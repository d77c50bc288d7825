"""What the search's decisions rest on, with their uncertainty: the recommended configuration,
its improvement on the baseline with a confidence interval, the winner's curse, and which of the
replicated configurations the data cannot tell apart.

Without replicates the recommendation is the best observed trial and its interval covers the
eval-set noise only (paired on the eval examples: one seed each). With replicates the
recommendation is the configuration with the best mean over its fresh seeds (the selection
run is left out of that mean: it was picked for being low, the winner's curse); when the
configurations closest to it are not distinguishable from it at `registry.confidence`, the one
with the fewest trainable parameters is recommended (a stated rule: equal quality, cheaper to
serve), and its improvement on the baseline pairs the same fresh seeds on both sides.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.core.stats import (
    SCALAR,
    ExampleScores,
    Interval,
    NotComparable,
    from_stderr,
    improvement,
    scalar_scores,
)
from pipeline.search import race
from pipeline.search.records import BASELINE, COMPLETED, SearchState, TrialRecord

Fetch = Callable[[str, str], ExampleScores | None]  # (run id, metric) -> its per-example scores


@dataclass
class Replicated:
    """One replicated configuration (or the baseline): its fresh-seed runs and their values."""

    key: str  # the Ax trial index, or "baseline"
    runs: list[tuple[int, str, float]]  # (seed, run id, objective value), fresh seeds only
    selection_value: float | None  # the run the search measured first (seed train.seed)
    trainable: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(v for _, _, v in self.runs)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(v for _, _, v in self.runs) if len(self.runs) >= 2 else None


@dataclass
class Evidence:
    recommended: TrialRecord | None = None
    rule: str = ""  # how the recommendation was chosen, one sentence
    improvement: Interval | None = None  # the recommendation on the baseline
    single_run_pct: float | None = None  # the selection run on the baseline run (one seed each)
    configs: list[Replicated] = field(default_factory=list)  # replicated, best mean first
    baseline: Replicated | None = None
    indistinguishable: list[str] = field(default_factory=list)  # keys no better-beyond-doubt than the best
    scores: list[ExampleScores] = field(default_factory=list)  # the recommendation's runs' (registry)
    notes: list[str] = field(default_factory=list)  # why an interval is missing

    @property
    def winners_curse(self) -> float | None:
        """The recommendation's selection value minus its fresh-seed mean (in the objective's
        units; negative when minimizing means the selection run looked better than it is)."""
        top = self._replicated(self.recommended)
        if top is None or top.selection_value is None:
            return None
        return top.selection_value - top.mean

    @property
    def recommended_mean(self) -> float | None:
        """The recommendation's mean over its fresh seeds (None without replicates): the score
        it is registered and judged with."""
        top = self._replicated(self.recommended)
        return top.mean if top is not None else None

    def _replicated(self, trial: TrialRecord | None) -> Replicated | None:
        return next((c for c in self.configs if trial is not None and c.key == str(trial.index)), None)


def gather(config: PipelineConfig, state: SearchState, best: TrialRecord | None, fetch: Fetch) -> Evidence:
    """The evidence behind the recommendation. `best`: the best observed trial (summary.best_trial)."""
    if best is None:
        return Evidence()
    objective = config.search.objectives[0]
    ev = Evidence(recommended=best, rule="the best observed trial (no replicates)")
    base = state.baseline
    groups = _replicated(config, state)
    if groups:
        _rank(config, state, groups, ev, fetch)
    elif base is not None:
        cand = _scores(config, [(config.train.seed, best.run_id, best.metrics.get(objective.metric))], fetch)
        ref = _scores(config, [(config.train.seed, base.run_id, base.metrics.get(objective.metric))], fetch)
        ev.scores = cand
        ev.improvement = _interval(config, cand, ref, best.metrics, base.metrics, ev.notes)
    chosen = ev.recommended
    if base is not None and objective.metric in base.metrics and objective.metric in chosen.metrics:
        old, new = base.metrics[objective.metric], chosen.metrics[objective.metric]
        sign = 1 if objective.minimize else -1
        ev.single_run_pct = sign * 100.0 * (old - new) / abs(old) if old else None
    return ev


def _replicated(config: PipelineConfig, state: SearchState) -> dict[str, Replicated]:
    metric = config.search.objectives[0].metric
    out: dict[str, Replicated] = {}
    for r in state.replicates or []:
        if r.status != COMPLETED or metric not in r.metrics or r.run_id is None:
            continue
        if r.of not in out:
            first = state.replicated(r)
            out[r.of] = Replicated(
                r.of,
                [],
                first.metrics.get(metric) if first is not None else None,
                first.metrics.get(names.TRAINABLE_PARAMS) if first is not None else None,
            )
        out[r.of].runs.append((r.seed, r.run_id, r.metrics[metric]))
    return out


def _rank(
    config: PipelineConfig, state: SearchState, groups: dict[str, Replicated], ev: Evidence, fetch: Fetch
) -> None:
    objective = config.search.objectives[0]
    sign = 1 if objective.minimize else -1
    ev.baseline = groups.pop(BASELINE, None)
    ev.configs = sorted(groups.values(), key=lambda c: sign * c.mean)
    if not ev.configs:
        return
    scores = {c.key: _scores(config, c.runs, fetch) for c in ev.configs}
    # A race's dropped finalists stay in the table but not in the running: each was worse than
    # the leader beyond doubt on the seeds both ran.
    alive = set(race.decide(config, state).alive) if config.search.replicates.mode == "race" else None
    running = [c for c in ev.configs if alive is None or c.key in alive] or ev.configs
    top = running[0]
    for other in running[1:]:
        try:
            gap = improvement(
                scores[top.key], scores[other.key], objective.minimize, config.registry.confidence
            )
        except NotComparable:
            continue
        if not gap.beyond(0.0):
            ev.indistinguishable.append(other.key)
    pool = [top, *(c for c in running if c.key in ev.indistinguishable)]
    chosen = min(pool, key=lambda c: (c.trainable if c.trainable is not None else math.inf, sign * c.mean))
    ev.recommended = state.record(int(chosen.key)) or ev.recommended
    n = len(chosen.runs)
    if len(pool) > 1:
        ev.rule = (
            f"{len(pool)} configurations are not distinguishable at {config.registry.confidence:.0%} "
            f"(trials {', '.join(c.key for c in pool)}); the one with the fewest trainable parameters "
            f"is recommended (trial {chosen.key})"
        )
    else:
        ev.rule = f"the best mean over {n} fresh seed{'s' if n != 1 else ''} of the replicated configurations"
    ev.scores = scores[chosen.key]
    if ev.baseline is not None:
        ref = _scores(config, ev.baseline.runs, fetch)
        ev.improvement = _interval(config, ev.scores, ref, {}, {}, ev.notes)


def _scores(
    config: PipelineConfig, runs: list[tuple[int, str, float | None]], fetch: Fetch
) -> list[ExampleScores]:
    """The runs' per-example scores of the first objective (eval losses, a task metric's
    per-document scores), or, where a run has none, every run's value as a scalar (compared
    across seeds only)."""
    metric = config.search.objectives[0].metric
    out = [fetch(run_id, metric) for _, run_id, _ in runs]
    if out and all(s is not None for s in out):
        return out
    if metric == names.EVAL_LOSS:
        return []  # an eval loss without per-example scores: no interval (said in the notes)
    return [scalar_scores(v, seed, metric, run_id) for seed, run_id, v in runs if v is not None]


def _interval(
    config: PipelineConfig,
    cand: list[ExampleScores],
    ref: list[ExampleScores],
    cand_metrics: dict[str, float],
    ref_metrics: dict[str, float],
    notes: list[str],
) -> Interval | None:
    objective = config.search.objectives[0]
    metric, conf = objective.metric, config.registry.confidence
    se = f"{metric}_stderr"
    single = len(cand) == 1 and len(ref) == 1
    if single and cand[0].ids == SCALAR and se in cand_metrics and se in ref_metrics:
        return from_stderr(
            cand_metrics[metric],
            cand_metrics[se],
            ref_metrics[metric],
            ref_metrics[se],
            objective.minimize,
            conf,
        )
    if single and cand[0].ids == SCALAR:
        notes.append(f"no interval: one run per side and no per-example scores or stderr of {metric}")
        return None
    try:
        return improvement(cand, ref, objective.minimize, conf)
    except NotComparable as e:
        notes.append(f"no interval: {e}")
        return None
