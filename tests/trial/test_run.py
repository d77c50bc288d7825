"""run_trial in-process: what it tracks, the adapter round trip, reproducibility, failures."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import with_overrides
from pipeline.core import names
from pipeline.core.errors import TrialFailed, TrialInterrupted
from pipeline.data.prepare import prepare_data
from pipeline.trial.resources import Resources
from pipeline.trial.run import run_trial

from ..conftest import DEMO_DATA, PROBE


def test_run_trial_tracks_everything(tiny_config, demo_tokenizer):
    result = run_trial(tiny_config, quiet=True)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.ROLE] == names.ROLE_BASELINE
    for tag in (
        names.BASE_MODEL,
        names.DATA_FINGERPRINT,
        names.EVAL_FINGERPRINT,
        names.CONFIG_FINGERPRINT,
        names.PACKAGE_VERSIONS,
        names.DEVICE,
    ):
        assert run.data.tags[tag], tag
    assert "torch" in json.loads(run.data.tags[names.PACKAGE_VERSIONS])
    assert run.info.run_name == "baseline r=8 a=16 lr=1.0e-03 bs=4"
    p = run.data.params
    assert (p["lora.r"], p["lora.alpha"], p["train.batch_size"]) == ("8", "16.0", "4")
    assert float(p["train.learning_rate"]) == tiny_config.train.learning_rate
    m = run.data.metrics
    assert m[names.EVAL_LOSS] == pytest.approx(result.eval_loss)
    assert m[names.EVAL_PERPLEXITY] == pytest.approx(math.exp(result.eval_loss), rel=1e-6)
    assert 0.0 <= m["eval_rougeL"] <= 1.0
    assert m[names.PEAK_RSS_GB] > 0 and m[names.TOKENS_PER_SECOND] > 0
    assert names.PEAK_GPU_MEM_GB not in m  # CPU run
    assert m[names.TRAIN_STEPS] == 12
    history = client.get_metric_history(result.run_id, names.TRAIN_LOSS)
    assert [h.step for h in history] == [1, 2, 4, 6, 8, 10, 12]
    evals = client.get_metric_history(result.run_id, names.EVAL_LOSS)
    assert [h.step for h in evals] == [6, 12]
    arts = {a.path for a in client.list_artifacts(result.run_id, names.ADAPTER_DIR)}
    for f in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        names.BASE_REFERENCE_FILE,
    ):
        assert f"{names.ADAPTER_DIR}/{f}" in arts
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {names.CONFIG_FILE, names.DATA_STATS_FILE, names.GENERATIONS_FILE} <= top
    check_datasets(run, tiny_config, demo_tokenizer)


def check_datasets(run, tiny_config, demo_tokenizer) -> None:
    """Each run names its data in MLflow's dataset inputs: name, source, a digest of the examples
    used (stable for the same data and split, changed by another split) and their count."""
    logged = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(logged) == {"training", "eval"}
    train, evals = logged["training"], logged["eval"]
    assert (train.name, evals.name) == ("pydoc_qa-train", "pydoc_qa-eval")
    for d in (train, evals):
        assert d.source_type == "local"
        assert json.loads(d.source) == {"uri": str(DEMO_DATA)}
    assert json.loads(train.profile) == {"num_rows": 200} and json.loads(evals.profile) == {"num_rows": 24}
    # The eval set's digest is the eval fingerprint that decides which eval losses compare.
    assert evals.digest == run.data.tags[names.EVAL_FINGERPRINT] and train.digest != evals.digest
    # Prepared again from scratch: the same digests; another split seed: other examples, other digests.
    again = prepare_data(tiny_config.data, demo_tokenizer).splits
    assert [s.digest for s in again] == [train.digest, evals.digest]
    reseeded = prepare_data(tiny_config.data.model_copy(update={"seed": 1234}), demo_tokenizer).splits
    assert reseeded[0].digest != train.digest and reseeded[1].digest != evals.digest


def test_metrics_are_sent_in_batches(tiny_config, monkeypatch):
    from mlflow.tracking import MlflowClient as Client

    calls = {"log_batch": 0, "log_metric": 0}
    evals_sent: list[int] = []  # per batch carrying eval losses: how many
    real_batch = Client.log_batch

    def counting_batch(self, *a, **k):
        calls["log_batch"] += 1
        n = sum(m.key == names.EVAL_LOSS for m in k.get("metrics", ()))
        evals_sent.extend([n] if n else [])
        return real_batch(self, *a, **k)

    monkeypatch.setattr(Client, "log_batch", counting_batch)
    monkeypatch.setattr(
        Client, "log_metric", lambda *a, **k: calls.__setitem__("log_metric", calls["log_metric"] + 1)
    )
    result = run_trial(with_overrides(tiny_config, {"tracking.log_every_s": 60}), quiet=True)
    values = sum(
        len(MlflowClient().get_metric_history(result.run_id, k))
        for k in MlflowClient().get_run(result.run_id).data.metrics
    )
    assert calls["log_metric"] == 0
    assert calls["log_batch"] < values / 5, (calls, values)
    # ...but each evaluation goes out as soon as it is made, not with the next one.
    evals = MlflowClient().get_metric_history(result.run_id, names.EVAL_LOSS)
    assert len(evals) >= 2 and evals_sent == [1] * len(evals), evals_sent


def test_adapter_round_trip_gives_the_same_logits(tiny_config, trained_logits, tmp_path):
    """The logged adapter, reloaded with plain peft onto a fresh base, reproduces the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor(PROBE)
    captured = trained_logits
    result = run_trial(tiny_config, quiet=True)

    import mlflow

    local = mlflow.artifacts.download_artifacts(result.adapter_uri, dst_path=str(tmp_path))
    base = AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path)
    reloaded = PeftModel.from_pretrained(base, local).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=probe).logits
    assert torch.allclose(logits, captured["logits"], atol=1e-5)
    assert not torch.allclose(base_logits, captured["logits"], atol=1e-3), (
        "the adapter must change the output"
    )


