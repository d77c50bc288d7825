"""End to end: `mlflow run . -e baseline --env-manager local`, then read the store back."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.core import names
from pipeline.data.prepare import prepare_data

from .conftest import DEMO_CONFIG, mlflow_run_command, tiny_overrides, venv_env

pytestmark = pytest.mark.e2e


def mlflow_run(tmp_path, *params: str, experiment: str = "e2e") -> subprocess.CompletedProcess:
    return subprocess.run(
        mlflow_run_command("baseline", experiment, *params),
        cwd=tmp_path,
        env=venv_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )


def recompute_eval_loss(config, adapter_dir: str) -> float:
    """Token-weighted eval loss of the adapter reloaded with plain peft, one example at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config.model.name_or_path), adapter_dir
    )
    model.eval()
    total = count = 0
    with torch.no_grad():
        for ex in prepare_data(config.data, tok).eval:
            labels = torch.tensor(ex["labels"][1:])
            logp = torch.log_softmax(model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1], -1)
            mask = labels != -100
            total += float(-logp[mask].gather(1, labels[mask][:, None]).sum())
            count += int(mask.sum())
    return total / count


def test_baseline_default_config_through_mlflow_run(tmp_path):
    """The README command, as is: no -P, the CPU demo config."""
    p = mlflow_run(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.ROLE] == "baseline"
    assert run.data.tags["mlflow.project.entryPoint"] == "baseline"
    config = load_config(DEMO_CONFIG)
    params = run.data.params
    assert params["lora.r"] == str(config.lora.r) and params["train.batch_size"] == str(
        config.train.batch_size
    )
    assert params["config"] == "configs/demo-cpu.yaml"  # the entry point's own parameter
    history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
    assert len(history) >= 10
    assert history[-1].value < history[0].value, "the demo baseline must learn"
    evals = client.get_metric_history(run.info.run_id, names.EVAL_LOSS)
    assert [h.step for h in evals] == [50, 100, 150]
    assert run.data.metrics[names.PEAK_RSS_GB] > 0
    # System metrics come from MLflow's own monitor.
    assert any(k.startswith("system/") for k in run.data.metrics)

    adapter = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/{names.ADAPTER_DIR}", dst_path=str(tmp_path)
    )
    assert recompute_eval_loss(config, adapter) == pytest.approx(run.data.metrics[names.EVAL_LOSS], abs=1e-4)


def test_overrides_through_mlflow_run_and_bad_input_fails_the_run(tmp_path):
    p = mlflow_run(
        tmp_path, "set=" + " ".join([*tiny_overrides(tmp_path), "lora.r=4", "train.learning_rate=5e-4"])
    )
    assert p.returncode == 0, p.stderr[-3000:]
    p_bad = mlflow_run(tmp_path, f"set=data.path={tmp_path / 'missing.jsonl'}")
    assert p_bad.returncode != 0
    errors = [line for line in p_bad.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: data.path: file not found: {tmp_path / 'missing.jsonl'}"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id], order_by=["attributes.start_time ASC"]
    )
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    ok, bad = runs
    assert ok.data.params["lora.r"] == "4" and float(ok.data.params["train.learning_rate"]) == 5e-4
    assert bad.data.tags[names.ERROR].startswith("data.path: file not found")
    torch.manual_seed(0)  # keep the global RNG state of later tests independent of this one
