"""The search package's parts on their own: records on disk, the pure summary, the executor seam.

No search runs here; the summary is checked on hand-made records, the executor on one tiny trial.
"""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.config import load_config, with_overrides
from pipeline.resources import Resources
from pipeline.search import journal, summary
from pipeline.search.executor import LocalExecutor, TrialJob, run_job
from pipeline.search.journal import BaselineRecord, SearchState, TrialRecord
from pipeline.search.space import Optimizer
from pipeline.trial import RunSpec

from .conftest import DEMO_CONFIG


def demo(**values):
    config = load_config(DEMO_CONFIG)
    return with_overrides(config, values) if values else config


def record(index, status, loss=None, steps=150, max_steps=150, **metrics):
    m = {"eval_loss": loss, **metrics} if loss is not None else dict(metrics)
    return TrialRecord(
        index=index,
        parameters={"lora.r": 8 * (index + 1)},
        status=status,
        eval_loss=loss,
        metrics=m,
        steps=steps,
        max_steps=max_steps,
    )


def baseline_record(loss, metrics, parameters=None, evals=()):
    return BaselineRecord(
        run_id="b",
        parameters=parameters or {},
        eval_loss=loss,
        metrics=metrics,
        reused=False,
        in_search_space=True,
        evals=list(evals),
    )


# --- records on disk ------------------------------------------------------------------------


def test_state_round_trips_through_json_and_reads_older_files():
    state = SearchState("p", 3, trials=[record(1, "completed", 2.5), record(2, "failed")], sessions=2)
    state.trials[0].evals = [(50, 3.0), (100, 2.5)]
    state.baseline = baseline_record(3.2, {"eval_loss": 3.2}, parameters={"lora.r": 8}, evals=[(150, 3.2)])
    again = SearchState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state and again.trials[0].evals == [(50, 3.0), (100, 2.5)]
    # A trials.json written before records had eval_fingerprint and adapter_dir still loads.
    old = state.to_json()
    for t in old["trials"]:
        del t["eval_fingerprint"], t["adapter_dir"]
    assert SearchState.from_json(old).trials[0].eval_fingerprint is None


def test_write_atomic_keeps_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "trials.json"
    journal.write_atomic(path, "old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        journal.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.json"]  # no temp file left behind


def test_optimizer_state_saves_and_loads(tmp_path):
    config = demo(**{"search.initialization_trials": 2})
    optimizer = Optimizer.create(config)
    index, params, method = optimizer.ask()
    assert method == "CenterOfSearchSpace" and set(params) == set(config.search.parameters)
    optimizer.complete(index, {"eval_loss": 2.0}, 150, early_stopped=False)
    running, running_params, _ = optimizer.ask()
    optimizer.save(tmp_path / "ax.json")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = Optimizer.load(tmp_path / "ax.json", config)
    # After a crash, the trial Ax saw running is still running in the loaded state, and a retry of
    # its parameters is a new trial once it failed.
    assert loaded.running() == {running: running_params}
    loaded.fail(running, "crash")
    assert loaded.running() == {} and loaded.retry(running_params) == running + 1


# --- the summary (pure) ---------------------------------------------------------------------


def test_best_trial_counts_only_completed_feasible_trials():
    search = demo(**{"search.outcome_constraints": ["peak_rss_gb <= 2"]}).search
    state = SearchState("p", 4)
    state.trials = [
        record(0, "completed", 2.0, peak_rss_gb=3.0),  # infeasible
        record(1, "early_stopped", 1.0, peak_rss_gb=1.0),  # partial training: ranks, never wins
        record(2, "completed", 2.5, peak_rss_gb=1.5),
        record(3, "completed", 2.6, peak_rss_gb=1.0),
        record(4, "failed"),
    ]
    assert summary.best_trial(state, search).index == 2
    assert summary.best_trial(state, search, pareto=[3]).index == 3  # restricted to the frontier
    assert summary.feasible(state.trials[2], search.outcome_constraints)
    assert not summary.feasible(state.trials[4], search.outcome_constraints)  # no value: not met


