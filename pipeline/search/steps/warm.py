"""Warm start: the trials earlier searches measured, given to Ax before this search's first trial.

`search.warm_start` names earlier search runs. Each of their completed and early-stopped trials
whose numbers this search would have measured the same way is attached to the new Ax experiment
with its eval-loss curve (so early stopping compares against it) and its final metrics, at its
progression. "The same way": every model, data, LoRA, training and eval setting that this search
does not vary is equal, the data and eval set have the same fingerprints, the trial logged every
metric this search optimizes or constrains, and its values of this search's dimensions lie in
this space (which may be wider or narrower than the earlier one, or have more or fewer keys).
Every other trial is skipped, with the reason, which the report lists.

Warm trials are not this search's trials: they do not count toward `n_trials` and are not
promoted (their search already had its chance at the registry); Ax sees them as measured, so it
does not propose their configurations as new ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from pipeline import tracking
from pipeline.config import (
    NO_RESULT_KEYS,
    RESULT_SECTIONS,
    PipelineConfig,
    flatten,
    to_dict,
    trial_config,
    values_at,
    with_overrides,
)
from pipeline.config.search import ParameterSpec
from pipeline.core import console, names
from pipeline.core.errors import PipelineError
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.records import WarmTrial
from pipeline.search.stopping import progression
from pipeline.trial.resources import Resources, identity

# Besides the config: what the run tags say it was measured on (the device may differ: the same
# precision on another GPU measures the same loss, up to noise).
MEASURED_ON = {
    names.DATA_FINGERPRINT: "data",
    names.EVAL_FINGERPRINT: "eval set",
    names.PRECISION: "precision",
}


def check_sources(config: PipelineConfig) -> list[tracking.RunRecord]:
    """The warm-start search runs, each checked to exist and be a search (before this search's
    own run is created, so a typo leaves nothing behind)."""
    tracking.setup(config.tracking)
    return [tracking.require_search_run(rid, "search.warm_start") for rid in config.search.warm_start]


def parse_value(text: str | None, spec: ParameterSpec) -> Any:
    """A run's param text as a value of dimension `spec`; ValueError when it is none."""
    if text is None:
        raise ValueError("not logged")
    if spec.type == "range":
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"{text} is not a finite number")
        integer = all(float(b).is_integer() for b in spec.bounds) and number.is_integer()
        return int(number) if integer and "." not in text else number
    for value in spec.choices():
        if tracking.param_text(value) == text or (
            not isinstance(value, (bool, str)) and _float(text) == float(value)
        ):
            return value
    return text  # kept as is: the membership check says it is outside


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def outside(spec: ParameterSpec, value: Any) -> str | None:
    """Why `value` is not in dimension `spec`, or None."""
    if spec.type == "range":
        low, high = spec.bounds
        return None if low <= value <= high else f"outside [{low:g}, {high:g}]"
    choices = spec.choices()
    return None if value in choices else f"not in {choices}"


def match(
    run: tracking.RunRecord,
    config: PipelineConfig,
    me: dict[str, str],
    in_space: Callable[[dict[str, Any]], bool],
) -> tuple[dict[str, Any], str | None]:
    """This search's parameters for an earlier trial run, and why it cannot be used (or None).

    `me` holds this search's data and eval fingerprints and precision (`trial.identity`)."""
    search = config.search
    status = run.tags.get(names.TRIAL_STATUS)
    if status not in names.SCORED_STATUSES or run.eval_loss is None or not math.isfinite(run.eval_loss):
        return {}, f"{status or run.status.lower()} (no result to reuse)"
    for key, label in MEASURED_ON.items():
        if run.tags.get(key) != me.get(key):
            return {}, f"{label} differs ({run.tags.get(key)} there, {me.get(key)} here)"
    trial_base = trial_config(config)
    base = flatten(to_dict(trial_base))
    for key, value in sorted(base.items()):
        if not key.startswith(tuple(f"{s}." for s in RESULT_SECTIONS)) or key in NO_RESULT_KEYS:
            continue
        if key in search.parameters:
            continue
        there = run.params.get(key, _default_text(trial_base, key))
        if there != tracking.param_text(value):
            there = "not logged" if there is None else there
            return {}, f"{key} is {there:.40} there, {tracking.param_text(value):.40} here"
    params: dict[str, Any] = {}
    for key, spec in search.parameters.items():
        try:
            params[key] = parse_value(run.params.get(key), spec)
        except ValueError as e:
            return params, f"{key}: {e}"
    for key, spec in search.parameters.items():
        why = outside(spec, params[key])
        if why:
            return params, f"outside this space: {key}={run.params.get(key)} {why}"
    # As the config types them (alpha is a float even when written 16), like the baseline's.
    params = values_at(with_overrides(trial_base, params), list(params))
    if not in_space(params):
        return params, "outside this space: breaks search.constraints"
    missing = [m for m in search.required_metrics() if m not in run.metrics]
    if missing:
        return params, f"logged no {', '.join(missing)}"
    return params, None


