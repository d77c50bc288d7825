"""Search integrity (issue 10): each test is named after what it guards, and failed on the code
before the fix (the note of the change says how)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config, with_overrides
from pipeline.errors import ConfigError, SearchAborted
from pipeline.search.space import Optimizer

from .conftest import DEMO_CONFIG


def demo(**values):
    config = load_config(DEMO_CONFIG)
    return with_overrides(config, values) if values else config


def _curve(optimizer: Optimizer, index: int, losses: list[float], every: int = 400) -> bool:
    """Report a learning curve evaluation by evaluation; True if Ax stopped the trial."""
    # Stops at the first True, like the trainer does: any() short-circuits.
    return any(optimizer.report_evaluation(index, i * every, loss) for i, loss in enumerate(losses, 1))


def test_early_stopping_survives_a_resume(tmp_path):
    """A trial killed after its first evaluation is retried with the same parameters (the same
    Ax arm). Its partial data must not stay beside the retry's, or Ax's early stopping gives up
    ("Arm ... has multiple trial indices") for the rest of the search."""
    config = demo(
        **{
            "search.initialization_trials": 8,
            "search.early_stopping.enabled": True,
            "search.early_stopping.min_curves": 2,
            "search.early_stopping.min_progression": 400,
        }
    )
    optimizer = Optimizer.create(config)
    good = [3.6, 3.3, 3.2]
    for _ in range(2):
        index, _, _ = optimizer.ask()
        assert not _curve(optimizer, index, good)
        optimizer.complete(index, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    killed, params, _ = optimizer.ask()
    assert not _curve(optimizer, killed, [3.5])  # one evaluation, then SIGTERM
    optimizer.fail(killed, "interrupted")
    optimizer.save(tmp_path / "ax.json")

    resumed = Optimizer.load(tmp_path / "ax.json", config)
    retry = resumed.retry(params)
    assert not _curve(resumed, retry, good)
    resumed.complete(retry, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    bad, _, _ = resumed.ask()
    assert _curve(resumed, bad, [9.0, 9.0, 9.0]), "a clearly bad trial after the resume must stop"
    assert resumed.broken is None


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
    statuses = {i: t.status.name for i, t in optimizer.client._experiment.trials.items()}
    assert statuses[index - 1] == "ABANDONED" and "parameters again" in optimizer.notes[-1]
    with pytest.raises(SearchAborted, match="has data"):
        optimizer.retry(params)  # the loop only retries interrupted trials, whose data is gone

    # Two trials of one arm with data (bypassing the optimizer): Ax gives up; we notice.
    twin = optimizer.client.attach_trial(parameters=params)
    optimizer.client.attach_data(twin, {"eval_loss": 3.1}, progression=400)
    assert optimizer.report_evaluation(index, 400, 3.2) is False
    assert optimizer.broken and "multiple trial indices" in optimizer.broken


def test_a_searched_key_means_what_trains(tmp_path, capsys):
    """lora.alpha_ratio sets lora.alpha: searching alpha beside it trained r x ratio while Ax
    recorded the asked alpha. The config refuses it, naming both keys; and a trial whose built
    config does not hold the values Ax asked for never trains."""
    from pipeline.resources import Resources
    from pipeline.search.executor import TrialJob, run_job

    from .conftest import run_cli, tiny_overrides

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


def test_early_stopping_compares_trials_at_the_same_share_of_their_training(tiny_config):
    """At step 6 a batch-8 trial has seen twice the data of a batch-4 one. Every evaluation now
    carries both the step and the training examples seen, and early stopping compares trials in
    the unit that puts each at the same share of its own training: steps when trials run
    train.max_steps steps, examples when they run epochs (or as `progression` says)."""
    from pipeline.resources import Resources
    from pipeline.search.executor import TrialJob, run_job
    from pipeline.search.space import early_stopping_strategy
    from pipeline.search.stopping import progression, progression_unit

    base = tiny_config.model_copy(update={"search": None})
    resources, heard, outs = Resources(), [], []
    for batch, accumulation in ((4, 1), (8, 1), (4, 2)):
        params = {"train.batch_size": batch, "train.gradient_accumulation_steps": accumulation}
        outs.append(run_job(TrialJob(batch, base, params), resources, lambda e: heard.append(e) or False))
    # (Ax index, step, examples seen) at step 6 of 12 of each trial.
    assert [(e.trial, e.step, e.examples) for e in heard] == [(4, 6, 24), (8, 6, 48), (4, 6, 48)]
    assert [o.result.examples_per_step for o in outs] == [4, 8, 8]

    steps_budget = demo()  # 150 steps whatever the batch size: compared at equal steps
    epochs_budget = demo(
        **{"train.max_steps": -1, "train.epochs": 1.0, "search.early_stopping.enabled": True}
    )
    examples = demo(**{"search.early_stopping.progression": "examples"})
    assert [progression_unit(c) for c in (steps_budget, epochs_budget, examples)] == [
        "steps",
        "examples",
        "examples",
    ]
    assert progression(examples, 6, 8) == 48 and progression(steps_budget, 6, 8) == 6
    # No stop before a third of the demo's 150 steps (its first evaluation), in either unit.
    assert early_stopping_strategy(steps_budget).min_progression == 50
    assert early_stopping_strategy(examples).min_progression == 50 * 8
    explicit = demo(**{"search.early_stopping.min_progression": 1000})
    assert early_stopping_strategy(explicit).min_progression == 1000


def _search_overrides(tmp_path, **extra):
    from .conftest import tiny_overrides

    values = {
        "search.output_dir": str(tmp_path / "search"),
        "registry.model_name": "integrity",
        "search.early_stopping.enabled": False,
        "search.initialization_trials": 6,
        **extra,
    }
    return tiny_overrides(tmp_path, **values)


@pytest.mark.slow
def test_resume_with_a_changed_search_space_is_refused(tmp_path, capsys):
    """The Ax state of a search belongs to its space and trial settings: a resume that changes
    them is refused with one line naming each key, before anything runs."""
    from mlflow.tracking import MlflowClient

    from pipeline.search import run_search, search_config

    from .conftest import run_cli

    sets = _search_overrides(tmp_path)
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

    from mlflow.tracking import MlflowClient

    from pipeline import names
    from pipeline.search import journal, loop, run_search, search_config

    sets = _search_overrides(tmp_path)

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
    real_record = loop.Search._record

    def record_then_die(self, record, outcome):
        real_record(self, record, outcome)
        if len(self.state.finished()) == 2:
            raise SystemExit("killed")  # like SIGKILL: no handler saves anything

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(loop.Search, "_record", record_then_die)
        run_search(search_config(DEMO_CONFIG, sets, n_trials=3), quiet=True)
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


def test_baseline_reuse_requires_the_same_data_eval_set_device_precision_and_versions(tmp_path):
    """A baseline is reused only when it was measured like this search measures: same config,
    data and eval set contents, device, precision and numerics package versions; the report
    says which baseline was used and why. Before, the config fingerprint alone decided, so a
    changed data file (same path) or a CPU baseline was compared against."""
    import json as _json

    from pipeline import names
    from pipeline.search.baseline import reusable
    from pipeline.tracking import RunRecord

    me = {
        names.CONFIG_FINGERPRINT: "c",
        names.DATA_FINGERPRINT: "d",
        names.EVAL_FINGERPRINT: "e",
        names.DEVICE: "NVIDIA A100-SXM4-80GB",
        names.PRECISION: "bf16",
        names.PACKAGE_VERSIONS: _json.dumps(
            {"bitsandbytes": "0.50.2", "peft": "0.21.2", "torch": "2.13.0", "transformers": "5.24.0"},
            sort_keys=True,
        ),
    }
    versions = {
        "torch": "2.13.0",
        "transformers": "5.24.0",
        "peft": "0.21.2",
        "bitsandbytes": "0.50.2",
        "mlflow": "3.17.2",
    }

    def run(run_id, **tags):
        t = {**me, names.PACKAGE_VERSIONS: _json.dumps({**versions, **tags.pop("versions", {})}), **tags}
        return RunRecord(run_id, "b", "0", "FINISHED", 0, 1, t, {"eval_loss": 3.0})

    cpu = run("cpu", **{names.DEVICE: "cpu (2 threads)", names.PRECISION: "fp32"})
    old_torch = run("old", versions={"torch": "2.9.1"})
    other_mlflow = run("ok", versions={"mlflow": "3.1.0"})  # not a numerics package: still the same
    chosen, why = reusable([cpu, old_torch, other_mlflow], me, ["eval_loss"])
    assert chosen.run_id == "ok" and "same config, data, eval set, device, precision" in why
    chosen, why = reusable([cpu, old_torch], me, ["eval_loss"])
    assert chosen is None
    assert "run cpu differs (device cpu (2 threads) vs NVIDIA A100-SXM4-80GB; precision fp32 vs bf16)" in why
    assert "run old differs (versions" in why and "2.9.1" in why
    assert reusable([other_mlflow], me, ["eval_rougeL"])[1] == "run ok differs (no eval_rougeL)"


@pytest.mark.slow
def test_a_changed_data_file_gets_its_own_baseline(tmp_path):
    """For real: the same config on a data file whose contents changed is not the same baseline;
    an unchanged one is reused, and the report says which and why."""
    import json as _json

    from pipeline import names
    from pipeline.search import run_search, search_config

    from .conftest import DEMO_DATA

    data = tmp_path / "qa.jsonl"
    data.write_text(DEMO_DATA.read_text())
    sets = [*_search_overrides(tmp_path), f"data.path={data}"]
    first = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    again = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    assert again.state.baseline.reused and again.state.baseline.run_id == first.state.baseline.run_id
    report = (again.report_dir / names.REPORT_FILE).read_text()
    assert f"(run `{first.state.baseline.run_id}`, reused: same config, data, eval set" in report
    rows = [_json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(_json.dumps({**r, "output": r["output"] + " Done."}) + "\n" for r in rows))
    changed = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    assert not changed.state.baseline.reused and changed.state.baseline.run_id != first.state.baseline.run_id
    assert f"run {first.state.baseline.run_id} differs (data " in changed.state.baseline.why
    assert "trained in this search (run " in (changed.report_dir / names.REPORT_FILE).read_text()


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


def search_config_for(tmp_path, *extra):
    from pipeline.search import search_config

    sets = _search_overrides(tmp_path, **{"train.eval_steps": 4})
    return search_config(DEMO_CONFIG, [*sets, *extra], n_trials=3)


# --- GPU paths, their logic on CPU --------------------------------------------------------


def test_oom_recovery_frees_the_failed_trials_memory(tiny_config, monkeypatch):
    """Out of memory, the trial is abandoned and what its frames held is freed before the next
    trial (the traceback kept the Trainer, optimizer state and activations alive while memory
    was freed inside the `except` block): RSS after the failed trial is back where it was."""
    import gc

    import psutil
    import torch

    import pipeline.trial as trial_mod
    from pipeline.resources import Resources
    from pipeline.search.executor import TrialJob, run_job
    from pipeline.trial import setup

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


def test_memory_peaks_are_the_trials_own_and_every_devices():
    """Peaks are reset per trial after the allocator's cache is emptied (else the reserved peak
    carries earlier trials' cached blocks), for every visible device, each logged and named."""
    from pipeline import names
    from pipeline.metrics import MemoryMonitor, device_tags

    from .test_metrics import FakeCuda

    cuda = FakeCuda(devices=2)
    monitor = MemoryMonitor(cuda)
    monitor.start()
    assert cuda.calls == ["empty_cache", "reset 0", "reset 1"]
    peaks = monitor.peaks()
    assert peaks[names.PEAK_GPU_MEM_GB] == 3.0 and peaks[names.PEAK_GPU_RESERVED_GB] == 5.0
    assert peaks["peak_gpu0_mem_gb"] == 3.0 and peaks["peak_gpu1_mem_gb"] == 6.0
    assert peaks["peak_gpu1_reserved_gb"] == 10.0
    assert device_tags(cuda) == {
        "pipeline.gpu0": "Fake GPU 0, 80.0 GB",
        "pipeline.gpu1": "Fake GPU 1, 80.0 GB",
    }
    one = MemoryMonitor(FakeCuda(devices=1))
    assert not [k for k in one.peaks() if k.startswith("peak_gpu0")]  # one device: the plain names


