"""The search's wall-clock and device budgets (`pipeline/search/budget.py`)."""

from __future__ import annotations

import pytest

from ..conftest import DEMO_CONFIG
from .common import search_overrides


def search_config_for(tmp_path, *extra):
    from pipeline.search import search_config

    sets = search_overrides(tmp_path, **{"train.eval_steps": 4})
    return search_config(DEMO_CONFIG, [*sets, *extra], n_trials=3)


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ("search.budget_minutes=1", "wall-clock budget of 1 minutes spent"),
        ("search.budget_gpu_hours=0.02", "device budget of 0.02 device-hours spent"),
    ],
)
def test_budgets_stop_the_running_trial_at_its_next_evaluation(tmp_path, budget, reason):
    """A budget is checked at each evaluation, not only between trials: the running trial ends
    early-stopped by the budget (its data kept, in Ax too), and no new trial starts. The clock
    is the search's own, driven here: each evaluation takes 40 s (the device-hours budget, 72 s,
    like the wall-clock one, 60 s, is spent at the second evaluation)."""
    from pipeline.search import loop
    from pipeline.search.executor import LocalExecutor

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    clock = Clock()
    config = search_config_for(tmp_path, budget)
    search = loop.Search(config, LocalExecutor(quiet=True), clock=clock)
    real_on_eval = search._on_eval

    def slow_evaluations(event):
        clock.now += 40
        return real_on_eval(event)

    search._on_eval = slow_evaluations
    result = search.run()
    (trial,) = result.state.trials
    assert trial.status == "early_stopped" and trial.stopped_by == "budget"
    assert trial.steps == 8 < trial.max_steps == 12 and trial.eval_loss is not None and trial.evals
    assert result.state.stop_reason.startswith(reason)
    statuses = {i: t.status.name for i, t in search.optimizer.client._experiment.trials.items()}
    assert statuses[trial.index] == "EARLY_STOPPED"
    # A budget stop is not early stopping's saving.
    assert "saved 0.0% of planned training steps" in (result.report_dir / "search_report.md").read_text()
