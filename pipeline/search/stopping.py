"""Early stopping as this config plans it: what trials are compared at (the progression unit),
whether the rule is on, from what progression and after how many curves it may act, and whether
it can act at all in this search. Pure functions of the config (Ax's strategy is built from
them in `space.py`); the loop warns with `unreachable` at the start, and the report says why no
trial was stopped (`summary.why_no_stopping`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.core import events, names


def progression_unit(config: PipelineConfig) -> str:
    """`steps` or `examples`: what early stopping compares trials at (see EarlyStoppingSpec).

    `auto` compares every trial at the same share of its own planned training: optimizer steps
    when trials run train.max_steps steps whatever their batch size, training examples when they
    run epochs (then a bigger batch takes fewer steps for the same share)."""
    unit = config.search.early_stopping.progression
    if unit != "auto":
        return unit
    return events.STEPS if config.train.max_steps > 0 else events.EXAMPLES


def progression(config: PipelineConfig, step: int, examples_per_step: int) -> int:
    """A trial's progression at `step`, in the search's unit (`events.progression`)."""
    return events.progression(progression_unit(config), step, examples_per_step)


@dataclass(frozen=True)
class StoppingPlan:
    """The early-stopping rule of a search: on or off (and why off), and its thresholds."""

    enabled: bool
    why_off: str | None  # a sentence, when off
    min_progression: int  # in the search's progression unit
    min_curves: int
    percentile: float


def stopping_plan(config: PipelineConfig) -> StoppingPlan:
    """Whether Ax's percentile rule on eval_loss runs (auto: trials evaluate at least 3 times),
    and from where. The config has checked that an enabled rule has `train.eval_steps`."""
    es, tr = config.search.early_stopping, config.train
    evals_per_trial = tr.max_steps // tr.eval_steps if tr.eval_steps and tr.max_steps > 0 else 0
    why_off = None
    if es.enabled is False:
        why_off = "search.early_stopping.enabled is false"
    elif not tr.eval_steps:
        why_off = "trials evaluate only at the end (set train.eval_steps)"
    elif es.enabled is None and evals_per_trial < 3:
        why_off = (
            "search.early_stopping.enabled is auto and trials evaluate fewer than 3 times (set "
            "train.eval_steps to at most a third of train.max_steps, or enabled: true)"
        )
    elif names.EVAL_LOSS not in [o.metric for o in config.search.objectives]:
        why_off = f"the rule watches {names.EVAL_LOSS}, and it is not an objective"
    # Default: the config's own first evaluation, or a third of its training, in the search's unit.
    eval_steps = tr.eval_steps or 1
    base_steps = max(eval_steps, tr.max_steps // 3 if tr.max_steps > 0 else eval_steps)
    min_progression = es.min_progression or progression(
        config, base_steps, tr.batch_size * tr.gradient_accumulation_steps
    )
    return StoppingPlan(why_off is None, why_off, min_progression, es.min_curves, es.percentile)


def unreachable(config: PipelineConfig, train_examples: int, baseline_counts: bool = True) -> str | None:
    """Why an enabled rule can never stop a trial of this search, or None when it can.

    Ax stops a trial only at an evaluation before its last step, at a progression of at least
    `min_progression`, once `min_curves` trials are COMPLETED (the baseline among them when it is
    in the search space: `baseline_counts`). For each batch size the search may try, the last
    such evaluation is computed from the planned steps (max_steps, or epochs over
    `train_examples`); when none reaches `min_progression`, or `n_trials` leaves no trial after
    the ones that must complete first, the rule never acts."""
    plan = stopping_plan(config)
    if not plan.enabled:
        return None
    search, tr = config.search, config.train
    first = plan.min_curves - (1 if baseline_counts else 0)  # trials that must complete first
    if search.n_trials <= first:
        return (
            f"search.early_stopping.min_curves is {plan.min_curves}: {first} trial(s)"
            f"{' besides the baseline' if baseline_counts else ''} must complete before any is stopped, "
            f"and the search runs {search.n_trials}"
        )
    unit = progression_unit(config)
    reach = []
    for batch in _batch_sizes(config):
        per_step = batch * tr.gradient_accumulation_steps
        steps = (
            tr.max_steps if tr.max_steps > 0 else math.ceil(math.ceil(train_examples / per_step) * tr.epochs)
        )
        last = (steps - 1) // tr.eval_steps * tr.eval_steps  # the last evaluation before the end
        reach.append((progression(config, last, per_step), batch, steps))
    best, batch, steps = max(reach)
    if best >= plan.min_progression:
        return None
    return (
        f"search.early_stopping.min_progression is {plan.min_progression} {unit}, and the last "
        f"evaluation before a trial ends comes at {best} {unit} at most (train.eval_steps "
        f"{tr.eval_steps}, {steps} steps of batch {batch}): lower min_progression or train longer"
    )


def _batch_sizes(config: PipelineConfig) -> list[int]:
    """The batch sizes trials may train with: the searched ones, else the config's."""
    spec = config.search.parameters.get("train.batch_size")
    if spec is None:
        return [config.train.batch_size]
    if spec.type == "range":
        return [int(b) for b in spec.bounds]
    return [int(v) for v in spec.choices()]
