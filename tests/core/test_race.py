"""Racing the finalists on shared seeds (`pipeline/core/race.py`), on made-up values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.race import (
    STOP_CAP,
    STOP_EQUIVALENT,
    STOP_ONE_LEFT,
    NoisePrior,
    gap,
    measured_noise,
    pool,
    race_round,
)

KNOWN = NoisePrior(sd_pct=1.0, df=8)  # a difference's seed noise remembered: 1 % of the loss


def _race(true: dict[str, float], sd_pct: float, rng, cap: int, prior=None, min_improvement=0.0):
    """Rounds until the race stops: every alive finalist gets the next seed (a shared offset per
    seed plus its own noise), as the replicate step runs them."""
    values: dict[str, list[float]] = {k: [] for k in true}
    alive = list(true)
    for _ in range(cap):
        shared = rng.normal(0, 0.01)
        for k in alive:
            values[k].append(true[k] * (1 + shared + rng.normal(0, sd_pct / 100 / np.sqrt(2))))
        decided = race_round(
            {k: values[k] for k in alive},
            minimize=True,
            confidence=0.95,
            min_improvement=min_improvement,
            max_seeds=cap,
            prior=prior,
        )
        alive = list(decided.alive)
        if decided.stop:
            return decided, values
    raise AssertionError("the race did not stop at its cap")


def test_a_clear_gap_with_remembered_noise_ends_after_one_round():
    decided = race_round(
        {"7": [2.70], "3": [2.90]},
        minimize=True,
        confidence=0.95,
        min_improvement=0.0,
        max_seeds=4,
        prior=KNOWN,
    )
    assert decided.seeds == 1 and decided.leader == "7"
    assert decided.dropped == ("3",) and decided.alive == ("7",)
    assert decided.stop == STOP_ONE_LEFT
    assert "dropped 3" in decided.text() and "stop:" in decided.text()


def test_without_remembered_noise_one_seed_decides_nothing():
    decided = race_round(
        {"7": [2.70], "3": [2.90]}, minimize=True, confidence=0.95, min_improvement=0.0, max_seeds=4
    )
    assert decided.stop is None and decided.dropped == ()
    assert decided.gaps[0].low is None and "no noise estimate" in decided.text()


def test_a_close_race_runs_to_the_cap():
    rng = np.random.default_rng(0)
    decided, values = _race({"7": 2.700, "3": 2.702}, sd_pct=1.0, rng=rng, cap=4, prior=KNOWN)
    assert decided.stop == STOP_CAP and decided.seeds == 4
    assert set(decided.alive) == {"7", "3"} and all(len(v) == 4 for v in values.values())


def test_finalists_equivalent_within_min_improvement_stop_early():
    tight = NoisePrior(sd_pct=0.1, df=20)
    rng = np.random.default_rng(1)
    decided, _ = _race({"7": 2.700, "3": 2.701}, sd_pct=0.1, rng=rng, cap=6, prior=tight, min_improvement=1.0)
    assert decided.stop == STOP_EQUIVALENT and decided.seeds < 6


def test_the_race_keeps_the_best_and_drops_the_worse_when_maximizing():
    decided = race_round(
        {"a": [0.61, 0.60], "b": [0.50, 0.49]},
        minimize=False,
        confidence=0.95,
        min_improvement=0.0,
        max_seeds=5,
    )
    assert decided.leader == "a" and decided.dropped == ("b",)


def test_the_gap_interval_covers_the_true_gap_95_in_100_times():
    # The per-seed differences drawn from a known noise; the prior is that noise with many
    # degrees of freedom, so the interval should hold the true gap in 95 % of draws.
    rng = np.random.default_rng(2)
    true_gap, sd, hits, draws = 1.5, 1.2, 0, 2000
    for _ in range(draws):
        lead = 2.0 * (1 + rng.normal(0, 0.02, 3))
        fin = lead * (1 + true_gap / 100) + 2.0 * rng.normal(0, sd / 100, 3)
        g = gap(fin, lead, True, 0.95, NoisePrior(sd, 200))
        hits += g.low <= true_gap <= g.high
    assert 0.93 <= hits / draws <= 0.97


def test_the_noise_a_race_measured_is_remembered_and_pooled():
    rng = np.random.default_rng(3)
    lead = 2.0 + rng.normal(0, 0.01, 30)
    other = lead * 1.02 + 2.0 * rng.normal(0, 0.008, 30)
    measured = measured_noise({"a": list(lead), "b": list(other)}, minimize=True)
    assert measured is not None and measured.df == 29
    assert 0.6 < measured.sd_pct < 1.0  # the difference's sd: 0.8 % of the loss
    pooled = pool([measured, NoisePrior(2.0, 29), NoisePrior(5.0, 0)])
    assert pooled.df == 58 and measured.sd_pct < pooled.sd_pct < 2.0
    assert pooled.source == "2 earlier searches"
    assert pool([]) is None and measured_noise({"a": [1.0]}, minimize=True) is None


def test_finalists_on_different_seeds_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        race_round(
            {"a": [1.0, 1.1], "b": [1.0]}, minimize=True, confidence=0.95, min_improvement=0, max_seeds=3
        )
