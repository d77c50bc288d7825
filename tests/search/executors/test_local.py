"""The seam between the loop and where trials run (`pipeline/search/executors/local.py`): jobs, outcomes,
evaluations."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.core import names
from pipeline.core.errors import ConfigError
from pipeline.search.executors.local import LocalExecutor, TrialJob, run_job
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec

from ...conftest import DEMO_CONFIG
from ..common import demo


def test_run_job_reports_failures_instead_of_raising(tiny_config, tmp_path, monkeypatch):
    base = tiny_config.model_copy(update={"search": None})
    resources = Resources()
    # Bad input for this trial's config: fails before any run exists.
    missing = run_job(TrialJob(3, base, {"data.path": str(tmp_path / "none.jsonl")}), resources)
    assert (missing.status, missing.run_id, missing.result) == ("failed", None, None)
    assert missing.reason.startswith("DataError: data.path: file not found")

    # Out of memory while training: the run ends FAILED, tagged abandoned, the error kept.
    import pipeline.trial.run as trial_mod

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trial_mod, "train", oom)
    spec = RunSpec(names.ROLE_TRIAL, "trial-01", tags={names.AX_TRIAL_INDEX: 4})
    evals = []
    out = run_job(TrialJob(4, base, {"lora.r": 4}, spec), resources, lambda e: evals.append(e))
    assert out.status == "abandoned" and out.run_id and "out of memory" in out.reason
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FAILED" and run.data.tags[names.TRIAL_STATUS] == "abandoned"
    assert run.data.tags[names.TRIAL_FAILURE_REASON] == out.reason and run.data.params["lora.r"] == "4"


def test_local_executor_runs_one_job_at_a_time_and_streams_evaluations(tiny_config):
    base = tiny_config.model_copy(update={"search": None})
    executor = LocalExecutor(quiet=True)
    heard = []

    def on_eval(event):
        heard.append((event.trial, event.step, event.examples))
        return False

    assert executor.idle() == 1
    executor.submit(TrialJob(5, base, {"lora.r": 4}, RunSpec(names.ROLE_TRIAL)), on_eval)
    assert executor.idle() == 0  # one at a time: nothing else until this one is collected
    out = executor.wait_any()
    assert out.status == "completed" and out.job.index == 5 and out.result.run_id == out.run_id
    # Each evaluation but the last (which ends the trial anyway), with the trial's Ax index, its
    # step and the training examples seen by then (step 6 x batch 4).
    assert heard == [(5, 6, 24)]
    assert out.result.adapter_dir.is_dir() and out.result.eval_fingerprint
    tags = MlflowClient().get_run(out.run_id).data.tags
    assert tags[names.TRIAL_STATUS] == "completed"
    assert executor.idle() == 1
    executor.close()


def test_a_searched_key_means_what_trains(tmp_path, capsys):
    """lora.alpha_ratio sets lora.alpha: searching alpha beside it trained r x ratio while Ax
    recorded the asked alpha. The config refuses it, naming both keys; and a trial whose built
    config does not hold the values Ax asked for never trains."""
    from pipeline.search.executors.local import TrialJob, run_job
    from pipeline.trial.resources import Resources

    from ...conftest import run_cli, tiny_overrides

    with pytest.raises(ConfigError) as e:
        demo(**{"lora.alpha_ratio": 2.0})
    assert "search.parameters" in str(e.value) and "lora.alpha_ratio" in str(e.value)
    code, _, err = run_cli(["search", "--config", str(DEMO_CONFIG), "--set", "lora.alpha_ratio=2"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "lora.alpha_ratio" in errors[0] and "lora.alpha" in errors[0]
    # Searching the ratio itself is fine: what Ax records (r, ratio) is what trains.
    space = {k: v.model_dump(exclude_none=True) for k, v in demo().search.parameters.items()}
    space["lora.alpha_ratio"] = {"type": "choice", "values": [1.0, 2.0]}
    del space["lora.alpha"]
    ratio = demo(**{"lora.alpha_ratio": 2.0, "search.parameters": space})
    assert set(ratio.search.parameters) == {
        "lora.r",
        "lora.alpha_ratio",
        "train.learning_rate",
        "train.batch_size",
    }

    base = load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), "lora.alpha_ratio=2", "search=null"])
    out = run_job(TrialJob(1, base, {"lora.r": 8, "lora.alpha": 8.0}), Resources())
    assert out.status == "failed" and out.run_id is None
    assert "lora.alpha: Ax asked for 8.0, the trial's config holds 16.0" in out.reason


def test_oom_recovery_frees_the_failed_trials_memory(tiny_config, monkeypatch):
    """Out of memory, the trial is abandoned and what its frames held is freed before the next
    trial (the traceback kept the Trainer, optimizer state and activations alive while memory
    was freed inside the `except` block): RSS after the failed trial is back where it was."""
    import gc

    import psutil
    import torch

    import pipeline.trial.run as trial_mod
    from pipeline.search.executors.local import TrialJob, run_job
    from pipeline.trial.resources import Resources
    from pipeline.trial.run import setup

    base = tiny_config.model_copy(update={"search": None})
    resources = Resources()
    setup(base, resources)  # tokenizer, data and base model loaded before measuring

    def oom_holding_memory(*args, **kwargs):
        hog = torch.ones(300 * 2**20 // 4)  # 300 MB of activations, say
        hog.add_(1)
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trial_mod, "train", oom_holding_memory)
    gc.collect()
    before = psutil.Process().memory_info().rss
    out = run_job(TrialJob(3, base, {"lora.r": 4}), resources)
    after = psutil.Process().memory_info().rss
    assert out.status == "abandoned" and "out of memory" in out.reason and out.run_id
    assert after - before < 100 * 2**20, f"{(after - before) / 2**20:.0f} MB still held after the OOM"


def test_jobs_in_flight_keep_their_records_start_times_and_device_seconds():
    # The trials' loop and the replicates run their jobs through one InFlight: what is running,
    # since when (the device budget counts it), and what each job held when it ended.
    from pipeline.search.executors.local import InFlight, JobOutcome

    class TwoDeviceExecutor:
        devices_per_trial = 2.0

        def __init__(self):
            self.queue = []

        def submit(self, job, on_eval):
            self.queue.append((job, on_eval))

        def wait_any(self):
            job, _ = self.queue.pop(0)
            return JobOutcome(job, "completed")

    now = [10.0]
    flight = InFlight(TwoDeviceExecutor(), lambda: now[0])
    base = demo()
    flight.submit(TrialJob(3, base, {}), "trial 3", on_eval=print)
    now[0] = 12.0
    flight.submit(TrialJob(-2, base, {}), "replicate 0")
    assert len(flight) == 2 and 3 in flight and -2 in flight and flight.started == {3: 10.0, -2: 12.0}
    assert flight.executor.queue[0][1] is print  # the eval hook reaches the executor
    now[0] = 15.0
    record, outcome, device_seconds = flight.wait()
    assert (record, outcome.job.index, device_seconds) == ("trial 3", 3, 10.0)  # 5 s on 2 devices
    assert 3 not in flight and flight.started == {-2: 12.0}
    assert flight.clear() == ["replicate 0"] and not flight and flight.started == {}
