"""The search loop end to end (`pipeline/search/loop.py`): failures, early stopping, interruption
and resume, the champion."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core import names
from pipeline.search import run_search, search_config
from pipeline.search.ax.optimizer import Optimizer

from ..conftest import DEMO_CONFIG, ROOT, run_cli, tiny_overrides, venv_env
from ..reproduce import children

MODEL = "tests-lora"


def overrides(tmp_path, **extra) -> list[str]:
    return tiny_overrides(
        tmp_path,
        **{
            "train.eval_steps": 4,
            "search.output_dir": str(tmp_path / "search"),
            "registry.model_name": MODEL,
            "search.early_stopping.enabled": False,
            **extra,
        },
    )


def trials_of(parent_id: str) -> list:
    return [r for r in children(parent_id) if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]


def ax_statuses(tmp_path, parent_id: str) -> dict[int, str]:
    path = tmp_path / "search" / parent_id / names.STATE_DIR / names.AX_STATE_FILE
    return Optimizer.load(path, load_config(DEMO_CONFIG)).statuses()


def _poison(monkeypatch, plan: dict[int, str]):
    """Make the n-th call of train() fail as planned: 'raise', 'nan' or 'oom'."""
    import pipeline.training.callbacks as callbacks
    import pipeline.trial.run as trial_mod

    real_train = trial_mod.train
    calls = {"n": 0, "nan": False}

    def train(*args, **kwargs):
        calls["n"] += 1
        what = plan.get(calls["n"])
        if what == "raise":
            raise RuntimeError("injected failure")
        if what == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        calls["nan"] = what == "nan"
        return real_train(*args, **kwargs)

    def nan_loss(real_on_log):
        def on_log(self, args, state, control, logs=None, **kw):
            if calls["nan"] and logs and "loss" in logs:
                logs = {**logs, "loss": float("nan")}
            return real_on_log(self, args, state, control, logs=logs, **kw)

        return on_log

    monkeypatch.setattr(trial_mod, "train", train)
    # What the trainer logs, as the stream and the divergence watch hear it.
    for cls in (callbacks.StreamMetrics, callbacks.StopOnDivergence):
        monkeypatch.setattr(cls, "on_log", nan_loss(cls.on_log))
    return calls


def _wait_for(predicate, proc, log, timeout=600, every=1.0):
    """Poll until predicate() holds; fail at once if the search process ended meanwhile."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the search exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(every)
    raise AssertionError("timed out")


def test_failed_nan_and_oom_trials_are_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    _poison(monkeypatch, {3: "raise", 4: "nan", 5: "oom"})  # call 1 is the baseline
    result = run_search(
        search_config(DEMO_CONFIG, overrides(tmp_path, **{"search.max_failure_rate": 1.0}), n_trials=5),
        quiet=True,
    )
    statuses = [t.status for t in result.state.trials]
    assert statuses == ["completed", "failed", "failed", "abandoned", "completed"]
    reasons = [t.failure_reason for t in result.state.trials[1:4]]
    assert (
        "injected failure" in reasons[0] and "loss became nan" in reasons[1] and "out of memory" in reasons[2]
    )
    runs = {r.info.run_id: r for r in trials_of(result.parent_run_id)}
    for t in result.state.trials:
        run = runs[t.run_id]
        assert run.data.tags[names.TRIAL_STATUS] == t.status
        assert run.info.status == ("FINISHED" if t.status == "completed" else "FAILED")
        if t.status != "completed":
            assert run.data.tags[names.TRIAL_FAILURE_REASON] == t.failure_reason
    ax = ax_statuses(tmp_path, result.parent_run_id)
    by_index = {t.index: ax[t.index] for t in result.state.trials}
    assert [by_index[t.index] for t in result.state.trials] == [
        "COMPLETED",
        "FAILED",
        "FAILED",
        "ABANDONED",
        "COMPLETED",
    ]
    assert result.best is not None and result.best.status == "completed"
    assert "Trials without a score" in (result.report_dir / names.REPORT_FILE).read_text()


