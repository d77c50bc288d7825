"""Intervals that pair examples and seeds, and the expected best of k trials (`pipeline/core/stats.py`)."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pytest

from pipeline.core.stats import ExampleScores, expected_best, improvement


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
