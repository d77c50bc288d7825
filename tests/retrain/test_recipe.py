"""Retrain and loading the registered adapter: search -> retrain -> registry -> generate."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, to_yaml, with_overrides
from pipeline.core import names
from pipeline.retrain import run_retrain
from pipeline.search import run_search, search_config
from pipeline.training.metrics import eval_loss
from pipeline.trial import run as trial
from pipeline.trial.run import run_trial

from ..conftest import DEMO_CONFIG, PROBE, mlflow_run_command, run_cli, tiny_overrides, venv_env

MODEL = "retrain-lora"
RETRAIN = ["retrain.max_steps=20", "retrain.eval_steps=5", "retrain.early_stopping_patience=2"]


def overrides(tmp_path, **extra) -> list[str]:
    return tiny_overrides(
        tmp_path,
        **{
            "search.output_dir": str(tmp_path / "search"),
            "registry.model_name": MODEL,
            "search.early_stopping.enabled": False,
            "search.initialization_trials": 4,
            **extra,
        },
    )


@pytest.fixture
def searched(tmp_path):
    """A finished 2-trial search whose winner is the champion."""
    result = run_search(search_config(DEMO_CONFIG, overrides(tmp_path), n_trials=2), quiet=True)
    assert result.promotion.promoted
    return result


@pytest.mark.e2e
def test_search_then_retrain_through_mlflow_run(searched, tmp_path):
    env = venv_env(tmp_path)
    cmd = mlflow_run_command("retrain", "tests", "set=" + " ".join([*overrides(tmp_path), *RETRAIN]))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests").experiment_id
    runs = client.search_runs([exp], f"tags.`{names.ROLE}` = 'retrain'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.SEARCH_SOURCE_RUN] == searched.parent_run_id
    assert run.data.tags[names.RETRAIN_SOURCE].startswith(
        f"champion {MODEL} v1 (search run {searched.parent_run_id})"
    )
    assert run.data.params["train.restore_best"] == "True" and run.data.params["train.max_steps"] == "12"
    # The command line's train.* (shared overrides: max_steps=12, eval_steps=6) win over retrain.*.
    assert run.data.params["train.eval_steps"] == "6"
    # A new version with its tags; the alias follows the gate.
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"1", "2"}
    v2 = versions["2"]
    assert v2.tags["source_run_id"] == run.info.run_id
    assert v2.tags["search_run_id"] == searched.parent_run_id
    assert v2.tags["data_fingerprint"] == run.data.tags[names.DATA_FINGERPRINT]
    assert float(v2.tags["eval_loss"]) == pytest.approx(run.data.metrics[names.EVAL_LOSS], abs=1e-6)
    champion = str(client.get_model_version_by_alias(MODEL, names.CHAMPION_ALIAS).version)
    beat = run.data.metrics[names.EVAL_LOSS] < searched.best.eval_loss
    assert champion == ("2" if beat else "1")
    if beat:
        assert str(client.get_model_version_by_alias(MODEL, names.PREVIOUS_ALIAS).version) == "1"
    # The report's numbers are the runs' numbers.
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path=f"{names.REPORT_DIR}/{names.RETRAIN_REPORT_FILE}",
        dst_path=str(tmp_path / "r"),
    )
    report = open(local).read()  # noqa: SIM115
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:6]
        for line in report.splitlines()
        if line.startswith("| ") and "`" in line
    }
    base = client.get_run(searched.state.baseline.run_id)
    best = client.get_run(searched.best.run_id)
    for label, r in (("baseline", base), ("search best", best), ("retrained", run)):
        run_cell, loss, _, rouge = rows[label]
        assert r.info.run_id in run_cell
        assert float(loss) == pytest.approx(r.data.metrics[names.EVAL_LOSS], abs=5e-5)
        assert float(rouge) == pytest.approx(r.data.metrics["eval_rougeL"], abs=5e-5)
    assert "same eval data" in report and "| yes |" in report
    # Each comparison with its paired interval (one seed each: the eval set's noise only).
    for label in ("search best", "baseline"):
        line = next(x for x in report.splitlines() if x.startswith(f"Retrained vs {label}: eval_loss "))
        assert " Improvement " in line and "(95 % CI " in line and "seed noise not measured" in line
    plots = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, names.REPORT_DIR)}
    assert plots[f"{names.REPORT_DIR}/retrain_eval_loss.png"] > 10_000

    # The same retrain again: the identical adapter is not registered twice.
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already holds this adapter" in p.stdout
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2


def test_registered_champion_round_trips_and_generates(tmp_path, trained_logits, capsys):
    """Logits of the in-memory retrained model == those of models:/<name>@champion (1e-5)."""
    base = load_config(DEMO_CONFIG, overrides(tmp_path))
    best_config = tmp_path / "best_config.yaml"
    best_config.write_text(to_yaml(with_overrides(base, {"lora.r": 16, "train.learning_rate": 3e-3})))
    probe = torch.tensor(PROBE)
    captured = trained_logits
    out = run_retrain(
        str(DEMO_CONFIG), [*overrides(tmp_path), *RETRAIN], best_config=str(best_config), quiet=True
    )
    assert out.promotion.promoted and out.source.kind == "file"
    capsys.readouterr()
    # The version says where it came from: the retrain run (linked), its eval loss, the config.
    described = MlflowClient().get_model_version(MODEL, out.promotion.version).description
    run_id, exp = out.result.run_id, mlflow.get_run(out.result.run_id).info.experiment_id
    assert f"[`{run_id}`](#/experiments/{exp}/runs/{run_id})" in described
    assert f"| eval_loss | {out.result.eval_loss:.4f} |" in described and "```yaml\n" in described

    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    inner = loaded.unwrap_python_model()
    with torch.no_grad():
        logits = inner.model(input_ids=probe).logits
    assert torch.allclose(logits, captured["logits"], atol=1e-5)
    answers = loaded.predict(["What does the function `json.dumps` do?"], params={"max_new_tokens": 12})
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip()

    # The adapter folder of the version also loads with plain peft.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.registry.versions import download_adapter

    folder = download_adapter(f"models:/{MODEL}@champion", tmp_path / "dl")
    model_dir = folder.parent.parent
    assert not list(model_dir.rglob("*.pkl")), "the registered model is code + safetensors, no pickle"
    assert (folder / "adapter_model.safetensors").is_file() and (folder / names.BASE_REFERENCE_FILE).is_file()
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.model.name_or_path), folder
    ).eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=probe).logits, captured["logits"], atol=1e-5)

    code, stdout, err = run_cli(
        [
            "generate",
            "--model",
            f"models:/{MODEL}@champion",
            "--prompt",
            "What is the signature of `re.sub`?",
            "--max-new-tokens",
            "10",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.startswith("> What is the signature of `re.sub`?\n") and len(stdout.splitlines()) >= 2
    code, stdout, _ = run_cli(
        [
            "generate",
            "--model",
            f"runs:/{out.result.run_id}/adapter",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
        ],
        capsys,
    )
    assert code == 0 and stdout.startswith("> hi\n")


def test_plateau_stops_training_and_the_best_evaluation_is_restored(tiny_config, monkeypatch):
    config = with_overrides(
        tiny_config,
        {
            "train.max_steps": 60,
            "train.eval_steps": 2,
            "train.learning_rate": 3e-2,
            "train.scheduler": "constant",
            "train.warmup_ratio": 0.0,
            "train.early_stopping_patience": 2,
            "train.restore_best": True,
            "lora.r": 16,
        },
    )
    captured = {}
    real_detach = trial.detach_lora

    def capture(model):
        from pipeline.data.prepare import prepare_data
        from pipeline.model.load import load_tokenizer

        tok = load_tokenizer(config.model)
        data = prepare_data(config.data, tok)
        captured["eval_loss"] = eval_loss(model, data.eval, tok, config.eval.batch_size)
        return real_detach(model)

    monkeypatch.setattr(trial, "detach_lora", capture)
    result = run_trial(config, quiet=True)
    losses = [loss for _, loss in result.evals]
    assert result.steps < 60, "the plateau should stop training early"
    best = min(losses)
    assert result.evals[-1][1] > best, "the last evaluation was not the best: a real restore happened"
    assert result.eval_loss == pytest.approx(best)
    assert captured["eval_loss"] == pytest.approx(best, abs=1e-5), (
        "the weights in the model are the best ones"
    )
    best_step = next(step for step, loss in result.evals if loss == best)
    assert result.metrics[names.BEST_EVAL_STEP] == best_step
    assert MlflowClient().get_run(result.run_id).data.metrics[names.EVAL_LOSS] == pytest.approx(best)


@pytest.mark.slow
def test_an_interrupted_retrain_continues_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    """A retrain stopped (SIGTERM) after its evaluation at step 10 and continued with --resume ends
    with the eval-loss curve, the plateau state and the eval loss of one never interrupted."""
    from pipeline.core import interrupt
    from pipeline.core.errors import TrialInterrupted
    from pipeline.training import callbacks

    best = tmp_path / "best_config.yaml"
    best.write_text(to_yaml(load_config(DEMO_CONFIG, overrides(tmp_path), search=False)))
    sets = [*overrides(tmp_path), "train.max_steps=30", "train.eval_steps=5", "lora.dropout=0.1"]
    whole = run_retrain(DEMO_CONFIG, sets, best_config=str(best), allow_duplicate=True, quiet=True)
    real = callbacks.KeepBest.on_evaluation

    def sigterm_at_step_10(self, result, model, control):
        real(self, result, model, control)
        if result.step == 10:
            interrupt.request_stop()

    with monkeypatch.context() as m, pytest.raises(TrialInterrupted) as stopped:
        m.setattr(callbacks.KeepBest, "on_evaluation", sigterm_at_step_10)
        run_retrain(DEMO_CONFIG, sets, best_config=str(best), allow_duplicate=True, quiet=True)
    run_id = stopped.value.run_id
    assert MlflowClient().get_run(run_id).info.status == "KILLED"

    continued = run_retrain(DEMO_CONFIG, [], resume=run_id, allow_duplicate=True, quiet=True)
    r, w = continued.result, whole.result
    assert r.run_id == run_id and r.evals == w.evals and r.eval_loss == w.eval_loss
    assert r.metrics[names.BEST_EVAL_STEP] == w.metrics[names.BEST_EVAL_STEP]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.TRIAL_RESUMED_FROM_STEP] == "10"
    assert run.data.tags[names.RETRAIN_SOURCE] == f"file {best}"
    assert continued.promotion is not None and continued.report_path.is_file()


# --- bad input: one line, exit 2, nothing registered ------------------------------------------


def test_bad_retrain_and_generate_input(tmp_path, capsys):
    sets = [f"--set={o}" for o in overrides(tmp_path)]
    code, _, err = run_cli(["retrain", "--quiet", *sets], capsys)
    assert (
        code == 2
        and f"error: retrain: registered model '{MODEL}' has no champion and neither from_search" in err
    )
    code, _, err = run_cli(
        ["retrain", "--quiet", *sets, "--from-search", "0123456789abcdef0123456789abcdef"], capsys
    )
    assert code == 2 and "error: from_search: no run '0123456789abcdef0123456789abcdef'" in err
    baseline = run_trial(
        with_overrides(load_config(DEMO_CONFIG, overrides(tmp_path)), {"train.max_steps": 2}), quiet=True
    )
    code, _, err = run_cli(["retrain", "--quiet", *sets, "--from-search", baseline.run_id], capsys)
    assert code == 2 and f"error: from_search: run {baseline.run_id} is not a search run" in err
    code, _, err = run_cli(["retrain", "--quiet", *sets, "--resume", baseline.run_id], capsys)
    assert (
        code == 2 and f"error: resume: {baseline.run_id!r} is not a retrain run in this tracking store" in err
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  name_or_path: models/pydoc-llama\ndata:\n  path: data/pydoc_qa.jsonl\nlora:\n  r: -1\n"
    )
    code, _, err = run_cli(["retrain", "--quiet", *sets, "--best-config", str(bad)], capsys)
    assert code == 2 and f"error: invalid config: {bad}:6: lora.r" in err
    assert not MlflowClient().search_registered_models()

    code, _, err = run_cli(["generate", "--model", "models:/nobody@champion", "--prompt", "x"], capsys)
    assert code == 2 and "error: --model: no registered model 'nobody'" in err
    from pipeline.registry.versions import Candidate, promote

    mlflow.set_experiment("tests")
    with mlflow.start_run():
        promote("has-no-alias", Candidate(baseline.run_id, 9.0, baseline.eval_fingerprint))
    MlflowClient().delete_registered_model_alias("has-no-alias", names.CHAMPION_ALIAS)
    code, _, err = run_cli(["generate", "--model", "models:/has-no-alias@best", "--prompt", "x"], capsys)
    assert (
        code == 2
        and "error: --model: registered model 'has-no-alias' has no alias 'best' (aliases: none)" in err
    )
    for line in err.splitlines():
        assert not line.startswith("Traceback")
