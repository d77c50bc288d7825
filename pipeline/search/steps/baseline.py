"""The search's baseline: the config's own values of the searched keys, trained once.

A finished baseline run of the same config (same config fingerprint) in the experiment is
reused instead of trained again (`search.reuse_baseline`). Either way the loop then gives it to
Ax as the status-quo arm, and the report measures every trial against it.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, SearchConfig, trial_config, values_at
from pipeline.core import console, names
from pipeline.core.errors import PipelineError
from pipeline.model.adapter import discard_local_adapter
from pipeline.search.executors.local import Executor, TrialJob
from pipeline.search.records import BaselineRecord
from pipeline.trial.resources import NUMERICS_PACKAGES, Resources, identity
from pipeline.trial.resume import has_checkpoint
from pipeline.trial.run import RunSpec


def baseline_parameters(config: PipelineConfig) -> dict[str, Any]:
    """The base config's value of every search dimension (of the conditional ones, those its
    values switch on)."""
    return config.search.active(values_at(config, config.search.parameters))


def require_metrics(metrics: dict[str, float], search: SearchConfig, what: str) -> None:
    """PipelineError, led by the key that names it, when a run did not log a metric the search
    optimizes or constrains. (The config and the search's start refuse the metrics known not to
    exist here; this catches the rest, e.g. a hub metric's key or a Ray worker without CUDA.)"""
    missing = [(key, m) for key, m in search.named_metrics() if m not in metrics]
    if missing:
        key = missing[0][0]
        raise PipelineError(
            f"{key}: {what} logged no {', '.join(dict.fromkeys(m for _, m in missing))} (is it a metric of "
            "this setup? eval_<metric> needs eval.generation_metric; peak_gpu_* needs CUDA)"
        )


LABELS = {
    names.DATA_FINGERPRINT: "data",
    names.EVAL_FINGERPRINT: "eval set",
    names.DEVICE: "device",
    names.PRECISION: "precision",
    names.PACKAGE_VERSIONS: "versions",
}
SAME = "same config, data, eval set, device, precision and torch/transformers/peft/bitsandbytes versions"


def reusable(
    candidates: list[tracking.RunRecord], identity: dict[str, str], required: list[str]
) -> tuple[tracking.RunRecord | None, str]:
    """The newest candidate measured like this search would measure (same data, eval set,
    device, precision and numerics versions) that logged every required metric, and why it was
    chosen; or None and why none was."""
    refusals = []
    for run in candidates:
        differs = [
            f"{label} {run.tags.get(key, '?')!s:.60} vs {identity[key]!s:.60}"
            for key, label in LABELS.items()
            if _tag(run, key) != identity[key]
        ]
        missing = [m for m in required if m not in run.metrics]
        if not differs and not missing:
            return run, SAME
        why = "; ".join(differs) or f"no {', '.join(missing)}"
        refusals.append(f"run {run.run_id} differs ({why})")
    if not candidates:
        return None, "no finished baseline of this config in the experiment"
    return None, "; ".join(refusals[:3]) + (" ..." if len(refusals) > 3 else "")


def _tag(run: tracking.RunRecord, key: str) -> str | None:
    """A run's tag as `identity` writes it (of the versions, only the numerics packages)."""
    value = run.tags.get(key)
    if key != names.PACKAGE_VERSIONS or value is None:
        return value
    versions = json.loads(value)
    return json.dumps({p: versions.get(p) for p in NUMERICS_PACKAGES}, sort_keys=True)


def _interrupted_baseline(config: PipelineConfig, parent_run_id: str) -> str | None:
    """This search's baseline run, if a kill interrupted it after a checkpoint: it continues."""
    for run in tracking.children_of(parent_run_id):
        killed = run.role == names.ROLE_BASELINE and run.tags.get(names.TRIAL_STATUS) == names.KILLED
        if killed and has_checkpoint(config.train, run.run_id):
            return run.run_id
    return None


def find_or_train(
    config: PipelineConfig,
    parent: tracking.TrackedRun,
    executor: Executor,
    resources: Resources,
) -> BaselineRecord:
    """The baseline: a reusable earlier run, or one trained now under `parent` by `executor`.

    A baseline that fails raises its error: without it, no trial can be judged."""
    trial_base = trial_config(config)
    params = baseline_parameters(config)
    reused, why = None, "search.reuse_baseline is off"
    if config.search.reuse_baseline:
        me = identity(trial_base, resources)
        candidates = tracking.finished_baselines(parent.experiment_id, me[names.CONFIG_FINGERPRINT])
        reused, why = reusable(candidates, me, config.search.required_metrics())
    if reused is not None:
        console.say(f"baseline: reusing run {reused.run_id} ({why}), eval_loss {reused.eval_loss:.4f}")
        evals = tracking.metric_history(reused.run_id, names.EVAL_LOSS)
        return _record(reused, params, evals, reused=True, why=why)
    left = _interrupted_baseline(config, parent.run_id)
    console.say(f"baseline: {'continuing' if left else 'training'} the baseline config ({why})")
    spec = RunSpec(names.ROLE_BASELINE, parent_run_id=parent.run_id, resume=left)
    executor.submit(TrialJob(-1, trial_base, {}, spec), None)
    outcome = executor.wait_any()
    if outcome.result is None:
        raise outcome.error or PipelineError(f"baseline: {outcome.reason}")
    result = outcome.result
    discard_local_adapter(result.adapter_dir)  # it is on the run; no one promotes a baseline
    require_metrics(result.metrics, config.search, "the baseline")
    console.say(f"baseline: eval_loss {result.eval_loss:.4f} ({result.wall_seconds:.0f}s)")
    return _record(result, params, result.evals, reused=False, why=why)


def _record(run: Any, params: dict[str, Any], evals: list, *, reused: bool, why: str) -> BaselineRecord:
    """The baseline's record from its run: an earlier finished one, or the one trained now (both
    carry run_id, eval_loss, metrics and examples_per_step)."""
    return BaselineRecord(
        run_id=run.run_id,
        parameters=params,
        eval_loss=run.eval_loss,
        metrics=dict(run.metrics),
        reused=reused,
        in_search_space=False,
        evals=evals,
        examples_per_step=run.examples_per_step,
        why=why,
    )
