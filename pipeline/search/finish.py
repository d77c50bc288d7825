"""The end of a search: the best trial, the search run's summary metrics, best_config.yaml, the
registry's decision and the report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, config_fingerprint, to_yaml, trial_config
from pipeline.core import console, names
from pipeline.core.files import write_atomic
from pipeline.core.provenance import git_commit, package_versions
from pipeline.core.timing import PhaseTimer
from pipeline.model.device import hardware
from pipeline.registry import versions as registry
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.records import SearchState, TrialRecord
from pipeline.search.report import evidence
from pipeline.search.report.markdown import ReportContext, description, write_report
from pipeline.search.report.summary import best_trial, pareto_front, search_metrics


@dataclass
class SearchResult:
    parent_run_id: str
    state: SearchState
    best: TrialRecord | None
    report_dir: Path
    best_config_path: Path | None
    promotion: registry.Promotion | None
    best_config: PipelineConfig | None = None  # what best_config.yaml holds, for a caller to go on with


def finish(
    config: PipelineConfig,
    state: SearchState,
    optimizer: Optimizer,
    run: tracking.TrackedRun,
    directory: Path,
    timer: PhaseTimer,
) -> SearchResult:
    """Decide the best trial, log the summary, write best_config.yaml, register, report."""
    with timer.phase("ax"):
        analysis = _analysis(config, state, optimizer)
    observed = best_trial(state, config.search, [p["index"] for p in analysis["pareto"]])
    ev = evidence.gather(config, state, observed, tracking.example_scores)
    best = ev.recommended
    # improvement_pct is eval_loss's (the interval's estimate when eval_loss is the objective).
    on_loss = config.search.objectives[0].metric == names.EVAL_LOSS
    summary = search_metrics(state, best, ev.improvement if on_loss else None)
    run.log_metrics(summary, step=len(state.finished()), flush=True)
    best_config = best_config_path = promotion = None
    if best is not None:
        best_config = trial_config(config, best.parameters)
        best_config_path = write_best_config(best_config, best, ev, run, directory)
        with timer.phase("registry"):
            promotion = register_best(config, best_config, best, summary, run, ev)
        console.say(f"registry: {promotion.message}")
    context = ReportContext(
        config=config,
        state=state,
        best=best,
        analysis=analysis,
        promotion=promotion.message if promotion else None,
        evidence=ev,
        provenance=_provenance(config),
        experiment_id=run.experiment_id,
    )
    report_dir = directory / names.REPORT_DIR
    with timer.phase("report"):
        write_report(context, report_dir)
        run.log_artifacts(report_dir, names.REPORT_DIR)
    if best is not None:
        run.set_tags({names.NOTE: description(context), names.SEARCH_BEST_RUN: best.run_id})
    console.say(
        f"report: {report_dir / names.REPORT_FILE} (and artifact {names.REPORT_DIR}/ of run {run.run_id})"
    )
    run.log_metrics(timer.metrics("search_time_"), step=len(state.finished()), flush=True)
    return SearchResult(run.run_id, state, best, report_dir, best_config_path, promotion, best_config)


def _analysis(config: PipelineConfig, state: SearchState, optimizer: Optimizer) -> dict[str, Any]:
    """Ax's analysis of the search, with the Pareto front of a multi-objective search."""
    analysis = optimizer.analysis()
    if len(config.search.objectives) > 1:
        analysis["pareto"] = [
            {
                "index": t.index,
                "parameters": dict(t.parameters),
                "metrics": {o.metric: t.metrics[o.metric] for o in config.search.objectives},
            }
            for t in pareto_front(state, config.search)
        ]
    return analysis


def _provenance(config: PipelineConfig) -> dict[str, str]:
    """What the report says produced it: code, seed, config, packages, hardware."""
    return {
        "git_commit": git_commit(Path(__file__).parent),
        "seed": str(config.search.seed),
        "config_fingerprint": config_fingerprint(config),
        **package_versions(),
        **hardware(),
    }


def write_best_config(
    best_config: PipelineConfig,
    best: TrialRecord,
    ev: evidence.Evidence,
    run: tracking.TrackedRun,
    directory: Path,
) -> Path:
    """best_config.yaml: the recommended trial's complete config, locally and on the search run."""
    path = directory / names.BEST_CONFIG_FILE
    text = to_yaml(
        best_config,
        f"best config of search {run.run_id}: trial {best.index} (run {best.run_id}), "
        f"eval_loss {best.eval_loss:.4f}, chosen as {ev.rule}. "
        "Retrain: mlflow run . -e retrain -P best_config=<this file>",
    )
    write_atomic(path, text)
    run.log_text(text, names.BEST_CONFIG_FILE)
    return path


def register_best(
    config: PipelineConfig,
    best_config: PipelineConfig,
    best: TrialRecord,
    summary: dict[str, Any],
    run: tracking.TrackedRun,
    ev: evidence.Evidence,
) -> registry.Promotion:
    """Register the recommendation; a registry failure is reported, it does not cost the report."""
    try:
        # Records saved by an older version lack the fingerprint: read it off the run then.
        fp = best.eval_fingerprint or tracking.get_run(best.run_id).eval_fingerprint
        adapter = Path(best.adapter_dir) if best.adapter_dir else None
        offer = registry.candidate(
            config, best.run_id, best.metrics, best.eval_loss, fp, adapter, tuple(ev.scores)
        )
        if ev.recommended_mean is not None:  # judged on its fresh seeds' mean, not its lucky run
            offer = replace(offer, value=ev.recommended_mean)
        interval = ev.improvement
        return registry.promote(
            config.registry.model_name,
            offer,
            tags={
                names.VERSION_SEARCH_RUN: run.run_id,
                names.VERSION_IMPROVEMENT_PCT: summary.get(names.IMPROVEMENT_PCT),
                names.VERSION_IMPROVEMENT_CI: f"{interval.low:.2f} to {interval.high:.2f} % ({interval.method()})"
                if interval
                else None,
            },
            description=registry.version_description(
                offer,
                to_yaml(best_config),
                experiment_id=run.experiment_id,
                role=names.ROLE_TRIAL,
                metrics=best.metrics,
                search_run_id=run.run_id,
                improvement_pct=summary.get(names.IMPROVEMENT_PCT),
                interval=interval,
                rule=registry.Rule.of(config),
            ),
            rule=registry.Rule.of(config),
        )
    except Exception as e:
        message = f"registration failed, nothing registered: {type(e).__name__}: {e}"
        run.set_tags({names.ERROR: message[:500]})
        return registry.Promotion(config.registry.model_name, "", False, message)
