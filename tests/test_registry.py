"""Registry: the champion gate, previous alias, duplicates, nothing half-written."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import names, registry
from pipeline.config import with_overrides
from pipeline.trial import Resources, run_trial


def champion(version: str, loss: float, fp: str = "fp1"):
    return SimpleNamespace(
        version=version, tags={registry.TAG_EVAL_LOSS: str(loss), registry.TAG_EVAL_FINGERPRINT: fp}
    )


def test_decide():
    assert registry.decide(2.0, "fp1", None) == (True, "no champion yet")
    ok, why = registry.decide(2.0, "fp1", champion("3", 2.5))
    assert ok and why == "eval_loss 2.0000 beats champion v3 (2.5000)"
    ok, why = registry.decide(2.6, "fp1", champion("3", 2.5))
    assert not ok and "does not beat champion v3" in why
    ok, why = registry.decide(2.5, "fp1", champion("3", 2.5))
    assert not ok  # a tie does not move the champion
    ok, why = registry.decide(1.0, "fp2", champion("3", 2.5))
    assert not ok and "other eval data" in why
    assert not registry.decide(float("nan"), "fp1", None)[0]


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
        return registry.promote(name, result.run_id, result.eval_loss, result.eval_fingerprint, **kw)


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
    assert mv.tags[registry.TAG_SOURCE_RUN] == good.run_id and mv.tags["search_run_id"] == "abc"
    assert mv.tags[registry.TAG_EVAL_FINGERPRINT] == good.eval_fingerprint
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
