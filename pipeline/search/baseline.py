"""The search's baseline: the config's own values of the searched keys, trained once.

A finished baseline run of the same config (same config fingerprint) in the experiment is
reused instead of trained again (`search.reuse_baseline`). Either way the loop then gives it to
Ax as the status-quo arm, and the report measures every trial against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import names, tracking
from pipeline.config import PipelineConfig, config_fingerprint, values_at
from pipeline.errors import PipelineError
from pipeline.search.executor import Executor, TrialJob
from pipeline.search.state import BaselineRecord
from pipeline.trial import RunSpec, discard_local_adapter


def baseline_parameters(config: PipelineConfig) -> dict[str, Any]:
    """The base config's value of every search dimension."""
    return values_at(config, config.search.parameters)


def require_metrics(metrics: dict[str, float], required: list[str], what: str) -> None:
    """PipelineError when a run did not log a metric the search optimizes or constrains."""
    missing = [m for m in required if m not in metrics]
    if missing:
        raise PipelineError(
            f"search.objectives: {what} logged no {', '.join(missing)} (is it a metric of this setup? "
            "eval_<metric> needs eval.generation_metric; peak_gpu_* needs CUDA)"
        )


def find_or_train(
    config: PipelineConfig, parent: tracking.TrackedRun, executor: Executor, echo: Callable[[str], None]
) -> BaselineRecord:
    """The baseline: a reusable earlier run, or one trained now under `parent` by `executor`.

    A baseline that fails raises its error: without it, no trial can be judged."""
    trial_base = config.model_copy(update={"search": None})
    params = baseline_parameters(config)
    required = config.search.required_metrics()
    fp = config_fingerprint(trial_base)
    reused = (
        tracking.find_reusable_baseline(parent.experiment_id, fp, required)
        if config.search.reuse_baseline
        else None
    )
    if reused is not None:
        echo(
            f"baseline: reusing run {reused.run_id} (same config fingerprint {fp}), eval_loss {reused.eval_loss:.4f}"
        )
        return BaselineRecord(
            reused.run_id,
            params,
            reused.eval_loss,
            dict(reused.metrics),
            True,
            False,
            tracking.metric_history(reused.run_id, names.EVAL_LOSS),
            reused.examples_per_step,
        )
    echo("baseline: training the baseline config")
    executor.submit(
        TrialJob(-1, trial_base, {}, RunSpec(names.ROLE_BASELINE, parent_run_id=parent.run_id)), None
    )
    outcome = executor.wait_any()
    if outcome.result is None:
        raise outcome.error or PipelineError(f"baseline: {outcome.reason}")
    result = outcome.result
    discard_local_adapter(result.adapter_dir)  # it is on the run; no one promotes a baseline
    require_metrics(result.metrics, required, "the baseline")
    echo(f"baseline: eval_loss {result.eval_loss:.4f} ({result.wall_seconds:.0f}s)")
    return BaselineRecord(
        result.run_id,
        params,
        result.eval_loss,
        result.metrics,
        False,
        False,
        result.evals,
        result.examples_per_step,
    )
