"""Phase timings: exclusive per phase, adding up to the time measured; logged by every trial."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.timing import PhaseTimer
from pipeline.trial import run_trial


def test_nested_phases_count_each_second_once():
    timer = PhaseTimer()
    t0 = time.perf_counter()
    with timer.phase("outer"):
        time.sleep(0.05)
        slow = timer.wrap("inner", time.sleep)
        slow(0.1)
        slow(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    assert timer.seconds["inner"] == pytest.approx(0.2, abs=0.03)
    assert timer.seconds["outer"] == pytest.approx(0.1, abs=0.03)  # the inner 0.2 s are not in it
    assert sum(timer.seconds.values()) == pytest.approx(wall, abs=0.01)
    assert timer.metrics() == {
        "time_inner_s": round(timer.seconds["inner"], 4),
        "time_outer_s": round(timer.seconds["outer"], 4),
    }


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
