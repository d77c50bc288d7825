"""Registry: the champion gate, previous alias, duplicates, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import with_overrides
from pipeline.core import names
from pipeline.registry import versions as registry
from pipeline.trial.resources import Resources
from pipeline.trial.run import run_trial


def champion(version: str, loss: float, fp: str = "fp1", **tags: str):
    return registry.VersionRecord(
        "m", version, {names.VERSION_EVAL_LOSS: str(loss), names.VERSION_EVAL_FINGERPRINT: fp, **tags}
    )


def offer(loss: float, fp: str = "fp1", **kw) -> registry.Candidate:
    return registry.Candidate("run", loss, fp, **kw)


def test_decide():
    assert registry.decide(offer(2.0), None) == (True, "no champion yet")
    ok, why = registry.decide(offer(2.0), champion("3", 2.5))
    assert ok and why == "eval_loss 2.0000 beats champion v3 (2.5000)"
    ok, why = registry.decide(offer(2.6), champion("3", 2.5))
    assert not ok and "does not beat champion v3" in why
    ok, why = registry.decide(offer(2.5), champion("3", 2.5))
    assert not ok  # a tie does not move the champion
    ok, why = registry.decide(offer(1.0, "fp2"), champion("3", 2.5))
    assert not ok and "other eval data" in why
    assert not registry.decide(offer(float("nan")), None)[0]


def test_decide_on_a_task_score():
    acc = {"objective": "lmeval_pydoc_mc_acc", "minimize": False, "fingerprint": "fp1+t1"}
    held = {
        names.VERSION_OBJECTIVE: "lmeval_pydoc_mc_acc",
        names.VERSION_OBJECTIVE_VALUE: "0.40",
        names.VERSION_OBJECTIVE_FINGERPRINT: "fp1+t1",
    }
    # Higher is better here, whatever the losses say.
    ok, why = registry.decide(offer(3.0, value=0.45, **acc), champion("3", 2.5, **held))
    assert ok and why == "lmeval_pydoc_mc_acc 0.4500 beats champion v3 (0.4000)"
    assert not registry.decide(offer(1.0, value=0.35, **acc), champion("3", 2.5, **held))[0]
    # Other task settings or files: the scores do not compare.
    other = {**acc, "fingerprint": "fp1+t2"}
    ok, why = registry.decide(offer(3.0, value=0.9, **other), champion("3", 2.5, **held))
    assert not ok and "other eval data or task settings" in why
    # A champion chosen on eval_loss (or registered before objectives were recorded) is not
    # beaten by a task score, nor the other way round.
    ok, why = registry.decide(offer(3.0, value=0.9, **acc), champion("3", 2.5))
    assert not ok and why.startswith(
        "champion v3 was chosen on eval_loss, this version on lmeval_pydoc_mc_acc"
    )
    ok, why = registry.decide(offer(1.0), champion("3", 2.5, **held))
    assert not ok and "chosen on lmeval_pydoc_mc_acc" in why


def test_a_candidate_is_judged_on_its_search_objective(tiny_config):
    from pipeline.config import LmEvalConfig, ObjectiveSpec

    metrics = {names.EVAL_LOSS: 2.0, "lmeval_pydoc_mc_acc": 0.5}
    c = registry.candidate(tiny_config, "r", metrics, 2.0, "fp", None)
    assert (c.objective, c.score, c.score_fingerprint) == (names.EVAL_LOSS, 2.0, "fp")
    search = tiny_config.search.model_copy(
        update={"objectives": [ObjectiveSpec(metric="lmeval_pydoc_mc_acc", minimize=False)]}
    )
    lm = LmEvalConfig(tasks=["pydoc_mc"], include_path="tasks")
    config = tiny_config.model_copy(
        update={"search": search, "eval": tiny_config.eval.model_copy(update={"lm_eval": lm})}
    )
    c = registry.candidate(config, "r", metrics, 2.0, "fp", None)
    assert (c.objective, c.minimize, c.score) == ("lmeval_pydoc_mc_acc", False, 0.5)
    assert c.score_fingerprint.startswith("fp+") and c.score_fingerprint != "fp"


@pytest.fixture
def two_adapters(tiny_config):
    res = Resources()
    good = run_trial(with_overrides(tiny_config, {"train.learning_rate": 3e-3}), quiet=True, resources=res)
    bad = run_trial(with_overrides(tiny_config, {"train.learning_rate": 1e-5}), quiet=True, resources=res)
    assert good.eval_loss < bad.eval_loss
    return good, bad


def promote(result, name="reg-test", **kw):
    mlflow.set_experiment("tests")
    with mlflow.start_run():
        return registry.promote(name, _candidate(result), **kw)


def _candidate(result):
    """What the search and the retrain hand the registry: the run, its score, its adapter folder."""
    return registry.Candidate(result.run_id, result.eval_loss, result.eval_fingerprint, result.adapter_dir)


def test_champion_previous_and_duplicates(two_adapters):
    good, bad = two_adapters
    client = MlflowClient()
    first = promote(bad)
    assert first.promoted and first.version == "1"
    second = promote(good, tags={"search_run_id": "abc"})
    assert second.promoted and second.previous_champion == "1"
    assert str(client.get_model_version_by_alias("reg-test", names.CHAMPION_ALIAS).version) == "2"
    assert str(client.get_model_version_by_alias("reg-test", names.PREVIOUS_ALIAS).version) == "1"
    mv = client.get_model_version("reg-test", "2")
    assert mv.tags[names.VERSION_SOURCE_RUN] == good.run_id and mv.tags["search_run_id"] == "abc"
    assert mv.tags[names.VERSION_EVAL_FINGERPRINT] == good.eval_fingerprint
    # The same adapter again: no new version.
    again = promote(good)
    assert again.duplicate and again.version == "2"
    assert len(client.search_model_versions("name = 'reg-test'")) == 2
    # A worse adapter (re-registered on purpose): a version, but the champion stays.
    worse = promote(bad, allow_duplicate=True)
    assert not worse.promoted and worse.version == "3"
    assert str(client.get_model_version_by_alias("reg-test", names.CHAMPION_ALIAS).version) == "2"


def test_a_failure_while_registering_leaves_nothing_behind(two_adapters, monkeypatch):
    good, _ = two_adapters

    def broken(*args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        promote(good, name="reg-broken")
    assert MlflowClient().search_model_versions("name = 'reg-broken'") == []


def test_the_adapter_handed_over_is_not_downloaded_again(two_adapters, monkeypatch):
    """The search and the retrain give the registry the adapter folder they just wrote."""
    good, _ = two_adapters
    assert (good.adapter_dir / "adapter_model.safetensors").is_file()
    downloads = []
    real = mlflow.artifacts.download_artifacts

    def counting(*args, **kwargs):
        downloads.append(kwargs.get("artifact_path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    handed = promote(good, name="reg-local")
    assert handed.promoted and names.ADAPTER_DIR not in downloads
    # Without the folder (another machine, or deleted), the run's artifact is fetched instead.
    mlflow.set_experiment("tests")
    with mlflow.start_run():
        fetched = registry.promote(
            "reg-fetched", registry.Candidate(good.run_id, good.eval_loss, good.eval_fingerprint)
        )
    assert fetched.promoted and downloads.count(names.ADAPTER_DIR) == 1
    versions = {
        v.name: v.tags[names.VERSION_ADAPTER_SHA]
        for n in ("reg-local", "reg-fetched")
        for v in MlflowClient().search_model_versions(f"name = '{n}'")
    }
    assert versions["reg-local"] == versions["reg-fetched"] == registry.adapter_sha256(good.adapter_dir)


def test_version_description_says_where_the_version_came_from(monkeypatch):
    offer = registry.Candidate(
        "run123", 2.5, "fp", objective="lmeval_pydoc_mc_acc", minimize=False, value=0.49
    )
    metrics = {names.EVAL_LOSS: 2.5, "lmeval_pydoc_mc_acc": 0.49, "train_loss_mean": 2.0}
    yaml = "lora:\n  r: 16\n"
    text = registry.version_description(
        offer,
        yaml,
        experiment_id="7",
        role="trial",
        metrics=metrics,
        search_run_id="s1",
        baseline_eval_loss=3.0,
    )
    assert "| source run | trial [`run123`](#/experiments/7/runs/run123), experiment 7 |" in text
    assert "| search run | [`s1`](#/experiments/7/runs/s1) |" in text
    assert "| eval_loss | 2.5000 |" in text
    assert "| objective | lmeval_pydoc_mc_acc = 0.4900 (maximized) |" in text
    assert "| lmeval_pydoc_mc_acc | 0.4900 |" in text and "train_loss_mean" not in text
    assert "| vs baseline | eval_loss 16.7 % below the baseline's (3.0000) |" in text
    assert text.endswith("```yaml\nlora:\n  r: 16\n```\n")
    worse = registry.version_description(offer, yaml, experiment_id="7", role="trial", baseline_eval_loss=2.0)
    assert "| vs baseline | eval_loss 25.0 % above the baseline's (2.0000) |" in worse
    # On a tracking server the links are absolute; no baseline known: no such row.
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow.example:5000/")
    text = registry.version_description(offer, yaml, experiment_id="7", role="retrain")
    assert "(http://mlflow.example:5000/#/experiments/7/runs/run123)" in text and "baseline" not in text
    # A long config is cut to what MLflow keeps, the header whole.
    long = registry.version_description(offer, "k: v\n" * 2000, experiment_id="7", role="trial")
    assert len(long) <= 5000 and long.startswith("| provenance") and "cut here" in long


def test_a_version_has_a_signature_and_an_input_example_and_answers_any_prompt_form(
    tiny_config, tmp_path, monkeypatch
):
    """The registered pyfunc declares a string column in, strings out and `max_new_tokens`;
    registering does not load the base model to try the example; predict takes a string, a
    list, a DataFrame or a dict."""
    import pandas as pd

    from pipeline.model import adapter as serving

    result = run_trial(tiny_config, quiet=True)
    loads = []
    real_load = serving.load_adapter
    monkeypatch.setattr(serving, "load_adapter", lambda d: loads.append(d) or real_load(d))
    assert promote(result, name="reg-sig").promoted
    assert loads == [], "registering must not load the model to validate the input example"
    uri = "models:/reg-sig@champion"
    signature = mlflow.models.get_model_info(uri).signature
    assert [c.type.name for c in signature.inputs.inputs] == ["string"]
    assert [c.type.name for c in signature.outputs.inputs] == ["string"]
    (param,) = signature.params.params
    assert (param.name, param.dtype.name, param.default) == ("max_new_tokens", "long", 64)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "m")))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["prompt"] and example["params"] == {"max_new_tokens": 64}
    model = mlflow.pyfunc.load_model(uri)
    for given, n in (
        ("hi", 1),
        (["a", "b"], 2),
        (pd.DataFrame({"prompt": ["a", "b", "c"]}), 3),
        ({"prompt": ["a", "b"]}, 2),
    ):
        answers = model.predict(given, params={"max_new_tokens": 3})
        assert len(answers) == n and all(isinstance(a, str) for a in answers), given
