"""Uncertainty: paired per-example scores, confidence intervals of an improvement, and the
expected best of n trials. Pure numpy/scipy: no MLflow, no Ax; tests check it on made-up numbers.

Every run logs its eval loss per example (`ExampleScores`: the summed negative log-likelihood
and the token count of each eval example, keyed by a stable example id). Two configurations
measured on the same eval set (same fingerprint) then compare *paired*: the same examples on
both sides, so the example-to-example spread cancels, and only what differs is tested.

`improvement` is the one interval every decision uses (the report's improvement line, the
recommendation, the registry's promotion). Its 95 % CI has two parts:

- seed noise: with several seeds per side, the spread of the per-seed results (paired by seed
  where both sides ran the same seeds), with (seeds - 1) degrees of freedom;
- eval-set noise: a bootstrap over eval examples, resampling the same examples on both sides,
  with (examples - 1) degrees of freedom.

The two variances are added (conservative: their small interaction is counted twice) and the
interval is a t interval whose degrees of freedom combine the two parts (Welch-Satterthwaite):
with few seeds, wide where the seed part dominates, not where the eval set's does. With one run
per side only the eval-set part exists (the bootstrap's percentile interval), and the interval
says so (`seed_noise` False).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_ITERS = 2000
BOOTSTRAP_SEED = 0  # the intervals are reproducible: the same runs give the same interval


@dataclass(frozen=True)
class ExampleScores:
    """One run's score on each eval example: `sums[i] / weights[i]` is example i's score (for
    eval loss: summed token NLL over response tokens; the run's eval_loss is sum/sum)."""

    ids: tuple[str, ...]
    sums: tuple[float, ...]
    weights: tuple[float, ...]
    fingerprint: str  # the eval set's: two runs compare only under the same one
    seed: int | None = None  # train.seed of the run
    run_id: str = ""
    metric: str = "eval_loss"

    @property
    def value(self) -> float:
        total = sum(self.weights)
        return sum(self.sums) / total if total else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "eval_fingerprint": self.fingerprint,
            "train_seed": self.seed,
            "run_id": self.run_id,
            "examples": [
                {"id": i, "sum": s, "weight": w}
                for i, s, w in zip(self.ids, self.sums, self.weights, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], run_id: str = "") -> ExampleScores:
        rows = data["examples"]
        return cls(
            ids=tuple(str(r["id"]) for r in rows),
            sums=tuple(float(r["sum"]) for r in rows),
            weights=tuple(float(r["weight"]) for r in rows),
            fingerprint=str(data.get("eval_fingerprint", "")),
            seed=data.get("train_seed"),
            run_id=run_id or str(data.get("run_id", "")),
            metric=str(data.get("metric", "eval_loss")),
        )


@dataclass(frozen=True)
class Interval:
    """A relative improvement (percent of the reference's value; positive = the candidate is
    better) and its confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    seeds: int  # runs per side the estimate averages (the smaller side)
    paired_seeds: bool  # seeds paired (both sides ran the same seeds)
    examples: int
    single_run: float | None = None  # the candidate's selection run alone against the reference
    how: str | None = None  # overrides method() (intervals not computed from example scores)

    @property
    def seed_noise(self) -> bool:
        return self.seeds >= 2

    def method(self) -> str:
        """How it was computed, in a few words."""
        if self.how:
            return self.how
        how = [f"{self.seeds} seed{'s' if self.seeds != 1 else ''}"]
        if self.seed_noise:
            how.append("paired by seed" if self.paired_seeds else "seeds unpaired")
        if self.examples:
            how.append(f"paired on {self.examples} eval examples")
        if not self.seed_noise:
            how.append("seed noise not measured")
        return ", ".join(how)

    def text(self) -> str:
        """`13.7 % (95 % CI 13.1 to 14.3 %, 4 seeds, paired by seed, paired on 200 eval examples)`."""
        return (
            f"{self.estimate:.1f} % ({self.confidence * 100:.0f} % CI {self.low:.1f} to {self.high:.1f} %, "
            f"{self.method()})"
        )

    def beyond(self, threshold: float) -> bool:
        """Better than `threshold` percent beyond doubt: the interval's lower bound is above it."""
        return self.low > threshold


class NotComparable(ValueError):
    """Runs whose per-example scores cannot be paired (other eval set, other examples)."""


def _matrix(runs: Sequence[ExampleScores], ids: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    sums = np.array([r.sums for r in runs], dtype=float)
    weights = np.array([r.weights for r in runs], dtype=float)
    if any(r.ids != ids for r in runs):
        raise NotComparable("the runs scored different eval examples")
    return sums, weights


def _check(candidate: Sequence[ExampleScores], reference: Sequence[ExampleScores]) -> tuple[str, ...]:
    if not candidate or not reference:
        raise NotComparable("no per-example scores on one side")
    prints = {r.fingerprint for r in (*candidate, *reference)}
    if len(prints) != 1:
        raise NotComparable(f"the runs were evaluated on different eval sets ({', '.join(sorted(prints))})")
    metrics = {r.metric for r in (*candidate, *reference)}
    if len(metrics) != 1:
        raise NotComparable(f"the runs scored different metrics ({', '.join(sorted(metrics))})")
    return candidate[0].ids


def improvement(
    candidate: Sequence[ExampleScores],
    reference: Sequence[ExampleScores],
    minimize: bool = True,
    confidence: float = 0.95,
    single_run: ExampleScores | None = None,
    iters: int = BOOTSTRAP_ITERS,
) -> Interval:
    """How much better the candidate's runs are than the reference's, in percent of the
    reference's mean value, with a `confidence` interval (see the module docstring).

    Each side's value is the mean over its runs (seeds) of the run's weighted mean score. Seeds
    pair when both sides ran exactly the same set of seeds (two or more)."""
    ids = _check(candidate, reference)
    c_sums, c_w = _matrix(candidate, ids)
    r_sums, r_w = _matrix(reference, ids)
    sign = 1.0 if minimize else -1.0

    def relative(c: np.ndarray, r: np.ndarray) -> np.ndarray:
        # c, r: per-run values (..., runs); the improvement of the means, in percent.
        rm = r.mean(axis=-1)
        return sign * 100.0 * (rm - c.mean(axis=-1)) / np.abs(rm)

    c_vals, r_vals = c_sums.sum(1) / c_w.sum(1), r_sums.sum(1) / r_w.sum(1)
    estimate = float(relative(c_vals, r_vals))
    boot = _bootstrap(c_sums, c_w, r_sums, r_w, relative, iters)
    var_seeds, df, paired = _seed_variance(candidate, reference, c_vals, r_vals, sign)
    alpha = 1.0 - confidence
    if df is None:
        # One run per side: the bootstrap's own percentile interval of the eval-set noise.
        low, high = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    else:
        from scipy.stats import t

        var_examples = float(np.var(boot, ddof=1))
        dof = _welch_satterthwaite(var_seeds, df, var_examples, len(ids) - 1)
        half = float(t.ppf(1 - alpha / 2, dof)) * math.sqrt(var_seeds + var_examples)
        low, high = estimate - half, estimate + half
    single = None
    if single_run is not None:
        _check([single_run], reference)
        single = float(relative(np.array([single_run.value]), r_vals))
    seeds = min(len(candidate), len(reference))
    return Interval(estimate, low, high, confidence, seeds, paired, 0 if ids == SCALAR else len(ids), single)


def _welch_satterthwaite(var_a: float, df_a: int, var_b: float, df_b: int) -> float:
    """Degrees of freedom of a sum of two variance estimates (Welch-Satterthwaite): the few
    seeds' part dominates only when it is the larger one; the eval set's has one per example."""
    den = (var_a**2 / df_a if df_a > 0 else 0.0) + (var_b**2 / df_b if df_b > 0 else 0.0)
    return (var_a + var_b) ** 2 / den if den > 0 else float(max(df_a, 1))


def _bootstrap(
    c_sums: np.ndarray, c_w: np.ndarray, r_sums: np.ndarray, r_w: np.ndarray, relative: Any, iters: int
) -> np.ndarray:
    """The improvement over `iters` resamples of the eval examples, the same examples on both
    sides (in chunks: a large eval set's resample counts would not fit in memory at once)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = c_sums.shape[1]
    parts = []
    for start in range(0, iters, 250):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(250, iters - start)).astype(float)
        c_boot = (counts @ c_sums.T) / (counts @ c_w.T)  # (draws, runs)
        r_boot = (counts @ r_sums.T) / (counts @ r_w.T)
        parts.append(relative(c_boot, r_boot))
    return np.concatenate(parts)


def _seed_variance(
    candidate: Sequence[ExampleScores],
    reference: Sequence[ExampleScores],
    c_vals: np.ndarray,
    r_vals: np.ndarray,
    sign: float,
) -> tuple[float, int | None, bool]:
    """(variance of the improvement's estimate from seed noise, its degrees of freedom or None
    with one run a side, whether seeds paired)."""
    c_seeds = [r.seed for r in candidate]
    r_seeds = [r.seed for r in reference]
    rm = abs(float(r_vals.mean()))
    if len(candidate) >= 2 and None not in c_seeds and sorted(c_seeds) == sorted(r_seeds):
        per_seed = sign * 100.0 * (r_vals[np.argsort(r_seeds)] - c_vals[np.argsort(c_seeds)]) / rm
        return float(np.var(per_seed, ddof=1)) / len(per_seed), len(per_seed) - 1, True
    seeds = min(len(candidate), len(reference))
    if seeds < 2:
        return 0.0, None, False
    spread = float(np.var(c_vals, ddof=1)) / len(c_vals) + float(np.var(r_vals, ddof=1)) / len(r_vals)
    return 1e4 * spread / rm**2, seeds - 1, False


SCALAR = ("*",)


def scalar_scores(value: float, seed: int | None, metric: str, run_id: str = "") -> ExampleScores:
    """A run known only by its overall value (a metric without per-example scores): compared
    across seeds only."""
    return ExampleScores(SCALAR, (float(value),), (1.0,), f"scalar:{metric}", seed, run_id, metric)


def from_stderr(
    candidate: float,
    candidate_se: float,
    reference: float,
    reference_se: float,
    minimize: bool = True,
    confidence: float = 0.95,
) -> Interval:
    """A normal interval of the relative improvement from two independent standard errors (a
    task metric's harness stderr, when no per-example scores pair the two runs)."""
    from scipy.stats import norm

    sign = 1.0 if minimize else -1.0
    estimate = sign * 100.0 * (reference - candidate) / abs(reference)
    half = (
        float(norm.ppf(0.5 + confidence / 2))
        * 100.0
        * math.hypot(candidate_se, reference_se)
        / abs(reference)
    )
    return Interval(
        estimate, estimate - half, estimate + half, confidence, 1, False, 0,
        how="1 seed each, unpaired, from the harness's standard errors",
    )  # fmt: skip


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sem NaN for one value)."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return (vals[0] if vals else math.nan), math.nan
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals))


def pooled_sd(groups: Sequence[Sequence[float]]) -> float | None:
    """The pooled standard deviation of several groups' values (each group one configuration's
    seeds): the seed noise of a single run. None without a group of two or more."""
    num = sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) >= 2)
    den = sum(len(g) - 1 for g in groups if len(g) >= 2)
    return math.sqrt(num / den) if den else None


def expected_best(values: Sequence[float], minimize: bool = True) -> list[tuple[float, float]]:
    """Expected best value (and its standard deviation) of k trials drawn from these, for
    k = 1..n: the expected-maximum estimator of Dodge et al. (EMNLP 2019, "Show your work"),
    which reads the observed trials as samples of what one more trial would give.

    With v sorted from worst to best, P(best of k = v_i) = (i/n)^k - ((i-1)/n)^k."""
    v = np.array(sorted(values, reverse=minimize), dtype=float)  # worst first
    n = len(v)
    if n == 0:
        return []
    i = np.arange(1, n + 1)
    out = []
    for k in range(1, n + 1):
        p = (i / n) ** k - ((i - 1) / n) ** k
        mean = float(p @ v)
        out.append((mean, math.sqrt(max(float(p @ (v - mean) ** 2), 0.0))))
    return out