def test_a_trial_runs_on_one_gpu_unless_the_config_asks_for_more(tiny_config):
    """With several GPUs visible the HF Trainer wraps the model in DataParallel while eval,
    generation and the memory peaks use one device: a trial is pinned to the first GPU, says so
    in its device tag, and train.multi_gpu opts out."""
    from types import SimpleNamespace

    from pipeline.device import plan_device
    from pipeline.train import pin_to_plan

    plan = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="H100", gpu_count=4
    )
    assert (plan.gpus, plan.name) == (1, "H100 (1 of 4 visible)")
    args = pin_to_plan(SimpleNamespace(n_gpu=4, _n_gpu=4), plan)
    assert args._n_gpu == 1
    multi = with_overrides(tiny_config, {"train.multi_gpu": True})
    plan = plan_device(multi.model, multi.train, cuda=True, bf16_supported=True, gpu_name="H100", gpu_count=4)
    assert (plan.gpus, pin_to_plan(SimpleNamespace(n_gpu=4, _n_gpu=4), plan)._n_gpu) == (4, 4)
    single = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="T4", gpu_count=1
    )
    assert single.name == "T4" and single.gpus == 1


@pytest.mark.slow
def test_gradient_checkpointing_is_switched_on_once_on_the_4bit_path(tiny_config, monkeypatch):
    """peft's 4-bit preparation switches checkpointing on; the Trainer must not do it again."""
    from transformers import PreTrainedModel

    from pipeline.trial import run_trial

    calls = []
    real = PreTrainedModel.activation_checkpointing_enable

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", counting)
    config = with_overrides(tiny_config, {"model.load_in_4bit": True, "train.gradient_checkpointing": True})
    result = run_trial(config, quiet=True)
    assert len(calls) == 1, calls
    assert result.steps == 12
    calls.clear()
    run_trial(with_overrides(tiny_config, {"train.gradient_checkpointing": True}), quiet=True)
    assert len(calls) == 1, calls  # without 4-bit, the Trainer is the one that switches it on


def test_load_adapter_uses_the_recorded_dtype_and_places_weights_at_load(tiny_config, tmp_path):
    """The base under a served adapter is loaded in the dtype it was trained in (recorded in
    pipeline_base.json) and, on a GPU, straight onto it (not loaded on CPU, then moved)."""
    import json

    import torch

    from pipeline import names
    from pipeline.device import plan_device
    from pipeline.model import from_pretrained_kwargs
    from pipeline.serving import load_adapter
    from pipeline.trial import run_trial

    result = run_trial(tiny_config, quiet=True)
    reference = result.adapter_dir / names.BASE_REFERENCE_FILE
    recorded = json.loads(reference.read_text())
    assert recorded["dtype"] == "float32"
    reference.write_text(json.dumps({**recorded, "dtype": "bfloat16"}))  # as if trained in bf16
    model, _ = load_adapter(result.adapter_dir)
    assert model.get_base_model().dtype == torch.bfloat16
    gpu = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="A100", gpu_count=1
    )
    assert from_pretrained_kwargs(tiny_config.model, gpu, for_training=False)["device_map"] == {"": 0}
    assert "device_map" not in from_pretrained_kwargs(tiny_config.model, gpu, for_training=True)