def test_pareto_front_is_the_observed_non_dominated_set():
    search = demo(
        **{
            "search.objectives": [
                {"metric": "eval_loss", "minimize": True},
                {"metric": "trainable_params", "minimize": True},
            ],
            "search.outcome_constraints": ["peak_rss_gb <= 2"],
        }
    ).search
    state = SearchState("p", 7)
    state.trials = [
        # The five trials of the CI run where Ax's (winsorized) frontier listed trial 1,
        # which trial 4 beats on both objectives.
        record(1, "completed", 5.368, trainable_params=81920, peak_rss_gb=1),
        record(2, "completed", 4.636, trainable_params=327680, peak_rss_gb=1),
        record(3, "completed", 5.848, trainable_params=163840, peak_rss_gb=1),
        record(4, "completed", 4.314, trainable_params=40960, peak_rss_gb=1),
        record(5, "completed", 6.061, trainable_params=40960, peak_rss_gb=1),
        record(6, "completed", 3.0, trainable_params=10, peak_rss_gb=9),  # infeasible
        record(7, "early_stopped", 1.0, trainable_params=10, peak_rss_gb=1),  # partial training
    ]
    assert [t.index for t in summary.pareto_front(state, search)] == [4]
    state.trials.append(record(8, "completed", 4.0, trainable_params=300000, peak_rss_gb=1))
    state.trials.append(record(9, "completed", 4.314, trainable_params=40960, peak_rss_gb=1))  # a tie
    assert [t.index for t in summary.pareto_front(state, search)] == [8, 4, 9]
    more_is_better = demo(
        **{
            "search.objectives": [
                {"metric": "eval_loss", "minimize": True},
                {"metric": "trainable_params", "minimize": False},
            ]
        }
    ).search
    assert [t.index for t in summary.pareto_front(state, more_is_better)] == [
        6,
        8,
        2,
    ]  # 6: no constraint here


def test_summary_metrics_and_steps_saved():
    state = SearchState("p", 4, wall_seconds=60.0)
    state.baseline = baseline_record(4.0, {"eval_loss": 4.0})
    state.trials = [
        record(0, "completed", 3.0),
        record(1, "early_stopped", 5.0, steps=50),
        record(2, "abandoned"),
        record(3, "killed"),
    ]
    best = summary.best_trial(state, demo().search)
    metrics = summary.search_metrics(state, best)
    assert metrics[names.BEST_EVAL_LOSS] == 3.0 and metrics[names.IMPROVEMENT_PCT] == pytest.approx(25.0)
    assert (metrics[names.TRIALS_COMPLETED], metrics[names.TRIALS_EARLY_STOPPED]) == (1, 1)
    assert metrics[names.TRIALS_ABANDONED] == 1 and metrics[names.TRIALS_FAILED] == 0
    # 100 of the 300 steps planned for the two scored trials were not spent.
    assert metrics[names.STEPS_SAVED_PCT] == pytest.approx(100 / 3)
    assert summary.best_so_far(state.trials) == [3.0, 3.0, 3.0, 3.0]


def test_recommendations_point_at_the_edges_of_the_space():
    state = SearchState("p", 1)
    state.baseline = baseline_record(3.0, {})
    best = TrialRecord(
        index=0,
        parameters={"lora.r": 32, "lora.alpha": 16.0, "train.learning_rate": 1e-2, "train.batch_size": 8},
        status="completed",
        run_id="r",
        eval_loss=2.99,
    )
    state.trials = [best]
    recs = summary.recommendations(demo(), state, best)
    assert recs[0].startswith("Retrain the best configuration (trial 0, run `r`)")
    assert any("within 1% of the baseline" in r for r in recs)
    assert any(r.startswith("Widen `train.learning_rate` above 0.01") for r in recs)
    assert any(r.startswith("Try `lora.r` beyond 32") for r in recs)


def test_early_stopping_that_cannot_act_is_named_with_its_reason():
    """The seed config's `min_progression: 400` (examples) on a short run, and min_curves that
    the number of trials never reaches, are found before anything trains; the report's advice
    says the actual reason instead of asking for evaluations the trials already make."""
    from pipeline.search.stopping import stopping_plan, unreachable

    demo_ok = demo()
    assert stopping_plan(demo_ok).enabled and unreachable(demo_ok, 6849) is None
    # 150 steps of batch 4-16, evaluated every 50: the last evaluation before the end is at step 100.
    far = demo(**{"search.early_stopping.min_progression": 400, "search.early_stopping.progression": "steps"})
    why = unreachable(far, 6849)
    assert why.startswith("search.early_stopping.min_progression is 400 steps, and the last evaluation")
    assert "comes at 100 steps at most (train.eval_steps 50" in why
    few = demo(**{"search.early_stopping.min_curves": 4, "search.n_trials": 3})
    assert unreachable(few, 6849).startswith(
        "search.early_stopping.min_curves is 4: 3 trial(s) besides the baseline"
    )
    assert unreachable(few, 6849, baseline_counts=False) is not None
    assert unreachable(demo(**{"search.early_stopping.min_curves": 4, "search.n_trials": 4}), 6849) is None
    # Epochs: the trials' steps come from the data size and each searched batch size.
    epochs = demo(
        **{
            "train.max_steps": -1,
            "train.epochs": 0.01,
            "train.eval_steps": 2,
            "search.early_stopping.enabled": True,
            "search.early_stopping.min_progression": 400,  # examples, the unit of epoch budgets
        }
    )
    assert unreachable(epochs, 6849) is not None and unreachable(epochs, 684900) is None

    state = SearchState("p", 3)
    state.baseline = baseline_record(3.0, {names.DATA_TRAIN_EXAMPLES: 6849})
    state.trials = [record(1, "completed", 2.9), record(2, "completed", 2.8)]
    recs = summary.recommendations(far, state, None, summary.why_no_stopping(far, state))
    (line,) = [r for r in recs if "stopped early" in r]
    assert line.startswith(
        "No trial was stopped early: early stopping could not act (search.early_stopping.min_progression"
    )
    off = demo(**{"train.eval_steps": 100})  # auto: fewer than 3 evaluations per trial
    (line,) = [
        r
        for r in summary.recommendations(off, state, None, summary.why_no_stopping(off, state))
        if "early" in r
    ]
    assert (
        "early stopping was off (search.early_stopping.enabled is auto and trials evaluate fewer than 3 times"
        in line
    )
    assert not [
        r
        for r in summary.recommendations(demo_ok, state, None, summary.why_no_stopping(demo_ok, state))
        if "stopped early" in r
    ]


