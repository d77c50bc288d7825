"""Decisions that survive noise: per-example scores, intervals, seed replicates, the champion gate."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import names, registry, tracking
from pipeline.cli import main
from pipeline.config import load_config, with_overrides
from pipeline.metrics import eval_losses
from pipeline.resources import Resources
from pipeline.search import run_search
from pipeline.search.space import Optimizer
from pipeline.stats import ExampleScores, expected_best, improvement
from pipeline.trial import run_trial

from .conftest import DEMO_CONFIG, tiny_overrides


def _runs(
    shift: float, seeds: list[int], rng: np.random.Generator, seed_sd: float = 0.0
) -> list[ExampleScores]:
    """Made-up runs on 100 examples: a per-example difficulty shared by every run (what pairing
    cancels), a per-seed offset, and a little per-run noise."""
    n = 100
    difficulty = np.linspace(2.0, 4.0, n)
    tokens = np.arange(5, 5 + n, dtype=float)
    out = []
    for seed in seeds:
        loss = difficulty - shift + rng.normal(0, seed_sd) + rng.normal(0, 0.05, n)
        ids = tuple(f"e{i}" for i in range(n))
        out.append(ExampleScores(ids, tuple(loss * tokens), tuple(tokens), "fp", seed))
    return out


def test_intervals_pair_examples_and_seeds():
    rng = np.random.default_rng(0)
    same = _runs(0.0, [1], rng)
    # The same runs: no improvement, and the interval says so.
    i = improvement(same, same)
    assert i.estimate == 0 and i.low <= 0 <= i.high and not i.beyond(0)
    assert i.method() == "1 seed, paired on 100 eval examples, seed noise not measured"
    # 0.1 nats lower on every example: far beyond doubt, although the examples' own spread (2 to
    # 4 nats) is twenty times the gap: pairing cancels it.
    better = _runs(0.1, [1], rng)
    i = improvement(better, same)
    assert i.beyond(2.0) and 2.5 < i.estimate < 4.0 and i.high - i.low < 1.5
    # Seeds: with a seed offset larger than the gap, three paired seeds do not settle it...
    ref = _runs(0.0, [1, 2, 3], np.random.default_rng(1), seed_sd=0.2)
    cand = _runs(0.02, [1, 2, 3], np.random.default_rng(2), seed_sd=0.2)
    noisy = improvement(cand, ref)
    assert noisy.paired_seeds and noisy.seeds == 3 and noisy.low < 0 < noisy.high
    assert noisy.method() == "3 seeds, paired by seed, paired on 100 eval examples"
    # ... and other seeds on each side do not pair.
    other = _runs(0.02, [4, 5, 6], np.random.default_rng(2), seed_sd=0.2)
    assert not improvement(other, ref).paired_seeds
    # Maximizing: higher is better, and the sign follows.
    assert improvement(same, better, minimize=False).estimate > 0


def test_expected_best_is_the_mean_of_the_best_of_k_draws():
    values = [3.1, 2.7, 2.9, 3.5]
    for k, (mean, sd) in enumerate(expected_best(values), 1):
        draws = [min(d) for d in itertools.product(values, repeat=k)]
        assert mean == pytest.approx(statistics.fmean(draws))
        assert sd == pytest.approx(statistics.pstdev(draws))
    assert expected_best(values, minimize=False)[-1][0] > expected_best(values)[-1][0]


def test_per_example_eval_losses_add_up_to_the_eval_loss(tiny_config):
    res = Resources()
    data, model = res.data(tiny_config), None
    from pipeline.device import plan_device

    base, _ = res.base_model(tiny_config, plan_device(tiny_config.model, tiny_config.train))
    model = base.model
    one = eval_losses(model, data.eval, res.tokenizer(tiny_config), 4)
    assert one.loss == pytest.approx(sum(one.nll) / sum(one.tokens), rel=1e-6)
    assert one.tokens == tuple(sum(t != -100 for t in e["labels"][1:]) for e in data.eval)
    # Examples are scored the same whatever their order and batch: keyed by example, not position.
    back = eval_losses(model, data.eval[::-1], res.tokenizer(tiny_config), 7)
    assert back.nll[::-1] == pytest.approx(one.nll, rel=1e-5) and back.loss == pytest.approx(one.loss)


def _cli(tmp_path, capsys, *extra: str) -> tuple[int, list[str]]:
    args = [
        "search",
        "--config",
        str(DEMO_CONFIG),
        "--quiet",
        *[f"--set={o}" for o in tiny_overrides(tmp_path)],
    ]
    try:
        main([*args, *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_bad_noise_settings_are_one_line_and_no_run(tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, "--set", "search.replicates.seeds=0")
    assert code == 2 and len(err) == 1 and "search.replicates.seeds: Input should be greater than 0" in err[0]
    code, err = _cli(tmp_path, capsys, "--set", "registry.confidence=1.5")
    assert code == 2 and len(err) == 1 and "registry.confidence: Input should be less than 1" in err[0]
    store = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # this test's own store
    assert not [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]


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


def _replicated_search(tmp_path, n_trials: int, model: str, **extra):
    """A tiny demo search that replicates its best configuration and the baseline on 2 seeds."""
    values = {
        "search.n_trials": n_trials,
        "search.output_dir": str(tmp_path / "search"),
        "search.early_stopping.enabled": False,
        "search.replicates.top_k": 1,
        "search.replicates.seeds": 2,
        "registry.model_name": model,
        **extra,
    }
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **values))


def test_replicates_are_tagged_told_to_ax_and_decide(tmp_path, capsys):
    """A search with replicates: the chosen configuration and the baseline on two fresh seeds,
    nested and tagged, not counted as trials; Ax gets (mean, sem) for them and the pooled seed
    noise for the rest; the report's improvement carries a CI and the single-run value; the
    registered version states the interval and the rule."""
    config = _replicated_search(tmp_path, 3, "noise", **{"train.eval_steps": 4})
    result = run_search(config, quiet=True)
    runs = tracking.children_of(result.parent_run_id)
    reps = [r for r in runs if names.TRIAL_REPLICATE_OF in r.tags]
    assert len(reps) == 4 and len(tracking.trials_of(result.parent_run_id)) == 3
    of = {(r.tags[names.TRIAL_REPLICATE_OF], r.tags[names.TRIAL_REPLICATE_SEED]) for r in reps}
    chosen = next(k for k, _ in of if k != "baseline")
    assert of == {(k, s) for k in ("baseline", chosen) for s in ("43", "44")}
    assert all(r.tags[names.TRIAL_STATUS] == names.COMPLETED for r in reps)
    parent = tracking.get_run(result.parent_run_id)
    assert parent.metrics[names.TRIALS_COMPLETED] == 3 and parent.metrics[names.REPLICATE_RUNS] == 4
    low, high = parent.metrics[names.IMPROVEMENT_CI_LOW], parent.metrics[names.IMPROVEMENT_CI_HIGH]
    assert low < parent.metrics[names.IMPROVEMENT_PCT] < high

    # Ax: the replicated trial's (mean, sem) over its three runs; every other observation the
    # pooled seed noise as its standard error.
    state = result.state
    trial = state.record(int(chosen))
    own = [trial.eval_loss, *(r.eval_loss for r in state.replicates if r.of == chosen)]
    base = [state.baseline.eval_loss, *(r.eval_loss for r in state.replicates if r.of == "baseline")]
    sd = math.sqrt((statistics.variance(own) * 2 + statistics.variance(base) * 2) / 4)
    ax = Optimizer.load(tmp_path / "search" / result.parent_run_id / "search_state" / "ax_state.json", config)
    df = ax.client._experiment.lookup_data().df
    final = df[df.metric_name == names.EVAL_LOSS].groupby("trial_index").last()
    assert final.loc[int(chosen), "mean"] == pytest.approx(statistics.fmean(own))
    assert final.loc[int(chosen), "sem"] == pytest.approx(statistics.stdev(own) / math.sqrt(3))
    assert final.loc[0, "mean"] == pytest.approx(statistics.fmean(base))  # the baseline's arm
    others = [t for t in state.trials if t.index != int(chosen)]
    for t in others:
        assert final.loc[t.index, "mean"] == pytest.approx(t.eval_loss)
        assert final.loc[t.index, "sem"] == pytest.approx(sd)

    report = (result.report_dir / names.REPORT_FILE).read_text()
    line = next(x for x in report.splitlines() if x.startswith("| **Improvement**"))
    assert line.startswith("| **Improvement** | eval_loss: ") and "(95 % CI " in line
    assert "2 seeds, paired by seed, paired on 24 eval examples" in line
    assert "single-run" in line and "## Seed replicates" in report and "Winner's curse, measured" in report
    assert (result.report_dir / "expected_best.png").is_file()
    assert "insufficient data (n=1)" in report  # one trial per choice value: no mean compared
    mv = MlflowClient().get_model_version("noise", "1")
    assert "promotion rule" in mv.description and "(95 % CI " in mv.description
    assert mv.tags[names.VERSION_SCORED_RUNS].count(":") == 2  # the two fresh seeds' runs
    best = json.loads(json.dumps(mv.tags))
    assert best[names.VERSION_SOURCE_RUN] == trial.run_id


@pytest.mark.slow
def test_replicates_resume_after_an_interruption(tmp_path, monkeypatch):
    """Ctrl-C during the replicates: the search stops with the finished replicates recorded; the
    resumed search runs only those that did not end (each configuration and seed once)."""
    from pipeline.search import executor

    config = _replicated_search(tmp_path, 2, "noise-resume")
    real = executor.run_trial
    seen: list[int] = []

    def interrupted_once(cfg, *args, **kwargs):
        if cfg.train.seed == 44 and not seen:
            seen.append(cfg.train.seed)
            raise KeyboardInterrupt
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(executor, "run_trial", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, quiet=True)
    (parent,) = [p.name for p in (tmp_path / "search").iterdir()]
    first = [r for r in tracking.children_of(parent) if names.TRIAL_REPLICATE_OF in r.tags]
    assert len(first) == 2 and {r.tags[names.TRIAL_REPLICATE_SEED] for r in first} == {"43"}
    result = run_search(config, resume=parent, quiet=True)
    reps = [r for r in tracking.children_of(parent) if names.TRIAL_REPLICATE_OF in r.tags]
    done = sorted(
        (r.tags[names.TRIAL_REPLICATE_OF], r.tags[names.TRIAL_REPLICATE_SEED])
        for r in reps
        if r.tags.get(names.TRIAL_STATUS) == names.COMPLETED
    )
    assert len(done) == 4 and len(set(done)) == 4, done
    assert all(r.status == names.COMPLETED for r in result.state.replicates)
    assert len(tracking.trials_of(parent)) == 2  # no trial ran again
