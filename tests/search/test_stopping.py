"""Early stopping as the config plans it and as Ax applies it (`pipeline/search/stopping.py`)."""

from __future__ import annotations

import pytest

from pipeline.core import names
from pipeline.core.errors import ConfigError
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.ax.space import early_stopping_strategy
from pipeline.search.executors.local import TrialJob, run_job
from pipeline.search.records import SearchState
from pipeline.search.report import summary
from pipeline.trial.resources import Resources

from .common import baseline_record, demo, record


def _curve(optimizer: Optimizer, index: int, losses: list[float], every: int = 400) -> bool:
    """Report a learning curve evaluation by evaluation; True if Ax stopped the trial."""
    # Stops at the first True, like the trainer does: any() short-circuits.
    return any(optimizer.report_evaluation(index, i * every, loss) for i, loss in enumerate(losses, 1))


def test_early_stopping_auto_and_settings():
    assert early_stopping_strategy(demo()) is not None  # 150 steps, eval every 50: 3 evaluations
    assert early_stopping_strategy(demo(**{"train.eval_steps": 100})) is None
    assert early_stopping_strategy(demo(**{"search.early_stopping.enabled": False})) is None
    es = early_stopping_strategy(
        demo(**{"search.early_stopping.min_progression": 70, "search.early_stopping.percentile": 30})
    )
    assert (es.min_progression, es.percentile_threshold) == (70, 30)
    with pytest.raises(ConfigError, match="needs train.eval_steps"):
        early_stopping_strategy(demo(**{"train.eval_steps": None, "search.early_stopping.enabled": True}))


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


def test_early_stopping_survives_a_resume(tmp_path):
    """A trial killed after its first evaluation is retried with the same parameters (the same
    Ax arm). Its partial data must not stay beside the retry's, or Ax's early stopping gives up
    ("Arm ... has multiple trial indices") for the rest of the search."""
    config = demo(
        **{
            "search.initialization_trials": 8,
            "search.early_stopping.enabled": True,
            "search.early_stopping.min_curves": 2,
            "search.early_stopping.min_progression": 400,
        }
    )
    optimizer = Optimizer.create(config)
    good = [3.6, 3.3, 3.2]
    for _ in range(2):
        index, _, _ = optimizer.ask()
        assert not _curve(optimizer, index, good)
        optimizer.complete(index, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    killed, params, _ = optimizer.ask()
    assert not _curve(optimizer, killed, [3.5])  # one evaluation, then SIGTERM
    optimizer.fail(killed, "interrupted")
    optimizer.save(tmp_path / "ax.json")

    resumed = Optimizer.load(tmp_path / "ax.json", config)
    retry = resumed.retry(params)
    assert not _curve(resumed, retry, good)
    resumed.complete(retry, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    bad, _, _ = resumed.ask()
    assert _curve(resumed, bad, [9.0, 9.0, 9.0]), "a clearly bad trial after the resume must stop"
    assert resumed.broken is None


def test_early_stopping_compares_trials_at_the_same_share_of_their_training(tiny_config):
    """At step 6 a batch-8 trial has seen twice the data of a batch-4 one. Every evaluation now
    carries both the step and the training examples seen, and early stopping compares trials in
    the unit that puts each at the same share of its own training: steps when trials run
    train.max_steps steps, examples when they run epochs (or as `progression` says)."""
    from pipeline.search.ax.space import early_stopping_strategy
    from pipeline.search.stopping import progression, progression_unit

    base = tiny_config.model_copy(update={"search": None})
    resources, heard, outs = Resources(), [], []
    for batch, accumulation in ((4, 1), (8, 1), (4, 2)):
        params = {"train.batch_size": batch, "train.gradient_accumulation_steps": accumulation}
        outs.append(run_job(TrialJob(batch, base, params), resources, lambda e: heard.append(e) or False))
    # (Ax index, step, examples seen) at step 6 of 12 of each trial.
    assert [(e.trial, e.step, e.examples) for e in heard] == [(4, 6, 24), (8, 6, 48), (4, 6, 48)]
    assert [o.result.examples_per_step for o in outs] == [4, 8, 8]

    steps_budget = demo()  # 150 steps whatever the batch size: compared at equal steps
    epochs_budget = demo(
        **{"train.max_steps": -1, "train.epochs": 1.0, "search.early_stopping.enabled": True}
    )
    examples = demo(**{"search.early_stopping.progression": "examples"})
    assert [progression_unit(c) for c in (steps_budget, epochs_budget, examples)] == [
        "steps",
        "examples",
        "examples",
    ]
    assert progression(examples, 6, 8) == 48 and progression(steps_budget, 6, 8) == 6
    # No stop before a third of the demo's 150 steps (its first evaluation), in either unit.
    assert early_stopping_strategy(steps_budget).min_progression == 50
    assert early_stopping_strategy(examples).min_progression == 50 * 8
    explicit = demo(**{"search.early_stopping.min_progression": 1000})
    assert early_stopping_strategy(explicit).min_progression == 1000


def test_the_progression_units_are_named_once():
    # The config's choices, the report's words for them and the plots' axis all use
    # core.events' names: a unit renamed in one place and not another would fail here.
    import typing

    from pipeline.config.search import EarlyStoppingSpec
    from pipeline.core import events
    from pipeline.search.report import markdown

    choices = typing.get_args(EarlyStoppingSpec.model_fields["progression"].annotation)
    assert set(choices) == {"auto", *events.UNITS}
    assert set(markdown.UNITS) == set(events.UNITS)
    assert events.progression(events.EXAMPLES, 50, 8) == 400 and events.progression(events.STEPS, 50, 8) == 50
