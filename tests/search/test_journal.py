"""The search's records on disk and on the run, and resuming from them
(`pipeline/search/journal.py`)."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import names
from pipeline.search import journal
from pipeline.search.records import SearchState

from ..conftest import DEMO_CONFIG
from .common import Watched, baseline_record, record, search_overrides


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


@pytest.mark.no_store
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


def test_a_resume_checks_its_settings_against_the_records_without_loading_the_old_config(
    monkeypatch, tmp_path
):
    """The records keep the started config's frozen settings: a resume compares with them (the
    run's config.yaml was loaded once already, by the preflight, to build this config)."""
    from pipeline import tracking

    from .common import demo

    started = demo()
    state = SearchState("p", 3, settings=journal.frozen_settings(started))
    assert state.settings["train.max_steps"] == started.train.max_steps
    assert "train.keep_checkpoints" not in state.settings and "tracking.tracking_uri" not in state.settings
    loads = []
    monkeypatch.setattr(tracking, "download_run_file", lambda *a: loads.append(a) or started_file)
    started_file = tmp_path / "config.yaml"
    started_file.write_text(DEMO_CONFIG.read_text())
    # What may change: where trials write, their checkpoints, the store, the budget.
    free = demo(**{"train.keep_checkpoints": True, "train.oom_retry": "none", "search.budget_minutes": 5})
    journal._refuse_changed_settings("p", state, free)
    with pytest.raises(journal.PipelineError, match=f"train.max_steps: {started.train.max_steps} -> 24"):
        journal._refuse_changed_settings("p", state, demo(**{"train.max_steps": 24}))
    assert loads == []
    # A key added since the search started is unchanged at the value it adds.
    del state.settings["lora.use_dora"]
    journal._refuse_changed_settings("p", state, free)
    with pytest.raises(journal.PipelineError, match=r"lora.use_dora: None -> True"):
        journal._refuse_changed_settings("p", state, demo(**{"lora.use_dora": True}))
    # Records saved before they kept the settings: the run's config.yaml, once.
    state.settings = {}
    with pytest.raises(journal.PipelineError, match=f"train.max_steps: {started.train.max_steps} -> 24"):
        journal._refuse_changed_settings("p", state, demo(**{"train.max_steps": 24}))
    assert len(loads) == 1


@pytest.mark.slow
def test_resume_with_a_changed_search_space_is_refused(tmp_path, capsys):
    """The Ax state of a search belongs to its space and trial settings: a resume that changes
    them is refused with one line naming each key, before anything runs."""

    from pipeline.search import run_search, search_config

    from ..conftest import run_cli

    sets = search_overrides(tmp_path)
    first = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    args = ["search", "--config", str(DEMO_CONFIG), "--resume", first.parent_run_id, "--quiet"]
    args += [f"--set={o}" for o in sets]
    code, _, err = run_cli(
        [
            *args,
            *("--set", "search.parameters.lora.r.values=[4,8]", "--set", "train.max_steps=24"),
            *("--set", "search.early_stopping.progression=examples"),
        ],
        capsys,
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert f"error: resume: search run {first.parent_run_id} changed since it started" in errors[0]
    assert "search.parameters.lora.r.values: [4, 8, 16, 32] -> [4, 8]" in errors[0]
    assert "train.max_steps: 12 -> 24" in errors[0]
    assert "search.early_stopping.progression: 'auto' -> 'examples'" in errors[0]
    runs = MlflowClient().search_runs([MlflowClient().get_run(first.parent_run_id).info.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # nothing new, nothing left open
    # What may change: the budget, the trial count, where the store is...
    code, _, err = run_cli([*args, "--n-trials", "1"], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_state_files_and_crash_windows(tmp_path, monkeypatch):
    """Two windows in which a hard kill (no handler runs) used to cost a finished trial: after a
    trial's run ended but before the state was saved, and in the middle of writing the state.
    Either way the resumed search records the finished trial from its run instead of training
    it again, and the state files on disk are whole."""
    import json

    from pipeline.search import journal, run_search, search_config
    from pipeline.search.executors.local import LocalExecutor

    sets = search_overrides(tmp_path)

    def trial_runs(parent):
        client = MlflowClient()
        exp = client.get_run(parent).info.experiment_id
        runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
        return [r for r in runs if r.data.tags[names.ROLE] == names.ROLE_TRIAL]

    def parent_of_last_search():
        client = MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        return max(
            (r for r in runs if r.data.tags[names.ROLE] == names.ROLE_SEARCH), key=lambda r: r.info.start_time
        )

    # Window 1: the second trial's run ends FINISHED, then the process dies before the save.
    ended = []

    def die_at_the_second(outcome):
        ended.append(outcome)
        if len(ended) == 2:
            raise SystemExit("killed")  # like SIGKILL: no handler saves anything

    with pytest.raises(SystemExit):
        executor = Watched(LocalExecutor(quiet=True), on_done=die_at_the_second)
        run_search(search_config(DEMO_CONFIG, sets, n_trials=3), quiet=True, executor=executor)
    parent = parent_of_last_search().info.run_id
    before = {r.data.tags[names.AX_TRIAL_INDEX]: r for r in trial_runs(parent)}
    assert len(before) == 2 and all(r.info.status == "FINISHED" for r in before.values())
    result = run_search(
        search_config(DEMO_CONFIG, sets, n_trials=3, resume=parent), resume=parent, quiet=True
    )
    after = trial_runs(parent)
    assert len(after) == 3, "the finished trial was trained again"
    second = result.state.record(int(max(before)))
    assert second.status == "completed" and second.run_id == before[max(before)].info.run_id
    assert second.eval_loss == pytest.approx(before[max(before)].data.metrics[names.EVAL_LOSS])
    assert [t.status for t in result.state.trials] == ["completed"] * 3

    # Window 2: killed while writing the state after a trial: Ax's JSON is new, trials.json is not.
    real_write = journal.write_atomic
    writes = {"n": 0}

    def die_in_the_second_state_write_after_trial_one(path, text):
        if path.name == names.TRIALS_FILE and '"status": "completed"' in text:
            writes["n"] += 1
            if writes["n"] == 1:
                raise SystemExit("killed mid-write")
        return real_write(path, text)

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(journal, "write_atomic", die_in_the_second_state_write_after_trial_one)
        run_search(search_config(DEMO_CONFIG, [*sets, "search.seed=1"], n_trials=2), quiet=True)
    parent = parent_of_last_search().info.run_id
    saved = tmp_path / "search" / parent / names.STATE_DIR
    on_disk = json.loads((saved / names.TRIALS_FILE).read_text())  # whole: the old version
    assert [t["status"] for t in on_disk["trials"]] == ["running"]
    assert not [p for p in saved.iterdir() if p.name.startswith(".")], "a temporary file was left"
    result = run_search(
        search_config(DEMO_CONFIG, [*sets, "search.seed=1"], n_trials=2, resume=parent),
        resume=parent,
        quiet=True,
    )
    assert len(trial_runs(parent)) == 2 and [t.status for t in result.state.trials] == ["completed"] * 2
