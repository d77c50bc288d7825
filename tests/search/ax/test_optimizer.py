"""The Optimizer: the verbs the search loop speaks to Ax in, and what it reads back
(`pipeline/search/ax/optimizer.py`)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import SearchAborted
from pipeline.search.ax.optimizer import Optimizer

from ..common import demo


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


def test_measured_parameters_are_never_a_new_trial_and_a_giving_up_rule_is_loud():
    """Ax re-proposes a failed trial's point (it deduplicates against every other arm); a point
    that has data is abandoned and Ax asked again, and if Ax's early stopping still gives up
    (it only logs a warning), the optimizer says so instead of never stopping a trial again."""
    config = demo(**{"search.early_stopping.enabled": True, "search.early_stopping.min_curves": 1})
    optimizer = Optimizer.create(config)
    first, params, _ = optimizer.ask()
    optimizer.complete(first, {"eval_loss": 3.0}, 1200, early_stopped=False)
    real = optimizer.client.get_next_trials
    calls = []

    def propose_the_measured_point_first(max_trials):
        calls.append(max_trials)
        if len(calls) == 1:
            return {optimizer.client.attach_trial(parameters=params): params}
        return real(max_trials=max_trials)

    optimizer.client.get_next_trials = propose_the_measured_point_first
    index, fresh, _ = optimizer.ask()
    assert len(calls) == 2 and fresh != params
    assert optimizer.statuses()[index - 1] == "ABANDONED" and "parameters again" in optimizer.notes[-1]
    with pytest.raises(SearchAborted, match="has data"):
        optimizer.retry(params)  # the loop only retries interrupted trials, whose data is gone

    # Two trials of one arm with data (bypassing the optimizer): Ax gives up; we notice.
    twin = optimizer.client.attach_trial(parameters=params)
    optimizer.client.attach_data(twin, {"eval_loss": 3.1}, progression=400)
    assert optimizer.report_evaluation(index, 400, 3.2) is False
    assert optimizer.broken and "multiple trial indices" in optimizer.broken


def test_what_ax_believes_is_read_through_the_optimizer():
    # The tests' one window on Ax's state (ax.api has no public read of statuses or data).
    optimizer = Optimizer.create(demo(**{"search.initialization_trials": 3}))
    done, failed, running = (optimizer.ask().index for _ in range(3))
    optimizer.report_evaluation(done, 50, 3.0)
    optimizer.complete(done, {"eval_loss": 2.5}, 150, early_stopped=False)
    optimizer.fail(failed, "boom")
    assert optimizer.statuses() == {done: "COMPLETED", failed: "FAILED", running: "RUNNING"}
    mean, _ = optimizer.observations("eval_loss")[done]  # the final value, not the curve's first
    assert mean == 2.5 and set(optimizer.observations("eval_loss")) == {done}
    assert optimizer.observations("no_such_metric") == {}
