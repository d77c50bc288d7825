"""The search report: markdown and PNG plots, every number computed from the search's runs.

It replaces a hand-written report whose numbers were invented: here each figure comes from the
trial records (which mirror the MLflow runs) and each insight states the numbers behind it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from pipeline import names
from pipeline.config import PipelineConfig
from pipeline.results import (
    ABANDONED,
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    KILLED,
    SearchState,
    TrialRecord,
)

PLOTS = {
    "trace": "optimization_trace.png",
    "curves": "eval_loss_curves.png",
    "slices": "parameter_slices.png",
    "pareto": "pareto_front.png",
}


@dataclass
class ReportContext:
    config: PipelineConfig
    state: SearchState
    best: TrialRecord | None
    analysis: dict[str, Any] = field(default_factory=dict)
    promotion: Any = None  # registry.Promotion
    provenance: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""


# ---------------------------------------------------------------------------------------------
# Numbers


def steps_saved_pct(state: SearchState) -> float:
    """Training steps early stopping did not spend, as a share of the steps planned."""
    trials = [t for t in state.trials if t.status in (COMPLETED, EARLY_STOPPED) and t.max_steps]
    planned = sum(t.max_steps for t in trials)
    saved = sum(t.max_steps - t.steps for t in trials if t.status == EARLY_STOPPED)
    return 100.0 * saved / planned if planned else 0.0


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _pct(new: float, old: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "n/a"


def _spearman(xs: list[float], ys: list[float]) -> float | None:
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


def parameter_effects(ctx: ReportContext) -> list[str]:
    """One insight per searched parameter, each with the numbers behind it.

    Only completed trials count here: an early-stopped trial's loss is from fewer steps."""
    scored = [t for t in ctx.state.scored() if t.status == COMPLETED]
    if len(scored) < 2:
        return [f"- Too few completed trials ({len(scored)}) for per-parameter insights."]
    lines = [f"Over the {len(scored)} completed trials (early-stopped ones trained for fewer steps):", ""]
    top = sorted(scored, key=lambda t: t.eval_loss)[:5]
    for name, spec in ctx.config.search.parameters.items():
        if spec.type == "fixed":
            continue
        values = [t.parameters.get(name) for t in scored]
        if spec.type == "choice":
            groups: dict[Any, list[float]] = {}
            for t in scored:
                groups.setdefault(t.parameters.get(name), []).append(t.eval_loss)
            parts = [
                f"{_fmt(v)}: mean {statistics.fmean(ls):.4f}, best {min(ls):.4f} (n={len(ls)})"
                for v, ls in sorted(groups.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
            ]
            best_value = min(groups, key=lambda v: statistics.fmean(groups[v])) if groups else None
            lines.append(
                f"- **{name}**: eval_loss by value: {'; '.join(parts)}."
                + (f" Lowest mean at {_fmt(best_value)}." if len(groups) > 1 else "")
            )
        else:
            xs = [float(v) for v in values]
            rho = _spearman(
                [math.log(x) if spec.log and x > 0 else x for x in xs], [t.eval_loss for t in scored]
            )
            top_vals = [float(t.parameters[name]) for t in top]
            text = (
                f"- **{name}**: the top {len(top)} trials span {_fmt(min(top_vals))} to {_fmt(max(top_vals))}"
                if top
                else f"- **{name}**:"
            )
            if rho is not None:
                direction = "lower" if rho > 0 else "higher"
                text += f"; rank correlation with eval_loss {rho:+.2f} ({direction} values did better)"
            lines.append(text + ".")
    params = ctx.config.search.parameters
    if "lora.r" in params and ("lora.alpha" in params or "lora.alpha_ratio" in params) and top:
        ratios = [
            float(t.parameters.get("lora.alpha", 0) or 0) / float(t.parameters["lora.r"])
            if "lora.alpha" in t.parameters
            else float(t.parameters["lora.alpha_ratio"])
            for t in top
        ]
        all_ratios = [
            float(t.parameters["lora.alpha"]) / float(t.parameters["lora.r"])
            if "lora.alpha" in t.parameters
            else float(t.parameters["lora.alpha_ratio"])
            for t in scored
        ]
        lines.append(
            f"- **rank:alpha**: alpha/r of the top {len(top)} trials: {', '.join(f'{r:g}' for r in ratios)} "
            f"(median {statistics.median(ratios):g}; over all scored trials the median is {statistics.median(all_ratios):g})."
        )
    return lines


def recommendations(ctx: ReportContext) -> list[str]:
    """What to do next, derived from the numbers above."""
    recs = []
    best, base = ctx.best, ctx.state.baseline
    if best is not None:
        recs.append(
            f"Retrain the best configuration (trial {best.index}, run `{best.run_id}`) for longer: "
            f"`mlflow run . -e retrain --env-manager local -P best_config={ctx.config.search.output_dir}/"
            f"{ctx.state.parent_run_id}/{names.BEST_CONFIG_FILE}`."
        )
        if base is not None and best.eval_loss >= base.eval_loss * 0.99:
            recs.append(
                f"The best trial ({best.eval_loss:.4f}) is within 1% of the baseline ({base.eval_loss:.4f}): the "
                "search space may not hold a better region, or trials are too short to tell configs apart."
            )
        for name, spec in ctx.config.search.parameters.items():
            value = best.parameters.get(name)
            if spec.type == "range":
                low, high = spec.bounds
                span = (math.log(high) - math.log(low)) if spec.log else (high - low)
                pos = (math.log(value) - math.log(low)) / span if spec.log else (value - low) / span
                if pos <= 0.05:
                    recs.append(
                        f"Widen `{name}` below {_fmt(low)}: the best value {_fmt(value)} sits at the lower bound."
                    )
                elif pos >= 0.95:
                    recs.append(
                        f"Widen `{name}` above {_fmt(high)}: the best value {_fmt(value)} sits at the upper bound."
                    )
            elif (
                spec.type == "choice"
                and spec.ordered is not False
                and len(spec.values) > 2
                and value in (spec.values[0], spec.values[-1])
            ):
                recs.append(
                    f"Try `{name}` beyond {_fmt(value)}: the best trial uses the end of the list {spec.values}."
                )
    bad = [t for t in ctx.state.trials if t.status in (FAILED, ABANDONED)]
    if bad:
        recs.append(
            f"{len(bad)} trial(s) failed or were abandoned; reasons are in the trial table and on each run (`trial.failure_reason`)."
        )
    saved = steps_saved_pct(ctx.state)
    if saved > 0:
        recs.append(
            f"Early stopping saved {saved:.0f}% of the planned training steps; keep it on for longer searches."
        )
    elif (
        any(t.status == EARLY_STOPPED for t in ctx.state.trials) is False
        and ctx.config.search.early_stopping.enabled is not False
    ):
        recs.append(
            "No trial was stopped early: set `train.eval_steps` so trials evaluate at least 3 times to let early stopping act."
        )
    return recs


# ---------------------------------------------------------------------------------------------
# Plots


def _save(fig: Any, path: Path) -> None:
    """Every report plot: laid out, written at one resolution, and closed (no figure leaks)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_trace(ctx: ReportContext, path: Path) -> None:
    trials = [t for t in ctx.state.trials if t.status != KILLED]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {
        "Sobol": "tab:blue",
        "BoTorch": "tab:orange",
        "CenterOfSearchSpace": "tab:green",
        "retry": "tab:gray",
    }
    for i, t in enumerate(trials, 1):
        if t.scored:
            ax.scatter(
                i,
                t.eval_loss,
                color=colors.get(t.generation_method, "tab:purple"),
                marker="o" if t.status == COMPLETED else "v",
                s=40,
                zorder=3,
            )
        else:
            ax.axvline(i, color="tab:red", alpha=0.3, lw=6)
    bsf = best_so_far(trials)
    ax.step(
        range(1, len(trials) + 1),
        [b if b is not None else math.nan for b in bsf],
        where="post",
        color="black",
        label="best so far",
    )
    if ctx.state.baseline:
        ax.axhline(
            ctx.state.baseline.eval_loss,
            color="tab:red",
            ls="--",
            label=f"baseline {ctx.state.baseline.eval_loss:.4f}",
        )
    for method, color in colors.items():
        if any(t.generation_method == method for t in trials):
            ax.scatter([], [], color=color, label=method)
    if any(t.status == EARLY_STOPPED for t in trials):
        ax.scatter([], [], color="gray", marker="v", label="early-stopped")
    if any(not t.scored for t in trials):
        ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="failed / abandoned")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("eval_loss")
    ax.set_title("Optimization trace")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_curves(ctx: ReportContext, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    trials = [t for t in ctx.state.trials if t.evals]
    for i, t in enumerate(trials):
        steps, losses = zip(*t.evals, strict=True)
        stopped = t.status == EARLY_STOPPED
        ax.plot(
            steps,
            losses,
            color=cmap(i / max(1, len(trials) - 1)),
            ls="--" if stopped else "-",
            alpha=0.8,
            lw=1.2,
        )
        if stopped:
            ax.scatter(steps[-1], losses[-1], marker="x", color="tab:red", zorder=3)
    if ctx.state.baseline and ctx.state.baseline.evals:
        steps, losses = zip(*ctx.state.baseline.evals, strict=True)
        ax.plot(steps, losses, color="black", lw=2.2, label="baseline")
    ax.plot([], [], color="gray", label="trial")
    ax.plot([], [], color="gray", ls="--", label="early-stopped (x: stop)")
    ax.set_xlabel("training step")
    ax.set_ylabel("eval_loss")
    ax.set_title("Eval loss of every trial")
    ax.legend(fontsize=8)
    _save(fig, path)


def important_parameters(ctx: ReportContext, k: int = 2) -> list[str]:
    """The k parameters that matter most: Ax sensitivity when available, else rank correlation."""
    varied = [n for n, s in ctx.config.search.parameters.items() if s.type != "fixed"]
    sens = ctx.analysis.get("sensitivity") or {}
    if sens:
        return sorted((n for n in varied if n in sens), key=lambda n: -abs(sens[n]))[:k]
    scored = ctx.state.scored()

    def strength(name: str) -> float:
        try:
            xs = [float(t.parameters[name]) for t in scored]
        except (TypeError, ValueError):
            return 0.0
        rho = _spearman(xs, [t.eval_loss for t in scored])
        return abs(rho) if rho is not None else 0.0

    return sorted(varied, key=lambda n: -strength(n))[:k]


def _plot_slices(ctx: ReportContext, path: Path, params: list[str]) -> None:
    scored = ctx.state.scored()
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.8), squeeze=False)
    for ax, name in zip(axes[0], params, strict=True):
        spec = ctx.config.search.parameters[name]
        xs = [t.parameters[name] for t in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            cats = sorted({str(x) for x in xs})
            xs = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        colors = ["tab:orange" if t.status == EARLY_STOPPED else "tab:blue" for t in scored]
        ax.scatter(xs, [t.eval_loss for t in scored], c=colors, s=36)
        if ctx.best is not None and name in ctx.best.parameters and numeric:
            ax.scatter(
                [ctx.best.parameters[name]],
                [ctx.best.eval_loss],
                marker="*",
                s=220,
                color="gold",
                edgecolor="black",
                zorder=3,
            )
        if ctx.state.baseline:
            ax.axhline(ctx.state.baseline.eval_loss, color="tab:red", ls="--", lw=1)
        if (spec.type == "range" and spec.log) or (
            spec.type == "choice" and numeric and len(set(xs)) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8
        ):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if spec.type == "choice" and numeric:
            ax.set_xticks(spec.values, [_fmt(v) for v in spec.values])
        ax.set_xlabel(name)
        ax.set_ylabel("eval_loss")
    fig.suptitle(
        "eval_loss against the most important parameters (star: best, orange: early-stopped, dashed: baseline)",
        fontsize=9,
    )
    _save(fig, path)


def _plot_pareto(ctx: ReportContext, path: Path) -> None:
    objectives = ctx.config.search.objectives
    a, b = objectives[0].metric, objectives[1].metric
    scored = [t for t in ctx.state.scored() if a in t.metrics and b in t.metrics]
    front = {p["index"] for p in ctx.analysis.get("pareto", [])}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(
        [t.metrics[a] for t in scored if t.index not in front],
        [t.metrics[b] for t in scored if t.index not in front],
        color="tab:gray",
        label="dominated",
    )
    pts = sorted((t.metrics[a], t.metrics[b]) for t in scored if t.index in front)
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-", color="tab:orange", label="Pareto frontier")
    ax.set_xlabel(f"{a} ({'min' if objectives[0].minimize else 'max'})")
    ax.set_ylabel(f"{b} ({'min' if objectives[1].minimize else 'max'})")
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Markdown


def _trial_table(ctx: ReportContext, trials: list[TrialRecord], base_loss: float | None) -> list[str]:
    keys = [k for k, s in ctx.config.search.parameters.items() if s.type != "fixed"]
    head = ["Trial", *keys, "eval_loss", "vs baseline", "status", "method", "run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        loss = f"{t.eval_loss:.4f}" if t.eval_loss is not None else "-"
        change = _pct(t.eval_loss, base_loss) if (t.eval_loss is not None and base_loss) else "-"
        rows.append(
            "| "
            + " | ".join(
                [
                    str(t.index),
                    *(_fmt(t.parameters.get(k)) for k in keys),
                    loss,
                    change,
                    t.status,
                    t.generation_method,
                    f"`{t.run_id}`" if t.run_id else "-",
                ]
            )
            + " |"
        )
    return rows


def description(ctx: ReportContext) -> str:
    """One paragraph for the parent run's description in the MLflow UI."""
    s, best, base = ctx.state, ctx.best, ctx.state.baseline
    n = len(s.finished())
    text = f"Ax search of {n} trials over {', '.join(ctx.config.search.parameters)}."
    if best is not None:
        label = best.run_name or f"trial {best.index}"
        link = f"#/experiments/{ctx.experiment_id}/runs/{best.run_id}"
        text += f" Best: [{label}]({link}), eval_loss {best.eval_loss:.4f}"
        if base is not None:
            gain = (base.eval_loss - best.eval_loss) / base.eval_loss * 100
            change = f"a {gain:.1f}% improvement on" if gain >= 0 else f"{-gain:.1f}% worse than"
            text += f", {change} the baseline ({base.eval_loss:.4f})"
        text += "."
    if ctx.promotion is not None:
        text += f" Registry: {ctx.promotion.message}."
    return text + f" Report: artifacts {names.REPORT_DIR}/{names.REPORT_FILE}."


def write_report(ctx: ReportContext, out_dir: Path) -> str:
    """Write search_report.md and the plots into out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s, best, base = ctx.state, ctx.best, ctx.state.baseline
    base_loss = base.eval_loss if base else None
    trials = [t for t in s.trials if t.status != KILLED]
    scored = sorted(s.scored(), key=lambda t: t.eval_loss)
    counts = {
        k: sum(t.status == k for t in s.trials) for k in (COMPLETED, EARLY_STOPPED, FAILED, ABANDONED, KILLED)
    }
    compute = sum(t.wall_seconds for t in s.trials)
    model = ctx.config.model.name_or_path + (
        f" ({ctx.config.model.gguf_file})" if ctx.config.model.gguf_file else ""
    )

    _plot_trace(ctx, out_dir / PLOTS["trace"])
    _plot_curves(ctx, out_dir / PLOTS["curves"])
    important = important_parameters(ctx)
    if important and scored:
        _plot_slices(ctx, out_dir / PLOTS["slices"], important)
    multi = len(ctx.config.search.objectives) > 1
    if multi:
        _plot_pareto(ctx, out_dir / PLOTS["pareto"])

    md = [
        f"# LoRA search report: {model}",
        "",
        f"Every number here comes from the MLflow runs of search run `{s.parent_run_id}` and its "
        f"{len(s.trials) + (1 if base and not base.reused else 0)} child runs; nothing is simulated.",
        "",
        "## Goal",
        "",
        f"Find hyperparameters that beat the baseline eval loss of **{base_loss:.4f}** (run `{base.run_id}`"
        + (", reused from an earlier run with the same config)" if base.reused else ")")
        + f", minimizing `{ctx.config.search.objectives[0].metric}`."
        if base
        else "Find the best hyperparameters.",
        "",
        "## Results summary",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| **Baseline eval_loss** | {base_loss:.4f} |"
        if base_loss is not None
        else "| Baseline | not run |",
        f"| **Best eval_loss** | {best.eval_loss:.4f} (trial {best.index}) |"
        if best
        else "| Best | no scored trial |",
        f"| **Improvement** | {100 * (base_loss - best.eval_loss) / base_loss:.1f}% |"
        if best and base_loss
        else "| Improvement | n/a |",
        f"| **Trials** | {len(s.finished())}: {counts[COMPLETED]} completed, {counts[EARLY_STOPPED]} early-stopped, "
        f"{counts[FAILED]} failed, {counts[ABANDONED]} abandoned"
        + (f" ({counts[KILLED]} interrupted and rerun)" if counts[KILLED] else "")
        + " |",
        f"| **Wall time** | {s.wall_seconds / 60:.1f} min over {s.sessions} session(s) |",
        f"| **Compute time in trials** | {compute / 60:.1f} min |",
        f"| **Early stopping** | saved {steps_saved_pct(s):.1f}% of planned training steps |",
    ]
    if s.stop_reason:
        md.append(f"| **Stopped** | {s.stop_reason} |")
    md.append("")

    if best is not None:
        md += ["## Best configuration", "", "```yaml", f"model: {model}"]
        md += [f"{k}: {_fmt(v)}" for k, v in best.parameters.items()]
        md += [
            "```",
            "",
            f"Run `{best.run_id}`; the complete config is `{names.BEST_CONFIG_FILE}` on the search run.",
            "",
        ]
        md += ["### Comparison with baseline", "", "| | Baseline | Best | Change |", "|---|---|---|---|"]
        for k, v in best.parameters.items():
            old = base.parameters.get(k) if base else None
            change = (
                _pct(float(v), float(old))
                if isinstance(v, (int, float))
                and isinstance(old, (int, float))
                and not isinstance(v, bool)
                and old
                else ("same" if old == v else "")
            )
            md.append(f"| {k} | {_fmt(old)} | {_fmt(v)} | {change} |")
        for metric in (
            names.EVAL_LOSS,
            names.EVAL_PERPLEXITY,
            "eval_rougeL",
            names.PEAK_RSS_GB,
            names.PEAK_GPU_MEM_GB,
            names.TRAIN_TOKENS_PER_SECOND,
        ):
            if metric in best.metrics and base and metric in base.metrics:
                b, n = base.metrics[metric], best.metrics[metric]
                md.append(f"| **{metric}** | {b:.4g} | {n:.4g} | {_pct(n, b)} |")
        md.append("")

    md += ["## Insights (computed from the trials)", ""]
    sens = ctx.analysis.get("sensitivity") or {}
    if sens:
        md += [
            "**Sensitivity** (Ax, total Sobol index of the GP model of eval_loss; sign: direction of the effect):",
            "",
        ]
        md += ["| Parameter | Sensitivity |", "|---|---|"]
        md += [f"| {k} | {v:+.3f} |" for k, v in sorted(sens.items(), key=lambda kv: -abs(kv[1]))]
        md.append("")
    md += [*(f"- {n}" for n in ctx.analysis.get("notes", [])), *parameter_effects(ctx), ""]

    md += ["## Trial history", "", f"Top {min(5, len(scored))} trials:", ""]
    md += _trial_table(ctx, scored[:5], base_loss)
    worst = scored[-3:][::-1] if len(scored) > 5 else []
    if worst:
        md += ["", "Worst 3 trials:", "", *_trial_table(ctx, worst, base_loss)]
    unscored = [t for t in s.trials if not t.scored]
    if unscored:
        md += ["", "Trials without a score:", "", "| Trial | status | reason | run |", "|---|---|---|---|"]
        md += [
            f"| {t.index} | {t.status} | {t.failure_reason or '-'} | `{t.run_id or '-'}` |" for t in unscored
        ]
    md.append("")

    md += ["## Convergence", ""]
    bsf = best_so_far(trials)
    if any(b is not None for b in bsf):
        md.append(
            "Best eval_loss of the completed trials so far, by trial: "
            + ", ".join(f"{i}: {b:.4f}" if b is not None else f"{i}: -" for i, b in enumerate(bsf, 1))
            + "."
        )
        if best is not None:
            md.append(f"The best trial was trial number {trials.index(best) + 1} of {len(trials)}.")
    methods: dict[str, list[float]] = {}
    for t in trials:
        if t.scored:
            methods.setdefault(t.generation_method, []).append(t.eval_loss)
    if methods:
        md += ["", "| Generated by | Trials | Best | Mean |", "|---|---|---|---|"]
        md += [f"| {m} | {len(v)} | {min(v):.4f} | {statistics.fmean(v):.4f} |" for m, v in methods.items()]
    md.append("")

    if multi:
        md += ["## Pareto frontier", ""]
        pareto = ctx.analysis.get("pareto", [])
        if pareto:
            mnames = [o.metric for o in ctx.config.search.objectives]
            md += [
                "| Trial | " + " | ".join(mnames) + " | parameters |",
                "|---|" + "---|" * (len(mnames) + 1),
            ]
            for p in pareto:
                md.append(
                    f"| {p['index']} | "
                    + " | ".join(f"{p['metrics'].get(m, math.nan):.4g}" for m in mnames)
                    + " | "
                    + ", ".join(f"{k}={_fmt(v)}" for k, v in p["parameters"].items())
                    + " |"
                )
        else:
            md.append("No Pareto frontier could be computed (see the notes above).")
        md.append("")

    md += ["## Recommendations", "", *(f"{i}. {r}" for i, r in enumerate(recommendations(ctx), 1)), ""]
    if ctx.promotion is not None:
        md += ["## Registry", "", ctx.promotion.message + ".", ""]

    md += [
        "## Plots",
        "",
        f"![Optimization trace]({PLOTS['trace']})",
        "",
        f"![Eval loss curves]({PLOTS['curves']})",
        "",
    ]
    if important and scored:
        md += [f"![Slices of {', '.join(important)}]({PLOTS['slices']})", ""]
    if multi:
        md += [f"![Pareto front]({PLOTS['pareto']})", ""]

    md += ["## Provenance", "", "| Trial | Run | Status |", "|---|---|---|"]
    if base:
        md.append(f"| baseline | `{base.run_id}` | {'reused' if base.reused else 'trained in this search'} |")
    md += [f"| {t.index} | `{t.run_id or '-'}` | {t.status} |" for t in s.trials]
    md += ["", "| | |", "|---|---|", f"| search run | `{s.parent_run_id}` |"]
    md += [f"| {k} | {v} |" for k, v in ctx.provenance.items()]
    md.append("")

    text = "\n".join(md)
    (out_dir / names.REPORT_FILE).write_text(text)
    return text


# ---------------------------------------------------------------------------------------------
# The retrain report


@dataclass
class RetrainContext:
    config: PipelineConfig
    source: str
    rows: list[tuple[str, str | None, dict[str, float], str | None]]  # (label, run id, metrics, eval fp)
    evals: list[tuple[int, float]]
    steps_per_epoch: int
    promotion: Any = None
    best_step: int | None = None


def write_retrain_report(ctx: RetrainContext, out_dir: Path) -> Path:
    """retrain_report.md and retrain_eval_loss.png: baseline vs search best vs retrained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = [
        k
        for k in ctx.rows[-1][2]
        if k.startswith("eval_") and k not in (names.EVAL_LOSS, names.EVAL_PERPLEXITY)
    ]
    gen = generated[0] if generated else "generation metric"
    mine = ctx.rows[-1][3]
    md = [
        "# Retrain report",
        "",
        f"The best configuration of {ctx.source}, trained for "
        + (
            f"{ctx.config.train.max_steps} steps "
            if ctx.config.train.max_steps > 0
            else f"{ctx.config.train.epochs:g} epoch(s) "
        )
        + f"({ctx.config.train.scheduler} schedule, evaluated every {ctx.config.train.eval_steps} steps, "
        f"early stopping after {ctx.config.train.early_stopping_patience} evaluations without improvement, "
        "best evaluation restored). Every number is read from the runs named here.",
        "",
        f"| | run | eval_loss | eval_perplexity | {gen} | same eval data |",
        "|---|---|---|---|---|---|",
    ]
    for label, run_id, metrics, fp in ctx.rows:
        if run_id is None:
            md.append(f"| {label} | not available | | | | |")
            continue
        loss = metrics.get(names.EVAL_LOSS)
        same = "yes" if fp == mine else f"no (fingerprint {fp})"
        md.append(
            f"| {label} | `{run_id}` | {loss:.4f} | {metrics.get(names.EVAL_PERPLEXITY, math.nan):.3f} | "
            f"{metrics.get(gen, math.nan):.4f} | {same} |"
        )
    base = next((m for label, r, m, _ in ctx.rows if label == "baseline" and r), None)
    best = next((m for label, r, m, _ in ctx.rows if label == "search best" and r), None)
    final = ctx.rows[-1][2]
    md.append("")
    if best and names.EVAL_LOSS in best:
        md.append(
            f"Retrained vs search best: eval_loss {_pct(final[names.EVAL_LOSS], best[names.EVAL_LOSS])}."
        )
    if base and names.EVAL_LOSS in base:
        md.append(f"Retrained vs baseline: eval_loss {_pct(final[names.EVAL_LOSS], base[names.EVAL_LOSS])}.")
    if ctx.best_step is not None:
        md.append(
            f"The best evaluation was at step {ctx.best_step} (epoch {ctx.best_step / ctx.steps_per_epoch:.2f}); "
            "its adapter weights are the ones registered."
        )
    if ctx.promotion is not None:
        md += ["", "## Registry", "", ctx.promotion.message + "."]
    md += ["", "## Eval loss over epochs", "", "![Eval loss over epochs](retrain_eval_loss.png)", ""]
    (out_dir / names.RETRAIN_REPORT_FILE).write_text("\n".join(md))

    fig, ax = plt.subplots(figsize=(7, 4))
    if ctx.evals:
        steps, losses = zip(*ctx.evals, strict=True)
        ax.plot([s / ctx.steps_per_epoch for s in steps], losses, "o-", label="retrain")
    if ctx.best_step is not None:
        best_loss = dict(ctx.evals).get(ctx.best_step)
        if best_loss is not None:
            ax.scatter(
                [ctx.best_step / ctx.steps_per_epoch],
                [best_loss],
                marker="*",
                s=220,
                color="gold",
                edgecolor="black",
                zorder=3,
                label="best (restored)",
            )
    for (label, run_id, metrics, _), style in zip(ctx.rows[:2], ("--", ":"), strict=True):
        if run_id and names.EVAL_LOSS in metrics:
            ax.axhline(
                metrics[names.EVAL_LOSS],
                ls=style,
                color="tab:red" if label == "baseline" else "tab:green",
                label=f"{label} {metrics[names.EVAL_LOSS]:.4f}",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval_loss")
    ax.set_title("Retrain: eval loss over epochs")
    ax.legend(fontsize=8)
    _save(fig, out_dir / "retrain_eval_loss.png")
    return out_dir / names.RETRAIN_REPORT_FILE