def test_batch_size_advice_says_a_step_budget_also_changes_the_data_seen():
    state = SearchState("p", 1)
    state.baseline = baseline_record(3.0, {})
    best = TrialRecord(
        index=0,
        parameters={"lora.r": 8, "lora.alpha": 16.0, "train.learning_rate": 1e-3, "train.batch_size": 16},
        status="completed",
        run_id="r",
        eval_loss=2.5,
    )
    state.trials = [best]
    (line,) = [r for r in summary.recommendations(demo(), state, best) if "train.batch_size" in r]
    assert "With train.max_steps fixed at 150, a larger value also trains on more examples" in line
    epochs = demo(**{"train.max_steps": -1, "train.epochs": 1.0})
    (line,) = [r for r in summary.recommendations(epochs, state, best) if "train.batch_size" in r]
    assert "train.max_steps fixed" not in line


def test_trial_names_and_durations():
    params = {"lora.r": 32, "lora.alpha": 64.0, "train.learning_rate": 1.2e-4, "train.batch_size": 2}
    assert summary.trial_name(7, params) == "trial-07 r=32 a=64 lr=1.2e-04 bs=2"
    assert summary.trial_name(3, {"lora.dropout": 0.1}, "retry") == "trial-03 dropout=0.1 (retry)"
    assert (summary.duration(65), summary.duration(3725)) == ("1m05s", "1h02m")


# --- the executor seam ----------------------------------------------------------------------


def test_run_job_reports_failures_instead_of_raising(tiny_config, tmp_path, monkeypatch):
    base = tiny_config.model_copy(update={"search": None})
    resources = Resources()
    # Bad input for this trial's config: fails before any run exists.
    missing = run_job(TrialJob(3, base, {"data.path": str(tmp_path / "none.jsonl")}), resources)
    assert (missing.status, missing.run_id, missing.result) == ("failed", None, None)
    assert missing.reason.startswith("DataError: data.path: file not found")

    # Out of memory while training: the run ends FAILED, tagged abandoned, the error kept.
    import pipeline.trial as trial_mod

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trial_mod, "train", oom)
    spec = RunSpec(names.ROLE_TRIAL, "trial-01", tags={names.AX_TRIAL_INDEX: 4})
    evals = []
    out = run_job(TrialJob(4, base, {"lora.r": 4}, spec), resources, lambda e: evals.append(e))
    assert out.status == "abandoned" and out.run_id and "out of memory" in out.reason
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FAILED" and run.data.tags[names.TRIAL_STATUS] == "abandoned"
    assert run.data.tags[names.TRIAL_FAILURE_REASON] == out.reason and run.data.params["lora.r"] == "4"


def test_local_executor_runs_one_job_at_a_time_and_streams_evaluations(tiny_config):
    base = tiny_config.model_copy(update={"search": None})
    executor = LocalExecutor(quiet=True)
    heard = []

    def on_eval(event):
        heard.append((event.trial, event.step, event.examples))
        return False

    assert executor.idle() == 1
    executor.submit(TrialJob(5, base, {"lora.r": 4}, RunSpec(names.ROLE_TRIAL)), on_eval)
    assert executor.idle() == 0  # one at a time: nothing else until this one is collected
    out = executor.wait_any()
    assert out.status == "completed" and out.job.index == 5 and out.result.run_id == out.run_id
    # Each evaluation but the last (which ends the trial anyway), with the trial's Ax index, its
    # step and the training examples seen by then (step 6 x batch 4).
    assert heard == [(5, 6, 24)]
    assert out.result.adapter_dir.is_dir() and out.result.eval_fingerprint
    tags = MlflowClient().get_run(out.run_id).data.tags
    assert tags[names.TRIAL_STATUS] == "completed"
    assert executor.idle() == 1
    executor.close()
