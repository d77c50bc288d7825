"""Interrupted trials continue from their checkpoint on --resume: the same Ax trial, the same run,
the same result as a search never interrupted; without a checkpoint, their config runs again."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import interrupt, names
from pipeline.search import loop, run_search, search_config
from pipeline.search.executors.local import LocalExecutor
from pipeline.training.checkpoint import MANIFEST

from ...conftest import DEMO_CONFIG, ROOT, venv_env
from ...reproduce import children
from ..common import Watched, interrupt_at, search_overrides


def _trials(parent_run_id: str) -> dict[int, object]:
    """The search's trial runs by Ax index (one run each)."""
    out: dict[int, object] = {}
    for r in children(parent_run_id):
        if r.data.tags[names.ROLE] != names.ROLE_TRIAL:
            continue
        index = int(r.data.tags[names.AX_TRIAL_INDEX])
        assert index not in out, f"trial {index} has two runs"
        out[index] = r
    return out


def _interrupted_search(config, trial: int, step: int) -> str:
    with pytest.raises(KeyboardInterrupt):
        loop.Search(config, Watched(LocalExecutor(quiet=True), on_eval=interrupt_at(trial, step))).run()
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs(
        [exp], f"tags.`{names.ROLE}` = 'search' and attributes.status = 'KILLED'", max_results=1
    )
    return parent.info.run_id


def test_a_trial_interrupted_after_an_evaluation_continues_in_its_own_run_and_ax_trial(tmp_path):
    sets = search_overrides(tmp_path, **{"train.eval_steps": 3, "lora.dropout": 0.1})
    whole = run_search(search_config(DEMO_CONFIG, sets, n_trials=3), quiet=True)

    parent = _interrupted_search(search_config(DEMO_CONFIG, sets, n_trials=3), trial=2, step=6)
    killed = _trials(parent)[2]
    assert killed.data.tags[names.TRIAL_STATUS] == names.KILLED

    resumed = run_search(
        search_config(DEMO_CONFIG, sets, n_trials=3, resume=parent), resume=parent, quiet=True
    )

    runs = _trials(parent)
    assert sorted(runs) == [1, 2, 3]  # no retry trial: trial 2 went on under its own index
    again = runs[2]
    assert again.info.run_id == killed.info.run_id and again.info.status == "FINISHED"
    assert (
        again.data.tags[names.TRIAL_RESUMED_FROM_STEP] == "6" and again.data.tags[names.TRIAL_RESUMES] == "1"
    )
    # Every trial ends as in the search that was never interrupted (same seed, same Ax state).
    assert [(t.index, t.eval_loss) for t in resumed.state.trials] == [
        (t.index, t.eval_loss) for t in whole.state.trials
    ]
    assert [t.status for t in resumed.state.trials] == ["completed"] * 3
    assert resumed.state.resumable == [] and resumed.state.retry == []
    history = MlflowClient().get_metric_history(again.info.run_id, names.EVAL_LOSS)
    assert [m.step for m in history] == [3, 6, 9, 12]  # one curve, each evaluation once


@pytest.mark.slow
def test_a_trial_interrupted_before_its_first_checkpoint_runs_again_as_a_new_trial(tmp_path):
    sets = search_overrides(tmp_path, **{"train.eval_steps": 6, "train.checkpoints": False})
    parent = _interrupted_search(search_config(DEMO_CONFIG, sets, n_trials=2), trial=1, step=6)
    resumed = run_search(
        search_config(DEMO_CONFIG, sets, n_trials=2, resume=parent), resume=parent, quiet=True
    )
    statuses = {t.index: t.status for t in resumed.state.trials}
    assert statuses == {1: names.KILLED, 2: names.COMPLETED, 3: names.COMPLETED}
    assert resumed.state.trials[1].parameters == resumed.state.trials[0].parameters  # its config again
    assert names.TRIAL_RESUMED_FROM_STEP not in _trials(parent)[2].data.tags


@pytest.mark.e2e
def test_a_search_sigkilled_mid_trial_continues_that_trial_on_resume(tmp_path):
    """The whole process SIGKILLed (no handler runs) after trial 2's first checkpoint; `--resume`
    continues trial 2 from that checkpoint in its run, and every eval loss is the uninterrupted
    search's."""
    sets = search_overrides(tmp_path, **{"train.max_steps": 60, "train.eval_steps": 10})
    cmd = [sys.executable, "-m", "pipeline", "search", "--config", str(DEMO_CONFIG), "--quiet"]
    cmd += ["--n-trials", "2", "--set", " ".join(sets)]
    env = venv_env(tmp_path)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    checkpoints = tmp_path / "out" / names.CHECKPOINTS_DIR
    try:
        deadline = time.monotonic() + 600
        while not any(line.startswith("[1/2]") for line in lines):  # trial 1 done: trial 2 runs
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.01)
        while not list(checkpoints.glob(f"*/checkpoint-*/{MANIFEST}")):
            assert proc.poll() is None, "trial 2 ended before its first checkpoint: " + "".join(lines)
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(5)
    (parent,) = {line.split()[2] for line in lines if line.startswith("search run ")}

    p = subprocess.run(
        [*cmd, "--resume", parent], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "continuing from its checkpoint at step" in p.stdout

    runs = _trials(parent)
    assert sorted(runs) == [1, 2]
    continued = runs[2]
    assert continued.info.status == "FINISHED" and int(continued.data.tags[names.TRIAL_RESUMED_FROM_STEP]) > 0
    whole = run_search(search_config(DEMO_CONFIG, sets, n_trials=2), quiet=True)
    assert [t.eval_loss for t in whole.state.trials] == [
        runs[i].data.metrics[names.EVAL_LOSS] for i in (1, 2)
    ]


@pytest.mark.slow
def test_an_interrupted_baseline_continues_in_its_run(tmp_path, monkeypatch):
    from pipeline.training import callbacks

    sets = search_overrides(tmp_path, **{"train.eval_steps": 3})
    real, fired = callbacks.KeepBest.on_evaluation, []

    def stop_the_baseline_at_6(self, result, model, control):
        real(self, result, model, control)
        if result.step == 6 and not fired:
            fired.append(True)
            interrupt.request_stop()

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(callbacks.KeepBest, "on_evaluation", stop_the_baseline_at_6)
        loop.Search(search_config(DEMO_CONFIG, sets, n_trials=1), LocalExecutor(quiet=True)).run()
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs([exp], f"tags.`{names.ROLE}` = 'search'")
    (killed,) = client.search_runs([exp], f"tags.`{names.ROLE}` = 'baseline'")
    assert killed.info.status == "KILLED"

    pid = parent.info.run_id
    resumed = run_search(search_config(DEMO_CONFIG, sets, n_trials=1, resume=pid), resume=pid, quiet=True)
    assert resumed.state.baseline.run_id == killed.info.run_id
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.TRIAL_RESUMED_FROM_STEP] == "6"
    assert [s for s, _ in resumed.state.baseline.evals] == [3, 6, 9, 12]
