"""Writing runs (`pipeline/tracking/runs.py`) on a real sqlite store: every run ends with the right
status, metrics are batched and none is lost, params fit MLflow's limits, `mlflow run`'s outer run
is resumed or handed over."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.core import names

CFG = TrackingConfig(experiment_name="runs", log_system_metrics=False, log_every_s=3600)


def _run(run_id: str):
    return MlflowClient().get_run(run_id)


def test_a_run_ends_finished_failed_or_killed_with_its_reason():
    with tracking.start_run(CFG, "ok", {names.ROLE: names.ROLE_BASELINE, "skipped": None}) as ok:
        pass
    assert _run(ok.run_id).info.status == "FINISHED"
    assert _run(ok.run_id).data.tags[names.ROLE] == names.ROLE_BASELINE
    assert "skipped" not in _run(ok.run_id).data.tags  # None tags are not written as "None"
    with pytest.raises(ValueError), tracking.start_run(CFG, "bad", {}) as bad:
        raise ValueError("line one\nline two")
    failed = _run(bad.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags[names.ERROR] == "ValueError: line one line two"
    with pytest.raises(KeyboardInterrupt), tracking.start_run(CFG, "stopped", {}) as stopped:
        raise KeyboardInterrupt
    killed = _run(stopped.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags[names.ERROR] == "interrupted"


def test_metrics_are_batched_non_finite_values_dropped_and_flushed_when_the_run_ends():
    with tracking.start_run(CFG, "m", {}) as run:
        run.log_metrics({"loss": 1.0, "nan": float("nan"), "none": None}, step=1)
        run.log_metrics({"loss": 0.5}, step=2)
        assert not _run(run.run_id).data.metrics  # buffered: log_every_s is an hour
        run.log_metrics({"eval_loss": 2.0}, step=2, flush=True)
        assert _run(run.run_id).data.metrics == {"loss": 0.5, "eval_loss": 2.0}
        run.log_metrics({"loss": 0.25}, step=3)
    history = tracking.metric_history(run.run_id, "loss")
    assert history == [(1, 1.0), (2, 0.5), (3, 0.25)]  # the last one went with the run's end
    assert "nan" not in _run(run.run_id).data.metrics and "none" not in _run(run.run_id).data.metrics


def test_params_fit_mlflows_limits():
    many = {f"p{i:03d}": i for i in range(250)}  # more than one log_batch takes
    with tracking.start_run(CFG, "p", {}) as run:
        run.log_params({**many, "long": "x" * 10_000, "list": [1, 2], "dict": {"a": 1}})
    params = _run(run.run_id).data.params
    assert len(params) == 253 and params["p249"] == "249"
    assert len(params["long"]) == 6000 and params["list"] == "[1, 2]" and params["dict"] == '{"a": 1}'
    assert tracking.param_text(("a", 1)) == "('a', 1)"


def test_a_child_run_nests_under_its_parent_in_the_parents_experiment():
    with tracking.start_run(CFG, "parent", {}) as parent:
        other = CFG.model_copy(update={"experiment_name": "elsewhere"})
        with tracking.start_run(other, "child", {}, parent_run_id=parent.run_id) as child:
            pass
    record = tracking.get_run(child.run_id)
    assert record.experiment_id == parent.experiment_id
    assert record.tags[names.PARENT_RUN_ID] == parent.run_id
    assert [r.run_id for r in tracking.children_of(parent.run_id)] == [child.run_id]


def test_the_outer_run_of_mlflow_run_is_resumed_or_handed_over(monkeypatch):
    client = MlflowClient()
    exp = client.create_experiment("outer")
    outer = client.create_run(exp).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    with tracking.start_run(CFG, "entry point", {}) as run:  # logs into the outer run
        pass
    assert run.run_id == outer
    # A resumed search logs into its own earlier run; the outer run says where the work went.
    with tracking.start_run(CFG, "search", {}) as search:
        pass
    second = client.create_run(exp).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", second)
    with tracking.start_run(CFG, "resumed", {}, resume_run_id=search.run_id) as resumed:
        pass
    assert resumed.run_id == search.run_id
    assert _run(second).data.tags[names.SEARCH_RESUMED_INTO] == search.run_id
    assert "MLFLOW_RUN_ID" not in os.environ  # taken: nothing later resumes the outer run by mistake


def test_runs_left_running_are_ended_with_their_reason():
    client = MlflowClient()
    exp = client.create_experiment("left")
    ids = [client.create_run(exp).info.run_id for _ in range(4)]
    tracking.end_failed(ids[0], "worker w1 died\nmid-trial")
    tracking.end_killed(ids[1], "interrupted: the search stopped")
    tracking.mark_failed(ids[2], "data.path: no such file")
    tracking.discard_run(ids[3])
    first, second, third = (_run(i) for i in ids[:3])
    assert first.info.status == "FAILED" and first.data.tags[names.TRIAL_STATUS] == names.FAILED
    assert first.data.tags[names.TRIAL_FAILURE_REASON] == "worker w1 died mid-trial"
    assert second.info.status == "KILLED" and second.data.tags[names.TRIAL_STATUS] == names.KILLED
    assert third.info.status == "FAILED" and third.data.tags[names.ERROR] == "data.path: no such file"
    assert _run(ids[3]).info.lifecycle_stage == "deleted"
