"""The search's wall-clock and device budgets (`pipeline/search/budget.py`)."""

from __future__ import annotations

import pytest

from ..conftest import DEMO_CONFIG
from .common import Watched, search_overrides


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
    from pipeline.search.executors.local import LocalExecutor

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    clock = Clock()
    config = search_config_for(tmp_path, budget)

    def slow_evaluation(event):
        clock.now += 40

    executor = Watched(LocalExecutor(quiet=True), on_eval=slow_evaluation)
    search = loop.Search(config, executor, clock=clock)
    result = search.run()
    (trial,) = result.state.trials
    assert trial.status == "early_stopped" and trial.stopped_by == "budget"
    assert trial.steps == 8 < trial.max_steps == 12 and trial.eval_loss is not None and trial.evals
    assert result.state.stop_reason.startswith(reason)
    assert search.optimizer.statuses()[trial.index] == "EARLY_STOPPED"
    # A budget stop is not early stopping's saving.
    assert "saved 0.0% of planned training steps" in (result.report_dir / "search_report.md").read_text()


class _Clock:
    """The search's clock, driven by the test."""

    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_a_hard_killed_session_keeps_its_wall_time_and_the_budget_counts_it(tmp_path):
    """Wall time reaches the records at every save, not only when the search exits: a session
    killed without a chance to save (SIGKILL, a lost node; here SystemExit, which no handler
    catches) keeps its time up to its last save, and a resumed search's budget counts it. Each
    trial takes 100 s on the search's clock; the budget is 3 minutes."""
    from mlflow.tracking import MlflowClient

    from pipeline.core import names
    from pipeline.search import journal, loop, search_config
    from pipeline.search.executors.local import LocalExecutor

    sets = search_overrides(tmp_path, **{"train.eval_steps": 4, "search.budget_minutes": 3})
    clock, ended = _Clock(), []

    def trial_takes_100_s_and_the_second_dies(outcome):
        clock.now += 100
        ended.append(outcome)
        if len(ended) == 2:
            raise SystemExit("killed")  # after trial 2's run ended, before the search hears of it

    with pytest.raises(SystemExit):
        executor = Watched(LocalExecutor(quiet=True), on_done=trial_takes_100_s_and_the_second_dies)
        loop.Search(search_config(DEMO_CONFIG, sets, n_trials=5), executor, clock=clock).run()
    client = MlflowClient()
    (parent,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        if r.data.tags[names.ROLE] == names.ROLE_SEARCH
    ]
    config = search_config(DEMO_CONFIG, sets, n_trials=5, resume=parent.info.run_id)
    _, saved = journal.load(parent.info.run_id, config)
    # Saved at trial 2's submit: trial 1's 100 s are in (before, a killed session added nothing).
    assert saved.wall_seconds == pytest.approx(100.0)

    def trial_takes_100_s(outcome):
        clock.now += 100

    executor = Watched(LocalExecutor(quiet=True), on_done=trial_takes_100_s)
    result = loop.Search(config, executor, clock=clock, resume=parent.info.run_id).run()
    # 100 s carried over + trial 3's 100 s spend the 180 s budget: trial 4 never starts (with
    # the first session's time lost, it would have).
    assert [t.status for t in result.state.finished()] == ["completed"] * 3
    assert result.state.stop_reason == "wall-clock budget of 3 minutes spent"
    assert result.state.wall_seconds == pytest.approx(200.0)
