"""The champion gate: whether a new adapter version replaces the registered `champion`.

Pure (no MLflow): `registry.promote` gathers the candidate's and the champion's scores and asks
`judge`. The rule (`registry.min_improvement`, `registry.confidence`): the candidate becomes
champion only when the lower bound of its improvement over the champion, a confidence interval
paired on the same eval examples (and across seeds where replicates exist, see `stats`), is above
`min_improvement` percent. A candidate that wins on its point value but not beyond its interval is
registered and the alias stays, with the reason. Where no interval can be computed (a champion
registered before per-example scores existed), the point values decide, and the reason says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.core.stats import SCALAR, ExampleScores, Interval, NotComparable, from_stderr, improvement
from pipeline.training import lmeval


@dataclass(frozen=True)
class Candidate:
    """An adapter offered to the registry: the run that trained it and how it scored.

    `adapter_dir` is the local copy of the run's `adapter/` when the caller still has it (then
    nothing is downloaded); otherwise the run's artifact is fetched from the store."""

    run_id: str
    eval_loss: float
    eval_fingerprint: str
    adapter_dir: Path | None = None
    # What it is judged on against the champion: eval_loss unless the search had another first
    # objective (a task score); `fingerprint` says when two such scores compare.
    objective: str = names.EVAL_LOSS
    minimize: bool = True
    value: float | None = None
    fingerprint: str | None = None
    # The runs its score rests on (per-example scores; with replicates, one per fresh seed), and
    # a task score's harness stderr: what the interval against the champion is computed from.
    scores: tuple[ExampleScores, ...] = ()
    stderr: float | None = None

    @property
    def score(self) -> float:
        return self.eval_loss if self.value is None else self.value

    @property
    def score_fingerprint(self) -> str:
        return self.fingerprint or self.eval_fingerprint


