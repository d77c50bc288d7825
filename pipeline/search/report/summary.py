"""What a search found, from its trial records (pure functions, no MLflow, no Ax): the best
trial (feasible, completed, on the Pareto frontier when there is one), the search run's summary
metrics, best-so-far, per-parameter effects, recommendations. The report renders these."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from pipeline.config import PipelineConfig, SearchConfig
from pipeline.core import names
from pipeline.core.console import run_name
from pipeline.core.stats import Interval
from pipeline.search.records import (
    ABANDONED,
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    KILLED,
    SearchState,
    TrialRecord,
    feasible,
)
from pipeline.search.stopping import stopping_plan, unreachable


def best_trial(state: SearchState, search: SearchConfig, pareto: Iterable[int] = ()) -> TrialRecord | None:
    """Best scored trial by the first objective, among completed trials that meet the outcome
    constraints (and, with several objectives, among those on the Pareto frontier)."""
    objective = search.objectives[0]
    candidates = state.contenders(search)
    pareto = set(pareto)
    if pareto:
        candidates = [t for t in candidates if t.index in pareto] or candidates
    if not candidates:
        return None
    sign = 1 if objective.minimize else -1
    return min(candidates, key=lambda t: sign * t.metrics[objective.metric])


def pareto_front(state: SearchState, search: SearchConfig) -> list[TrialRecord]:
    """Completed, feasible trials that no other such trial beats on every objective, by their
    observed final values, best first objective first.

    Computed from the records rather than asked of Ax: Ax's observed frontier goes through its
    modelling transforms (each objective winsorized when no thresholds are set), and on a
    five-trial search it listed a trial that another trial beat on both objectives.
    """
    objectives = search.objectives
    signs = [1 if o.minimize else -1 for o in objectives]

    def values(t: TrialRecord) -> list[float]:
        return [s * float(t.metrics[o.metric]) for s, o in zip(signs, objectives, strict=True)]

    candidates = [
        t
        for t in state.scored()
        if t.status == COMPLETED
        and all(math.isfinite(float(t.metrics.get(o.metric, math.nan))) for o in objectives)
        and feasible(t, search.outcome_constraints)
    ]
    points = {t.index: values(t) for t in candidates}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    front = [
        t for t in candidates if not any(dominates(points[o.index], points[t.index]) for o in candidates)
    ]
    return sorted(front, key=lambda t: points[t.index])


def counts(state: SearchState) -> dict[str, int]:
    """Trials by status."""
    return {
        k: sum(t.status == k for t in state.trials)
        for k in (COMPLETED, EARLY_STOPPED, FAILED, ABANDONED, KILLED)
    }


def improvement_pct(baseline: float, best: float) -> float:
    """How much lower the best loss is than the baseline's, in percent of the baseline."""
    return 100.0 * (baseline - best) / baseline


def search_metrics(
    state: SearchState, best: TrialRecord | None, interval: Interval | None = None
) -> dict[str, float]:
    """The search run's summary metrics. `interval`: the recommendation's improvement on the
    baseline with its confidence interval (evidence.gather); then improvement_pct is its estimate
    and the single-run value is logged beside it."""
    n = counts(state)
    out = {
        names.TRIALS_COMPLETED: n[COMPLETED],
        names.TRIALS_EARLY_STOPPED: n[EARLY_STOPPED],
        names.TRIALS_FAILED: n[FAILED],
        names.TRIALS_ABANDONED: n[ABANDONED],
        names.SEARCH_WALL_S: state.wall_seconds,
        names.STEPS_SAVED_PCT: steps_saved_pct(state),
    }
    if best is not None:
        out[names.BEST_EVAL_LOSS] = best.eval_loss
        if state.baseline and state.baseline.eval_loss:
            out[names.IMPROVEMENT_PCT] = improvement_pct(state.baseline.eval_loss, best.eval_loss)
            out[names.IMPROVEMENT_SINGLE_RUN_PCT] = out[names.IMPROVEMENT_PCT]
    if interval is not None:
        out[names.IMPROVEMENT_PCT] = interval.estimate
        out[names.IMPROVEMENT_CI_LOW] = interval.low
        out[names.IMPROVEMENT_CI_HIGH] = interval.high
    out[names.REPLICATE_RUNS] = sum(r.status == COMPLETED for r in state.replicates or [])
    return out


def steps_saved_pct(state: SearchState) -> float:
    """Training steps early stopping did not spend, as a share of the steps planned (a trial a
    spent budget stopped saved nothing: the search ended there)."""
    trials = [t for t in state.trials if t.status in (COMPLETED, EARLY_STOPPED) and t.max_steps]
    planned = sum(t.max_steps for t in trials)
    saved = sum(
        t.max_steps - t.steps for t in trials if t.status == EARLY_STOPPED and t.stopped_by != "budget"
    )
    return 100.0 * saved / planned if planned else 0.0


