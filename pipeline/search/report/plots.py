"""The search report's plots (PNG), drawn from the trial records."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.config import SearchConfig
from pipeline.core.events import EXAMPLES, STEPS
from pipeline.core.plotting import BASELINE_COLOR, mark_best, plt, save, ticker
from pipeline.search.records import COMPLETED, EARLY_STOPPED, KILLED, SearchState, TrialRecord
from pipeline.search.report.summary import best_so_far, fmt


def plot_trace(state: SearchState, path: Path) -> None:
    """Each trial's eval_loss in trial order, coloured by who proposed it, and the best so far."""
    trials = [t for t in state.trials if t.status != KILLED]
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
    if state.baseline:
        ax.axhline(
            state.baseline.eval_loss,
            color=BASELINE_COLOR,
            ls="--",
            label=f"baseline {state.baseline.eval_loss:.4f}",
        )
    for method, color in colors.items():
        if any(t.generation_method == method for t in trials):
            ax.scatter([], [], color=color, label=method)
    if any(t.status == EARLY_STOPPED for t in trials):
        ax.scatter([], [], color="gray", marker="v", label="early-stopped")
    if any(not t.scored for t in trials):
        ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="failed / abandoned")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("eval_loss")
    ax.set_title("Optimization trace")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_curves(state: SearchState, path: Path, unit: str = STEPS) -> None:
    """Every trial's eval_loss curve against the progression early stopping compares (`steps`
    or training `examples` seen); early-stopped ones dashed, ending in a cross."""
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    trials = [t for t in state.trials if t.evals]
    curves = [*trials, *([state.baseline] if state.baseline and state.baseline.evals else [])]
    # Records from before examples were counted hold steps only.
    in_examples = unit == EXAMPLES and all(c.examples_per_step for c in curves)

    def xs(record) -> list[int]:
        return [s * record.examples_per_step if in_examples else s for s, _ in record.evals]

    for i, t in enumerate(trials):
        losses = [loss for _, loss in t.evals]
        stopped = t.status == EARLY_STOPPED
        ax.plot(
            xs(t),
            losses,
            color=cmap(i / max(1, len(trials) - 1)),
            ls="--" if stopped else "-",
            alpha=0.8,
            lw=1.2,
        )
        if stopped:
            ax.scatter(xs(t)[-1], losses[-1], marker="x", color="tab:red", zorder=3)
    if state.baseline and state.baseline.evals:
        ax.plot(
            xs(state.baseline),
            [loss for _, loss in state.baseline.evals],
            color="black",
            lw=2.2,
            label="baseline",
        )
    ax.plot([], [], color="gray", label="trial")
    ax.plot([], [], color="gray", ls="--", label="early-stopped (x: stop)")
    ax.set_xlabel("training examples seen" if in_examples else "training step")
    ax.set_ylabel("eval_loss")
    ax.set_title("Eval loss of every trial")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_slices(
    search: SearchConfig, state: SearchState, best: TrialRecord | None, params: list[str], path: Path
) -> None:
    """eval_loss against each of `params`, the best trial starred, the baseline dashed."""
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.8), squeeze=False)
    for ax, name in zip(axes[0], params, strict=True):
        spec = search.parameters[name]
        scored = [t for t in state.scored() if name in t.parameters]  # conditional: where it exists
        xs = [t.parameters[name] for t in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            cats = sorted({str(x) for x in xs})
            xs = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        colors = ["tab:orange" if t.status == EARLY_STOPPED else "tab:blue" for t in scored]
        ax.scatter(xs, [t.eval_loss for t in scored], c=colors, s=36)
        if best is not None and name in best.parameters and numeric:
            mark_best(ax, best.parameters[name], best.eval_loss)
        if state.baseline:
            ax.axhline(state.baseline.eval_loss, color=BASELINE_COLOR, ls="--", lw=1)
        if (spec.type == "range" and spec.log) or (
            spec.type == "choice" and numeric and len(set(xs)) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8
        ):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        if spec.type == "choice" and numeric:
            ax.set_xticks(spec.values, [fmt(v) for v in spec.values])
        ax.set_xlabel(name)
        ax.set_ylabel("eval_loss")
    fig.suptitle(
        "eval_loss against the most important parameters (star: best, orange: early-stopped, dashed: baseline)",
        fontsize=9,
    )
    save(fig, path)


def plot_pareto(search: SearchConfig, state: SearchState, pareto: list[dict], path: Path) -> None:
    """The two objectives of every scored trial, the Pareto frontier joined."""
    objectives = search.objectives
    a, b = objectives[0].metric, objectives[1].metric
    scored = [t for t in state.scored() if a in t.metrics and b in t.metrics]
    front = {p["index"] for p in pareto}
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
    save(fig, path)
