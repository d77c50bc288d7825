"""Racing seed replicates: after the trials, the finalists are trained on fresh seeds in rounds,
one seed per round shared by all of them, and after each round a finalist whose paired
difference from the leader is worse beyond the confidence is dropped (SMAC's intensification
races configurations on shared seeds in the same way; here the stop is an interval, not a
fixed number of seeds). Pure numpy/scipy: no MLflow, no Ax, no torch; the pipeline's replicate
step and the replay benchmark (`bench/noise.py`) both call `race_round`.

The interval of a difference: the per-seed differences d_s = (finalist - leader) / |leader's
mean| in percent (positive: the finalist is worse), their mean over the n shared seeds, and a t
interval whose variance pools the n - 1 degrees of freedom of the differences with the
remembered noise of earlier searches (`NoisePrior`: the sd of such a per-seed difference, with
its own degrees of freedom). The difference's own sd is remembered, not a run's sd times sqrt(2):
measured here, finalists paired by seed differ by 2.1-2.8x the baseline's seed-to-seed sd, not
the 1.4x independent runs of equal noise would give (docs/benchmarks.md#noise). Without a prior
the first round decides nothing (no degree of freedom); with one, a large gap decides at once.

Several finalists are compared with the leader each at `confidence`, not a family-wise level:
the race is meant for two or three finalists, and a finalist wrongly dropped was one that the
leader beat on every seed so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STOP_ONE_LEFT = "one finalist better than every other beyond doubt"
STOP_EQUIVALENT = "the finalists left are equivalent within the margin"
STOP_CAP = "the seed cap (search.replicates.seeds)"


@dataclass(frozen=True)
class NoisePrior:
    """Seed noise remembered from earlier searches of the same model, data, eval set and steps:
    the sd of a per-seed difference between two finalists, in percent, and its degrees of freedom."""

    sd_pct: float
    df: int
    source: str = ""  # where it came from, for the report (e.g. "2 earlier searches")


@dataclass(frozen=True)
class Gap:
    """A finalist against the round's leader, in percent of the leader's mean (positive: worse)."""

    finalist: str
    estimate: float
    low: float | None  # None: no degree of freedom yet (one seed and no prior)
    high: float | None
    seeds: int
    df: float

    def text(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.finalist} {self.estimate:+.2f} % (1 seed, no noise estimate yet)"
        return f"{self.finalist} {self.estimate:+.2f} % ({self.low:+.2f} to {self.high:+.2f} %)"


@dataclass(frozen=True)
class Round:
    """What one round decided: the leader, the gaps, who is dropped, and whether the race ends."""

    seeds: int
    leader: str
    gaps: tuple[Gap, ...]
    dropped: tuple[str, ...]
    alive: tuple[str, ...]
    stop: str | None  # one of STOP_*, or None: another round

    def text(self) -> str:
        gaps = "; ".join(g.text() for g in self.gaps) or "no rival"
        out = f"after {self.seeds} seed{'s' if self.seeds != 1 else ''}: leader {self.leader}, vs {gaps}"
        if self.dropped:
            out += f"; dropped {', '.join(self.dropped)} (worse beyond doubt)"
        return out + (f"; stop: {self.stop}" if self.stop else "")


def leader_of(values: Mapping[str, Sequence[float]], minimize: bool) -> str:
    """The finalist with the best mean."""
    sign = 1.0 if minimize else -1.0
    return min(values, key=lambda k: sign * float(np.mean(values[k])))


def gap(
    finalist: Sequence[float],
    leader: Sequence[float],
    minimize: bool,
    confidence: float,
    prior: NoisePrior | None,
    name: str = "",
) -> Gap:
    """The paired-by-seed difference of `finalist` from `leader` (same seeds, same order) and
    its `confidence` t interval, the variance pooled with `prior`."""
    from scipy.stats import t

    f, lead = np.asarray(finalist, dtype=float), np.asarray(leader, dtype=float)
    if f.shape != lead.shape or f.size == 0:
        raise ValueError("a gap needs the same seeds on both sides")
    sign = 1.0 if minimize else -1.0
    d = sign * 100.0 * (f - lead) / abs(float(lead.mean()))
    n = d.size
    ss, df = (float(np.var(d, ddof=1)) * (n - 1), n - 1) if n >= 2 else (0.0, 0)
    if prior is not None and prior.df > 0:
        ss += prior.df * prior.sd_pct**2
        df += prior.df
    estimate = float(d.mean())
    if df == 0:
        return Gap(name, estimate, None, None, n, 0.0)
    half = float(t.ppf(0.5 + confidence / 2, df)) * math.sqrt(ss / df / n)
    return Gap(name, estimate, estimate - half, estimate + half, n, float(df))


def race_round(
    values: Mapping[str, Sequence[float]],
    *,
    minimize: bool,
    confidence: float,
    min_improvement: float,
    max_seeds: int,
    prior: NoisePrior | None = None,
) -> Round:
    """Decide a round from the alive finalists' values on the fresh seeds so far (each the same
    seeds in the same order). Drops a finalist worse than the leader beyond `confidence`; ends the
    race when one is left, when every gap lies within +-`min_improvement` percent beyond doubt
    (equivalent: the report's rule then picks the cheaper), or at `max_seeds` seeds."""
    if not values:
        raise ValueError("a race needs at least one finalist")
    counts = {len(v) for v in values.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every finalist needs the same seeds, got {sorted(counts)} runs")
    seeds = counts.pop()
    leader = leader_of(values, minimize)
    gaps = tuple(
        gap(values[k], values[leader], minimize, confidence, prior, name=k) for k in values if k != leader
    )
    dropped = tuple(g.finalist for g in gaps if g.low is not None and g.low > 0)
    alive = tuple(k for k in values if k not in dropped)
    kept = [g for g in gaps if g.finalist in alive]
    if len(alive) == 1:
        stop = STOP_ONE_LEFT
    elif min_improvement > 0 and all(
        g.low is not None and g.high is not None and -min_improvement < g.low and g.high < min_improvement
        for g in kept
    ):
        stop = STOP_EQUIVALENT
    elif seeds >= max_seeds:
        stop = STOP_CAP
    else:
        stop = None
    return Round(seeds, leader, gaps, dropped, alive, stop)


def measured_noise(values: Mapping[str, Sequence[float]], minimize: bool) -> NoisePrior | None:
    """The noise a race measured, to remember: the per-seed differences of every finalist from the
    final leader on the seeds both ran, their variances pooled (n - 1 degrees of freedom each)."""
    if not values:
        return None
    leader = leader_of(values, minimize)
    ss, df = 0.0, 0
    for k, v in values.items():
        n = min(len(v), len(values[leader]))
        if k == leader or n < 2:
            continue
        lead = np.asarray(values[leader][:n], dtype=float)
        d = 100.0 * (np.asarray(v[:n], dtype=float) - lead) / abs(float(lead.mean()))
        ss += float(np.var(d, ddof=1)) * (n - 1)
        df += n - 1
    return NoisePrior(math.sqrt(ss / df), df) if df else None


def pool(priors: Sequence[NoisePrior]) -> NoisePrior | None:
    """Several remembered estimates as one: variances pooled by their degrees of freedom."""
    kept = [p for p in priors if p.df > 0]
    if not kept:
        return None
    df = sum(p.df for p in kept)
    sd = math.sqrt(sum(p.df * p.sd_pct**2 for p in kept) / df)
    return NoisePrior(sd, df, f"{len(kept)} earlier search{'es' if len(kept) != 1 else ''}")