def fmt(value: Any) -> str:
    """A parameter or metric value as the report prints it."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def pct(new: float, old: float) -> str:
    """The relative change from `old` to `new`, e.g. `-14.0%`."""
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "n/a"


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def best_so_far(trials: list[TrialRecord]) -> list[float | None]:
    """Best eval_loss of the completed trials up to each trial (early-stopped ones never count)."""
    out, best = [], None
    for t in trials:
        if t.scored and t.status == COMPLETED and (best is None or t.eval_loss < best):
            best = t.eval_loss
        out.append(best)
    return out


MIN_PER_VALUE = 3  # completed trials a choice value needs before its mean is compared


def parameter_effects(search: SearchConfig, state: SearchState) -> list[str]:
    """One insight per searched parameter, each with the numbers behind it.

    Only completed trials count here: an early-stopped trial's loss is from fewer steps."""
    scored = [t for t in state.scored() if t.status == COMPLETED]
    if len(scored) < 2:
        return [f"- Too few completed trials ({len(scored)}) for per-parameter insights."]
    lines = [f"Over the {len(scored)} completed trials (early-stopped ones trained for fewer steps):", ""]
    top = sorted(scored, key=lambda t: t.eval_loss)[:5]
    parents = search.parents()
    for name, spec in search.parameters.items():
        # A conditional parameter is compared only among the trials where it exists.
        having = [t for t in scored if name in t.parameters]
        if spec.type == "choice":
            line = _choice_effect(name, having)
        elif spec.type != "fixed":
            line = _range_effect(name, spec.log, having, [t for t in top if name in t.parameters])
        else:
            continue
        if name in parents:
            line += f" Conditional: only when {parents[name][0]} = {fmt(parents[name][1])} ({len(having)} of {len(scored)} trials)."
        lines.append(line)
    params = search.parameters
    if "lora.r" in params and ("lora.alpha" in params or "lora.alpha_ratio" in params) and top:
        ratios, all_ratios = _alpha_ratios(top), _alpha_ratios(scored)
        lines.append(
            f"- **rank:alpha**: alpha/r of the top {len(top)} trials: {', '.join(f'{r:g}' for r in ratios)} "
            f"(median {statistics.median(ratios):g}; over all scored trials the median is {statistics.median(all_ratios):g})."
        )
    return lines