def test_same_seed_same_eval_loss_other_seed_differs(tiny_config):
    res = Resources()
    a = run_trial(tiny_config, quiet=True, resources=res)
    b = run_trial(tiny_config, quiet=True)  # fresh resources: base loaded again
    c = run_trial(with_overrides(tiny_config, {"train.seed": 7}), quiet=True, resources=res)
    assert abs(a.eval_loss - b.eval_loss) < 1e-4
    assert abs(a.eval_loss - c.eval_loss) > 1e-6


def test_reused_base_gives_the_fresh_result(tiny_config):
    """The search keeps the base loaded between trials: that must not change any result."""
    res = Resources()
    first = run_trial(
        with_overrides(tiny_config, {"lora.r": 16, "train.learning_rate": 3e-3}), quiet=True, resources=res
    )
    again = run_trial(tiny_config, quiet=True, resources=res)  # base reused after another adapter
    fresh = run_trial(tiny_config, quiet=True)
    assert first.metrics[names.MODEL_LOAD_S] > 0 and again.metrics[names.MODEL_LOAD_S] == 0
    assert again.eval_loss == pytest.approx(fresh.eval_loss, abs=1e-6)


def test_nan_loss_fails_the_run_with_its_reason(tiny_config, monkeypatch):
    import pipeline.training.callbacks as callbacks

    def poisoned(real_on_log):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.global_step >= 4:
                logs = {**logs, "loss": float("nan")}
            return real_on_log(self, args, state, control, logs=logs, **kw)

        return on_log

    for cls in (callbacks.StreamMetrics, callbacks.StopOnDivergence):
        monkeypatch.setattr(cls, "on_log", poisoned(cls.on_log))
    with pytest.raises(TrialFailed, match=r"loss became nan at step 4") as e:
        run_trial(tiny_config, quiet=True)
    run = MlflowClient().get_run(e.value.run_id)
    assert run.info.status == "FAILED"
    assert "loss became nan" in run.data.tags[names.ERROR]


def test_huge_learning_rate_diverges_for_real(tiny_config):
    config = with_overrides(
        tiny_config,
        {
            "train.learning_rate": 1e6,
            "train.max_grad_norm": 0,
            "train.scheduler": "constant",
            "train.warmup_ratio": 0,
        },
    )
    try:
        result = run_trial(config, quiet=True)
    except TrialFailed as e:
        assert MlflowClient().get_run(e.run_id).info.status == "FAILED"
    else:  # some seeds survive with a finite but terrible loss: it must then be reported as such
        assert result.eval_loss > 5


def test_exception_inside_the_run_ends_it_failed(tiny_config, monkeypatch):
    import pipeline.trial.run as trial_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trial_mod, "train", boom)
    with pytest.raises(TrialFailed) as e:
        run_trial(tiny_config, quiet=True)
    assert isinstance(e.value.__cause__, RuntimeError) and e.value.status == "failed"
    assert e.value.reason == "RuntimeError: disk full"
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags[names.ERROR] == "RuntimeError: disk full"


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(1)], ids=["ctrl-c", "process-exiting"])
def test_interrupt_ends_the_run_killed(tiny_config, monkeypatch, stop):
    """Ctrl-C/SIGTERM, or the process told to exit (Ray ends an orphaned worker with SystemExit
    when its driver dies): the trial was interrupted, not failed by its config, so a resumed
    search runs it again instead of counting a failure."""
    import pipeline.trial.run as trial_mod

    def interrupted(*a, **k):
        raise stop

    monkeypatch.setattr(trial_mod, "train", interrupted)
    with pytest.raises(type(stop)) as e:
        run_trial(tiny_config, quiet=True)
    assert isinstance(e.value, TrialInterrupted) == isinstance(stop, KeyboardInterrupt)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags[names.TRIAL_STATUS] == names.KILLED
    assert runs[0].data.tags[names.TRIAL_FAILURE_REASON] == "interrupted"


def test_resources_keep_one_base_per_setting_least_recently_used_out(tiny_config, monkeypatch):
    """A search over model.load_in_4bit alternates two bases: both stay loaded (2 on CPU, 1 on
    a GPU), a third setting pushes out the one used longest ago."""
    import pipeline.trial.resources as resources_mod
    from pipeline.model.device import plan_device

    loads = []
    monkeypatch.setattr(
        resources_mod, "load_base_model", lambda cfg, plan, gc: loads.append(cfg.load_in_4bit) or object()
    )
    res = Resources()
    plan = plan_device(tiny_config.model, tiny_config.train)
    full, four = tiny_config, with_overrides(tiny_config, {"model.load_in_4bit": True})
    other = with_overrides(tiny_config, {"train.gradient_checkpointing": True})
    reused = [res.base_model(c, plan)[1] for c in (full, four, full, four, other, four, full)]
    assert reused == [False, False, True, True, False, True, False]
    assert res.base_loads == 4 and loads == [False, True, False, False]
    gpu = Resources()
    cuda = dataclasses.replace(plan, device="cuda")
    assert [gpu.base_model(c, cuda)[1] for c in (full, four, full)] == [False, False, False]