def attach(
    config: PipelineConfig,
    optimizer: Optimizer,
    sources: list[tracking.RunRecord],
    me: dict[str, str],
) -> list[WarmTrial]:
    """Attach every usable trial of the `sources` searches to Ax; all of them, with what became
    of each, in the order attached."""
    out: list[WarmTrial] = []
    seen: dict[str, WarmTrial] = {}
    for source in sources:
        runs = tracking.trials_of(source)
        if not runs:
            raise PipelineError(f"search.warm_start: search run {source.run_id} has no trial runs")
        for run in runs:
            params, why = match(run, config, me, optimizer.in_search_space)
            warm = WarmTrial(
                source_search=source.run_id,
                run_id=run.run_id,
                run_name=run.name,
                status=run.tags.get(names.TRIAL_STATUS, run.status.lower()),
                parameters=params,
                eval_loss=run.eval_loss,
                metrics={k: float(v) for k, v in run.metrics.items() if names.is_trial_metric(k)},
                source_experiment=source.experiment_id,
            )
            key = json.dumps(params, sort_keys=True, default=str)
            twin = seen.get(key)
            if why is None and twin is not None:
                why = f"same configuration as {twin.run_id} (attached)"
            if why is None:
                steps, eps = int(run.metrics.get(names.TRAIN_STEPS, 0)), run.examples_per_step
                curve = [
                    (progression(config, int(s), eps), loss)
                    for s, loss in tracking.metric_history(run.run_id, names.EVAL_LOSS)
                ]
                warm.index = optimizer.attach_measured(
                    params,
                    curve,
                    optimizer.ax_metrics(run.metrics),
                    progression(config, steps, eps),
                    warm.status == names.EARLY_STOPPED,
                )
                seen[key] = warm
            warm.skipped = why
            out.append(warm)
        used = sum(w.attached for w in out if w.source_search == source.run_id)
        console.say(f"warm start: {used} of {len(runs)} trials of search {source.run_id} attached to Ax")
    return out


def start(
    config: PipelineConfig,
    optimizer: Optimizer,
    parent: tracking.TrackedRun,
    resources: Resources,
) -> list[WarmTrial]:
    """The warm start of a new search (nothing when `search.warm_start` is empty): trials
    attached to Ax, the sources linked from the parent run."""
    if not config.search.warm_start:
        return []
    sources = check_sources(config)
    me = identity(trial_config(config), resources)
    out = attach(config, optimizer, sources, me)
    parent.set_tags({names.SEARCH_WARM_START: ",".join(s.run_id for s in sources)})
    return out


def _default_text(config: PipelineConfig, key: str) -> str | None:
    """A key an earlier version did not log (it did not exist yet) ran as its default does: the
    default's param text, or None where the key has no default or is nested deeper."""
    section, _, name = key.partition(".")
    field = type(getattr(config, section, None)).model_fields.get(name) if "." not in name else None
    if field is None or field.is_required():
        return None
    return tracking.param_text(field.get_default(call_default_factory=True))
