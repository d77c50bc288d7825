"""Phase timings: exclusive per phase, adding up to the time measured; logged by every trial."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.timing import PhaseTimer
from pipeline.trial.run import run_trial


class FakeClock:
    """A clock the test moves by hand: timings exact to the microsecond, no sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_nested_phases_count_each_second_once():
    clock = FakeClock()
    timer = PhaseTimer(clock)
    start = clock()
    with timer.phase("outer"):
        clock.advance(0.05)
        slow = timer.wrap("inner", clock.advance)
        slow(0.1)
        slow(0.1)
        clock.advance(0.05)
    clock.advance(7.0)  # outside every phase: counted nowhere
    assert timer.seconds["inner"] == pytest.approx(0.2)
    assert timer.seconds["outer"] == pytest.approx(0.1)  # the inner 0.2 s are not in it
    assert sum(timer.seconds.values()) == pytest.approx(clock() - start - 7.0)
    assert timer.metrics() == {"time_inner_s": 0.2, "time_outer_s": 0.1}


def test_a_phase_that_raises_still_counts_its_time():
    clock = FakeClock()
    timer = PhaseTimer(clock)
    with pytest.raises(ValueError), timer.phase("a"):
        clock.advance(1.5)
        with timer.phase("b"):
            clock.advance(0.5)
            raise ValueError
    with timer.phase("a"):
        clock.advance(1.0)
    assert dict(timer.seconds) == {"a": 2.5, "b": 0.5}
    assert timer.metrics("search_time_") == {"search_time_a_s": 2.5, "search_time_b_s": 0.5}


def test_a_trial_logs_where_its_time_went(tiny_config):
    result = run_trial(tiny_config, quiet=True)
    t = result.timings
    assert {"load", "tracking", "lora", "train", "adapter", "generation", "other"} <= set(t)
    assert t["train"] > 0 and t["load"] > 0
    # The phases cover the trial but the run's end: they add up to its wall time, nearly.
    assert sum(t.values()) <= result.wall_seconds
    assert sum(t.values()) > 0.9 * result.wall_seconds
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert logged["time_train_s"] == pytest.approx(t["train"], abs=1e-3)
