"""The promotion rule: a champion moves only when the challenger is better beyond doubt
(`pipeline/registry/gate.py`)."""

from __future__ import annotations

import statistics

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import with_overrides
from pipeline.core import names
from pipeline.registry import versions as registry
from pipeline.trial.resources import Resources
from pipeline.trial.run import run_trial


def _train(config, res, **values):
    return run_trial(with_overrides(config, values), quiet=True, resources=res)


def _offer(runs) -> registry.Candidate:
    first = runs[0]
    scores = tuple(tracking.example_scores(r.run_id) for r in runs)
    mean = statistics.fmean(r.eval_loss for r in runs)
    return registry.Candidate(first.run_id, mean, first.eval_fingerprint, first.adapter_dir, scores=scores)


def _promote(offer, rule=registry.DEFAULT_RULE):
    mlflow.set_experiment("tests")
    with mlflow.start_run():
        return registry.promote("gate", offer, description="provenance\n\n**Config**\n", rule=rule)


def test_a_point_win_inside_the_noise_does_not_move_the_champion(tiny_config):
    """The same configuration on other seeds: one pair of seeds scores lower on average than the
    other, a point win, but its interval (two seeds each, unpaired) holds zero: the version is
    registered, the champion stays, and the version says why, with the interval and the rule."""
    res = Resources()
    pairs = [[_train(tiny_config, res, **{"train.seed": s}) for s in seeds] for seeds in ((1, 2), (3, 4))]
    worse, better = sorted(pairs, key=lambda p: statistics.fmean(r.eval_loss for r in p), reverse=True)
    assert statistics.fmean(r.eval_loss for r in better) < statistics.fmean(r.eval_loss for r in worse)
    first = _promote(_offer(worse))
    assert first.promoted
    second = _promote(_offer(better))
    client = MlflowClient()
    assert not second.promoted and second.version == "2"
    assert str(client.get_model_version_by_alias("gate", names.CHAMPION_ALIAS).version) == "1"
    assert "does not beat champion v1 beyond doubt" in second.message
    assert second.interval is not None and second.interval.low <= 0 < second.interval.estimate
    mv = client.get_model_version("gate", "2")
    assert mv.tags[names.VERSION_PROMOTION_RULE] == registry.Rule().text()
    assert mv.tags[names.VERSION_VS_CHAMPION].startswith(f"{second.interval.estimate:.1f} % (95 % CI ")
    assert mv.tags[names.VERSION_SCORED_RUNS] == ",".join(f"{r.config.train.seed}:{r.run_id}" for r in better)
    assert "**Promotion**: not promoted" in mv.description and "beyond doubt" in mv.description
    # A clearly better configuration is promoted beyond doubt, judged against the champion's own
    # replicates (read back from its version's scored runs).
    good = [_train(tiny_config, res, **{"train.seed": s, "train.learning_rate": 5e-3}) for s in (1, 2)]
    third = _promote(_offer(good))
    assert third.promoted and "beats champion v1 beyond doubt" in third.message, third.message
    assert third.interval.low > 0 and third.interval.seeds == 2
    # A minimum improvement the interval does not clear keeps the alias where it is.
    fourth = _promote(_offer(good[::-1]), registry.Rule(min_improvement=99.0))
    assert not fourth.promoted and "registry.min_improvement 99 %" in fourth.message
    assert str(client.get_model_version_by_alias("gate", names.CHAMPION_ALIAS).version) == third.version
