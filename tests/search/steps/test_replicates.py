"""Seed replicates after the trials (`pipeline/search/steps/replicates.py`): tagged, told to Ax,
resumable."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.core import names
from pipeline.search import run_search
from pipeline.search.ax.optimizer import Optimizer

from ...conftest import DEMO_CONFIG, tiny_overrides


def _replicated_search(tmp_path, n_trials: int, model: str, **extra):
    """A tiny demo search that replicates its best configuration and the baseline on 2 seeds."""
    values = {
        "search.n_trials": n_trials,
        "search.output_dir": str(tmp_path / "search"),
        "search.early_stopping.enabled": False,
        "search.replicates.top_k": 1,
        "search.replicates.seeds": 2,
        "registry.model_name": model,
        **extra,
    }
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **values))


def test_replicates_are_tagged_told_to_ax_and_decide(tmp_path, capsys):
    """A search with replicates: the chosen configuration and the baseline on two fresh seeds,
    nested and tagged, not counted as trials; Ax gets (mean, sem) for them and the pooled seed
    noise for the rest; the report's improvement carries a CI and the single-run value; the
    registered version states the interval and the rule."""
    config = _replicated_search(tmp_path, 3, "noise", **{"train.eval_steps": 4})
    result = run_search(config, quiet=True)
    runs = tracking.children_of(result.parent_run_id)
    reps = [r for r in runs if names.TRIAL_REPLICATE_OF in r.tags]
    assert len(reps) == 4 and len(tracking.trials_of(result.parent_run_id)) == 3
    of = {(r.tags[names.TRIAL_REPLICATE_OF], r.tags[names.TRIAL_REPLICATE_SEED]) for r in reps}
    chosen = next(k for k, _ in of if k != "baseline")
    assert of == {(k, s) for k in ("baseline", chosen) for s in ("43", "44")}
    assert all(r.tags[names.TRIAL_STATUS] == names.COMPLETED for r in reps)
    parent = tracking.get_run(result.parent_run_id)
    assert parent.metrics[names.TRIALS_COMPLETED] == 3 and parent.metrics[names.REPLICATE_RUNS] == 4
    low, high = parent.metrics[names.IMPROVEMENT_CI_LOW], parent.metrics[names.IMPROVEMENT_CI_HIGH]
    assert low < parent.metrics[names.IMPROVEMENT_PCT] < high

    # Ax: the replicated trial's (mean, sem) over its three runs; every other observation the
    # pooled seed noise as its standard error.
    state = result.state
    trial = state.record(int(chosen))
    own = [trial.eval_loss, *(r.eval_loss for r in state.replicates if r.of == chosen)]
    base = [state.baseline.eval_loss, *(r.eval_loss for r in state.replicates if r.of == "baseline")]
    sd = math.sqrt((statistics.variance(own) * 2 + statistics.variance(base) * 2) / 4)
    ax = Optimizer.load(tmp_path / "search" / result.parent_run_id / "search_state" / "ax_state.json", config)
    final = ax.observations(names.EVAL_LOSS)
    assert final[int(chosen)] == pytest.approx((statistics.fmean(own), statistics.stdev(own) / math.sqrt(3)))
    assert final[0][0] == pytest.approx(statistics.fmean(base))  # the baseline's arm
    others = [t for t in state.trials if t.index != int(chosen)]
    for t in others:
        assert final[t.index] == pytest.approx((t.eval_loss, sd))

    report = (result.report_dir / names.REPORT_FILE).read_text()
    line = next(x for x in report.splitlines() if x.startswith("| **Improvement**"))
    assert line.startswith("| **Improvement** | eval_loss: ") and "(95 % CI " in line
    assert "2 seeds, paired by seed, paired on 24 eval examples" in line
    assert "single-run" in line and "## Seed replicates" in report and "Winner's curse, measured" in report
    assert (result.report_dir / "expected_best.png").is_file()
    assert "insufficient data (n=1)" in report  # one trial per choice value: no mean compared
    mv = MlflowClient().get_model_version("noise", "1")
    assert "promotion rule" in mv.description and "(95 % CI " in mv.description
    assert mv.tags[names.VERSION_SCORED_RUNS].count(":") == 2  # the two fresh seeds' runs
    best = json.loads(json.dumps(mv.tags))
    assert best[names.VERSION_SOURCE_RUN] == trial.run_id


@pytest.mark.slow
def test_replicates_resume_after_an_interruption(tmp_path, monkeypatch):
    """Ctrl-C during the replicates: the search stops with the finished replicates recorded; the
    resumed search runs only those that did not end (each configuration and seed once)."""
    from pipeline.search.executors import local as executor

    config = _replicated_search(tmp_path, 2, "noise-resume")
    real = executor.run_trial
    seen: list[int] = []

    def interrupted_once(cfg, *args, **kwargs):
        if cfg.train.seed == 44 and not seen:
            seen.append(cfg.train.seed)
            raise KeyboardInterrupt
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(executor, "run_trial", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, quiet=True)
    (parent,) = [p.name for p in (tmp_path / "search").iterdir()]
    first = [r for r in tracking.children_of(parent) if names.TRIAL_REPLICATE_OF in r.tags]
    assert len(first) == 2 and {r.tags[names.TRIAL_REPLICATE_SEED] for r in first} == {"43"}
    result = run_search(config, resume=parent, quiet=True)
    reps = [r for r in tracking.children_of(parent) if names.TRIAL_REPLICATE_OF in r.tags]
    done = sorted(
        (r.tags[names.TRIAL_REPLICATE_OF], r.tags[names.TRIAL_REPLICATE_SEED])
        for r in reps
        if r.tags.get(names.TRIAL_STATUS) == names.COMPLETED
    )
    assert len(done) == 4 and len(set(done)) == 4, done
    assert all(r.status == names.COMPLETED for r in result.state.replicates)
    assert len(tracking.trials_of(parent)) == 2  # no trial ran again
