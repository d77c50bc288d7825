"""What a search's records say: best trial, Pareto front, summary metrics, advice, names
(`pipeline/search/report/summary.py`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.core import console, names
from pipeline.search.records import SearchState, TrialRecord, feasible
from pipeline.search.report import summary

from ..common import baseline_record, demo, record


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
    assert feasible(state.trials[2], search.outcome_constraints)
    assert not feasible(state.trials[4], search.outcome_constraints)  # no value: not met
    # In the objective's direction: a maximized metric's highest value wins (no constraint here).
    maximize = demo(**{"search.objectives": [{"metric": "eval_rougeL", "minimize": False}]}).search
    for t, rouge in zip(state.trials[:4], (0.4, 0.9, 0.3, 0.2), strict=True):
        t.metrics["eval_rougeL"] = rouge
    assert summary.best_trial(state, maximize).index == 0  # 0.9 is the early-stopped trial's


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


def _one_trial(parameters, eval_loss) -> tuple[SearchState, TrialRecord]:
    """A search of one completed trial (run `r`) against a baseline at 3.0."""
    state = SearchState("p", 1)
    state.baseline = baseline_record(3.0, {})
    best = TrialRecord(index=0, parameters=parameters, status="completed", run_id="r", eval_loss=eval_loss)
    state.trials = [best]
    return state, best


def test_recommendations_point_at_the_edges_of_the_space():
    params = {"lora.r": 32, "lora.alpha": 16.0, "train.learning_rate": 1e-2, "train.batch_size": 8}
    state, best = _one_trial(params, 2.99)
    recs = summary.recommendations(demo(), state, best)
    assert recs[0].startswith("Retrain the best configuration (trial 0, run `r`)")
    assert any("within 1% of the baseline" in r for r in recs)
    assert any(r.startswith("Widen `train.learning_rate` above 0.01") for r in recs)
    assert any(r.startswith("Try `lora.r` beyond 32") for r in recs)


def test_batch_size_advice_says_a_step_budget_also_changes_the_data_seen():
    params = {"lora.r": 8, "lora.alpha": 16.0, "train.learning_rate": 1e-3, "train.batch_size": 16}
    state, best = _one_trial(params, 2.5)
    (line,) = [r for r in summary.recommendations(demo(), state, best) if "train.batch_size" in r]
    assert "With train.max_steps fixed at 150, a larger value also trains on more examples" in line
    epochs = demo(**{"train.max_steps": -1, "train.epochs": 1.0})
    (line,) = [r for r in summary.recommendations(epochs, state, best) if "train.batch_size" in r]
    assert "train.max_steps fixed" not in line


def test_trial_names_and_durations():
    params = {"lora.r": 32, "lora.alpha": 64.0, "train.learning_rate": 1.2e-4, "train.batch_size": 2}
    assert summary.trial_name(7, params) == "trial-07 r=32 a=64 lr=1.2e-04 bs=2"
    assert summary.trial_name(3, {"lora.dropout": 0.1}, "retry") == "trial-03 dropout=0.1 (retry)"
    assert (console.duration(65), console.duration(3725)) == ("1m05s", "1h02m")


def test_the_baseline_and_a_trial_of_the_same_values_name_their_runs_alike():
    # One formatter (core.console.run_name): the baseline's name was once a second one, with its
    # own number formats (lr 0.02 read 2.0e-02 there, 0.02 in the trials).
    from pipeline.trial.run import default_run_name

    config = demo(**{"train.learning_rate": 0.02, "lora.alpha": 16.0})
    values = {"lora.r": config.lora.r, "lora.alpha": 16.0, "train.learning_rate": 0.02}
    values["train.batch_size"] = config.train.batch_size
    baseline = default_run_name(config, "baseline")
    assert baseline.startswith("baseline ") and "lr=0.02" in baseline
    assert baseline.removeprefix("baseline") == summary.trial_name(1, values).removeprefix("trial-01")


def test_the_records_and_their_summary_are_plain_data():
    # The report reads a search's records as data: importing them must not pull in the optimizer,
    # the tracker or the trainer (journal.py once held records and disk I/O together, and did).
    code = (
        "import sys; import pipeline.search.records, pipeline.search.report.summary; "
        "print(sorted(m for m in ('ax', 'mlflow', 'torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
