"""Task metrics from lm-evaluation-harness (`eval.lm_eval`): names, config checks, the shipped
offline task `pydoc_mc`, and a real trial scored by the harness on its in-memory model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.data.prepare import read_records, split_records, to_messages
from pipeline.training import lmeval

from ..conftest import DEMO_CONFIG, ROOT, mlflow_search, run_cli, tiny_overrides

TASKS = ROOT / "tasks"
TASK_FILE = TASKS / "pydoc_mc" / "pydoc_mc.jsonl"


def test_harness_keys_become_metric_names():
    assert lmeval.metric_name("pydoc_mc", "acc,none") == "lmeval_pydoc_mc_acc"
    assert lmeval.metric_name("pydoc_mc", "acc_stderr,none") == "lmeval_pydoc_mc_acc_stderr"
    assert lmeval.metric_name("gsm8k", "exact_match,strict-match") == "lmeval_gsm8k_exact_match_strict-match"
    assert lmeval.metric_name("mmlu (stem)", "acc,none") == "lmeval_mmlu _stem__acc"
    assert lmeval.metric_name("pydoc_mc", "alias") is None
    results = {
        "pydoc_mc": {
            "alias": "pydoc_mc",
            "acc,none": 0.5,
            "acc_stderr,none": 0.02,
            "acc_norm,none": float("nan"),  # not finite: not logged
            "acc_norm_stderr,none": "N/A",  # the harness writes N/A where it has no stderr
            "sample_len": 40,  # a count, not a score
        }
    }
    assert lmeval.task_metrics(results) == {"lmeval_pydoc_mc_acc": 0.5, "lmeval_pydoc_mc_acc_stderr": 0.02}


def _with_objective(tmp_path, metric: str, **extra):
    values = {"search.objectives": f"'[{{metric: {metric}, minimize: false}}]'", **extra}
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **values))


def test_a_task_metric_objective_needs_its_task(tmp_path):
    config = _with_objective(
        tmp_path,
        "lmeval_pydoc_mc_acc",
        **{"eval.lm_eval.tasks": "[pydoc_mc]", "eval.lm_eval.include_path": "tasks"},
    )
    assert config.search.required_metrics() == ["lmeval_pydoc_mc_acc"]
    assert config.eval.lm_eval.apply_chat_template and config.eval.lm_eval.limit is None
    with pytest.raises(PipelineError) as e:
        _with_objective(tmp_path, "lmeval_pydoc_mc_acc")
    assert "search.objectives: lmeval_pydoc_mc_acc is a task metric, but eval.lm_eval is not set" in str(
        e.value
    )
    with pytest.raises(PipelineError) as e:
        _with_objective(tmp_path, "lmeval_arc_easy_acc", **{"eval.lm_eval.tasks": "[pydoc_mc]"})
    assert "no task of eval.lm_eval.tasks (pydoc_mc) logs it" in str(e.value)
    with pytest.raises(PipelineError) as e:  # unknown keys are errors here too
        load_config(DEMO_CONFIG, ["eval.lm_eval.tasks=[pydoc_mc]", "eval.lm_eval.shots=3"])
    assert "eval.lm_eval.shots" in str(e.value)


def test_the_shipped_task_is_current_and_built_from_the_eval_split_only():
    spec = importlib.util.spec_from_file_location("build_pydoc_mc", ROOT / "scripts" / "build_pydoc_mc.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built, meta = builder.build(DEMO_CONFIG)  # the committed file is what the script builds now
    assert builder.render(built) == TASK_FILE.read_text() and meta["documents"] == len(built)
    docs = [json.loads(line) for line in TASK_FILE.read_text().splitlines()]
    cfg = load_config(DEMO_CONFIG).data
    train, held_out = split_records(read_records(str(ROOT / cfg.path), "data.path"), cfg)
    seen = {m["content"] for r in train for m in to_messages(r, cfg)}
    asked = [to_messages(r, cfg) for r in held_out]
    assert len(docs) == len([m for m in asked if m[0]["content"] not in seen]) > 600
    assert not [d for d in docs if d["question"] in seen]  # no question of the training split
    answers_of: dict[str, set[str]] = {}
    for user, assistant in asked:
        answers_of.setdefault(user["content"], set()).add(assistant["content"])
    for d in docs:  # one right answer; no other right answer to the same question among the rest
        assert len(set(d["choices"])) == 4 and d["choices"][d["answer"]] in answers_of[d["question"]]
        assert len(answers_of[d["question"]] & set(d["choices"])) == 1
    answers = [d["answer"] for d in docs]
    assert all(answers.count(i) > len(docs) / 8 for i in range(4))  # the right answer moves around


@pytest.mark.slow
@pytest.mark.lmeval
def test_a_trial_logs_task_metrics_from_its_trained_model(tmp_path):
    from pipeline.trial.run import RunSpec, run_trial

    lm = {
        "eval.lm_eval.tasks": "[pydoc_mc]",
        "eval.lm_eval.include_path": str(TASKS),
        "eval.lm_eval.limit": 40,
    }
    config = load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **lm))
    result = run_trial(config, RunSpec(names.ROLE_BASELINE), quiet=True)
    run = MlflowClient().get_run(result.run_id)
    m = run.data.metrics
    assert 0 <= m["lmeval_pydoc_mc_acc"] <= 1 and 0 < m["lmeval_pydoc_mc_acc_stderr"] < 0.2
    assert {"lmeval_pydoc_mc_acc_norm", "lmeval_pydoc_mc_acc_norm_stderr"} <= set(m)
    assert result.metrics["lmeval_pydoc_mc_acc"] == m["lmeval_pydoc_mc_acc"]  # what the search gets
    assert m["time_lm_eval_s"] > 0
    client = MlflowClient()
    table = json.loads(
        Path(client.download_artifacts(result.run_id, names.LMEVAL_RESULTS_FILE, str(tmp_path))).read_text()
    )
    assert table["pydoc_mc"]["acc,none"] == m["lmeval_pydoc_mc_acc"] and table["pydoc_mc"]["sample_len"] == 40
    configs = json.loads(
        Path(client.download_artifacts(result.run_id, names.LMEVAL_CONFIGS_FILE, str(tmp_path))).read_text()
    )
    assert configs["pydoc_mc"]["output_type"] == "multiple_choice"
    # Per-document scores (the harness's logged samples): what pairs two runs' task scores.
    from pipeline import tracking

    docs = tracking.example_scores(result.run_id, "lmeval_pydoc_mc_acc")
    assert docs is not None and len(docs.ids) == 40 and len(set(docs.ids)) == 40
    assert docs.value == pytest.approx(m["lmeval_pydoc_mc_acc"]) and set(docs.sums) <= {0.0, 1.0}


def test_without_the_harness_a_config_asking_for_it_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    real = lmeval.importlib.util.find_spec
    monkeypatch.setattr(
        lmeval.importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a)
    )
    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = " ".join(tiny_overrides(tmp_path, **{"eval.lm_eval.tasks": "[pydoc_mc]"}))
    for command in ("baseline", "search"):
        code, _, err = run_cli([command, "--config", str(DEMO_CONFIG), "--quiet", "--set", overrides], capsys)
        assert code == 2, err
        assert [line for line in err.splitlines() if "error" in line.lower()] == [f"error: {lmeval.INSTALL}"]
    client = MlflowClient(tracking_uri=uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # no run started


@pytest.mark.e2e
@pytest.mark.lmeval
def test_a_search_through_mlflow_run_maximizes_a_task_metric(tmp_path):
    """`mlflow run . -e search` with `lmeval_pydoc_mc_acc` as the objective: every trial scored
    by the harness, the report shows the score of each, the best trial is the highest score."""

    values = {
        "eval.lm_eval.tasks": "[pydoc_mc]",
        "eval.lm_eval.include_path": str(TASKS),
        "eval.lm_eval.limit": 40,
        "search.objectives": "'[{metric: lmeval_pydoc_mc_acc, minimize: false}]'",
        "search.output_dir": str(tmp_path / "search"),
        "search.early_stopping.enabled": False,
        "registry.model_name": "lmeval-lora",
    }
    found = mlflow_search(tmp_path, "lmeval", 3, " ".join(tiny_overrides(tmp_path, **values)), timeout=1200)
    client, trials, text = found.client, found.trials, found.report
    assert len(trials) == 3 and all("lmeval_pydoc_mc_acc" in r.data.metrics for r in trials)
    assert "maximizing `lmeval_pydoc_mc_acc`" in text
    head = next(line for line in text.splitlines() if line.startswith("| Trial |"))
    column = [c.strip() for c in head.strip("|").split("|")].index("lmeval_pydoc_mc_acc")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit() and len(cells) == len(head.strip("|").split("|")):
            rows[cells[-1].strip("`")] = cells[column]
    for r in trials:  # every trial's score, as its run holds it
        assert rows[r.info.run_id] == f"{r.data.metrics['lmeval_pydoc_mc_acc']:.4g}"
    best = max(trials, key=lambda r: r.data.metrics["lmeval_pydoc_mc_acc"])
    champion = client.get_model_version_by_alias("lmeval-lora", "champion")
    best_score = best.data.metrics["lmeval_pydoc_mc_acc"]
    source = client.get_run(champion.tags[names.VERSION_SOURCE_RUN])  # the trial whose adapter it is
    assert source.data.metrics["lmeval_pydoc_mc_acc"] == best_score
    # The version says what it was chosen on, so the next search or retrain is compared on it.
    assert champion.tags[names.VERSION_OBJECTIVE] == "lmeval_pydoc_mc_acc"
    assert float(champion.tags[names.VERSION_OBJECTIVE_VALUE]) == pytest.approx(best_score)
    assert champion.tags[names.VERSION_OBJECTIVE_FINGERPRINT].startswith(
        champion.tags[names.VERSION_EVAL_FINGERPRINT] + "+"
    )