def _choice_effect(name: str, scored: list[TrialRecord]) -> str:
    """Mean and best eval_loss per value of a choice parameter (values with too few trials say so)."""
    groups: dict[Any, list[float]] = {}
    for t in scored:
        groups.setdefault(t.parameters.get(name), []).append(t.eval_loss)
    parts = [
        f"{fmt(v)}: mean {statistics.fmean(ls):.4f}, best {min(ls):.4f} (n={len(ls)})"
        if len(ls) >= MIN_PER_VALUE
        else f"{fmt(v)}: insufficient data (n={len(ls)})"
        for v, ls in sorted(groups.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
    ]
    # A mean of one or two noisy runs says little: only values with enough trials rank.
    enough = {v: ls for v, ls in groups.items() if len(ls) >= MIN_PER_VALUE}
    best_value = min(enough, key=lambda v: statistics.fmean(enough[v])) if enough else None
    return f"- **{name}**: eval_loss by value: {'; '.join(parts)}." + (
        f" Lowest mean at {fmt(best_value)}." if len(enough) > 1 else ""
    )


def _range_effect(name: str, log: bool, scored: list[TrialRecord], top: list[TrialRecord]) -> str:
    """Where the top trials' values lie, and the rank correlation of the value with eval_loss."""
    xs = [float(t.parameters[name]) for t in scored]
    rho = spearman([math.log(x) if log and x > 0 else x for x in xs], [t.eval_loss for t in scored])
    top_vals = [float(t.parameters[name]) for t in top]
    text = (
        f"- **{name}**: the top {len(top)} trials span {fmt(min(top_vals))} to {fmt(max(top_vals))}"
        if top
        else f"- **{name}**:"
    )
    if rho is not None:
        direction = "lower" if rho > 0 else "higher"
        text += f"; rank correlation with eval_loss {rho:+.2f} ({direction} values did better)"
    return text + "."


def _alpha_ratios(trials: list[TrialRecord]) -> list[float]:
    """alpha / r of each trial (its alpha_ratio where the search sets alpha that way)."""
    return [
        float(t.parameters.get("lora.alpha", 0) or 0) / float(t.parameters["lora.r"])
        if "lora.alpha" in t.parameters
        else float(t.parameters["lora.alpha_ratio"])
        for t in trials
    ]


def recommendations(
    config: PipelineConfig, state: SearchState, best: TrialRecord | None, stopping: str | None = None
) -> list[str]:
    """What to do next, derived from the numbers above. `stopping`: why early stopping was off or
    could not act in this search (None when it could), for the line on early stopping."""
    search = config.search
    recs = []
    base = state.baseline
    if best is not None:
        recs.append(
            f"Retrain the best configuration (trial {best.index}, run `{best.run_id}`) for longer: "
            f"`mlflow run . -e retrain --env-manager local -P best_config={search.output_dir}/"
            f"{state.parent_run_id}/{names.BEST_CONFIG_FILE}`."
        )
        if base is not None and best.eval_loss >= base.eval_loss * 0.99:
            recs.append(
                f"The best trial ({best.eval_loss:.4f}) is within 1% of the baseline ({base.eval_loss:.4f}): the "
                "search space may not hold a better region, or trials are too short to tell configs apart."
            )
        for name, spec in search.parameters.items():
            value = best.parameters.get(name)
            if value is None:  # a conditional parameter the best trial does not have
                continue
            if spec.type == "range":
                low, high = spec.bounds
                span = (math.log(high) - math.log(low)) if spec.log else (high - low)
                pos = (math.log(value) - math.log(low)) / span if spec.log else (value - low) / span
                if pos <= 0.05:
                    recs.append(
                        f"Widen `{name}` below {fmt(low)}: the best value {fmt(value)} sits at the lower bound."
                    )
                elif pos >= 0.95:
                    recs.append(
                        f"Widen `{name}` above {fmt(high)}: the best value {fmt(value)} sits at the upper bound."
                    )
            elif (
                spec.type == "choice"
                and spec.ordered is not False
                and len(spec.values) > 2
                and value in (spec.values[0], spec.values[-1])
            ):
                recs.append(
                    f"Try `{name}` beyond {fmt(value)}: the best trial uses the end of the list {spec.values}."
                    + _data_caveat(config, name)
                )
    bad = [t for t in state.trials if t.status in (FAILED, ABANDONED)]
    if bad:
        recs.append(
            f"{len(bad)} trial(s) failed or were abandoned; reasons are in the trial table and on each run (`trial.failure_reason`)."
        )
    saved = steps_saved_pct(state)
    if saved > 0:
        recs.append(
            f"Early stopping saved {saved:.0f}% of the planned training steps; keep it on for longer searches."
        )
    elif stopping and search.early_stopping.enabled is not False:
        recs.append(f"No trial was stopped early: {stopping}.")
    return recs


def _data_caveat(config: PipelineConfig, name: str) -> str:
    """With a step budget, a larger batch (or more accumulation) also trains on more examples:
    part of what looks like the batch size's effect may be the extra data."""
    if name not in ("train.batch_size", "train.gradient_accumulation_steps") or config.train.max_steps <= 0:
        return ""
    return (
        f" With train.max_steps fixed at {config.train.max_steps}, a larger value also trains on more "
        "examples, so part of its gain may be the extra data; compare at equal examples (train.epochs) "
        "before concluding."
    )


def important_parameters(
    search: SearchConfig, state: SearchState, sensitivity: dict[str, float], k: int = 2
) -> list[str]:
    """The k parameters that matter most: Ax sensitivity when available, else rank correlation."""
    varied = [n for n, s in search.parameters.items() if s.type != "fixed"]
    sens = sensitivity
    if sens:
        return sorted((n for n in varied if n in sens), key=lambda n: -abs(sens[n]))[:k]
    scored = state.scored()

    def strength(name: str) -> float:
        having = [t for t in scored if name in t.parameters]
        try:
            xs = [float(t.parameters[name]) for t in having]
        except (TypeError, ValueError):
            return 0.0
        rho = spearman(xs, [t.eval_loss for t in having])
        return abs(rho) if rho is not None else 0.0

    return sorted(varied, key=lambda n: -strength(n))[:k]


def trial_name(number: int, params: dict[str, Any], method: str = "") -> str:
    """`trial-07 r=32 a=64 lr=1.2e-04 bs=2`: the trial's number and its key params."""
    return run_name(f"trial-{number:02d}", params) + (f" ({method})" if method == "retry" else "")


def why_no_stopping(config: PipelineConfig, state: SearchState) -> str | None:
    """Why no trial of a finished search could be stopped early, from its records: the rule was
    off, or could not act (`unreachable`, with the baseline's train-set size and whether it was in
    the space); None when it could have acted."""
    plan = stopping_plan(config)
    if not plan.enabled:
        return f"early stopping was off ({plan.why_off})"
    base = state.baseline
    if base is None or names.DATA_TRAIN_EXAMPLES not in base.metrics:
        return None
    why = unreachable(config, int(base.metrics[names.DATA_TRAIN_EXAMPLES]), bool(base.in_search_space))
    return f"early stopping could not act ({why})" if why else None