def _search_exit(tmp_path, capsys, n_trials: int, *sets: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(
            [
                "search",
                "--config",
                str(DEMO_CONFIG),
                "--n-trials",
                str(n_trials),
                "--quiet",
                *[f"--set={o}" for o in [*overrides(tmp_path), *sets]],
            ]
        )
    return e.value.code, capsys.readouterr().err


def _search_parent():
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return next(r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH)


def test_a_search_whose_first_trial_fails_with_no_score_stops_there(tmp_path, monkeypatch, capsys):
    # Before: the rate applied from 3 trials on, so a space that cannot run spent 3 trials first
    # (and with max_failure_rate 1.0, all of them, then exited 0 with "best none").
    _poison(monkeypatch, {n: "raise" for n in range(2, 20)})
    code, err = _search_exit(tmp_path, capsys, 8)
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert re.fullmatch(
        r"error: search stopped: 1 of 1 trials failed \(search.max_failure_rate 0.5\); nothing registered; "
        r"first failure, trial \d+: RuntimeError: injected failure \(traceback: error.txt of run (\w+), or rerun with -v\)",
        line,
    ), line
    run_id = line.rsplit("of run ", 1)[1].split(",")[0]
    traceback = Path(MlflowClient().download_artifacts(run_id, names.ERROR_FILE, str(tmp_path))).read_text()
    assert "RuntimeError: injected failure" in traceback
    assert _search_parent().info.status == "FAILED"
    assert not MlflowClient().search_registered_models()


def test_a_search_whose_every_trial_failed_exits_non_zero_with_nothing_registered(
    tmp_path, monkeypatch, capsys
):
    # Before: exit 0 and "best none", which a scheduler reads as success. Out-of-memory trials
    # alone count toward max_failure_rate from 3 trials on (Ax learns from them): the end catches it.
    _poison(monkeypatch, {2: "oom", 3: "oom"})
    code, err = _search_exit(tmp_path, capsys, 2)
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "error: search stopped: 2 of 2 trials failed and none has a score; nothing registered; " in line
    assert "first failure, trial" in line and "out of memory" in line, line
    assert _search_parent().info.status == "FAILED"
    assert not MlflowClient().search_registered_models()


def test_early_stopping_stops_a_clearly_bad_trial(tmp_path):
    result = run_search(
        search_config(
            DEMO_CONFIG,
            [
                *overrides(
                    tmp_path,
                    **{
                        "search.early_stopping.enabled": True,
                        "search.early_stopping.min_curves": 2,
                        "search.initialization_trials": 6,
                        "train.max_steps": 16,
                    },
                ),
                "search.parameters.train.learning_rate.bounds=[1.0e-5,1.0e-2]",
            ],
            n_trials=6,
        ),
        quiet=True,
    )
    stopped = [t for t in result.state.trials if t.status == "early_stopped"]
    assert stopped, [(t.parameters, t.eval_loss) for t in result.state.trials]
    completed = [t for t in result.state.trials if t.status == "completed"]
    for t in stopped:
        assert t.steps < t.max_steps == 16
        # Stopped because it was worse than the completed trials at the same step.
        at_step = [dict(c.evals).get(t.steps) for c in completed if t.steps in dict(c.evals)]
        assert at_step and t.eval_loss > min(at_step)
        run = MlflowClient().get_run(t.run_id)
        assert run.data.tags[names.TRIAL_STATUS] == "early_stopped" and run.info.status == "FINISHED"
        assert any(
            a.path.endswith("adapter_model.safetensors")
            for a in MlflowClient().list_artifacts(t.run_id, names.ADAPTER_DIR)
        )
    assert MlflowClient().get_run(result.parent_run_id).data.metrics[names.STEPS_SAVED_PCT] > 0
    assert result.best.status == "completed"


@pytest.mark.slow
def test_interrupt_and_crash_then_resume(tmp_path):
    """SIGTERM ends the current trial cleanly (KILLED, state saved, exit 130); SIGKILL leaves a
    RUNNING trial that the resumed search marks KILLED and reruns; nothing completed is lost."""
    env = venv_env(tmp_path)
    uri = env["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "search",
        "--config",
        str(DEMO_CONFIG),
        "--n-trials",
        "4",
        "--quiet",
        *[f"--set={o}" for o in overrides(tmp_path, **{"train.max_steps": 60, "train.eval_steps": 20})],
    ]

    def state():
        client = MlflowClient()
        exp = client.get_experiment_by_name("tests")
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id])
        parent = next((r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH), None)
        trials = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]
        return parent, trials

    # 1. SIGTERM during the first trial.
    log = (tmp_path / "search.log").open("w")  # a file, not a pipe: a full pipe would block the search
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(
        lambda: (s := state()) and s[1] and s[1][0].info.status == "RUNNING",
        proc,
        tmp_path / "search.log",
        every=0.2,
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = (tmp_path / "search.log").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: state saved" in err
    parent, trials = state()
    assert parent.info.status == "KILLED"
    assert [t.info.status for t in trials] == ["KILLED"]
    parent_id = parent.info.run_id
    saved = json.loads((tmp_path / "search" / parent_id / names.STATE_DIR / names.TRIALS_FILE).read_text())
    killed_params = saved["trials"][0]["parameters"]
    assert saved["retry"] == [killed_params]

    # 2. Resume; SIGKILL once a trial has completed and the next one runs.
    proc = subprocess.Popen(
        [*args, "--resume", parent_id], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def one_done_one_running():
        _, trials = state()
        done = [t for t in trials if t.info.status == "FINISHED"]
        running = [t for t in trials if t.info.status == "RUNNING"]
        return len(done) >= 1 and running

    _wait_for(one_done_one_running, proc, tmp_path / "search.log")
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _, trials = state()
    done_before = {
        t.info.run_id: t.data.metrics[names.EVAL_LOSS] for t in trials if t.info.status == "FINISHED"
    }
    retried = next(t for t in trials if t.info.status == "FINISHED")
    assert {k: retried.data.params[k] for k in killed_params} == {k: str(v) for k, v in killed_params.items()}

    # 3. Resume again: runs to the end.
    p = subprocess.run(
        [*args, "--resume", parent_id], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    parent, trials = state()
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert not [t for t in trials if t.info.status == "RUNNING"]
    finished = [t for t in trials if t.info.status == "FINISHED"]
    killed = [t for t in trials if t.info.status == "KILLED"]
    assert len(finished) == 4 and len(killed) == 2
    assert all(t.data.tags[names.TRIAL_STATUS] == "killed" for t in killed)
    for run_id, loss in done_before.items():  # nothing completed was lost or redone
        assert MlflowClient().get_run(run_id).data.metrics[names.EVAL_LOSS] == loss
    final = json.loads((tmp_path / "search" / parent_id / names.STATE_DIR / names.TRIALS_FILE).read_text())
    assert [t["status"] for t in final["trials"]].count("completed") == 4
    assert final["sessions"] == 3 and final["retry"] == []
    ax = ax_statuses(tmp_path, parent_id)
    assert sum(s == "COMPLETED" for s in ax.values()) == 4 + 1  # + the baseline


def test_multi_objective_search_reports_a_pareto_frontier(tmp_path):
    result = run_search(
        search_config(
            DEMO_CONFIG,
            [
                *overrides(tmp_path, **{"search.initialization_trials": 5}),
                "search.objectives='[{metric: eval_loss, minimize: true}, {metric: trainable_params, minimize: true}]'",
            ],
            n_trials=5,
        ),
        quiet=True,
    )
    report = (result.report_dir / names.REPORT_FILE).read_text()
    assert "## Pareto frontier" in report
    assert (result.report_dir / "pareto_front.png").stat().st_size > 10_000
    # Every reported point is a trial, and no scored trial dominates it.
    rows = [
        line
        for line in report.split("## Pareto frontier")[1].split("##")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| Trial")
    ]
    assert rows
    scored = result.state.scored()
    for row in rows:
        index = int(row.split("|")[1])
        t = next(t for t in scored if t.index == index)
        dominated = any(
            o.eval_loss <= t.eval_loss
            and o.metrics["trainable_params"] <= t.metrics["trainable_params"]
            and (o.eval_loss < t.eval_loss or o.metrics["trainable_params"] < t.metrics["trainable_params"])
            for o in scored
        )
        assert not dominated, row


def test_a_worse_search_does_not_move_the_champion_and_reuses_the_baseline(tmp_path):
    first = run_search(
        search_config(DEMO_CONFIG, overrides(tmp_path, **{"search.initialization_trials": 4}), n_trials=2),
        quiet=True,
    )
    assert first.promotion.promoted and first.promotion.version == "1"
    # The version's description: the best trial and its search, with the gain over the baseline.
    described = MlflowClient().get_model_version(MODEL, "1").description
    assert f"| source run | trial [`{first.best.run_id}`](#/experiments/" in described
    assert f"| search run | [`{first.parent_run_id}`](#/experiments/" in described
    assert "| vs baseline | eval_loss " in described and "```yaml\n" in described
    # best_config.yaml, the run's copy and the result handed on are one config: the file is
    # written once, not read back; the version's description holds the same YAML.
    from pipeline.config import load_config, to_yaml

    assert load_config(first.best_config_path, search=False) == first.best_config
    assert first.best_config.search is None and first.best_config.lora.r == first.best.parameters["lora.r"]
    logged = MlflowClient().download_artifacts(first.parent_run_id, names.BEST_CONFIG_FILE, str(tmp_path))
    assert Path(logged).read_text() == first.best_config_path.read_text()
    assert to_yaml(first.best_config) in described
    # A search confined to a tiny learning rate cannot beat the first one.
    worse = run_search(
        search_config(
            DEMO_CONFIG,
            [*overrides(tmp_path), "search.parameters.train.learning_rate='{type: fixed, value: 1.0e-6}'"],
            n_trials=1,
        ),
        quiet=True,
    )
    assert worse.state.baseline.reused and worse.state.baseline.run_id == first.state.baseline.run_id
    assert not [r for r in children(worse.parent_run_id) if r.data.tags[names.ROLE] == names.ROLE_BASELINE]
    assert not worse.promotion.promoted and worse.promotion.version == "2"
    assert "does not beat champion v1" in worse.promotion.message
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(MODEL, names.CHAMPION_ALIAS).version) == "1"
    assert "not promoted: eval_loss" in (worse.report_dir / names.REPORT_FILE).read_text()


def test_bad_search_input(tmp_path, capsys):
    def run(*extra: str) -> tuple[int, str]:
        try:
            main(
                [
                    "search",
                    "--config",
                    str(DEMO_CONFIG),
                    "--quiet",
                    *[f"--set={o}" for o in overrides(tmp_path)],
                    *extra,
                ]
            )
            code = 0
        except SystemExit as e:
            code = e.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1, err
        return code, err[0]

    # Checked by the config's own validation, like any key: the option is named, not a file line.
    assert run("--n-trials", "0") == (
        2,
        f"error: invalid config {DEMO_CONFIG}: --n-trials: Input should be greater than 0 (got 0)",
    )
    code, err = run("--resume", "0123456789abcdef0123456789abcdef")
    assert code == 2 and "resume: no run '0123456789abcdef0123456789abcdef'" in err
    code, err = run(
        "--set", "search.parameters.lora.r.bounds=[64,8]", "--set", "search.parameters.lora.r.type=range"
    )
    assert code == 2 and "search.parameters.lora.r" in err and "inverted" in err
    # An objective no trial logs: found in the config, before anything trains.
    code, err = run("--set", "search.objectives='[{metric: eval_exact_match}]'", "--n-trials", "1")
    assert code == 2 and "search.objectives: eval_exact_match is not logged by eval.generation_metric" in err
    # A constraint on a CUDA memory peak, on a machine without CUDA: refused before any run exists,
    # naming the key that holds it (the seed config's `peak_gpu_mem_gb <= 15` on a laptop).
    before = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    code, err = run("--set", "search.outcome_constraints='[peak_gpu_mem_gb <= 15]'", "--n-trials", "1")
    assert code == 2 and "search.outcome_constraints: peak_gpu_mem_gb is measured only on a CUDA GPU" in err
    after = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert len(after) == before, "the refusal left a run behind"
    # Resume a run that is not a search parent (a baseline's).
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests") or client.get_experiment(client.create_experiment("tests"))
    base = client.create_run(exp.experiment_id, tags={names.ROLE: names.ROLE_BASELINE}).info.run_id
    client.set_terminated(base)
    code, err = run("--resume", base)
    assert code == 2 and "is not a search run" in err
    assert not MlflowClient().search_registered_models()
    exp = MlflowClient().get_experiment_by_name("tests").experiment_id
    assert all(r.info.status != "RUNNING" for r in MlflowClient().search_runs([exp]))


def test_resuming_a_finished_search_says_so_and_leaves_no_run(tmp_path, capsys):
    """The run id is printed as the search starts; resuming a search that ran all its trials is one
    line, exit 0, and no run: not even the one `mlflow run` made for the invocation."""
    code, out, err = run_cli(
        [
            "search",
            "--config",
            str(DEMO_CONFIG),
            "--n-trials",
            "1",
            "--quiet",
            *[f"--set={o}" for o in overrides(tmp_path)],
        ],
        capsys,
    )
    assert code == 0, err
    first = out.splitlines()[0]
    assert (
        first.startswith("search run ")
        and "started; after an interruption, continue it with --resume" in first
    )
    parent = first.split()[2]
    client = MlflowClient()
    exp = client.get_run(parent).info.experiment_id
    runs = {r.info.run_id for r in client.search_runs([exp])}
    outer = client.create_run(exp).info.run_id  # what `mlflow run` makes before the entry point starts
    os.environ["MLFLOW_RUN_ID"] = outer
    try:
        code, out, err = run_cli(
            [
                "search",
                "--config",
                str(DEMO_CONFIG),
                "--resume",
                parent,
                "--quiet",
                *[f"--set={o}" for o in overrides(tmp_path)],
            ],
            capsys,
        )
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    assert code == 0, err
    assert out.strip() == (
        f"search run {parent} has finished (1 of 1 trials); nothing to do (give --n-trials more than that "
        "to run more trials)"
    )
    assert {r.info.run_id for r in client.search_runs([exp])} == runs
    assert client.get_run(outer).info.lifecycle_stage == "deleted"
    assert client.get_run(parent).info.status == "FINISHED"


def test_resume_from_another_experiment_is_refused(tmp_path, capsys):
    first = run_search(
        search_config(DEMO_CONFIG, overrides(tmp_path, **{"search.initialization_trials": 4}), n_trials=1),
        quiet=True,
    )
    with pytest.raises(SystemExit) as e:
        main(
            [
                "search",
                "--config",
                str(DEMO_CONFIG),
                "--resume",
                first.parent_run_id,
                "--quiet",
                *[f"--set={o}" for o in overrides(tmp_path, **{"tracking.experiment_name": "elsewhere"})],
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"resume: run {first.parent_run_id} belongs to experiment" in err
    os.environ.pop("MLFLOW_RUN_ID", None)