def candidate(
    config: PipelineConfig,
    run_id: str,
    metrics: dict[str, float],
    eval_loss: float,
    eval_fp: str,
    adapter: Any,
    scores: tuple[ExampleScores, ...] = (),
) -> Candidate:
    """The candidate as `config` judges it: on its search's first objective (eval_loss without
    a search section, or when a trial lacks the metric)."""
    objective = config.search.objectives[0] if config.search is not None else None
    if objective is None or objective.metric == names.EVAL_LOSS or objective.metric not in metrics:
        return Candidate(run_id, eval_loss, eval_fp, adapter, scores=scores)
    fp = eval_fp
    if objective.metric.startswith(names.LMEVAL_PREFIX) and config.eval.lm_eval is not None:
        fp = f"{eval_fp}+{lmeval.fingerprint(config.eval.lm_eval)}"
    return Candidate(
        run_id,
        eval_loss,
        eval_fp,
        adapter,
        objective.metric,
        objective.minimize,
        metrics[objective.metric],
        fp,
        scores=scores,
        stderr=metrics.get(f"{objective.metric}_stderr"),
    )


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version, as the pipeline reads it."""

    name: str
    version: str
    tags: dict[str, str]

    @property
    def search_run_id(self) -> str | None:
        return self.tags.get(names.VERSION_SEARCH_RUN)

    def scored_runs(self) -> list[tuple[int | None, str]]:
        """(train seed, run id) of the runs its score rests on (`seed:run,...`)."""
        out = []
        for item in filter(None, self.tags.get(names.VERSION_SCORED_RUNS, "").split(",")):
            seed, _, run = item.rpartition(":")
            out.append((int(seed) if seed.lstrip("-").isdigit() else None, run))
        return out


@dataclass(frozen=True)
class Rule:
    """registry.min_improvement (percent) and registry.confidence."""

    min_improvement: float = 0.0
    confidence: float = 0.95

    @classmethod
    def of(cls, config: PipelineConfig) -> Rule:
        """The rule `config.registry` sets."""
        return cls(config.registry.min_improvement, config.registry.confidence)

    def text(self) -> str:
        return (
            f"champion moves when the lower bound of the {self.confidence:.0%} CI of the improvement "
            f"over it is above {self.min_improvement:g} %"
        )


DEFAULT_RULE = Rule()


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    interval: Interval | None = None  # the improvement over the champion, when computed


def judge(
    candidate: Candidate,
    champion: VersionRecord | None,
    champion_scores: list[ExampleScores] | None = None,
    rule: Rule = DEFAULT_RULE,
) -> Verdict:
    """Whether a new version should become champion, and why (a sentence): better beyond doubt
    on the candidate's objective, measured the same way as the champion's (same eval data; for a
    task score, the same task settings and files)."""
    metric, value = candidate.objective, candidate.score
    if not math.isfinite(value):
        return Verdict(False, f"{metric} {value} is not finite")
    if champion is None:
        return Verdict(True, "no champion yet")
    tags, v = champion.tags, champion.version
    held = tags.get(names.VERSION_OBJECTIVE, names.EVAL_LOSS)
    if held != metric:
        return Verdict(False, (
            f"champion v{v} was chosen on {held}, this version on {metric}: they do not compare; "
            "promote by hand if intended"
        ))  # fmt: skip
    old_fp = tags.get(names.VERSION_OBJECTIVE_FINGERPRINT, tags.get(names.VERSION_EVAL_FINGERPRINT))
    if old_fp != candidate.score_fingerprint:
        what = "eval data" if metric == names.EVAL_LOSS else "eval data or task settings"
        return Verdict(False, (
            f"champion v{v} was evaluated on other {what} (fingerprint {old_fp} vs "
            f"{candidate.score_fingerprint}), so the scores do not compare; promote by hand if intended"
        ))  # fmt: skip
    old = float(tags.get(names.VERSION_OBJECTIVE_VALUE, tags.get(names.VERSION_EVAL_LOSS, "nan")))
    if not math.isfinite(old):
        return Verdict(True, f"champion v{v} has no finite {metric}")
    interval, why_not = _interval(candidate, champion, champion_scores, rule)
    point = f"{metric} {value:.4f}"
    if interval is None:
        better = value < old if candidate.minimize else value > old
        gain = (1 if candidate.minimize else -1) * 100.0 * (old - value) / abs(old)
        if rule.min_improvement > 0:
            better = gain > rule.min_improvement
        note = f" (point comparison: {why_not})" if why_not else ""
        if better:
            return Verdict(True, f"{point} beats champion v{v} ({old:.4f}){note}")
        return Verdict(False, f"{point} does not beat champion v{v} ({old:.4f}){note}")
    against = f"improvement over champion v{v} ({old:.4f}): {interval.text()}"
    if interval.beyond(rule.min_improvement):
        return Verdict(True, f"{point} beats champion v{v} beyond doubt; {against}", interval)
    return Verdict(
        False,
        f"{point} does not beat champion v{v} beyond doubt; {against}; the lower bound is not above "
        f"registry.min_improvement {rule.min_improvement:g} %",
        interval,
    )


def _interval(
    candidate: Candidate, champion: VersionRecord, champion_scores: list[ExampleScores] | None, rule: Rule
) -> tuple[Interval | None, str]:
    """The candidate's improvement over the champion, or None and why not."""
    if not candidate.scores:
        return None, "" if champion_scores is None else "no per-example scores for this version"
    if candidate.scores[0].ids == SCALAR and len(candidate.scores) == 1:
        se = champion.tags.get(names.VERSION_OBJECTIVE_STDERR)
        if candidate.stderr is None or se is None:
            return None, "one run each and no stderr"
        old = float(champion.tags.get(names.VERSION_OBJECTIVE_VALUE, "nan"))
        return from_stderr(
            candidate.score, candidate.stderr, old, float(se), candidate.minimize, rule.confidence
        ), ""
    if not champion_scores:
        return (
            None,
            f"champion v{champion.version} has no per-example scores (registered by an older version)",
        )
    try:
        return improvement(list(candidate.scores), champion_scores, candidate.minimize, rule.confidence), ""
    except NotComparable as e:
        return None, str(e)


def decide(candidate: Candidate, champion: VersionRecord | None) -> tuple[bool, str]:
    """`judge` without scores: the point comparison (kept for callers that have no scores)."""
    verdict = judge(candidate, champion)
    return verdict.promote, verdict.reason
